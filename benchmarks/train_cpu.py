"""SAE training throughput (tokens/s) for the issue-3 config: TopK, d_in 256, 4,096 latents, k 32, batch 4,096.

    python benchmarks/train_cpu.py [--steps 20] [--device cpu]

One table, one run: our `Trainer.train_step` (aux-k, dead-latent counters, decoder-norm projection, clipping,
metrics) against a naive PyTorch reference step (dense pre-activations, torch.topk, dense decode, MSE, Adam) on
the same activations; plus the activation store alone and the end-to-end run (store + step) on the embedded model.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from fixed_batches import FixedBatches

from sae_widgets.activations import ActivationStore
from sae_widgets.models import load_model
from sae_widgets.sae import SAE, SAEConfig
from sae_widgets.train import Trainer, TrainConfig

D_IN, D_SAE, K, BATCH, HOOK = 256, 4096, 32, 4096, "blocks.1.hook_resid_post"


def naive_step_fn(device):
    torch.manual_seed(0)
    w_enc = torch.nn.Parameter(torch.randn(D_IN, D_SAE, device=device) / D_IN ** 0.5)
    w_dec = torch.nn.Parameter(torch.randn(D_SAE, D_IN, device=device) / D_IN ** 0.5)
    b_enc = torch.nn.Parameter(torch.zeros(D_SAE, device=device))
    b_dec = torch.nn.Parameter(torch.zeros(D_IN, device=device))
    opt = torch.optim.Adam([w_enc, w_dec, b_enc, b_dec], lr=1e-3)

    def step(x):
        z = (x - b_dec) @ w_enc + b_enc
        v, i = z.topk(K, dim=-1)
        f = torch.zeros_like(z).scatter(-1, i, torch.relu(v))
        loss = ((f @ w_dec + b_dec - x) ** 2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def rate(fn, steps, tokens_per_step, device):
    fn()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps * tokens_per_step / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = args.device
    model = load_model(device=dev)
    store = ActivationStore(model, HOOK, batch_size=BATCH, buffer_size=8 * BATCH, model_batch_size=32, seed=0,
                            device=dev, show_progress=False)
    batches = [store.next_batch() for _ in range(4)]
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else \
        f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__})"
    print(f"device: {name}; TopK SAE d_in {D_IN}, d_sae {D_SAE}, k {K}, batch {BATCH} tokens, fp32, {args.steps} timed steps")

    def ours(st):
        torch.manual_seed(0)
        sae = SAE(SAEConfig(arch="topk", d_in=D_IN, d_sae=D_SAE, k=K, hook=HOOK)).to(dev)
        tr = Trainer(sae, st, TrainConfig(total_tokens=10**12, progress=False, init_tokens=BATCH,
                                          dead_window_tokens=BATCH * 4))
        tr._initialize()
        sae.train()
        return tr

    tr_fixed = ours(FixedBatches(batches))
    naive = naive_step_fn(dev)
    r_ours = rate(tr_fixed.train_step, args.steps, BATCH, dev)
    r_naive = rate(lambda: naive(batches[0]), args.steps, BATCH, dev)
    r_store = rate(store.next_batch, args.steps, BATCH, dev)
    tr_full = ours(store)
    r_full = rate(tr_full.train_step, max(5, args.steps // 2), BATCH, dev)
    print()
    print("| what | tokens/s | ratio to naive step |")
    print("|---|---|---|")
    print(f"| naive PyTorch TopK step (reference) | {r_naive:,.0f} | 1.00x |")
    print(f"| sae_widgets Trainer.train_step (torch backend; aux-k active) | {r_ours:,.0f} | {r_ours / r_naive:.2f}x |")
    print(f"| activation store alone (embedded model, {HOOK}) | {r_store:,.0f} | {r_store / r_naive:.2f}x |")
    print(f"| end to end: store + train_step | {r_full:,.0f} | {r_full / r_naive:.2f}x |")


if __name__ == "__main__":
    main()
