"""Training throughput with and without the TrainingMonitor attached (issue 6: within 5 %), in one run.

    python benchmarks/monitor_overhead.py [--steps 100] [--repeats 3]

Three ways to run the same seeded training (synthetic data, TopK SAE 64 -> 512, batches of 1,024): plain `run()` in
the calling thread, plain `run()` in a bare thread (what the monitor does, without its callback), and under
`TrainingMonitor`. Best of `--repeats` each, alternated. torch uses one thread so other load on a small machine
does not swamp the monitor's own cost.
"""
from __future__ import annotations

import argparse
import platform
import threading

import torch

from sae_widgets.sae import SAE, SAEConfig
from sae_widgets.synthetic import SyntheticActivations
from sae_widgets.train import Trainer, TrainConfig
from sae_widgets.widgets import TrainingMonitor


def run(mode: str, steps: int) -> float:
    torch.manual_seed(0)
    store = SyntheticActivations(d_in=64, n_features=512, batch_size=1024, mean_active=5, seed=0)
    trainer = Trainer(SAE(SAEConfig(arch="topk", d_in=64, d_sae=512, k=16)), store,
                      TrainConfig(total_tokens=1024 * steps, progress=False, log_every=1, init_tokens=2048))
    if mode == "monitor":
        TrainingMonitor(trainer, refresh_s=0.5).start().wait(timeout=600)
    elif mode == "thread":
        t = threading.Thread(target=trainer.run)
        t.start()
        t.join()
    else:
        trainer.run()
    return trainer.history[-1]["tokens_per_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    got = {"plain run() (main thread)": [], "plain run() in a thread": [], "with TrainingMonitor": []}
    modes = dict(zip(got, ("plain", "thread", "monitor")))
    for _ in range(args.repeats):
        for name in got:
            got[name].append(run(modes[name], args.steps))
    best = {k: max(v) for k, v in got.items()}
    ref = best["plain run() in a thread"]
    print(f"device: CPU ({platform.machine()}), torch {torch.__version__}, 1 thread; {args.steps} steps of 1,024 tokens, "
          f"best of {args.repeats}\n")
    print("| run | tokens/s | ratio to plain run() in a thread |\n|---|---|---|")
    for name, v in best.items():
        print(f"| {name} | {v:,.0f} | {v / ref:.3f} |")


if __name__ == "__main__":
    main()
