"""autograd.Functions over the kernels: a TopK encoder and a sparse decoder whose backward passes stay sparse."""
from __future__ import annotations

import torch

from .sparse_ops import gather_dot, gather_sum, group_by_latent, scatter_outer
from .topk_encoder import encode_topk


class LatentGrouping:
    """The flat (b, j) positions of one top-k index matrix grouped by latent, computed once on first use and shared by
    the encoder's and the decoder's backward (one sort of B·k indices per step instead of two)."""

    def __init__(self, n_latents: int):
        self.n_latents, self._grouping = n_latents, None

    def __call__(self, indices):
        if self._grouping is None:
            self._grouping = group_by_latent(indices, self.n_latents)
        return self._grouping


class TopKEncode(torch.autograd.Function):
    """(x, centre, W_enc, b_enc) -> TopK of z = (x − centre)·W_enc + b_enc as (values [B, k], indices [B, k] int32).

    `centre` is b_dec (pre-encoder centring) or None (transcoders); `dtype` is the kernel's operand type (bf16 under
    autocast). Backward stays sparse: ∂z only at the selected latents (TopK: where the value is > 0);
    ∂W_enc[:, i] = Σ over the tokens that selected i of ∂z·x_c and ∂b_enc[i] likewise; ∂centre = −W_enc·∂b_enc, so the
    B × d_in input gradient is computed only when x itself needs one.
    """

    @staticmethod
    def forward(ctx, x, centre, w_enc, b_enc, k: int, absolute: bool, dtype, grouping: LatentGrouping | None = None):
        x_c = (x if centre is None else x - centre).to(dtype)
        w = w_enc.to(dtype)
        values, indices = encode_topk(x_c, w, b_enc, k, absolute)
        ctx.save_for_backward(x_c, w, values, indices)
        ctx.absolute, ctx.w_dtype = absolute, w_enc.dtype
        ctx.grouping = grouping or LatentGrouping(w_enc.shape[1])
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, g_values, _g_indices):
        x_c, w, values, indices = ctx.saved_tensors
        n = w.shape[1]
        dz = g_values.float() if ctx.absolute else g_values.float() * (values > 0)
        need_x, need_centre, need_w, need_b = ctx.needs_input_grad[:4]
        dx = dcentre = dw = db = None
        if need_x:
            dx = gather_sum(dz, indices, w.t().contiguous(), out_dtype=torch.float32)
        if need_w:
            # written straight into W_enc's [d_in, n] layout: autograd keeps it as W_enc.grad with no transposing copy
            dw = torch.empty(w.shape, dtype=ctx.w_dtype, device=w.device)
            scatter_outer(dz, indices, x_c, n, ctx.grouping(indices), out=dw.t())
        if need_b or need_centre:
            db = torch.zeros(n, dtype=torch.float32, device=dz.device).index_add_(0, indices.reshape(-1).long(),
                                                                                   dz.reshape(-1))
        if need_centre:
            dcentre = -torch.mv(w, db.to(w.dtype)).float() if dx is None else -dx.sum(0)
        return dx, dcentre, dw, db if need_b else None, None, None, None, None


class SparseDecode(torch.autograd.Function):
    """(values, indices, W_dec, b_dec) -> x̂ = Σ_j v_j W_dec[idx_j] + b_dec, by row gather.

    `dtype` is the gather's operand type (bf16 under autocast): W_dec is cast inside, so its gradient comes back in
    W_dec's own dtype straight from the fp32 accumulation, not through a bf16 round trip.
    Backward: ∂v = ⟨g, W_dec[idx]⟩; ∂W_dec only in the active rows; ∂b_dec = Σ_b g. Works in fp32 and bf16; with
    bf16 operands the gathers read g rounded to bf16 (autocast's dense backward does the same).
    """

    @staticmethod
    def forward(ctx, values, indices, w_dec, b_dec, grouping: LatentGrouping | None = None, dtype=None):
        w = w_dec.to(dtype or w_dec.dtype)
        ctx.save_for_backward(values, indices, w)
        ctx.grouping = grouping or LatentGrouping(w_dec.shape[0])
        ctx.w_dtype = w_dec.dtype
        return gather_sum(values, indices, w, b_dec, out_dtype=torch.promote_types(values.dtype, b_dec.dtype))

    @staticmethod
    def backward(ctx, g):
        values, indices, w = ctx.saved_tensors
        # the gathers read g in the operand dtype, as autocast's dense backward does: scatter_outer reads each row
        # of g once per selected latent (k times), so a bf16 g that stays in L2 halves its traffic
        g_op = g.to(w.dtype) if w.element_size() < g.element_size() else g
        dv = gather_dot(g_op, indices, w) if ctx.needs_input_grad[0] else None
        dw = scatter_outer(values, indices, g_op, w.shape[0], ctx.grouping(indices), out_dtype=ctx.w_dtype) \
            if ctx.needs_input_grad[2] else None
        db = g.sum(0) if ctx.needs_input_grad[3] else None
        return dv, None, dw, db, None, None
