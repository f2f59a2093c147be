"""Fused encoder + TopK: z = x·W_enc + b_enc tile by tile with a running per-row top-k, never writing z.

Each program owns BM rows and one chunk of the latents. For every BN-wide tile it computes z with tl.dot (fp32
accumulation), packs each entry into an int64 key that sorts like the score (z, or |z| for AbsTopK) with ties going
to the lower index, and merges the tile's top KP into its running top KP. The chunks' candidates (B × chunks × KP
keys, not B × d_sae values) are merged by one small torch.topk and unpacked into values and int32 indices.
"""
from __future__ import annotations

import triton
import triton.language as tl

INT64_MIN = -(2 ** 63)


@triton.jit
def _pack_keys(z, cols, valid, ABS: tl.constexpr):
    score = tl.abs(z) if ABS else z
    bits = score.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order == float order
    low = ((0x7FFFFFFF - cols).to(tl.int64) << 1) | (z < 0).to(tl.int64)  # lower index wins ties; sign bit last
    key = (ordered.to(tl.int64) << 32) | low
    return tl.where(valid, key, -9223372036854775807 - 1)


@triton.jit
def _encode_topk_kernel(x_ptr, w_ptr, b_ptr, theta_ptr, count_ptr, out_ptr, B, D, N, CHUNK, n_chunks,
                        sxb, sxd, swd, swn, sob, soc,
                        ABS: tl.constexpr, JUMP: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < B
    best = tl.full((BM, KP), -9223372036854775807 - 1, tl.int64)
    n_active = tl.zeros((BM,), dtype=tl.int32)
    for t in range(0, CHUNK, BN):
        cols = pid_c * CHUNK + t + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, D, BK):
            ks = k0 + tl.arange(0, BK)
            xb = tl.load(x_ptr + rows[:, None] * sxb + ks[None, :] * sxd, mask=rmask[:, None] & (ks[None, :] < D), other=0.0)
            wb = tl.load(w_ptr + ks[:, None] * swd + cols[None, :] * swn, mask=(ks[:, None] < D) & (cols[None, :] < N), other=0.0)
            acc = tl.dot(xb, wb, acc)
        bias = tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        z = acc + bias[None, :]
        valid = (cols[None, :] < N) & rmask[:, None]
        if JUMP:  # JumpReLU: only z > θ_i is active (Rajamanoharan et al. 2024); count them to detect overflow
            theta = tl.load(theta_ptr + cols, mask=cols < N, other=float("inf")).to(tl.float32)
            valid = valid & (z > theta[None, :])
            n_active += tl.sum(valid.to(tl.int32), axis=1)
        keys = _pack_keys(z, cols, valid, ABS)
        top = tl.topk(keys, KP)
        best = tl.topk(tl.reshape(tl.join(best, top), (BM, 2 * KP)), KP)
    out_cols = pid_c * KP + tl.arange(0, KP)
    tl.store(out_ptr + rows[:, None] * sob + out_cols[None, :] * soc, best, mask=rmask[:, None])
    if JUMP:
        tl.store(count_ptr + rows * n_chunks + pid_c, n_active, mask=rmask)


def next_pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def candidate_width(B: int, D: int, N: int, k: int) -> int:
    """Columns of the packed-key buffer `encode_topk` writes (chunks × KP), for callers that pass `keys_out`."""
    KP = next_pow2(k)
    bm, bn, bk, chunks = _launch_config(B, D, N, KP)
    return _chunking(N, chunks, bn)[1] * KP


def _chunking(N: int, chunks: int, bn: int) -> tuple[int, int]:
    """(columns per program, programs per row block): chunks rounded to whole BN tiles."""
    chunk = triton.cdiv(triton.cdiv(N, chunks), bn) * bn
    return chunk, triton.cdiv(N, chunk)


def _launch_config(B: int, D: int, N: int, KP: int) -> tuple[int, int, int, int]:
    bm = 64 if B >= 64 else 16
    bn = max(64, KP)
    bk = 64 if D >= 64 else 16
    # enough programs to fill the GPU, but chunks long enough to amortise the merge
    n_tiles = triton.cdiv(N, bn)
    row_blocks = triton.cdiv(B, bm)
    chunks = max(1, min(n_tiles, triton.cdiv(4 * 132, row_blocks)))
    return bm, bn, bk, chunks


def top_keys(keys, k: int):
    """The k largest packed keys per row, largest first."""
    return keys.topk(k, dim=-1).values if keys.shape[-1] > k else keys.sort(dim=-1, descending=True).values


def unpack_keys(top, absolute: bool):
    """Packed keys -> (values fp32, indices int32); TopK values are ReLU'd, AbsTopK's keep their sign."""
    import torch

    high = (top >> 32).to(torch.int32)
    bits = high ^ ((high >> 31) & 0x7FFFFFFF)
    score = bits.view(torch.float32)
    low = top & 0xFFFFFFFF
    idx = (0x7FFFFFFF - (low >> 1)).to(torch.int32)
    if absolute:
        vals = torch.where((low & 1).bool(), -score, score)
    else:
        vals = torch.relu(score)
    return vals, idx


def encode_topk(x, w_enc, b_enc, k: int, absolute: bool = False, keys_out=None, config=None, theta=None):
    """(values [B, k] fp32, indices [B, k] int32) of TopK(x·W_enc + b_enc) (AbsTopK with `absolute`).

    With `theta` (JumpReLU thresholds [d_sae]): the active latents z > θ in sparse form, at most k per row, padded
    with zeros, plus each row's count of active latents (a count above k means the row did not fit).
    """
    import torch

    B, D = x.shape
    N = w_enc.shape[1]
    if not 1 <= k <= N:
        raise ValueError(f"k={k} must be in [1, d_sae={N}]")
    KP = next_pow2(k)
    bm, bn, bk, chunks = _launch_config(B, D, N, KP)
    warps, stages = 4, 2
    if config:  # (BM, BN, BK, chunks, num_warps, num_stages), for tuning runs
        bm, bn, bk, chunks, warps, stages = config
    chunk, chunks = _chunking(N, chunks, bn)
    keys = keys_out if keys_out is not None else torch.empty(B, chunks * KP, dtype=torch.int64, device=x.device)
    grid = (triton.cdiv(B, bm), chunks)
    jump = theta is not None
    counts = torch.empty(B, chunks, dtype=torch.int32, device=x.device) if jump else keys
    _encode_topk_kernel[grid](x, w_enc, b_enc, theta if jump else b_enc, counts, keys, B, D, N, chunk, chunks,
                              x.stride(0), x.stride(1), w_enc.stride(0), w_enc.stride(1), keys.stride(0), keys.stride(1),
                              ABS=absolute, JUMP=jump, KP=KP, BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    top = top_keys(keys, k)
    if not jump:
        return unpack_keys(top, absolute)
    values, indices = unpack_keys(top, absolute=True)  # signed values; relu would be wrong for negative θ
    empty = top == INT64_MIN
    return values.masked_fill(empty, 0.0), indices.masked_fill(empty, 0), counts.sum(1)
