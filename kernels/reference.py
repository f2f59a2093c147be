"""PyTorch references for every kernel: the definitions the Triton kernels must reproduce (and the CPU path)."""
from __future__ import annotations

import torch


def topk_select_reference(z: torch.Tensor, k: int, absolute: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the k largest z (or |z|), ties to the lower index; values ReLU'd (topk) or signed (abstopk)."""
    score = z.abs() if absolute else z
    order = torch.sort(score.float(), dim=-1, descending=True, stable=True).indices[..., :k]
    vals = z.gather(-1, order)
    return (vals if absolute else torch.relu(vals)), order


def encode_topk_reference(x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, k: int, absolute: bool):
    z = x.float() @ w_enc.float() + b_enc.float()
    return topk_select_reference(z, k, absolute)


def gather_sum_reference(values, indices, weight, bias=None):
    """out[b] = Σ_j values[b, j] · weight[indices[b, j]] (+ bias): the sparse decoder."""
    out = (values.float().unsqueeze(-1) * weight.float()[indices]).sum(-2)
    return out + bias.float() if bias is not None else out


def gather_dot_reference(grad, indices, weight):
    """out[b, j] = ⟨grad[b], weight[indices[b, j]]⟩: the gradient of the sparse decoder's values."""
    return (weight.float()[indices] * grad.float().unsqueeze(-2)).sum(-1)


def scatter_outer_reference(coef, indices, rows, n_latents):
    """out[i] = Σ_{(b, j): indices[b, j] = i} coef[b, j] · rows[b]: weight gradients for the active latents only."""
    out = torch.zeros(n_latents, rows.shape[-1], dtype=torch.float32, device=rows.device)
    b = torch.arange(indices.shape[0], device=rows.device).repeat_interleave(indices.shape[1])
    out.index_add_(0, indices.reshape(-1), coef.float().reshape(-1, 1) * rows.float()[b])
    return out


def encode_jumprelu_reference(x, w_enc, b_enc, theta, k_max: int):
    """JumpReLU latents in sparse form: the z > θ entries, largest first (ties to the lower index), at most k_max."""
    z = x.float() @ w_enc.float() + b_enc.float()
    active = z > theta.float()
    score = torch.where(active, z, torch.full_like(z, float("-inf")))
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :k_max]
    keep = active.gather(-1, order)
    return torch.where(keep, z.gather(-1, order), 0.0), torch.where(keep, order, 0), active.sum(-1)


def project_out_rows_reference(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return g - (g * w).sum(-1, keepdim=True) * w


def normalize_rows_reference(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
