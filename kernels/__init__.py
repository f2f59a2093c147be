"""Triton kernels for sparse autoencoders, installed as ``sae_widgets.kernels``.

`encode_topk` (fused encoder + TopK/AbsTopK), `gather_sum` / `gather_dot` / `scatter_outer` (sparse decoder and
sparse backward), the autograd wrappers `TopKEncode` / `SparseDecode`, and `project_out_rows_` / `normalize_rows_`
(the unit-norm decoder's upkeep, one pass each). `reference.py` holds the PyTorch
definitions they are tested against. On a machine without CUDA they run only under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os


def triton_runnable(device) -> bool:
    """True when Triton kernels can run on tensors of `device`: compiled on CUDA, or the interpreter on CPU."""
    import torch

    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if torch.device(device).type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def __getattr__(name):
    from importlib import import_module

    where = {"encode_topk": "topk_encoder", "gather_sum": "sparse_ops", "gather_dot": "sparse_ops",
             "scatter_outer": "sparse_ops", "group_by_latent": "sparse_ops", "TopKEncode": "autograd",
             "LatentGrouping": "autograd", "project_out_rows_": "decoder_rows", "normalize_rows_": "decoder_rows",
             "SparseDecode": "autograd"}
    if name in where:
        return getattr(import_module(f".{where[name]}", __name__), name)
    raise AttributeError(f"module 'sae_widgets.kernels' has no attribute {name!r}")
