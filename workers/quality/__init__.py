"""Data quality: feature profiles, the profile store and the drift monitor actor."""
