"""Triton kernels, installed as ``sae_widgets.kernels`` (the top-level ``kernels/`` folder is mapped there)."""
