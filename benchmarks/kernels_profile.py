"""Where the Triton step's time goes: each kernel and torch op of a TopK SAE step timed alone, and a CUDA-time profile
of the whole training step. Launch shapes are swept by kernel_launches.py, encoder tilings by encoder_tilings.py.

    python benchmarks/kernels_profile.py      # d_in 768, d_sae 32,768, k 32, batch 16,384, bf16 operands
"""
from __future__ import annotations

import torch
from triton.testing import do_bench

from sae_widgets.kernels.sparse_ops import gather_dot, gather_sum, group_by_latent, scatter_outer
from sae_widgets.kernels.topk_encoder import encode_topk
from sae_widgets.kernels.topk_encoder import _tiles, tiles_config
from sae_widgets.kernels.topk_merge import merge_topk

B, D, N, K = 16384, 768, 32768, 32


def t(fn):
    return do_bench(fn, warmup=20, rep=100, return_mode="median")


STEP_ONLY = "--step-only" in __import__("sys").argv  # only the whole-step profile
SHAPES = "--shapes" in __import__("sys").argv  # also the eager step's torch ops by input shape


def main():
    print(f"device: {torch.cuda.get_device_name()}; B {B}, d_in {D}, d_sae {N}, k {K}, bf16 operands\n")
    x = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(D, N, device="cuda") / D ** 0.5).bfloat16()
    b = torch.zeros(N, device="cuda")
    wt = w.t().contiguous()
    v, i = encode_topk(x, w, b, K)
    cfg = tiles_config(B, N, K)
    keys, n_tiles = _tiles(x, w, b, False, cfg)
    g = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)
    rows = [("torch: x @ W_enc (bf16)", t(lambda: x @ w)),
            ("torch: topk of dense z (bf16)", t(lambda: (x @ w).topk(K, dim=1))),
            ("encode_topk, method='scan' (running bitonic top-k)", t(lambda: encode_topk(x, w, b, K, method="scan"))),
            (f"encode_topk, method='tiles' (default) {cfg}", t(lambda: encode_topk(x, w, b, K))),
            ("  tiles stage 1: matmul tiles keeping R keys per row", t(lambda: _tiles(x, w, b, False, cfg))),
            ("  tiles stage 2: merge_topk (+ flags)", t(lambda: merge_topk(keys, K, n_tiles, cfg[3], flag_last=True))),
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


def profile_step():
    """Self CUDA time per kernel over five Trainer.train_step calls (the benchmark's headline configuration)."""
    from kernels_gpu import trainer
    from torch.profiler import ProfilerActivity, profile

    tr, _ = trainer("triton", N, K, B, True)
    for _ in range(10):
        tr.train_step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            tr.train_step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=80))
    if SHAPES:  # the eager step's torch ops with their input shapes: which op launches which small kernel
        tr.cfg.cuda_graph, tr._graph = False, None
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            for _ in range(5):
                tr.train_step()
            torch.cuda.synchronize()
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="cuda_time_total", row_limit=70,
                                                                 max_name_column_width=40, max_shapes_column_width=70))
        return
    print(f"step ms: {t(tr.train_step):.3f}")
    import time

    host, total = [], []
    for _ in range(20):  # host time to enqueue a step vs its wall time: equal means the step is launch-bound
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tr.train_step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host.append(t1 - t0)
        total.append(time.perf_counter() - t0)
    print(f"host enqueue ms (median): {sorted(host)[10] * 1e3:.3f}; wall ms: {sorted(total)[10] * 1e3:.3f}")


if __name__ == "__main__":
    if not STEP_ONLY:
        main()
    profile_step()
