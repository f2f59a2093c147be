"""Replay a training step as one CUDA graph.

The Triton step is launch-bound without it: on an H100 the host took 8.4 ms to enqueue the ~100 kernels of a step
whose GPU work is 7.1 ms (benchmarks/kernels_profile.py). A graph makes the step one launch. The step function must
not wait for the GPU, and everything that changes between steps must live in tensors it reads (the batch is copied
into the graph's own input buffers; the learning rate is a device tensor).
"""
from __future__ import annotations

from typing import Callable

import torch


def dead_capacity(n_dead: int, d_sae: int, current: int) -> int:
    """A fixed size for the dead-latent list that changes rarely: each new size is a new capture.

    Powers of two from 512 up (capped at d_sae); it keeps the current size while n_dead fits and fills more than a
    quarter of it, so a count wandering around a boundary does not re-capture every step.
    """
    if n_dead == 0:
        return 0
    if current >= n_dead and n_dead * 4 > current:
        return current
    return min(d_sae, max(512, 1 << (n_dead - 1).bit_length()))


def padded_dead_latents(tokens_since_fired: torch.Tensor, window: int, size: int) -> torch.Tensor:
    """The indices of the dead latents in ascending order, then −1s, as a list of exactly `size` (no host sync)."""
    dead = tokens_since_fired >= window
    order = torch.sort(dead.to(torch.uint8), descending=True, stable=True).indices[:size]
    return torch.where(dead[order], order, -1)


class StepGraph:
    """Runs `fn(*tensors, *key)` (a dict of 0-dim tensors out) eagerly `warmup` times per key, then captures it
    and replays the capture. One graph is kept: a new key (another dead-list size or batch shape) re-captures.

    The outputs come back as a dict of views into one fresh tensor, so a caller may keep them across steps.
    """

    def __init__(self, fn: Callable[..., dict[str, torch.Tensor]], warmup: int = 1):
        self.fn, self.warmup, self.captures = fn, warmup, 0
        self.reset()

    def reset(self) -> None:
        """Forget the capture: call it whenever a tensor the step reads is replaced (e.g. on loading a checkpoint)."""
        self.key, self.graph, self.inputs, self.names, self.packed, self._eager_left = None, None, None, None, None, 0

    def __call__(self, tensors: tuple[torch.Tensor | None, ...], key: tuple) -> dict[str, torch.Tensor]:
        full_key = (key, tuple(None if t is None else (t.shape, t.dtype) for t in tensors))
        if full_key != self.key:
            self.reset()
            self.key, self._eager_left = full_key, self.warmup
        if self._eager_left > 0:  # compiles the kernels and creates the optimizer state before any capture
            self._eager_left -= 1
            return self.fn(*tensors, *key)
        if self.graph is None:
            self.inputs = tuple(None if t is None else t.clone() for t in tensors)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.fn(*self.inputs, *key)
                self.names = list(out)
                self.packed = torch.stack([out[n].float() for n in self.names])
            self.graph = graph
            self.captures += 1
        for buf, t in zip(self.inputs, tensors):
            if buf is not None:
                buf.copy_(t)
        self.graph.replay()
        return dict(zip(self.names, self.packed.clone().unbind()))
