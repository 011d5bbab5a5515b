"""Inference: the batching actor per model version and the model repository that owns them."""
