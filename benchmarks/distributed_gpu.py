"""Data-parallel SAE training on several GPUs (NCCL): equality with one GPU, and throughput 1 GPU vs N GPUs.

    NCCL_PROTO=Simple torchrun --nproc-per-node 2 benchmarks/distributed_gpu.py   # 2 GPUs (H200s): ~1 minute
    torchrun --nproc-per-node 2 benchmarks/distributed_gpu.py --dry-run   # CPU + gloo, tiny shapes: checks the logic

Prints one table (rank 0). TopK SAE, d_in 768, d_sae 131,072, k 32, synthetic activations made on the GPU (every rank
makes the same global batches; no model, no transformer_lens), 5 % of the latents dead so the aux-k loss runs:
- equality after 1 step and after `--eq-steps` steps, in fp32 and in bf16 autocast, between all ranks training on
  slices of the global batches and rank 0 training alone on the whole batches (the plain single-process Trainer): the
  largest parameter difference, the difference relative to how far the parameters moved (‖θ_N − θ_1‖ / ‖θ_1 − θ_0‖),
  and the loss's relative difference. After one step they agree to float rounding; over more steps a few top-k
  choices flip on rounding-level differences and Adam turns each flip into a change of about lr, so the largest
  difference grows towards lr while the relative one stays small;
- throughput in tokens/s, bf16 autocast: 1 GPU at the global batch (rank 0 alone, the other GPUs idle), N GPUs at the
  same global batch (strong scaling) and N GPUs at that batch per GPU (weak scaling, also with bf16 gradient
  all-reduce), with the ratio to 1 GPU.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.distributed as dist

from sae_widgets.distributed import DataParallel, RankSlice
from sae_widgets.sae import SAE, SAEConfig
from sae_widgets.train import Trainer, TrainConfig


class GlobalBatches:
    """A few global batches made from a seed (the same on every rank), served in a loop."""

    def __init__(self, batch_size: int, d_in: int, device: torch.device, n: int = 3, seed: int = 1):
        g = torch.Generator(device=device).manual_seed(seed)
        mean = torch.randn(d_in, generator=g, device=device)
        self.batches = [torch.randn(batch_size, d_in, generator=g, device=device) + mean for _ in range(n)]
        self.batch_size, self.i = batch_size, 0

    def next_batch(self) -> torch.Tensor:
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]


def build(args, device, global_batch: int, bf16: bool, parallel: DataParallel | None) -> Trainer:
    torch.manual_seed(0)
    with torch.device(device):
        sae = SAE(SAEConfig(arch="topk", d_in=args.d_in, d_sae=args.d_sae, k=args.k))
    data = GlobalBatches(global_batch, args.d_in, device)
    store = data if parallel is None else RankSlice(data, parallel)
    tr = Trainer(sae, store, TrainConfig(total_tokens=10 ** 15, progress=False, autocast_bf16=bf16, lr=1e-3,
                                         init_tokens=global_batch, dead_window_tokens=10 ** 12, lr_warmup_steps=1),
                 parallel=parallel)
    tr._initialize()
    sae.train()
    tr.tokens_since_fired[: args.d_sae // 20] = 10 ** 13  # 5 % dead: the aux-k loss runs every step, as in kernels_gpu
    return tr


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(tr: Trainer, steps: int) -> dict[str, float]:
    m = {}
    for _ in range(steps):
        m = tr.train_step()
    tr.raise_if_diverged()
    return {k: float(v) for k, v in m.items()}


def params(tr: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in tr.sae.named_parameters()}


def trajectory(tr: Trainer, eq_steps: int) -> list[tuple[dict[str, torch.Tensor], dict[str, float]]]:
    """[(parameters, metrics)] after 0, 1 and `eq_steps` steps."""
    out = [(params(tr), {})]
    for steps in (1, eq_steps - 1):
        m = train(tr, steps)
        out.append((params(tr), m))
    return out


def compare(ref, got, start) -> str:
    (a, ma), (b, mb) = ref, got
    biggest = max(float((a[k] - b[k]).abs().max()) for k in a)
    dist_ab = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
    moved = sum(float(((a[k] - start[k]) ** 2).sum()) for k in a) ** 0.5
    loss = abs(ma["loss"] - mb["loss"]) / abs(ma["loss"])
    return f"max |Δθ| {biggest:.1e}, rel {dist_ab / moved:.1e}, loss rel Δ {loss:.1e}"


def timed(tr: Trainer, args, device, parallel: DataParallel | None) -> tuple[float, float]:
    """(tokens/s, peak GiB) over `args.steps` steps after `args.warmup` (compiles, CUDA-graph capture)."""
    train(tr, args.warmup)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    train(tr, args.steps)
    sync(device)
    dt = torch.tensor(time.perf_counter() - t0, dtype=torch.float64, device=device)
    if parallel is not None and parallel.world_size > 1:
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    return args.steps * tr.batch_tokens / float(dt), peak


def free(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU and gloo with tiny shapes (checks the script's logic)")
    ap.add_argument("--d-in", type=int, default=768)
    ap.add_argument("--d-sae", type=int, default=131072)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16384, help="global batch of the strong-scaling rows; per-GPU batch "
                    "of the weak-scaling row")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per throughput row")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--eq-steps", type=int, default=8, help="steps of the equality rows")
    args = ap.parse_args()
    if args.dry_run:
        args.d_in, args.d_sae, args.k, args.batch, args.steps, args.warmup, args.eq_steps = 32, 256, 4, 256, 3, 1, 4
    parallel = DataParallel.from_torchrun("cpu" if args.dry_run else "cuda")
    device, n, rank0 = parallel.device, parallel.world_size, parallel.is_writer
    rows = []

    for bf16 in (False, True):  # equality: N ranks on slices vs rank 0 alone on the whole batches
        ref = None
        if rank0:
            tr = build(args, device, args.batch, bf16, None)
            ref = trajectory(tr, args.eq_steps)
            del tr
            free(device)
        parallel.barrier()
        tr = build(args, device, args.batch, bf16, parallel)
        got = trajectory(tr, args.eq_steps)
        if rank0:
            for i, steps in ((1, 1), (2, args.eq_steps)):
                rows.append((f"equality after {steps} step{'s' if steps > 1 else ''}", f"{n} vs 1", args.batch,
                             "bf16" if bf16 else "fp32", compare(ref[i], got[i], ref[0][0]), ""))
        del tr, ref, got
        free(device)
        parallel.barrier()

    base = None
    if rank0:  # 1 GPU: rank 0 alone, the plain single-process path
        tr = build(args, device, args.batch, True, None)
        base, peak = timed(tr, args, device, None)
        rows.append(("throughput, 1 GPU", 1, args.batch, "bf16", f"{base / 1e6:.3f} M tok/s, peak {peak:.1f} GiB",
                     "1.00x"))
        del tr
        free(device)
    parallel.barrier()
    for label, global_batch, reduce_dtype in (("strong", args.batch, None), ("weak", args.batch * n, None),
                                              ("weak, bf16 grad all-reduce", args.batch * n, torch.bfloat16)):
        parallel.reduce_dtype = reduce_dtype
        tr = build(args, device, global_batch, True, parallel)
        rate, peak = timed(tr, args, device, parallel)
        if rank0:
            rows.append((f"throughput, {n} GPUs ({label})", n, global_batch, "bf16",
                         f"{rate / 1e6:.3f} M tok/s, peak {peak:.1f} GiB", f"{rate / base:.2f}x"))
        del tr
        free(device)
        parallel.barrier()
    parallel.reduce_dtype = None

    if rank0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        print(f"\n{n} x {name}, torch {torch.__version__}, backend {dist.get_backend() if n > 1 else 'none'}; TopK SAE "
              f"d_in {args.d_in}, d_sae {args.d_sae:,}, k {args.k}; {args.steps} timed steps after {args.warmup}\n")
        head = ("measurement", "GPUs", "global batch", "precision", "result", "vs 1 GPU")
        table = [head, *[tuple(str(c) if not isinstance(c, int) else f"{c:,}" for c in r) for r in rows]]
        widths = [max(len(r[i]) for r in table) for i in range(len(head))]
        for j, r in enumerate(table):
            print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
            if j == 0:
                print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    parallel.close()


if __name__ == "__main__":
    main()
