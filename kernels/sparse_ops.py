"""Sparse decoder kernels: row gathers instead of dense products, for values/indices from a top-k encoder.

gather_sum    out[b]    = Σ_j v[b, j] · W[idx[b, j]] (+ bias)     decoder forward; ∂x through the encoder
gather_dot    out[b, j] = ⟨g[b], W[idx[b, j]]⟩                    ∂values
scatter_outer out[i]    = Σ_{idx[b, j] = i} c[b, j] · rows[b]      ∂W_dec and ∂W_encᵀ, active rows only
scatter_outer visits the (b, j) pairs grouped by latent (one stable sort), so it needs no atomics and is deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .topk_encoder import next_pow2


@triton.jit
def _gather_sum_kernel(v_ptr, idx_ptr, w_ptr, bias_ptr, out_ptr, K, D, svb, sib, swn, sob,
                       HAS_BIAS: tl.constexpr, KP: tl.constexpr, BD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = ds < D
    ks = tl.arange(0, KP)
    kmask = ks < K
    idx = tl.load(idx_ptr + row * sib + ks, mask=kmask, other=0).to(tl.int64)
    v = tl.load(v_ptr + row * svb + ks, mask=kmask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + idx[:, None] * swn + ds[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    acc = tl.sum(v[:, None] * w, axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ds, mask=dmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * sob + ds, acc.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _gather_dot_kernel(g_ptr, idx_ptr, w_ptr, out_ptr, K, D, sgb, sib, swn, sob,
                       KP: tl.constexpr, BD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, KP)
    kmask = ks < K
    idx = tl.load(idx_ptr + row * sib + ks, mask=kmask, other=0).to(tl.int64)
    acc = tl.zeros((KP,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        dmask = ds < D
        g = tl.load(g_ptr + row * sgb + ds, mask=dmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + idx[:, None] * swn + ds[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * g[None, :], axis=1)
    tl.store(out_ptr + row * sob + ks, acc.to(out_ptr.dtype.element_ty), mask=kmask)


@triton.jit
def _scatter_outer_kernel(order_ptr, start_ptr, coef_ptr, rows_ptr, out_ptr, K, D, srb, sob, sod,
                          BT: tl.constexpr, BD: tl.constexpr):
    lat = tl.program_id(0)
    ds = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = ds < D
    start = tl.load(start_ptr + lat)
    end = tl.load(start_ptr + lat + 1)
    acc = tl.zeros((BD,), dtype=tl.float32)
    for t0 in range(start, end, BT):
        ts = t0 + tl.arange(0, BT)
        tmask = ts < end
        e = tl.load(order_ptr + ts, mask=tmask, other=0).to(tl.int64)  # flat (b, j) position
        c = tl.load(coef_ptr + e, mask=tmask, other=0.0).to(tl.float32)
        r = tl.load(rows_ptr + (e // K)[:, None] * srb + ds[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(c[:, None] * r.to(tl.float32), axis=0)
    tl.store(out_ptr + lat.to(tl.int64) * sob + ds.to(tl.int64) * sod, acc.to(out_ptr.dtype.element_ty), mask=dmask)


def gather_sum(values, indices, weight, bias=None, out_dtype=None, out=None, launch: tuple[int, int] | None = None):
    """`launch` (columns per program, warps) overrides the default for tuning runs."""
    B, K = values.shape
    D = weight.shape[1]
    values, indices, weight = values.contiguous(), indices.contiguous(), weight.contiguous()
    out = out if out is not None else torch.empty(B, D, dtype=out_dtype or weight.dtype, device=weight.device)
    # one warp per program, a KP × BD tile of at most 8,192 elements: 4.4x faster than 4 warps (H100, k 32;
    # benchmarks/kernel_launches.py)
    BD, warps = launch or (min(128, next_pow2(D), max(16, 8192 // next_pow2(K))), 1)
    grid = (B, triton.cdiv(D, BD))
    _gather_sum_kernel[grid](values, indices, weight, bias if bias is not None else weight, out, K, D,
                             values.stride(0), indices.stride(0), weight.stride(0), out.stride(0),
                             HAS_BIAS=bias is not None, KP=next_pow2(K), BD=BD, num_warps=warps)
    return out


def gather_dot(grad, indices, weight, out_dtype=torch.float32, out=None, launch: tuple[int, int] | None = None):
    """`launch` (columns per step, warps) overrides the default for tuning runs."""
    B, K = indices.shape
    D = weight.shape[1]
    grad, indices, weight = grad.contiguous(), indices.contiguous(), weight.contiguous()
    out = out if out is not None else torch.empty(B, K, dtype=out_dtype, device=weight.device)
    BD, warps = launch or (min(64, next_pow2(D), max(16, 8192 // next_pow2(K))), max(1, min(4, next_pow2(K) // 32)))
    _gather_dot_kernel[(B,)](grad, indices, weight, out, K, D, grad.stride(0), indices.stride(0), weight.stride(0),
                             out.stride(0), KP=next_pow2(K), BD=BD, num_warps=warps)
    return out


def group_by_latent(indices, n_latents: int):
    """(order, starts): flat (b, j) positions sorted by latent, and each latent's first position (CSR offsets)."""
    flat = indices.reshape(-1).long()
    latents, order = torch.sort(flat, stable=True)
    # searchsorted, not bincount: bincount waits for the GPU (it reads the max), which a CUDA graph cannot hold
    starts = torch.searchsorted(latents, torch.arange(n_latents + 1, device=indices.device))
    return order, starts


def scatter_outer(coef, indices, rows, n_latents: int, grouping=None, out_dtype=torch.float32, out=None,
                  launch: tuple[int, int, int] | None = None):
    """`launch` (occurrences per step, columns per program, warps) overrides the default for tuning runs."""
    B, K = indices.shape
    D = rows.shape[1]
    order, starts = grouping if grouping is not None else group_by_latent(indices, n_latents)
    coef, rows = coef.contiguous(), rows.contiguous()
    out = out if out is not None else torch.empty(n_latents, D, dtype=out_dtype, device=rows.device)
    # whole rows (up to 1,024 columns) per one-warp program, one occurrence per step: 3x faster than 16 × 128 tiles
    # and 1.3x faster than 8 occurrences on 4 warps (H100, k 32 and 128; benchmarks/kernel_launches.py)
    BT, BD, warps = launch or (1, min(1024, next_pow2(D)), 1)
    _scatter_outer_kernel[(n_latents, triton.cdiv(D, BD))](order, starts, coef, rows, out, K, D, rows.stride(0),
                                                          out.stride(0), out.stride(1), BT=BT, BD=BD,
                                                          num_warps=warps)
    return out
