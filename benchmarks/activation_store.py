"""Activations per second from the activation store on the embedded model.

    python benchmarks/activation_store.py [--tokens 65536] [--device cpu]

One table, in one run: for each hook, the store as shipped (model stopped after the needed layer) against the
same store forced to run the whole model (the reference), and reading the same rows back from a disk cache.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch

from sae_widgets.activations import ActivationStore, write_activation_cache
from sae_widgets.models import load_model

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.3.hook_resid_post", "blocks.2.attn.hook_z",
         ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")]


def rate(store: ActivationStore, n_tokens: int) -> float:
    store.next_batch()  # warm-up: first fill
    start, served = time.perf_counter(), 0
    while served < n_tokens:
        b = store.next_batch()
        served += len(b[0] if isinstance(b, tuple) else b)
    return served / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=65536, help="activation rows timed per configuration")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-ctx", type=int, default=128)
    args = ap.parse_args()
    model = load_model(device=args.device)
    kw = dict(n_ctx=args.n_ctx, batch_size=4096, model_batch_size=32, buffer_size=32768, show_progress=False)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads)"
    print(f"device: {device}; n_ctx {args.n_ctx}, model batch 32 contexts, store batch 4096, buffer 32768, {args.tokens} rows timed")
    rows = []
    for hook in HOOKS:
        ours = ActivationStore(model, hook, **kw)
        full = ActivationStore(model, hook, **kw)
        full.rows.stop_at_layer = None  # the reference: the whole model, unembedding included
        r_ours, r_full = rate(ours, args.tokens), rate(full, args.tokens)
        with tempfile.TemporaryDirectory() as tmp:
            write_activation_cache(model, hook, tmp, n_tokens=args.tokens + 40960, n_ctx=args.n_ctx, show_progress=False)
            r_disk = rate(ActivationStore.from_cache(tmp, **{k: v for k, v in kw.items() if k in ("batch_size", "buffer_size", "show_progress")}), args.tokens)
        name = hook if isinstance(hook, str) else " -> ".join(hook)
        rows.append((name, ours.stop_at_layer, r_ours, r_full, r_disk))
    print()
    print("| hook | stop_at_layer | store (tokens/s) | full model (tokens/s) | ratio | disk cache (tokens/s) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, stop, r_ours, r_full, r_disk in rows:
        print(f"| `{name}` | {stop} | {r_ours:,.0f} | {r_full:,.0f} | {r_ours / r_full:.2f}x | {r_disk:,.0f} | {r_disk / r_ours:.1f}x |")


if __name__ == "__main__":
    main()
