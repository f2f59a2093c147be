"""The feature statistics sweep on the embedded model: tokens per second, latents covered, wall time, peak memory.

    python benchmarks/feature_stats.py                                   # CPU: 100k tokens, d_sae 4096
    python benchmarks/feature_stats.py --device cuda --d-sae 32768 --n-tokens 10000000

The SAE is a TopK SAE (k 32) with random directions, normalised on a sample of the hook's activations, so every
latent fires and the top-k tables see real traffic. The tokens are the embedded corpus, tokenised once before
the clock starts (repeated when more tokens are asked for than it holds) and passed as windows; the sweep itself
(model forward up to the hook, SAE encode, all statistics, logit effects) is what is timed. A short warm-up run
comes first (imports; on CUDA kernel compilation and cuBLAS set-up). Then the stats are saved and reopened: the file's size
and the time to reopen it and read one feature are printed too.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time

import torch

from sae_widgets.feature_stats import FeatureStats
from sae_widgets.models import load_model
from sae_widgets.sae import SAE, SAEConfig
from sae_widgets.token_sources import EmbeddedCorpus
from sae_widgets.tokens import chunk_windows, join_documents


def corpus_windows(model, n_tokens: int, n_ctx: int) -> torch.Tensor:
    """Windows [n, n_ctx] of the embedded corpus covering `n_tokens` scored tokens, the corpus repeated if needed."""
    tok = model.tokenizer
    stream = join_documents(EmbeddedCorpus("train").documents(tok), tok.eos_token_id)
    windows = chunk_windows(stream, n_ctx, tok.bos_token_id)
    need = -(-n_tokens // (n_ctx - 1))
    return windows.repeat(-(-need // len(windows)), 1)[:need]


def make_sae(model, d_sae: int, k: int, hook: str, windows: torch.Tensor, device: torch.device,
             backend: str = "auto") -> SAE:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(arch="topk", d_in=model.cfg.d_model, d_sae=d_sae, k=k, hook=hook, backend=backend)).to(device)
    _, cache = model.run_with_cache(windows[:32].to(model.cfg.device), names_filter=hook)
    sae.initialize(cache[hook][:, 1:].reshape(-1, model.cfg.d_model).to(device).float(), b_dec="mean")
    return sae.eval()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-tokens", type=int, default=100_000)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--hook", default="blocks.1.hook_resid_post")
    ap.add_argument("--n-ctx", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=None, help="windows per model forward (default: by device)")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                    help="the SAE's encoder: auto = the Triton TopK kernel on CUDA, torch = dense pre-activations")
    ap.add_argument("--progress", action="store_true", help="show the sweep's progress bar")
    args = ap.parse_args()
    device = torch.device(args.device)
    model = load_model(device=str(device))
    t0 = time.perf_counter()
    windows = corpus_windows(model, args.n_tokens, args.n_ctx)
    t_tok = time.perf_counter() - t0
    sae = make_sae(model, args.d_sae, args.k, args.hook, windows, device, args.backend)
    kw = dict(batch_size=args.batch_size, device=device)
    FeatureStats.compute(model, sae, windows[:8], show_progress=False, **kw)  # warm-up: imports, kernels, cuBLAS
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    stats = FeatureStats.compute(model, sae, windows, show_progress=args.progress, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB (GPU, allocated)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB (process RSS)"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = stats.save(tmp)
        t_save = time.perf_counter() - t0
        size = path.stat().st_size
        t0 = time.perf_counter()
        FeatureStats.load(tmp).feature(0)
        t_open = time.perf_counter() - t0
    alive = int((stats.columns()["density"] > 0).sum())
    print(f"device: {device_name(device)}, torch {torch.__version__}; embedded model, hook {args.hook}, n_ctx "
          f"{args.n_ctx}; TopK SAE d_sae {args.d_sae}, k {args.k}, backend {args.backend}; n_top 20, 10 quantile bins × 5, context (12, 4); "
          f"tokenising the corpus (untimed): {t_tok:.1f} s")
    print()
    print("| tokens | d_sae | wall time | tokens/s | latents covered | peak memory | file | save | reopen + feature(0) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {stats.n_tokens:,} | {args.d_sae:,} | {wall:.1f} s | {stats.n_tokens / wall:,.0f} | "
          f"{alive:,} / {args.d_sae:,} ({alive / args.d_sae:.1%}) | {peak} | {size / 2 ** 20:.0f} MiB | "
          f"{t_save:.1f} s | {t_open * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
