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
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .generation import Generation, check_fits_context, generate_samples
from .special_tokens import boundary_tokens, model_tokenizer
from .token_input import prompt_tokens, token_ids
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

    prompt: str | list[int]               # the text, or the token ids, given
    edits: list[dict]
    baseline: list[Generation]
    steered: list[Generation]
    latent_activations: list[LatentActivationChange] = field(default_factory=list)
    kl_text: str | list[int] = ""
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
def next_token_kl(model, sae, text, edits, *, prepend_bos: bool = True) -> tuple[float, list[float]]:
    """KL(baseline ‖ steered) of the next-token distributions at each position of `text` (text or token ids; a
    leading BOS skipped).

    Returns (mean over those positions, the per-position values). The edits see `text` as the prompt.
    """
    tokens, has_bos = prompt_tokens(model, text, prepend_bos=prepend_bos, what="kl_text")
    check_fits_context(model, tokens, has_bos, what="kl_text")
    first = int(has_bos)
    if tokens.shape[1] <= first:
        raise ValueError(f"text={text!r} has no tokens to score")
    hooks = steering_hooks(model, sae, edits, prompt_len=tokens.shape[1], skip_bos=has_bos)
    lp_base = F.log_softmax(model.run_with_hooks(tokens, fwd_hooks=[])[0, first:].double(), dim=-1)
    lp_steer = F.log_softmax(model.run_with_hooks(tokens, fwd_hooks=hooks)[0, first:].double(), dim=-1)
    kl = (lp_base.exp() * (lp_base - lp_steer)).sum(-1).clamp_min(0.0)  # rounding can leave tiny negatives
    return float(kl.mean()), kl.tolist()


def heldout_windows(model, n_windows: int, n_ctx: int, *, prepend_bos: bool = True, source=None) -> torch.Tensor:
    """The first `n_windows` windows [n, n_ctx] of `source` (a token source; default the embedded corpus's held-out
    split 'val'), cut as in training (the store's BOS and document separator)."""
    from .special_tokens import boundary_tokens
    from .token_sources import EmbeddedCorpus
    from .tokens import chunk_windows, join_documents, window_body

    if n_ctx < 2 or n_ctx > model.cfg.n_ctx:
        raise ValueError(f"n_ctx={n_ctx} must be in 2..{model.cfg.n_ctx} (the model's context)")
    marks = boundary_tokens(model, prepend_bos=prepend_bos)
    source = EmbeddedCorpus("val") if source is None else source
    need, docs, have = n_windows * window_body(n_ctx, marks.bos_id), [], 0
    for doc in source.documents(model_tokenizer(model)):  # tokenise only as many documents as the windows need
        docs.append(doc)
        have += len(doc) + (marks.separator_id is not None)
        if have >= need:
            break
    windows = chunk_windows(join_documents(docs, marks.separator_id), n_ctx, marks.bos_id)
    if len(windows) < n_windows:
        raise ValueError(f"the held-out tokens hold only {len(windows)} windows of {n_ctx} tokens, not {n_windows}")
    return windows[:n_windows].to(model.cfg.device)


@torch.no_grad()
def heldout_perplexity(model, sae, edits, *, n_windows: int = 8, n_ctx: int = 128, batch_size: int = 8,
                       prepend_bos: bool = True, heldout_tokens=None) -> tuple[float, float, int]:
    """(baseline, steered) perplexity = exp(mean next-token cross-entropy) on held-out windows, and the token count.

    `heldout_tokens`: a token source (default: the embedded corpus's 'val' split) or a 2-D tensor of windows
    [n, n_ctx] whose first `n_windows` are used (position 0 is BOS when `prepend_bos` and the model has one).
    Each window is one sequence for the edits: "last" touches its last token (whose prediction is not scored), and
    list positions index into every window.
    """
    has_bos = prepend_bos and boundary_tokens(model, prepend_bos=True, warn=False).bos_id is not None
    if isinstance(heldout_tokens, torch.Tensor):
        if heldout_tokens.dim() != 2 or heldout_tokens.shape[0] < n_windows:
            raise ValueError(f"heldout_tokens must be windows [n >= n_windows={n_windows}, n_ctx], got shape "
                             f"{tuple(heldout_tokens.shape)}")
        windows = heldout_tokens[:n_windows].long().to(model.cfg.device)
    else:
        windows = heldout_windows(model, n_windows, n_ctx, prepend_bos=prepend_bos, source=heldout_tokens)
    hooks = steering_hooks(model, sae, edits, prompt_len=windows.shape[1], skip_bos=has_bos)
    totals = [0.0, 0.0]
    for batch in windows.split(batch_size):
        for i, fwd in enumerate(([], hooks)):
            logits = model.run_with_hooks(batch, fwd_hooks=fwd)[:, :-1].double()
            totals[i] += float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
    n = windows[:, 1:].numel()
    return math.exp(totals[0] / n), math.exp(totals[1] / n), n


def steer(model, sae, prompt, edits, *, seed: int = 0, n_samples: int = 1, max_new_tokens: int = 32,
          temperature: float = 1.0, top_p: float = 1.0, track_latents: Sequence[int] | None = None,
          kl_text=None, n_heldout_windows: int = 8, heldout_n_ctx: int = 128,
          prepend_bos: bool = True, heldout_tokens=None) -> SteeringResult:
    """Generate from `prompt` (text or token ids) without and with `edits` (same seed), then measure the steering's
    effect and cost.

    Tracked latents (default: every latent the edits touch) are read on the generated tokens of every completion.
    The cost is KL(baseline ‖ steered) on `kl_text` (text or ids; default: the prompt) and the perplexity on
    `n_heldout_windows` held-out windows of `heldout_n_ctx` tokens (0 windows: skipped) from `heldout_tokens` (see
    `heldout_perplexity`). A model without a tokenizer has no default held-out text: the perplexity is then skipped,
    with a warning, unless `heldout_tokens` is given.
    """
    edits = list(edits or [])
    n_prompt = prompt_tokens(model, prompt, prepend_bos=prepend_bos)[0].shape[1]
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
    if n_heldout_windows and heldout_tokens is None and model_tokenizer(model) is None:
        warnings.warn("the held-out perplexity is skipped: the model has no tokenizer for the default held-out text; "
                      "pass heldout_tokens= (a TokenArray or windows [n, n_ctx]) to measure it", stacklevel=2)
    elif n_heldout_windows:
        ppl_b, ppl_s, n_heldout = heldout_perplexity(model, sae, edits, n_windows=n_heldout_windows,
                                                     n_ctx=heldout_n_ctx, prepend_bos=prepend_bos,
                                                     heldout_tokens=heldout_tokens)
    prompt, kl_text = (p if isinstance(p, str) else token_ids(model, p) for p in (prompt, kl_text))
    return SteeringResult(prompt=prompt, edits=[e.to_dict() for e in edits], baseline=baseline, steered=steered,
                          latent_activations=changes, kl_text=kl_text, kl=kl, kl_per_position=kl_pos,
                          perplexity_baseline=ppl_b, perplexity_steered=ppl_s, heldout_tokens=n_heldout)
