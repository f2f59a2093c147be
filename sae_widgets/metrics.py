"""SAE / transcoder evaluation metrics, with the SAELens / SAEBench names and the definitions of requirements §3.

    result = evaluate(model, sae, store, n_tokens=65_536)
    print(result.table())                      # or result.metrics["explained_variance"], result.feature_density

Reconstruction and sparsity metrics stream: `MetricAccumulator.update(target, recon, latents)` adds float64
sums per batch and `.compute()` turns them into metrics, so an evaluation over many tokens holds one batch at a
time and dataset-level quantities (the variance in `explained_variance`) use the mean of the whole set, not a
per-batch mean. Model metrics splice the SAE into the LM's forward pass (`splice_hooks`) and compare next-token
cross-entropy and KL with the clean run and with zero ablation (`model_metrics`). For a transcoder the target
is the output-hook activation y, everywhere.
"""
from __future__ import annotations

import html
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

RECONSTRUCTION_METRICS = ("mse", "explained_variance", "fvu", "cossim", "l2_ratio", "relative_reconstruction_bias")
SPARSITY_METRICS = ("l0", "l1", "frac_alive", "freq_over_1_percent", "freq_over_10_percent")
MODEL_METRICS = ("ce_loss_score", "kl_div_score", "ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation",
                 "ce_loss_with_sae_and_error", "kl_div_with_sae", "kl_div_with_ablation", "kl_div_with_sae_and_error")
SPLICE_MODES = ("sae", "sae_and_error", "ablation")
DENSITY_EPS = 1e-10  # log10(density + 1e-10), as SAELens plots it: dead latents land at -10
_EPS = 1e-12  # guards cos / norm ratios of all-zero rows (they count as cos 0)
SCORE_MIN_GAP = 1e-6  # nats: a CE gap or KL of zero ablation below this is float rounding (float32 KL of an
# unchanged distribution comes out near ±1e-8), so a score divided by it would be noise


# ----------------------------------------------------------------------------------------------- streaming sums
def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1, t.shape[-1])


class MetricAccumulator:
    """Float64 running sums for the reconstruction and sparsity metrics of §3, one batch at a time.

    `update(target, recon, latents)` takes rows [N, d] (target x, or y for a transcoder; recon x̂; latents
    [N, d_sae], optional). Sums stay on the batch's device (no sync per batch). The variance is accumulated
    around the first batch's mean (a shift that leaves it unchanged), so a large common offset in the
    activations costs no precision.
    """

    def __init__(self) -> None:
        self.n = 0  # target rows seen
        self.n_latent_rows = 0
        self._shift: torch.Tensor | None = None
        self._s: dict[str, torch.Tensor] = {}
        self.fire_counts: torch.Tensor | None = None  # [d_sae] tokens on which each latent was non-zero
        self.l0_counts: torch.Tensor | None = None  # [d_sae + 1] tokens with each L0

    def _add(self, name: str, value: torch.Tensor) -> None:
        self._s[name] = self._s[name] + value if name in self._s else value

    @torch.no_grad()
    def update(self, target: torch.Tensor, recon: torch.Tensor, latents: torch.Tensor | None = None) -> None:
        x, xh = _rows(target).double(), _rows(recon).double().to(target.device)
        if x.shape != xh.shape:
            raise ValueError(f"target {tuple(x.shape)} and reconstruction {tuple(xh.shape)} differ in shape")
        if len(x) == 0:
            return
        if self._shift is None:
            self._shift = x.mean(0)
        xc = x - self._shift
        xn, xhn, dot = x.norm(dim=-1), xh.norm(dim=-1), (x * xh).sum(-1)
        self._add("x_centred", xc.sum(0))  # Σ(x - c)
        self._add("x_centred_sq", xc.pow(2).sum())  # Σ‖x - c‖²
        self._add("err_sq", (x - xh).pow(2).sum())  # Σ‖x - x̂‖²
        self._add("cos", (dot / (xn * xhn).clamp_min(_EPS)).sum())
        self._add("l2_ratio", (xhn / xn.clamp_min(_EPS)).sum())
        self._add("recon_sq", xhn.pow(2).sum())  # Σ‖x̂‖²
        self._add("dot", dot.sum())  # Σ⟨x, x̂⟩
        self.n += len(x)
        if latents is not None:
            self.update_latents(latents, n_rows=len(x))

    @torch.no_grad()
    def update_latents(self, latents: torch.Tensor, n_rows: int | None = None) -> None:
        """Sparsity sums only (L0, L1, firing counts); a latent fires where it is non-zero (signed for AbsTopK)."""
        f = _rows(latents)
        if n_rows is not None and len(f) != n_rows:
            raise ValueError(f"latents have {len(f)} rows but the target has {n_rows}")
        active = f != 0
        l0 = active.sum(-1)
        if self.fire_counts is None:
            self.fire_counts = torch.zeros(f.shape[-1], dtype=torch.long, device=f.device)
            self.l0_counts = torch.zeros(f.shape[-1] + 1, dtype=torch.long, device=f.device)
        elif f.shape[-1] != len(self.fire_counts):
            raise ValueError(f"latents have {f.shape[-1]} columns, earlier batches had {len(self.fire_counts)}")
        self.fire_counts += active.sum(0)
        self.l0_counts += torch.bincount(l0, minlength=f.shape[-1] + 1)
        self._add("l0", l0.sum())
        self._add("l1", f.abs().sum(-1, dtype=torch.float64).sum())
        self.n_latent_rows += len(f)

    def compute(self) -> dict[str, float]:
        """Metrics as plain floats: those of RECONSTRUCTION_METRICS, plus SPARSITY_METRICS if latents were given."""
        s = {k: v.item() if v.dim() == 0 else v.cpu() for k, v in self._s.items()}
        out: dict[str, float] = {}
        if self.n:
            n = self.n
            mse = s["err_sq"] / n
            var = s["x_centred_sq"] / n - float((s["x_centred"] / n).pow(2).sum())  # E‖x‖² − ‖E x‖², shift-invariant
            fvu = mse / var if var > 0 else math.nan
            out.update(mse=mse, explained_variance=1.0 - fvu, fvu=fvu, cossim=s["cos"] / n, l2_ratio=s["l2_ratio"] / n,
                       relative_reconstruction_bias=s["recon_sq"] / s["dot"] if s["dot"] != 0 else math.nan)
        if self.n_latent_rows:
            density = self.feature_density()
            out.update(l0=s["l0"] / self.n_latent_rows, l1=s["l1"] / self.n_latent_rows,
                       frac_alive=float((density > 0).double().mean()),
                       freq_over_1_percent=float((density > 0.01).double().mean()),
                       freq_over_10_percent=float((density > 0.1).double().mean()))
        return out

    def feature_density(self) -> torch.Tensor | None:
        """Per latent, the fraction of tokens on which it fired: float64 [d_sae] on the CPU."""
        if self.fire_counts is None:
            return None
        return self.fire_counts.cpu().double() / self.n_latent_rows

    def l0_histogram(self) -> torch.Tensor | None:
        """Tokens per L0 value (index = number of active latents), trailing zeros trimmed: int64 on the CPU."""
        if self.l0_counts is None:
            return None
        counts = self.l0_counts.cpu()
        nz = torch.nonzero(counts)
        return counts[: int(nz.max()) + 1] if len(nz) else counts[:1]


# ----------------------------------------------------------------------------------------------- pure functions
def reconstruction_metrics(target: torch.Tensor, recon: torch.Tensor, latents: torch.Tensor | None = None) -> dict[str, float]:
    """All §3 reconstruction (and, with latents, sparsity) metrics of one set of rows."""
    acc = MetricAccumulator()
    acc.update(target, recon, latents)
    return acc.compute()


def mse(target: torch.Tensor, recon: torch.Tensor) -> float:
    """Mean over tokens of Σ_d (x − x̂)² (a sum over d, not a mean: SAELens/SAEBench `mse`)."""
    return reconstruction_metrics(target, recon)["mse"]


def explained_variance(target: torch.Tensor, recon: torch.Tensor) -> float:
    """1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²), with the mean taken over all the rows given."""
    return reconstruction_metrics(target, recon)["explained_variance"]


def fvu(target: torch.Tensor, recon: torch.Tensor) -> float:
    """Fraction of variance unexplained, 1 − explained_variance."""
    return reconstruction_metrics(target, recon)["fvu"]


def cossim(target: torch.Tensor, recon: torch.Tensor) -> float:
    """Mean over tokens of cos(x, x̂)."""
    return reconstruction_metrics(target, recon)["cossim"]


def l2_ratio(target: torch.Tensor, recon: torch.Tensor) -> float:
    """Mean over tokens of ‖x̂‖ / ‖x‖: below 1 means shrinkage."""
    return reconstruction_metrics(target, recon)["l2_ratio"]


def relative_reconstruction_bias(target: torch.Tensor, recon: torch.Tensor) -> float:
    """E‖x̂‖² / E⟨x, x̂⟩ (Rajamanoharan et al. 2024): 1 when x̂ is not systematically shrunk or inflated."""
    return reconstruction_metrics(target, recon)["relative_reconstruction_bias"]


def l0(latents: torch.Tensor) -> float:
    """Mean over tokens of the number of non-zero latents."""
    return float((_rows(latents) != 0).sum(-1).double().mean())


def l1(latents: torch.Tensor) -> float:
    """Mean over tokens of Σ|f|."""
    return float(_rows(latents).abs().sum(-1, dtype=torch.float64).mean())


def l0_per_token(latents: torch.Tensor) -> torch.Tensor:
    """The L0 of every token (int64 [N]): the distribution behind `l0`."""
    return (_rows(latents) != 0).sum(-1)


def feature_density(latents: torch.Tensor) -> torch.Tensor:
    """Per latent, the fraction of tokens on which it is non-zero (float64 [d_sae])."""
    return (_rows(latents) != 0).double().mean(0)


def density_fractions(density: torch.Tensor) -> dict[str, float]:
    """frac_alive, freq_over_1_percent, freq_over_10_percent: fractions of latents with density > 0, > 1 %, > 10 %."""
    d = density.double()
    return {"frac_alive": float((d > 0).double().mean()), "freq_over_1_percent": float((d > 0.01).double().mean()),
            "freq_over_10_percent": float((d > 0.1).double().mean())}


def log10_density_histogram(density: torch.Tensor, bins: int = 50, lo: float = -10.0,
                            hi: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram of log10(density + 1e-10) (SAELens' feature-density plot): (counts [bins], edges [bins + 1]).

    Dead latents fall in the first bin (log10(1e-10) = -10); values outside [lo, hi] are clipped into the end bins.
    """
    logd = torch.log10(density.detach().double().cpu() + DENSITY_EPS).clamp(lo, hi)
    counts, edges = torch.histogram(logd, bins=bins, range=(lo, hi))
    return counts.long(), edges


# ----------------------------------------------------------------------------------------------- splicing
def _sae_forward(sae, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂, latents) of rows, run in the SAE's dtype and device."""
    w = sae.W_dec
    out = sae(rows.to(w.device, w.dtype))
    return out[0], out[1]


def splice_hooks(sae, mode: str = "sae", *, keep_first: bool = False) -> list[tuple[str, Callable]]:
    """`fwd_hooks` for `model.run_with_hooks` that put the SAE into the forward pass.

    mode "sae": the activation becomes x̂; "sae_and_error": x̂ + (x − x̂) (equals x up to float error: checks the
    plumbing); "ablation": zeros. An SAE replaces its own hook; a transcoder (`cfg.out_hook` set) reads its input
    at `cfg.hook` and replaces the activation at `cfg.out_hook`. Per-head hooks ([batch, pos, heads, d_head], e.g.
    `hook_z`) are flattened to rows of heads * d_head and back. `keep_first` leaves position 0 (BOS) untouched.
    """
    if mode not in SPLICE_MODES:
        raise ValueError(f"mode={mode!r} is not one of {SPLICE_MODES}")
    cfg = sae.cfg
    out_hook = getattr(cfg, "out_hook", None)
    start = int(keep_first)
    captured: dict[str, torch.Tensor] = {}

    def capture(act, hook):
        captured["x"] = act[:, start:].clone()  # the model may reuse this buffer before the output hook fires
        return act

    def replace(act, hook):
        new = act.clone()
        part = act[:, start:]
        if mode == "ablation":
            new[:, start:] = 0
            return new
        if out_hook is not None:
            if "x" not in captured:
                raise RuntimeError(f"transcoder input hook {cfg.hook!r} did not fire before {out_hook!r}")
            inp = captured.pop("x")
        else:
            inp = part
        d_in = inp[0, 0].numel() if inp.numel() else cfg.d_in
        if d_in != cfg.d_in:
            raise ValueError(f"hook {cfg.hook!r} gives {d_in} values per token but the SAE has d_in={cfg.d_in}")
        x_hat, _ = _sae_forward(sae, inp.reshape(-1, d_in))
        x_hat = x_hat.to(act.device, torch.float32).reshape(part.shape)
        if mode == "sae_and_error":
            x_hat = x_hat + (part.float() - x_hat)
        new[:, start:] = x_hat.to(act.dtype)
        return new

    hooks = [(cfg.hook, capture)] if out_hook is not None and mode != "ablation" else []
    return hooks + [(out_hook if out_hook is not None else cfg.hook, replace)]


def loss_scores(ce_clean: float, ce_sae: float, ce_zero: float, kl_sae: float, kl_zero: float,
                hook: str = "") -> dict[str, float]:
    """ce_loss_score = (CE_zero − CE_sae) / (CE_zero − CE_clean) and kl_div_score = (KL_zero − KL_sae) / KL_zero.

    Each is NaN, with a one-line warning naming the hook and the losses, where its denominator is not above
    SCORE_MIN_GAP: zero-ablating the hook then does not raise the loss (CE; at some hooks of real models it lowers
    it) or does not change the next-token distribution (KL, ≥ 0 exactly, ±rounding in float), and the ratio would
    be > 1, negative or noise while looking like a score."""
    where = f" at {hook}" if hook else ""
    scores = {"ce_loss_score": math.nan, "kl_div_score": math.nan}
    if ce_zero - ce_clean > SCORE_MIN_GAP:
        scores["ce_loss_score"] = (ce_zero - ce_sae) / (ce_zero - ce_clean)
    else:
        warnings.warn(f"ce_loss_score{where} is NaN: zero-ablating the hook does not raise the loss (CE "
                      f"{ce_zero:.6g} with the hook zeroed, {ce_clean:.6g} clean, nats)", RuntimeWarning, stacklevel=2)
    if kl_zero > SCORE_MIN_GAP:
        scores["kl_div_score"] = (kl_zero - kl_sae) / kl_zero
    else:
        warnings.warn(f"kl_div_score{where} is NaN: zero-ablating the hook does not change the next-token "
                      f"distribution (KL {kl_zero:.3g} with the hook zeroed, not above {SCORE_MIN_GAP:g}; "
                      f"{kl_sae:.3g} with the SAE, nats)", RuntimeWarning, stacklevel=2)
    return scores


@torch.no_grad()
def model_metrics(model, sae, token_batches: Iterable[torch.Tensor], *, prepend_bos: bool = True) -> dict[str, float]:
    """Spliced CE / KL and the scores, over the given token windows [batch, n_ctx].

    CE is the mean next-token cross-entropy (nats); KL is KL(clean ‖ spliced) of the next-token distributions, mean
    over predicted positions. With `prepend_bos`, position 0 (BOS) is never spliced (SAEs are trained without BOS
    rows) and its prediction is not scored, so every variant is scored on the same positions 1..n_ctx-2.
    ce_loss_score = (CE_zero − CE_sae) / (CE_zero − CE_clean), kl_div_score = (KL_zero − KL_sae) / KL_zero
    (SAELens names), both from the means over all windows; NaN with a warning where zero ablation does not raise
    the loss / change the distribution (`loss_scores`).
    """
    start = int(prepend_bos)
    sums = {f"ce_{m}": 0.0 for m in ("clean", *SPLICE_MODES)} | {f"kl_{m}": 0.0 for m in SPLICE_MODES}
    n = 0
    for tokens in token_batches:
        if tokens.shape[1] - 1 - start < 1:
            raise ValueError(f"windows of {tokens.shape[1]} tokens leave no scored predictions")
        targets = tokens[:, start + 1:]

        def logprobs(logits):
            return F.log_softmax(logits[:, start:-1].float(), dim=-1)

        lp_clean = logprobs(model.run_with_hooks(tokens, fwd_hooks=[]))
        sums["ce_clean"] += float(-lp_clean.gather(-1, targets[..., None]).sum(dtype=torch.float64))
        for mode in SPLICE_MODES:
            lp = logprobs(model.run_with_hooks(tokens, fwd_hooks=splice_hooks(sae, mode, keep_first=prepend_bos)))
            sums[f"ce_{mode}"] += float(-lp.gather(-1, targets[..., None]).sum(dtype=torch.float64))
            kl = F.kl_div(lp, lp_clean, log_target=True, reduction="none").sum(-1)  # Σ_v p_clean (log p_clean − log p)
            sums[f"kl_{mode}"] += float(kl.sum(dtype=torch.float64))
        n += targets.numel()
    if n == 0:
        raise ValueError("no token windows given")
    m = {k: v / n for k, v in sums.items()}
    hook = getattr(sae.cfg, "out_hook", None) or sae.cfg.hook  # the hook that is replaced and ablated
    return {
        **loss_scores(m["ce_clean"], m["ce_sae"], m["ce_ablation"], m["kl_sae"], m["kl_ablation"], hook),
        "ce_loss_without_sae": m["ce_clean"], "ce_loss_with_sae": m["ce_sae"],
        "ce_loss_with_ablation": m["ce_ablation"], "ce_loss_with_sae_and_error": m["ce_sae_and_error"],
        "kl_div_with_sae": m["kl_sae"], "kl_div_with_ablation": m["kl_ablation"],
        "kl_div_with_sae_and_error": m["kl_sae_and_error"],
        "n_predicted_tokens": float(n),
    }


# ----------------------------------------------------------------------------------------------- evaluate
@dataclass
class EvalResult:
    """Metrics of one evaluation: `.metrics` (name -> float) and the per-latent / per-token distributions."""

    metrics: dict[str, float]
    feature_density: torch.Tensor | None = None  # float64 [d_sae]
    l0_histogram: torch.Tensor | None = None  # int64: tokens with L0 = index
    n_tokens: int = 0
    n_model_tokens: int = 0  # predicted positions scored for the model metrics (0 when skipped)
    notes: list[str] = field(default_factory=list)
    # rows the store kept and dropped by rule while this evaluation drew from it (row_filter.COUNTERS; {} for a cache)
    row_counts: dict[str, int] = field(default_factory=dict)

    def density_histogram(self, bins: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
        """log10(density + 1e-10) histogram: (counts, edges)."""
        return log10_density_histogram(self.feature_density, bins=bins)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: metrics, token counts, notes and the distributions as lists."""
        out: dict[str, Any] = {"metrics": dict(self.metrics), "n_tokens": self.n_tokens,
                               "n_model_tokens": self.n_model_tokens, "notes": list(self.notes),
                               "row_counts": dict(self.row_counts)}
        if self.feature_density is not None:
            counts, edges = self.density_histogram()
            out.update(feature_density=self.feature_density.tolist(), log10_density_histogram={
                "counts": counts.tolist(), "edges": edges.tolist()})
        if self.l0_histogram is not None:
            out["l0_histogram"] = self.l0_histogram.tolist()
        return out

    def _sections(self) -> list[tuple[str, list[tuple[str, str]]]]:
        def fmt(v: float) -> str:
            return f"{v:.6g}" if isinstance(v, float) else str(v)

        sections = []
        for title, names in (("reconstruction", RECONSTRUCTION_METRICS), ("sparsity", SPARSITY_METRICS),
                             ("model (SAE spliced into the LM)", MODEL_METRICS)):
            rows = [(k, fmt(self.metrics[k])) for k in names if k in self.metrics]
            if rows:
                sections.append((title, rows))
        return sections

    def _header(self) -> str:
        head = f"SAE evaluation over {self.n_tokens:,} tokens"
        if self.n_model_tokens:
            head += f" (model metrics over {self.n_model_tokens:,} predicted tokens)"
        return head

    def table(self) -> str:
        """A small aligned text table, grouped by kind, with notes (e.g. why model metrics were skipped)."""
        sections = self._sections()
        width = max([len(k) for _, rows in sections for k, _ in rows] + [10])
        lines = [self._header()]
        for title, rows in sections:
            lines.append(title)
            lines += [f"  {k:<{width}}  {v:>12}" for k, v in rows]
        if self.row_counts:
            from .row_filter import counts_line

            lines.append(counts_line("evaluation", self.row_counts))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        lines = [f"**{self._header()}**", "", "| metric | value |", "|---|---:|"]
        for title, rows in self._sections():
            lines.append(f"| *{title}* | |")
            lines += [f"| `{k}` | {v} |" for k, v in rows]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        e = html.escape
        body = []
        for title, rows in self._sections():
            body.append(f"<tr><th colspan='2' style='text-align:left'>{e(title)}</th></tr>")
            body += [f"<tr><td><code>{e(k)}</code></td><td style='text-align:right'>{e(v)}</td></tr>" for k, v in rows]
        notes = "".join(f"<li>{e(n)}</li>" for n in self.notes)
        return (f"<div><b>{e(self._header())}</b><table>{''.join(body)}</table>"
                + (f"<ul>{notes}</ul>" if notes else "") + "</div>")

    def __str__(self) -> str:
        return self.table()


DEFAULT_CE_TOKENS = 4096  # model metrics run the LM four times per window: modest by default (CPU)


def evaluate(model, sae, store, n_tokens: int, *, n_ctx_batches: int | None = None, ce_tokens: int | None = None,
             ce_batch_size: int | None = None, show_progress: bool = False) -> EvalResult:
    """Evaluate `sae` on `n_tokens` rows of `store` and, given the LM, spliced into the model.

    Reconstruction / sparsity metrics stream over `store.next_batch()` (a [B, d_in] tensor, or (x, y) for a
    transcoder store: the target is then y) until exactly `n_tokens` rows are seen; the store advances, so pass an
    evaluation store rather than the training one. Model metrics run over token windows from
    `store.rows.window_batches` (model-backed stores): `n_ctx_batches` batches of `ce_batch_size` windows, or else
    enough windows for `ce_tokens` tokens (default min(n_tokens, 4096)). They are skipped, with a note, when
    `model` is None or the store has no token windows (a disk cache). The SAE runs in eval mode.

    Which rows count: the store's (`ActivationStore`: by default no BOS, special-token or massive-norm rows);
    `EvalResult.row_counts` says how many rows the store kept and dropped by rule while this evaluation drew from it (the
    buffer reads ahead, so it covers somewhat more rows than `n_tokens`). The spliced CE / KL are over whole
    windows: the SAE replaces every position but BOS, special-token and massive-norm positions included (the model
    sees its reconstruction there too), and every prediction after BOS is scored.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens} must be >= 1")
    out_hook = getattr(sae.cfg, "out_hook", None)
    store_hooks = list(getattr(store, "hooks", []) or [])
    want = [sae.cfg.hook] + ([out_hook] if out_hook is not None else [])
    if store_hooks and store_hooks != want:
        raise ValueError(f"the store streams {store_hooks} but the {'transcoder' if out_hook else 'SAE'} "
                         f"reads {want}: build the store with the same hook name(s)")
    was_training = sae.training
    counts_before = dict(getattr(store, "counts", {}) or {})
    sae.eval()
    try:
        acc = MetricAccumulator()
        bar = _bar(show_progress, n_tokens, "evaluating SAE")
        while acc.n < n_tokens:
            batch = store.next_batch()
            if isinstance(batch, (tuple, list)) != (out_hook is not None):
                raise ValueError("a transcoder needs a paired (x, y) store and an SAE a single-hook store")
            x, y = batch if out_hook is not None else (batch, batch)
            take = n_tokens - acc.n
            x, y = x[:take], y[:take]
            with torch.no_grad():
                x_hat, latents = _sae_forward(sae, x)
            acc.update(y, x_hat, latents)
            if bar is not None:
                bar.update(len(x))
        if bar is not None:
            bar.close()
        metrics = acc.compute()
        notes: list[str] = []
        n_model = 0
        rows = getattr(store, "rows", None)
        if model is None:
            notes.append("model metrics (CE / KL) skipped: no model given")
        elif not hasattr(rows, "window_batches"):
            notes.append("model metrics (CE / KL) skipped: the store has no token windows (cache-backed store)")
        else:
            n_ctx = rows.n_ctx
            bs = ce_batch_size or getattr(rows, "model_batch_size", 8)
            if n_ctx_batches is None:
                want_tokens = min(n_tokens, DEFAULT_CE_TOKENS) if ce_tokens is None else ce_tokens
                windows = math.ceil(want_tokens / n_ctx)
                bs = max(1, min(bs, windows))
                n_ctx_batches = math.ceil(windows / bs)
            windows_it = rows.window_batches(bs)
            batches = (next(windows_it) for _ in range(n_ctx_batches))
            if show_progress:
                from tqdm.auto import tqdm

                batches = tqdm(batches, total=n_ctx_batches, desc="spliced CE / KL", leave=False)
            mm = model_metrics(model, sae, batches, prepend_bos=bool(getattr(rows, "prepend_bos", False)))
            n_model = int(mm.pop("n_predicted_tokens"))
            metrics.update(mm)
    finally:
        sae.train(was_training)
    counts = dict(getattr(store, "counts", {}) or {})
    rows_drawn = {k: v - counts_before.get(k, 0) for k, v in counts.items()}
    if not rows_drawn.get("rows_kept"):  # a cache, or rows already buffered: nothing new was filtered
        rows_drawn = {}
    return EvalResult(metrics=metrics, feature_density=acc.feature_density(), l0_histogram=acc.l0_histogram(),
                      n_tokens=acc.n, n_model_tokens=n_model, notes=notes, row_counts=rows_drawn)


def _bar(show: bool, total: int, desc: str):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", leave=False)
