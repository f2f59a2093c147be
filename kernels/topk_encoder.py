"""Fused encoder + TopK: z = x·W_enc + b_enc tile by tile, never writing the dense B × d_sae matrix z.

Every entry is packed into an int64 key that sorts like its score (z, or |z| for AbsTopK), ties going to the lower
index, so "the k largest keys" is the exact selection. Two exact algorithms:

tiles (TopK / AbsTopK): a plain 2-D grid of matmul tiles. Each [BM, BN] tile keeps only each row's R largest keys
  (R max-reductions, no sorting), and topk_merge takes each row's top k of its T × R kept keys. That is exact unless
  one tile held R or more of a row's top k; the merge flags such rows (a tile's R-th key was selected; R is chosen
  so that under 0.05 rows per call are flagged on average) and `scan` recomputes them, all on the GPU with no host
  sync.
scan (JumpReLU, the flagged rows, tiny shapes): each program owns BM rows and one chunk of the latents and keeps a
  running top-k by bitonic merges (`tl.topk`); about 8x slower than `tiles` at 32,768 latents, exact for any k.
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

from .topk_merge import INT64_MIN, merge_topk, next_pow2


@triton.jit
def pack_score(score, cols, neg):
    """int64 key: the fp32 score's bits made order-preserving, then the inverted column (lower index wins ties),
    then the sign of z (AbsTopK keeps it)."""
    bits = score.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order == float order
    low = ((0x7FFFFFFF - cols).to(tl.int64) << 1) | neg.to(tl.int64)
    return (ordered.to(tl.int64) << 32) | low


@triton.jit
def pack_keys(z, cols, valid, ABS: tl.constexpr):
    key = pack_score(tl.abs(z) if ABS else z, cols, z < 0)
    return tl.where(valid, key, -9223372036854775807 - 1)


@triton.jit
def _dot_tile(x_ptr, w_ptr, rows, cols, B, D, N, sxb, sxd, swd, swn, BM: tl.constexpr, BN: tl.constexpr,
              BK: tl.constexpr):
    """x[rows] · W_enc[:, cols] with fp32 accumulation."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        xb = tl.load(x_ptr + rows[:, None] * sxb + ks[None, :] * sxd, mask=(rows < B)[:, None] & (ks[None, :] < D),
                     other=0.0)
        wb = tl.load(w_ptr + ks[:, None] * swd + cols[None, :] * swn, mask=(ks[:, None] < D) & (cols[None, :] < N),
                     other=0.0)
        acc = tl.dot(xb, wb, acc)
    return acc


@triton.jit
def _tile_top_kernel(x_ptr, w_ptr, b_ptr, out_ptr, B, D, N, sxb, sxd, swd, swn, sob,
                     ABS: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """One [BM, BN] tile of z; stores each row's R largest keys of the tile, largest first, at out[row, tile*R + r]."""
    pid = tl.program_id(0)  # grouped launch order: GROUP_M row blocks share each W_enc tile while it is in L2
    n_m, n_n = tl.cdiv(B, BM), tl.cdiv(N, BN)
    first_m = (pid // (GROUP_M * n_n)) * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    z = _dot_tile(x_ptr, w_ptr, rows, cols, B, D, N, sxb, sxd, swd, swn, BM, BN, BK)
    z += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    score = tl.where((cols < N)[None, :], tl.abs(z) if ABS else z, float("-inf"))
    local = tl.arange(0, BN)[None, :]
    for r in tl.static_range(R):
        m, j = tl.max(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
        hit = local == j[:, None]
        if ABS:
            neg = tl.max(tl.where(hit & (z < 0), 1, 0), axis=1)
        else:
            neg = tl.zeros((BM,), dtype=tl.int32)
        key = tl.where(m == float("-inf"), -9223372036854775807 - 1, pack_score(m, pid_n * BN + j, neg))
        tl.store(out_ptr + rows.to(tl.int64) * sob + pid_n * R + r, key, mask=rows < B)
        score = tl.where(hit, float("-inf"), score)


@triton.jit
def _scan_rows(x_ptr, w_ptr, b_ptr, theta_ptr, count_ptr, out_ptr, rows, pid_c, B, D, N, CHUNK, n_chunks,
               sxb, sxd, swd, swn, sob, ABS: tl.constexpr, JUMP: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr):
    rmask = rows < B
    best = tl.full((BM, KP), -9223372036854775807 - 1, tl.int64)
    n_active = tl.zeros((BM,), dtype=tl.int32)
    for t in range(0, CHUNK, BN):
        cols = pid_c * CHUNK + t + tl.arange(0, BN)
        z = _dot_tile(x_ptr, w_ptr, rows, cols, B, D, N, sxb, sxd, swd, swn, BM, BN, BK)
        z += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        valid = (cols[None, :] < N) & rmask[:, None]
        if JUMP:  # JumpReLU: only z > θ_i is active (Rajamanoharan et al. 2024); count them to detect overflow
            theta = tl.load(theta_ptr + cols, mask=cols < N, other=float("inf")).to(tl.float32)
            valid = valid & (z > theta[None, :])
            n_active += tl.sum(valid.to(tl.int32), axis=1)
        top = tl.topk(pack_keys(z, cols, valid, ABS), KP)
        best = tl.topk(tl.reshape(tl.join(best, top), (BM, 2 * KP)), KP)
    out_cols = pid_c * KP + tl.arange(0, KP)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * sob + out_cols[None, :], best, mask=rmask[:, None])
    if JUMP:
        tl.store(count_ptr + rows * n_chunks + pid_c, n_active, mask=rmask)


@triton.jit
def _scan_kernel(x_ptr, w_ptr, b_ptr, theta_ptr, count_ptr, out_ptr, skip_ptr, B, D, N, CHUNK, n_chunks,
                 sxb, sxd, swd, swn, sob, ABS: tl.constexpr, JUMP: tl.constexpr, SKIP: tl.constexpr,
                 KP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Running top-KP of one chunk of latents for BM rows, at out[row, chunk*KP : (chunk+1)*KP]."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    pid_c = tl.program_id(1)
    if SKIP:  # only rows that `tiles` flagged: other blocks return at once
        if tl.max(tl.load(skip_ptr + rows, mask=rows < B, other=0), axis=0) > 0:
            _scan_rows(x_ptr, w_ptr, b_ptr, theta_ptr, count_ptr, out_ptr, rows, pid_c, B, D, N, CHUNK, n_chunks,
                       sxb, sxd, swd, swn, sob, ABS, JUMP, KP, BM, BN, BK)
    else:
        _scan_rows(x_ptr, w_ptr, b_ptr, theta_ptr, count_ptr, out_ptr, rows, pid_c, B, D, N, CHUNK, n_chunks,
                   sxb, sxd, swd, swn, sob, ABS, JUMP, KP, BM, BN, BK)


# ---------------------------------------------------------------------------------------------- launch choices
def tiles_config(B: int, N: int, k: int, elem_bytes: int = 2) -> tuple[int, int, int, int, int, int]:
    """(BM, BN, BK, R, warps, stages) for `tiles`. R is the smallest count that leaves under 0.05 flagged rows per call
    on average: a row is flagged when one tile holds R of its top k, with probability ≈ C(k, R)·(BN/N)^(R-1). The
    flagged rows' recomputation then costs little on average, and one more R costs little in stage 1."""
    bn = min(256 if k <= 64 else 128, max(16, next_pow2(N)))  # H100, bf16: 256 wide is fastest at k = 32
    bm, bk = 128, 64 if elem_bytes <= 2 else 32  # fp32 operands: half-depth K tiles keep 3 stages in shared memory
    return bm, bn, bk, keys_per_tile(B, N, k, bn), 8, 3


def keys_per_tile(B: int, N: int, k: int, bn: int) -> int:
    """R for BN-wide tiles: the smallest count leaving under 0.05 flagged rows per call on average."""
    r = 1
    while r < min(k, bn) and B * math.comb(k, r) * (bn / N) ** (r - 1) > 0.05:
        r += 1
    return r


def scan_config(B: int, N: int, k: int, fallback: bool = False) -> tuple[int, int, int, int, int, int]:
    """(BM, BN, BK, chunks, warps, stages) for `scan`: enough programs to fill the GPU, chunks long enough to amortise
    the merges. The fallback for flagged rows runs on every call (no host sync decides), with most blocks returning at
    once, so its grid is kept small: 16-row blocks and 8,192-latent chunks."""
    bn = max(64, next_pow2(k))
    if fallback:
        return 16, bn, 64, triton.cdiv(N, max(bn, 8192)), 4, 2
    bm = 64 if B >= 64 else 16
    chunks = max(1, min(triton.cdiv(N, bn), triton.cdiv(4 * 132, triton.cdiv(B, bm))))
    return bm, bn, 64, chunks, 4, 2


def _chunking(N: int, chunks: int, bn: int) -> tuple[int, int]:
    """(columns per program, programs per row block): chunks rounded to whole BN tiles."""
    chunk = triton.cdiv(triton.cdiv(N, chunks), bn) * bn
    return chunk, triton.cdiv(N, chunk)


def candidate_width(B: int, N: int, k: int, method: str = "auto", config=None, jumprelu: bool = False) -> int:
    """Columns of the key buffer that `encode_topk(..., keys_out=...)` fills (tiles: T × R; scan: chunks × KP)."""
    if _method(method, N, k, jumprelu) == "tiles":
        bm, bn, bk, r, *_ = config or tiles_config(B, N, k)
        return triton.cdiv(N, bn) * r
    bm, bn, bk, chunks, *_ = config or scan_config(B, N, k)
    return _chunking(N, chunks, bn)[1] * next_pow2(k)


def _method(method: str, N: int, k: int, jump: bool) -> str:
    if method not in ("auto", "tiles", "scan"):
        raise ValueError(f"method={method!r}; expected 'auto', 'tiles' or 'scan'")
    if jump:
        return "scan"  # JumpReLU's active set has no fixed size per tile
    return "tiles" if method == "auto" else method


# ---------------------------------------------------------------------------------------------- launches
def _scan(x, w, b, k, absolute, theta=None, config=None, keys_out=None, only_rows=None):
    """Keys [B, chunks·KP] (each chunk's running top KP) and, for JumpReLU, counts [B, chunks] of active latents."""
    import torch

    B, D = x.shape
    N = w.shape[1]
    KP = next_pow2(k)
    bm, bn, bk, chunks, warps, stages = config or scan_config(B, N, k, fallback=only_rows is not None)
    chunk, chunks = _chunking(N, chunks, bn)
    keys = keys_out if keys_out is not None else torch.empty(B, chunks * KP, dtype=torch.int64, device=x.device)
    jump = theta is not None
    counts = torch.empty(B, chunks, dtype=torch.int32, device=x.device) if jump else keys
    _scan_kernel[(triton.cdiv(B, bm), chunks)](
        x, w, b, theta if jump else b, counts, keys, only_rows if only_rows is not None else keys, B, D, N, chunk,
        chunks, x.stride(0), x.stride(1), w.stride(0), w.stride(1), keys.stride(0),
        ABS=absolute, JUMP=jump, SKIP=only_rows is not None, KP=KP, BM=bm, BN=bn, BK=bk, num_warps=warps,
        num_stages=stages)
    return keys, chunks, (counts if jump else None)


def _tiles(x, w, b, absolute, config, keys_out=None):
    import torch

    B, D = x.shape
    N = w.shape[1]
    bm, bn, bk, r, warps, stages = config
    n_tiles = triton.cdiv(N, bn)
    keys = keys_out if keys_out is not None else torch.empty(B, n_tiles * r, dtype=torch.int64, device=x.device)
    _tile_top_kernel[(triton.cdiv(B, bm) * n_tiles,)](
        x, w, b, keys, B, D, N, x.stride(0), x.stride(1), w.stride(0), w.stride(1), keys.stride(0),
        ABS=absolute, R=r, BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
    return keys, n_tiles


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


def encode_topk(x, w_enc, b_enc, k: int, absolute: bool = False, keys_out=None, config=None, theta=None,
                method: str = "auto"):
    """(values [B, k] fp32, indices [B, k] int32) of TopK(x·W_enc + b_enc) (AbsTopK with `absolute`), largest first.

    With `theta` (JumpReLU thresholds [d_sae]): the active latents z > θ in sparse form, at most k per row, padded
    with zeros, plus each row's count of active latents (a count above k means the row did not fit).
    `method` picks the algorithm (see the module docstring); `config` overrides its launch tuple (tuning, tests);
    `keys_out` receives the first-stage key buffer (width `candidate_width(...)`), for tests that poison it.
    """
    import torch

    B, D = x.shape
    N = w_enc.shape[1]
    if not 1 <= k <= N:
        raise ValueError(f"k={k} must be in [1, d_sae={N}]")
    jump = theta is not None
    if _method(method, N, k, jump) == "scan":
        keys, chunks, counts = _scan(x, w_enc, b_enc, k, absolute, theta, config, keys_out)
        top, _ = merge_topk(keys, k, chunks, next_pow2(k))
        if not jump:
            return unpack_keys(top, absolute)
        values, indices = unpack_keys(top, absolute=True)  # signed values; relu would be wrong for negative θ
        empty = top == INT64_MIN
        return values.masked_fill(empty, 0.0), indices.masked_fill(empty, 0), counts.sum(1)
    cfg = config or tiles_config(B, N, k, x.element_size())
    keys, n_tiles = _tiles(x, w_enc, b_enc, absolute, cfg, keys_out)
    top, flagged = merge_topk(keys, k, n_tiles, cfg[3], flag_last=True)
    exact, chunks, _ = _scan(x, w_enc, b_enc, k, absolute, only_rows=flagged)
    exact_top, _ = merge_topk(exact, k, chunks, next_pow2(k), only_rows=flagged)
    return unpack_keys(torch.where(flagged[:, None].bool(), exact_top, top), absolute)
