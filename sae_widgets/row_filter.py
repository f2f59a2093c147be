"""Which activation rows of a model batch become training and metric rows, and how many were dropped, and why.

Three rules, in this order, over the positions of one model batch of windows:

1. The BOS position (position 0 when BOS is prepended) is dropped, unless `keep_bos_rows` (then no rule touches it).
2. A row whose token is an excluded id (by default the tokenizer's special tokens: see `special_tokens`) is dropped.
3. A row whose norm exceeds `massive_norm_factor` x the median row norm of the model batch (non-BOS positions) at
   any of the store's hooks is dropped: attention-sink positions ("massive activations", Sun et al. 2024), a few
   rows whose squared error would dominate an SAE's loss and a metric's variance. The median is per model batch,
   so the rule needs no pass over the data and keeps the same rows however the batches are later shuffled, cached
   or sharded. 0 or None turns it off.

   Why 10: measured on SmolLM2-135M-Instruct (48 windows of 128 tokens of the embedded corpus, 6,094 non-BOS,
   non-special rows per hook, every blocks.L.hook_resid_post), the massive rows are BOS and `<|endoftext|>`
   (100-120x the median at layer 11, about 80x at 15, 60x at 19, 25x at 25) and a ',' right after BOS, a secondary
   sink (14x at layers 11-12, 11x at 15, under 10x from layer 17 on, where it is kept). At layers 10-29, where SAEs
   are usually trained, every other row stays under 2.5x: 10 separates the two with room on both sides. The cost is at layers 2-5, where ' the' rows form a tail up to 13x with no gap: 10 drops 25 of the 6,094
   rows at layer 2 (0.4 %), 2 at layers 3 and 4, 1 at layer 5; raise the factor (or pass 0) for those hooks. The
   embedded model's largest non-BOS row is 2.6x its batch median over all its residual, attention and MLP hooks,
   so it drops none there.

A row dropped by rule 2 is counted there, not again under rule 3.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_MASSIVE_NORM_FACTOR = 10.0
COUNTERS = ("dropped_special_tokens", "dropped_massive_norm", "rows_kept")


def check_massive_norm_factor(factor: float | None) -> float | None:
    """None when the rule is off (None or 0), else the factor; a factor in (0, 1] would drop ordinary rows."""
    if factor is None or factor == 0:
        return None
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise ValueError(f"massive_norm_factor={factor!r} must be a number > 1 (a row is dropped when its norm exceeds "
                         f"that multiple of the median), or 0 / None to keep massive-norm rows")
    return float(factor)


class RowFilter:
    """The keep mask of one model batch ([n_windows, n_ctx] tokens and activations), with running drop counts."""

    def __init__(self, d_hooks: Sequence[int], *, bos_first: bool, keep_bos_rows: bool,
                 excluded_ids: Sequence[int] = (), massive_norm_factor: float | None = DEFAULT_MASSIVE_NORM_FACTOR):
        self.d_hooks = list(d_hooks)
        self.first = int(bos_first)
        self.keep_bos_rows = bos_first and keep_bos_rows
        self.excluded_ids = sorted(int(i) for i in excluded_ids)
        self.massive_norm_factor = check_massive_norm_factor(massive_norm_factor)
        self.counts = dict.fromkeys(COUNTERS, 0)

    def keep(self, tokens: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """Bool [n_windows, n_ctx]: the positions whose rows are kept (`acts` is [n_windows, n_ctx, sum(d_hooks)])."""
        candidate = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        candidate[:, : self.first] = False
        special = torch.zeros_like(candidate)
        if self.excluded_ids:
            ids = torch.tensor(self.excluded_ids, dtype=tokens.dtype, device=tokens.device)
            special = torch.isin(tokens, ids) & candidate
        massive = torch.zeros_like(candidate)
        if self.massive_norm_factor is not None:
            for part in torch.split(acts, self.d_hooks, dim=-1):
                norms = part.float().norm(dim=-1).to(tokens.device)
                median = norms[:, self.first:].median()
                if median > 0:
                    massive |= norms > self.massive_norm_factor * median
            massive &= candidate & ~special
        keep = candidate & ~special & ~massive
        if self.keep_bos_rows:
            keep[:, 0] = True
        self.counts["dropped_special_tokens"] += int(special.sum())
        self.counts["dropped_massive_norm"] += int(massive.sum())
        self.counts["rows_kept"] += int(keep.sum())
        return keep

    def describe(self) -> dict:
        return {"exclude_token_ids": self.excluded_ids, "massive_norm_factor": self.massive_norm_factor}


def counts_line(what: str, counts: dict[str, int]) -> str:
    """One line for logs and tables: rows kept, and dropped by rule."""
    return (f"{what} rows: {counts.get('rows_kept', 0):,} kept; dropped {counts.get('dropped_special_tokens', 0):,} "
            f"special-token and {counts.get('dropped_massive_norm', 0):,} massive-norm rows")
