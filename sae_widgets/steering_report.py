"""Steering, side by side: a baseline and a steered completion from one seed, and what the steering did and cost.

    result = steer(model, sae, "The whale", [LatentEdit(123, "add", 8.0)], seed=0, n_samples=4)
    result.baseline[0].completion, result.steered[0].completion      # side by side, same seed
    result.latent_activations   # each tracked latent's mean activation on the generated tokens, baseline vs steered
    result.kl                   # KL(baseline ‖ steered) of next-token distributions on the prompt (or `kl_text`)
    result.perplexity_steered   # perplexity on held-out text (the embedded corpus's 'val' split) with the edits on

Latent activations are read by the *unmodified* model and the SAE from each completion's tokens, so they say
whether the steered text itself evokes the latent, not merely that the edit set it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .generation import Generation, generate_samples
from .steering import LatentEdit, check_edits, latent_activations, steering_hooks


@dataclass
class LatentActivationChange:
    """One latent's mean activation over the generated tokens of the baseline and of the steered completion."""

    latent: int
    baseline: float
    steered: float

    @property
    def change(self) -> float:
        return self.steered - self.baseline

    def to_dict(self) -> dict:
        return asdict(self) | {"change": self.change}


@dataclass
class SteeringResult:
    """Baseline and steered completions (same seed, `n_samples` each) with the steering's effect and cost.

    `to_dict()` is JSON-ready. Activations are means over the generated tokens of all samples.
    """

    prompt: str
    edits: list[dict]
    baseline: list[Generation]
    steered: list[Generation]
    latent_activations: list[LatentActivationChange] = field(default_factory=list)
    kl_text: str = ""
    kl: float = 0.0                       # mean over the scored positions of kl_text
    kl_per_position: list[float] = field(default_factory=list)
    perplexity_baseline: float | None = None
    perplexity_steered: float | None = None
    heldout_tokens: int = 0

    @property
    def perplexity_change(self) -> float | None:
        if self.perplexity_baseline is None or self.perplexity_steered is None:
            return None
        return self.perplexity_steered - self.perplexity_baseline

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "edits": list(self.edits), "baseline": [g.to_dict() for g in self.baseline],
                "steered": [g.to_dict() for g in self.steered],
                "latent_activations": [a.to_dict() for a in self.latent_activations],
                "kl_text": self.kl_text, "kl": self.kl, "kl_per_position": list(self.kl_per_position),
                "perplexity_baseline": self.perplexity_baseline, "perplexity_steered": self.perplexity_steered,
                "perplexity_change": self.perplexity_change, "heldout_tokens": self.heldout_tokens}


@torch.no_grad()
def next_token_kl(model, sae, text: str, edits, *, prepend_bos: bool = True) -> tuple[float, list[float]]:
    """KL(baseline ‖ steered) of the next-token distributions at each position of `text` (a leading BOS skipped).

    Returns (mean over those positions, the per-position values). The edits see `text` as the prompt.
    """
    tokens = model.to_tokens(text, prepend_bos=prepend_bos).to(model.cfg.device)
    first = int(prepend_bos)
    if tokens.shape[1] <= first:
        raise ValueError(f"text={text!r} has no tokens to score")
    hooks = steering_hooks(model, sae, edits, prompt_len=tokens.shape[1], skip_bos=prepend_bos)
    lp_base = F.log_softmax(model.run_with_hooks(tokens, fwd_hooks=[])[0, first:].double(), dim=-1)
    lp_steer = F.log_softmax(model.run_with_hooks(tokens, fwd_hooks=hooks)[0, first:].double(), dim=-1)
    kl = (lp_base.exp() * (lp_base - lp_steer)).sum(-1).clamp_min(0.0)  # rounding can leave tiny negatives
    return float(kl.mean()), kl.tolist()


def heldout_windows(model, n_windows: int, n_ctx: int, *, prepend_bos: bool = True) -> torch.Tensor:
    """The first `n_windows` windows [n, n_ctx] of the embedded corpus's held-out split ('val'), as in training."""
    from .corpus import load_texts
    from .tokens import chunk_windows, join_documents, window_body

    if n_ctx < 2 or n_ctx > model.cfg.n_ctx:
        raise ValueError(f"n_ctx={n_ctx} must be in 2..{model.cfg.n_ctx} (the model's context)")
    tok = model.tokenizer
    need, docs, have = n_windows * window_body(n_ctx, tok.bos_token_id if prepend_bos else None), [], 0
    for text in load_texts("val"):  # tokenise only as many documents as the windows need
        docs.append(tok(text, add_special_tokens=False)["input_ids"])
        have += len(docs[-1]) + 1
        if have >= need:
            break
    stream = join_documents(docs, tok.eos_token_id)
    windows = chunk_windows(stream, n_ctx, tok.bos_token_id if prepend_bos else None)
    if len(windows) < n_windows:
        raise ValueError(f"the held-out split holds only {len(windows)} windows of {n_ctx} tokens, not {n_windows}")
    return windows[:n_windows].to(model.cfg.device)


@torch.no_grad()
def heldout_perplexity(model, sae, edits, *, n_windows: int = 8, n_ctx: int = 128, batch_size: int = 8,
                       prepend_bos: bool = True) -> tuple[float, float, int]:
    """(baseline, steered) perplexity = exp(mean next-token cross-entropy) on held-out windows, and the token count.

    Each window is one sequence for the edits: "last" touches its last token (whose prediction is not scored), and
    list positions index into every window.
    """
    windows = heldout_windows(model, n_windows, n_ctx, prepend_bos=prepend_bos)
    hooks = steering_hooks(model, sae, edits, prompt_len=n_ctx, skip_bos=prepend_bos)
    totals = [0.0, 0.0]
    for batch in windows.split(batch_size):
        for i, fwd in enumerate(([], hooks)):
            logits = model.run_with_hooks(batch, fwd_hooks=fwd)[:, :-1].double()
            totals[i] += float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
    n = windows[:, 1:].numel()
    return math.exp(totals[0] / n), math.exp(totals[1] / n), n


def steer(model, sae, prompt: str, edits, *, seed: int = 0, n_samples: int = 1, max_new_tokens: int = 32,
          temperature: float = 1.0, top_p: float = 1.0, track_latents: Sequence[int] | None = None,
          kl_text: str | None = None, n_heldout_windows: int = 8, heldout_n_ctx: int = 128,
          prepend_bos: bool = True) -> SteeringResult:
    """Generate from `prompt` without and with `edits` (same seed), then measure the steering's effect and cost.

    Tracked latents (default: every latent the edits touch) are read on the generated tokens of every completion.
    The cost is KL(baseline ‖ steered) on `kl_text` (default: the prompt) and the perplexity on
    `n_heldout_windows` held-out windows of `heldout_n_ctx` tokens (0 windows: skipped).
    """
    edits = list(edits or [])
    n_prompt = model.to_tokens(prompt, prepend_bos=prepend_bos).shape[1]
    check_edits(model, sae, edits, prompt_len=n_prompt)
    opts = dict(seed=seed, n_samples=n_samples, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                prepend_bos=prepend_bos)
    baseline = generate_samples(model, sae, prompt, [], **opts)
    steered = generate_samples(model, sae, prompt, edits, **opts)
    if track_latents is None:
        track_latents = list(dict.fromkeys(e.latent for e in edits if isinstance(e, LatentEdit)))
    track_latents = [LatentEdit(t, "ablate").latent for t in track_latents]
    changes = []
    if track_latents:
        if sae is None:
            raise ValueError(f"track_latents={track_latents} needs an SAE, got sae=None")
        check_edits(model, sae, [LatentEdit(t, "ablate") for t in track_latents])
        means = []
        for gens in (baseline, steered):
            tokens = torch.tensor([g.tokens for g in gens], device=model.cfg.device)
            f = latent_activations(model, sae, tokens, track_latents)[:, n_prompt:]
            means.append(f.double().mean((0, 1)).tolist())
        changes = [LatentActivationChange(t, b, s) for t, b, s in zip(track_latents, *means)]
    kl_text = prompt if kl_text is None else kl_text
    kl, kl_pos = next_token_kl(model, sae, kl_text, edits, prepend_bos=prepend_bos)
    ppl_b = ppl_s = None
    n_heldout = 0
    if n_heldout_windows:
        ppl_b, ppl_s, n_heldout = heldout_perplexity(model, sae, edits, n_windows=n_heldout_windows,
                                                     n_ctx=heldout_n_ctx, prepend_bos=prepend_bos)
    return SteeringResult(prompt=prompt, edits=[e.to_dict() for e in edits], baseline=baseline, steered=steered,
                          latent_activations=changes, kl_text=kl_text, kl=kl, kl_per_position=kl_pos,
                          perplexity_baseline=ppl_b, perplexity_steered=ppl_s, heldout_tokens=n_heldout)
