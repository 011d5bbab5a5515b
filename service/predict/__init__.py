"""Prediction: the flow shared by the REST and OIP routes, and OIP tensors."""
