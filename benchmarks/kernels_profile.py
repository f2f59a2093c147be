"""Where the Triton step's time goes: each kernel and torch op of a TopK SAE step timed alone, plus encoder tilings.

    python benchmarks/kernels_profile.py      # d_in 768, d_sae 32,768, k 32, batch 16,384, bf16 operands
"""
from __future__ import annotations

import torch
from triton.testing import do_bench

from sae_widgets.kernels import encode_topk, gather_dot, gather_sum, group_by_latent, scatter_outer

B, D, N, K = 16384, 768, 32768, 32


def t(fn):
    return do_bench(fn, warmup=20, rep=100, return_mode="median")


SCATTER_ONLY = "--scatter-only" in __import__("sys").argv


def main():
    print(f"device: {torch.cuda.get_device_name()}; B {B}, d_in {D}, d_sae {N}, k {K}, bf16 operands\n")
    x = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(D, N, device="cuda") / D ** 0.5).bfloat16()
    b = torch.zeros(N, device="cuda")
    wt = w.t().contiguous()
    v, i = encode_topk(x, w, b, K)
    g = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)
    rows = [("torch: x @ W_enc (bf16)", t(lambda: x @ w)),
            ("torch: topk of dense z (bf16)", t(lambda: (x @ w).topk(K, dim=1))),
            ("encode_topk (default tiling)", t(lambda: encode_topk(x, w, b, K))),
            ("group_by_latent (sort + bincount)", t(lambda: group_by_latent(i, N))),
            ("gather_sum (decoder fwd)", t(lambda: gather_sum(v, i, wt, None))),
            ("gather_dot (dv)", t(lambda: gather_dot(g, i, wt))),
            ("scatter_outer (dW_dec)", t(lambda: scatter_outer(v, i, g, N))),
            ("W_enc.t().contiguous()", t(lambda: w.t().contiguous())),
            ("index_add_ (db_enc)", t(lambda: torch.zeros(N, device="cuda").index_add_(0, i.reshape(-1).long(), v.reshape(-1))))]
    p = [torch.zeros(D, N, device="cuda", requires_grad=True), torch.zeros(N, D, device="cuda", requires_grad=True)]
    for q in p:
        q.grad = torch.randn_like(q)
    opt = torch.optim.Adam(p, fused=True)
    rows.append(("Adam (fused) over W_enc + W_dec", t(opt.step)))
    print("| op | ms |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.3f} |")
    print("\n| scatter_outer tiles (BT, BD) | ms |\n|---|---|")
    for tiles in [(16, 128), (16, 512), (32, 512), (16, 1024), (32, 1024), (8, 1024), (64, 512)]:
        print(f"| {tiles} | {t(lambda: scatter_outer(v, i, g, N, tiles=tiles)):.3f} |", flush=True)
    if SCATTER_ONLY:
        return
    print("\n| encoder tiling (BM, BN, BK, chunks, warps, stages) | ms |\n|---|---|")
    for cfg in [(64, 64, 64, 4, 4, 2), (128, 64, 64, 4, 4, 2), (64, 128, 64, 4, 4, 2), (128, 128, 64, 4, 8, 2),
                (128, 64, 64, 8, 8, 3), (64, 64, 128, 8, 4, 3), (64, 256, 64, 4, 8, 2), (32, 64, 64, 8, 4, 2)]:
        try:
            print(f"| {cfg} | {t(lambda: encode_topk(x, w, b, K, config=cfg)):.3f} |", flush=True)
        except Exception as e:  # a tiling that does not compile on this GPU
            print(f"| {cfg} | failed: {type(e).__name__} |")


if __name__ == "__main__":
    main()
