"""sae_widgets: train, inspect and steer sparse autoencoders on transformer_lens models."""
__version__ = "0.1.0"
