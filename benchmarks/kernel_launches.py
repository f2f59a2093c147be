"""Launch shapes of the memory- and latency-bound kernels of the step (merge, decoder gather, scatter), timed at the
benchmark's headline shape, so that their defaults are chosen by measurement.

    python benchmarks/kernel_launches.py     # d_in 768, d_sae 32,768, k 32, batch 16,384, bf16 operands
"""
from __future__ import annotations

import torch
from triton.testing import do_bench

from sae_widgets.kernels.sparse_ops import gather_dot, gather_sum, scatter_outer
from sae_widgets.kernels.topk_encoder import encode_topk
from sae_widgets.kernels.topk_encoder import _tiles, tiles_config
from sae_widgets.kernels.topk_merge import merge_topk

B, D, N = 16384, 768, 32768


def ms(fn):
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def main():
    print(f"device: {torch.cuda.get_device_name()}; B {B}, d_in {D}, d_sae {N}, bf16 operands\n")
    print("| k | kernel | launch | ms |\n|---|---|---|---|")
    for K in (32, 128):
        sweep(K)


def sweep(K):
    x = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(D, N, device="cuda") / D ** 0.5).bfloat16()
    b = torch.zeros(N, device="cuda")
    cfg = tiles_config(B, N, K)
    keys, n_tiles = _tiles(x, w, b, False, cfg)
    v, i = encode_topk(x, w, b, K)
    wt = w.t().contiguous()
    g = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)
    sweeps = [("merge_topk (rows per program, warps)", [None, (4, 2), (2, 2), (1, 1), (1, 2), (2, 1)],
               lambda L: merge_topk(keys, K, n_tiles, cfg[3], flag_last=True, launch=L)),
              ("gather_sum (columns per program, warps)", [None, (256, 1), (128, 1), (64, 1), (512, 1), (256, 2),
                                                            (64, 2)],
               lambda L: gather_sum(v, i, wt, b[:D], launch=L)),
              ("gather_dot (columns per step, warps)", [None, (64, 2), (64, 1), (32, 1), (32, 2), (128, 1), (16, 1)],
               lambda L: gather_dot(g, i, wt, launch=L)),
              ("scatter_outer (occurrences, columns per step, warps)", [None, (4, 1024, 2), (2, 1024, 2),
                                                                        (4, 1024, 1), (2, 1024, 1), (8, 1024, 1),
                                                                        (1, 1024, 1)],
               lambda L: scatter_outer(v, i, g, N, launch=L))]
    for name, launches, fn in sweeps:
        for launch in launches:
            try:
                print(f"| {K} | {name} | {launch or 'default'} | {ms(lambda: fn(launch)):.3f} |", flush=True)
            except Exception as e:  # a launch that does not compile or fit
                print(f"| {K} | {name} | {launch} | failed: {type(e).__name__} |")


if __name__ == "__main__":
    main()
