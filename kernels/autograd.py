"""autograd.Functions over the kernels: a TopK encoder and a sparse decoder whose backward passes stay sparse."""
from __future__ import annotations

import torch

from .sparse_ops import gather_dot, gather_sum, group_by_latent, scatter_outer
from .topk_encoder import encode_topk


class TopKEncode(torch.autograd.Function):
    """(x_c, W_enc, b_enc) -> values [B, k]; indices are returned too and carry no gradient.

    Backward: ∂z only at the selected latents (TopK: where the value is > 0); ∂x_c = Σ_j ∂z_j W_enc[:, idx_j],
    ∂W_enc[:, i] = Σ over the tokens that selected i of ∂z · x_c, ∂b_enc[i] likewise: no dense B × d_sae tensor.
    """

    @staticmethod
    def forward(ctx, x_c, w_enc, b_enc, k: int, absolute: bool):
        values, indices = encode_topk(x_c, w_enc, b_enc, k, absolute)
        ctx.save_for_backward(x_c, w_enc, values, indices)
        ctx.absolute = absolute
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, g_values, _g_indices):
        x_c, w_enc, values, indices = ctx.saved_tensors
        n = w_enc.shape[1]
        dz = g_values.float() if ctx.absolute else g_values.float() * (values > 0)
        grouping = group_by_latent(indices, n)
        dx = gather_sum(dz, indices, w_enc.t().contiguous(), out_dtype=x_c.dtype) if ctx.needs_input_grad[0] else None
        dw = scatter_outer(dz, indices, x_c, n, grouping).t().to(w_enc.dtype) if ctx.needs_input_grad[1] else None
        db = None
        if ctx.needs_input_grad[2]:
            db = torch.zeros(n, dtype=torch.float32, device=dz.device).index_add_(0, indices.reshape(-1).long(), dz.reshape(-1))
        return dx, dw, db, None, None


class SparseDecode(torch.autograd.Function):
    """(values, indices, W_dec, b_dec) -> x̂ = Σ_j v_j W_dec[idx_j] + b_dec, by row gather.

    Backward: ∂v = ⟨g, W_dec[idx]⟩; ∂W_dec only in the active rows; ∂b_dec = Σ_b g. Works in fp32 and bf16.
    """

    @staticmethod
    def forward(ctx, values, indices, w_dec, b_dec):
        ctx.save_for_backward(values, indices, w_dec)
        return gather_sum(values, indices, w_dec, b_dec, out_dtype=torch.promote_types(values.dtype, b_dec.dtype))

    @staticmethod
    def backward(ctx, g):
        values, indices, w_dec = ctx.saved_tensors
        dv = gather_dot(g, indices, w_dec) if ctx.needs_input_grad[0] else None
        dw = scatter_outer(values, indices, g, w_dec.shape[0]).to(w_dec.dtype) if ctx.needs_input_grad[2] else None
        db = g.sum(0) if ctx.needs_input_grad[3] else None
        return dv, None, dw, db
