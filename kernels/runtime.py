"""Whether the Triton kernels can run here: compiled on CUDA, or the interpreter on CPU (TRITON_INTERPRET=1)."""
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
