"""Torch path vs Triton path for TopK SAE training on one GPU, in the same run: forward, backward, full training
step (Adam + aux-k loss) in tokens/s, peak memory; then a batch-size sweep of sparse vs dense decoding.

    python benchmarks/kernels_gpu.py                  # all configs (~5 min on an H100)
    python benchmarks/kernels_gpu.py --quick          # the headline config only

The roofline floor of a step is max(encoder FLOPs / measured bf16 matmul rate, Adam bytes / measured copy bandwidth):
the only dense work left in the Triton path is the forward encoder product and the optimizer.
"""
from __future__ import annotations

import argparse
import itertools

import torch
from fixed_batches import FixedBatches
from triton.testing import do_bench

from sae_widgets.sae import SAE, SAEConfig
from sae_widgets.train import Trainer, TrainConfig

D_IN = 768


def ceilings():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ a, warmup=50, rep=200, return_mode="median")
    flops = 2 * 8192 ** 3 / (ms * 1e-3)
    buf = torch.empty(2 ** 30 // 4, device="cuda")
    out = torch.empty_like(buf)
    ms = do_bench(lambda: out.copy_(buf), warmup=50, rep=200, return_mode="median")
    return flops, 2 * buf.numel() * 4 / (ms * 1e-3)


def trainer(backend, d_sae, k, batch, bf16):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(arch="topk", d_in=D_IN, d_sae=d_sae, k=k, backend=backend)).cuda()
    batches = [torch.randn(batch, D_IN, device="cuda") for _ in range(3)]
    tr = Trainer(sae, FixedBatches(batches), TrainConfig(total_tokens=10 ** 15, progress=False, autocast_bf16=bf16,
                                                  init_tokens=batch, dead_window_tokens=10 ** 12, lr_warmup_steps=1))
    tr._initialize()
    sae.train()
    tr.tokens_since_fired[: d_sae // 20] = 10 ** 13  # 5 % of the latents dead: the aux-k loss runs every step
    return tr, batches[0]


def measure(backend, d_sae, k, batch, bf16):
    tr, x = trainer(backend, d_sae, k, batch, bf16)
    sae, dead = tr.sae, (tr.tokens_since_fired >= 10 ** 12).nonzero().squeeze(1)

    def fwd():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            return sae.training_loss(x, dead_latents=dead)[0]

    def fwd_bwd():
        sae.zero_grad(set_to_none=True)
        fwd().backward()

    t_f = do_bench(fwd, warmup=25, rep=150, return_mode="median")
    t_fb = do_bench(fwd_bwd, warmup=25, rep=150, return_mode="median")
    t_step = do_bench(tr.train_step, warmup=25, rep=200, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    tr.train_step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    tr = sae = None  # free the GPU memory before the next configuration
    torch.cuda.empty_cache()
    return t_f, t_fb - t_f, t_step, peak


def decode_sweep(d_sae=32768, k=32):
    from sae_widgets.kernels.autograd import SparseDecode

    print(f"\n### Decode forward+backward, sparse (gather kernels) vs dense (f @ W_dec), d_sae {d_sae}, k {k}, bf16\n")
    print("| batch | sparse ms | dense ms | dense/sparse | active latents (union) |")
    print("|---|---|---|---|---|")
    w = torch.randn(d_sae, D_IN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.zeros(D_IN, device="cuda", requires_grad=True)
    for batch in (256, 1024, 4096, 16384, 65536):
        idx = torch.randint(0, d_sae, (batch, k), device="cuda", dtype=torch.int32)
        v = torch.rand(batch, k, device="cuda", requires_grad=True)
        dense = torch.zeros(batch, d_sae, device="cuda", dtype=torch.bfloat16).scatter(1, idx.long(), v.detach().bfloat16()).requires_grad_()

        def sparse_fb():
            SparseDecode.apply(v, idx, w, b).sum().backward()

        def dense_fb():
            (dense @ w + b).sum().backward()

        ts, td = do_bench(sparse_fb, rep=100, return_mode="median"), do_bench(dense_fb, rep=100, return_mode="median")
        union = idx.unique().numel() / d_sae
        print(f"| {batch:,} | {ts:.3f} | {td:.3f} | {td / ts:.2f}x | {union:.0%} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = torch.cuda.get_device_name()
    flops, bw = ceilings()
    print(f"device: {dev}; torch {torch.__version__}; measured bf16 matmul {flops / 1e12:.0f} TFLOP/s, copy {bw / 1e12:.2f} TB/s")
    print("TopK SAE, d_in 768, aux-k on 5 % dead latents, Adam (fused); times are medians of CUDA-event timings\n")
    print("| d_sae | k | batch | dtype | path | fwd ms | bwd ms | step ms | step tokens/s | peak GiB | triton/torch | floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    configs = [(32768, 32, 16384, True)] if args.quick else \
        list(itertools.product((32768, 131072), (32, 128), (4096, 16384), (True, False)))
    for d_sae, k, batch, bf16 in configs:
        res = {}
        for backend in ("torch", "triton"):
            try:
                res[backend] = measure(backend, d_sae, k, batch, bf16)
            except torch.OutOfMemoryError:
                res[backend] = None
                torch.cuda.empty_cache()
        enc_flops = 2 * batch * D_IN * d_sae
        adam_bytes = 2 * d_sae * D_IN * 4 * 7  # W_enc + W_dec: read p, g, m, v; write p, m, v (fp32)
        floor_ms = max(enc_flops / flops, adam_bytes / bw) * 1e3
        for backend in ("torch", "triton"):
            r = res[backend]
            if r is None:
                print(f"| {d_sae:,} | {k} | {batch:,} | {'bf16' if bf16 else 'fp32'} | {backend} | OOM | | | | | | |")
                continue
            f, b, s, peak = r
            ratio = f"{res['torch'][2] / s:.2f}x" if backend == "triton" and res["torch"] else ""
            print(f"| {d_sae:,} | {k} | {batch:,} | {'bf16' if bf16 else 'fp32'} | {backend} | {f:.2f} | {b:.2f} | {s:.2f} | "
                  f"{batch / s * 1e3 / 1e6:.2f} M | {peak:.2f} | {ratio} | {floor_ms / s:.0%} |", flush=True)
    if not args.quick:
        decode_sweep()


if __name__ == "__main__":
    main()
