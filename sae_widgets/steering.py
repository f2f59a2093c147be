"""Interventions through an SAE at its hook: add to, clamp, scale or ablate latents, or add a raw direction.

    edits = [LatentEdit(123, "add", 8.0), LatentEdit(7, "ablate", positions="last")]
    hooks = steering_hooks(model, sae, edits)              # fwd_hooks for model.run_with_hooks
    generate(model, sae, "The whale", edits, seed=0)       # sae_widgets.generation: seeded sampling with the edits
    steer(model, sae, "The whale", edits, seed=0)          # sae_widgets.steering_report: baseline vs steered + costs

The SAE's error term is kept by construction. At the SAE's hook the activation x becomes

    x_new = x + (x̂_edited − x̂) = x + Σ_i (f'_i − f_i) · W_dec[i] / out_scale

`SAE.decode` is affine (x̂ = (f W_dec + b_dec) / out_scale), so b_dec and every unedited latent cancel; the
difference is computed from the edited latents alone, so an edit that changes nothing adds an exact zero and
the model's output is bit-identical. Edits act in latent space: "add" is f_i += α, which moves x by
α · W_dec[i] / out_scale in model units (out_scale is the SAE's saved input normalisation; W_dec rows are unit
norm in normalised units for every architecture but relu), so α is on the scale of the latent's own activations
(see `steering_vector`). "clamp" sets f_i := c, "scale" f_i ← s·f_i, "ablate" f_i := 0. Several edits apply
in list order. `DirectionEdit` adds α · direction (model units) at any hook, e.g. a difference-in-means direction.

Positions index the token sequence, BOS included (position 0 when the prompt is tokenised with BOS):
"all" = every position but a leading BOS (the SAE never saw BOS rows in training, and BOS is the attention
sink); "last" = the prompt's last token and, while generating, each new token (what a KV-cache loop edits, so a
position's edit never changes when later tokens arrive); a list = those prompt positions.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Union

import torch

from .activations import run_to_hooks, stop_layer_for, validate_hooks
from .token_input import is_token_ids, prompt_tokens

MODES = ("add", "clamp", "scale", "ablate")
POSITION_KEYWORDS = ("all", "last")
_VALUE_NAMES = {"add": "α", "clamp": "c", "scale": "s"}


# ----------------------------------------------------------------------------------------------- edits
def _check_positions(positions: Any) -> str | tuple[int, ...]:
    if isinstance(positions, str):
        if positions not in POSITION_KEYWORDS:
            raise ValueError(f"positions={positions!r} is not one of {POSITION_KEYWORDS} or a list of token positions")
        return positions
    try:
        items = list(positions)
        if any(isinstance(p, bool) for p in items):
            raise TypeError
        pos = tuple(operator.index(p) for p in items)
    except TypeError:
        raise ValueError(f"positions={positions!r} must be one of {POSITION_KEYWORDS} or a list of ints") from None
    if not pos:
        raise ValueError(f"positions=[] is empty: give token positions, or one of {POSITION_KEYWORDS}")
    if min(pos) < 0:
        raise ValueError(f"positions={list(pos)} holds a negative position; positions count from 0 (BOS when the "
                         f"prompt starts with it), or use 'last'")
    return tuple(sorted(set(pos)))


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what}={value!r} is not a finite number")
    return float(value)


@dataclass(frozen=True)
class LatentEdit:
    """One edit of one SAE latent: mode "add" (value α, signed), "clamp" (value c), "scale" (value s) or "ablate"."""

    latent: int
    mode: str = "add"
    value: float | None = None
    positions: str | tuple[int, ...] = "all"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {MODES}")
        try:
            latent = operator.index(self.latent)
        except TypeError:
            raise ValueError(f"latent={self.latent!r} must be an int (a latent index)") from None
        if isinstance(self.latent, bool) or latent < 0:
            raise ValueError(f"latent={self.latent!r} must be an int >= 0")
        if self.mode == "ablate":
            if self.value not in (None, 0, 0.0):
                raise ValueError(f"mode 'ablate' sets the latent to 0 and takes no value (got value={self.value!r})")
            value = 0.0
        elif self.value is None:
            raise ValueError(f"mode {self.mode!r} needs a value ({_VALUE_NAMES[self.mode]})")
        else:
            what = f"value ({_VALUE_NAMES[self.mode]}) of the {self.mode!r} edit of latent {latent}"
            value = _finite(self.value, what)
        object.__setattr__(self, "latent", latent)
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "positions", _check_positions(self.positions))

    def apply(self, f: torch.Tensor) -> torch.Tensor:
        """The edited activations of this latent, given its current ones."""
        if self.mode == "add":
            return f + self.value
        if self.mode == "scale":
            return f * self.value
        return torch.full_like(f, self.value)  # clamp to c; ablate to 0

    def to_dict(self) -> dict[str, Any]:
        pos = self.positions if isinstance(self.positions, str) else list(self.positions)
        return {"kind": "latent", "latent": self.latent, "mode": self.mode, "value": self.value, "positions": pos}


@dataclass(frozen=True, eq=False)
class DirectionEdit:
    """Add α · direction (model units) at `hook` (None: the SAE's hook), e.g. a difference-in-means direction."""

    direction: torch.Tensor
    alpha: float
    hook: str | None = None
    positions: str | tuple[int, ...] = "all"
    label: str = "direction"

    def __post_init__(self):
        d = torch.as_tensor(self.direction).detach()
        if d.dim() != 1 or d.numel() == 0 or not d.is_floating_point():
            raise ValueError(f"direction must be a 1-D float vector, got shape {tuple(d.shape)} and dtype {d.dtype}")
        if not bool(d.isfinite().all()):
            raise ValueError("direction holds non-finite values (nan or inf)")
        object.__setattr__(self, "direction", d.float())
        object.__setattr__(self, "alpha", _finite(self.alpha, f"alpha of direction {self.label!r}"))
        object.__setattr__(self, "positions", _check_positions(self.positions))

    def to_dict(self) -> dict[str, Any]:
        pos = self.positions if isinstance(self.positions, str) else list(self.positions)
        return {"kind": "direction", "label": self.label, "alpha": self.alpha, "hook": self.hook, "positions": pos,
                "norm": float(self.direction.norm()), "direction": self.direction.tolist()}


Edit = Union[LatentEdit, DirectionEdit]


# ----------------------------------------------------------------------------------------------- checks
@contextmanager
def eval_mode(sae):
    """Inference behaviour for the SAE (batchtopk / matryoshka use their threshold only in eval mode)."""
    was = sae.training
    sae.eval()
    try:
        yield sae
    finally:
        sae.train(was)


@torch.no_grad()
def hook_width(model, name: str) -> int:
    """Values per token at hook `name` (heads flattened), from a two-token forward pass up to that hook."""
    probe = torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device)
    return hook_activations(model, name, probe).shape[-1]


def check_sae_fits(model, sae) -> None:
    """Clear errors for an SAE that cannot steer this model: a transcoder, no hook, an unknown hook, wrong width."""
    cfg = sae.cfg
    if cfg.out_hook is not None:
        raise ValueError(f"steering takes an SAE; this is a transcoder ({cfg.hook!r} -> {cfg.out_hook!r})")
    if not cfg.hook:
        raise ValueError("the SAE's config names no hook (sae.cfg.hook is empty): set the hook it was trained on")
    width = hook_width(model, cfg.hook)
    if width != cfg.d_in:
        raise ValueError(f"the SAE has d_in={cfg.d_in} but the model's hook {cfg.hook!r} gives {width} values per "
                         f"token: this SAE was trained on another model or hook")


def check_edits(model, sae, edits: Sequence[Edit], prompt_len: int | None = None) -> list[Edit]:
    """Check `edits` against the SAE (latent range, hook, width) and the prompt (positions); returns them as a list."""
    edits = list(edits or [])
    for e in edits:
        if not isinstance(e, (LatentEdit, DirectionEdit)):
            raise TypeError(f"an edit must be a LatentEdit or a DirectionEdit, got {type(e).__name__}: {e!r}")
    if any(isinstance(e, LatentEdit) for e in edits):
        if sae is None:
            raise ValueError("latent edits need an SAE, got sae=None")
        check_sae_fits(model, sae)
        d_sae = sae.cfg.d_sae
        for e in edits:
            if isinstance(e, LatentEdit) and e.latent >= d_sae:
                raise ValueError(f"latent {e.latent} is out of range: this SAE has d_sae={d_sae} latents "
                                 f"(valid 0..{d_sae - 1})")
    for e in edits:
        if isinstance(e, DirectionEdit):
            hook = _edit_hook(e, sae)
            width = hook_width(model, hook)
            if e.direction.numel() != width:
                raise ValueError(f"direction {e.label!r} has {e.direction.numel()} values but hook {hook!r} gives "
                                 f"{width} per token")
        if prompt_len is not None and not isinstance(e.positions, str) and max(e.positions) >= prompt_len:
            raise ValueError(f"position {max(e.positions)} is beyond the prompt of {prompt_len} tokens (valid "
                             f"positions 0..{prompt_len - 1}, BOS included, or one of {POSITION_KEYWORDS})")
    return edits


def _edit_hook(e: Edit, sae) -> str:
    if isinstance(e, DirectionEdit) and e.hook is not None:
        return e.hook
    if sae is None:
        raise ValueError(f"direction {e.label!r} names no hook and there is no SAE to take it from: set hook=")
    return sae.cfg.hook


# ----------------------------------------------------------------------------------------------- hooks
def position_index(positions: str | tuple[int, ...], seq_len: int, prompt_len: int | None, first: int) -> torch.Tensor:
    """The sequence positions an edit touches (see the module docstring), as int64 indices."""
    if positions == "all":
        return torch.arange(first, seq_len)
    if positions == "last":
        start = (seq_len if prompt_len is None else prompt_len) - 1
        return torch.arange(max(start, first), seq_len)
    if max(positions) >= seq_len:
        raise ValueError(f"position {max(positions)} is beyond the sequence of {seq_len} tokens "
                         f"(valid 0..{seq_len - 1})")
    return torch.tensor(positions, dtype=torch.long)


def _mask(positions, seq_len: int, prompt_len: int | None, first: int, device) -> torch.Tensor:
    m = torch.zeros(seq_len, dtype=torch.bool)
    m[position_index(positions, seq_len, prompt_len, first)] = True
    return m.to(device)


def _latent_delta(sae, x: torch.Tensor, edits: list[LatentEdit], masks: list[torch.Tensor],
                  rows: torch.Tensor) -> torch.Tensor:
    """x̂_edited − x̂ [B, n_rows, d] at the positions `rows`, from the edited latents only (float32)."""
    latents = sorted({e.latent for e in edits})
    column = {lat: j for j, lat in enumerate(latents)}
    w = sae.W_dec
    with eval_mode(sae):
        f = sae.encode(x[:, rows].reshape(-1, x.shape[-1]).to(w.device, w.dtype))
    f = f.reshape(x.shape[0], -1, f.shape[-1])[..., latents]
    f_new = f.clone()
    for e, m in zip(edits, masks):  # in list order: a later edit of the same latent sees the earlier one's result
        sel, j = m[rows].to(f.device), column[e.latent]
        f_new[:, sel, j] = e.apply(f_new[:, sel, j])
    change = (f_new - f) @ w[latents] / sae.out_scale  # decode is affine: b_dec and the other latents cancel
    return change.to(x.device, torch.float32)


def _hook_fn(sae, latent_edits: list[LatentEdit], dir_edits: list[DirectionEdit], prompt_len: int | None,
             first: int) -> Callable:
    @torch.no_grad()
    def hook_fn(act: torch.Tensor, hook=None) -> torch.Tensor:
        batch, seq_len = act.shape[:2]
        x = act.reshape(batch, seq_len, -1)  # per-head hooks: heads flattened, as the SAE saw them
        delta = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        touched = torch.zeros(seq_len, dtype=torch.bool, device=x.device)
        if latent_edits:
            masks = [_mask(e.positions, seq_len, prompt_len, first, x.device) for e in latent_edits]
            rows = torch.stack(masks).any(0)
            if bool(rows.any()):
                delta[:, rows] += _latent_delta(sae, x, latent_edits, masks, rows)
                touched |= rows
        for e in dir_edits:
            m = _mask(e.positions, seq_len, prompt_len, first, x.device)
            delta[:, m] += e.alpha * e.direction.to(x.device)
            touched |= m
        if not bool(touched.any()):
            return act
        new = x.clone()  # only touched positions are rewritten; an edit that changes nothing adds an exact 0
        new[:, touched] = (x[:, touched].float() + delta[:, touched]).to(x.dtype)
        return new.reshape(act.shape)

    return hook_fn


def steering_hooks(model, sae, edits: Sequence[Edit], *, prompt_len: int | None = None,
                   skip_bos: bool = True) -> list[tuple[str, Callable]]:
    """`fwd_hooks` for `model.run_with_hooks` that apply `edits`; one hook function per hook point.

    `prompt_len` anchors "last" and bounds list positions (None: the sequence the hooks see). `skip_bos` says
    that position 0 is BOS, which "all" and "last" leave alone. No edits: no hooks (the model runs untouched).
    """
    edits = check_edits(model, sae, edits, prompt_len)
    first = int(skip_bos)
    by_hook: dict[str, tuple[list[LatentEdit], list[DirectionEdit]]] = {}
    for e in edits:
        lat, dirs = by_hook.setdefault(_edit_hook(e, sae), ([], []))
        (lat if isinstance(e, LatentEdit) else dirs).append(e)
    return [(hook, _hook_fn(sae, lat, dirs, prompt_len, first)) for hook, (lat, dirs) in by_hook.items()]


def steering_vector(sae, latent: int) -> torch.Tensor:
    """What "add" with α = 1 adds to the model's activation: W_dec[latent] / out_scale, in model units."""
    latent = LatentEdit(latent, "ablate").latent  # the same type checks as an edit
    if latent >= sae.cfg.d_sae:
        raise ValueError(f"latent {latent} is out of range: this SAE has d_sae={sae.cfg.d_sae} latents "
                         f"(valid 0..{sae.cfg.d_sae - 1})")
    return (sae.W_dec[latent] / sae.out_scale).detach().float()


# ----------------------------------------------------------------------------------------------- reading
@torch.no_grad()
def hook_activations(model, name: str, tokens: torch.Tensor) -> torch.Tensor:
    """Clean activations [B, P, width] at hook `name` (heads flattened), running the model only as far as needed."""
    validate_hooks(model, [name])
    return run_to_hooks(model, [name], tokens, stop_layer_for(model, [name]))[0]


@torch.no_grad()
def latent_activations(model, sae, tokens: torch.Tensor, latents: Sequence[int] | None = None) -> torch.Tensor:
    """The SAE's latents [B, P, n] on the unmodified model's activations (all latents, or the given ones)."""
    x = hook_activations(model, sae.cfg.hook, tokens)
    w = sae.W_dec
    with eval_mode(sae):
        f = sae.encode(x.reshape(-1, x.shape[-1]).to(w.device, w.dtype)).reshape(*x.shape[:2], -1)
    return f if latents is None else f[..., list(latents)]


def prompt_list(prompts, name: str) -> list:
    """One prompt (text, or ids as a list of ints / 1-D tensor) or many (a list of them, or a 2-D tensor's rows)."""
    if isinstance(prompts, str) or is_token_ids(prompts) and torch.as_tensor(prompts).dim() == 1:
        prompts = [prompts]
    elif isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
        prompts = list(prompts)
    else:
        prompts = list(prompts)
    if not prompts or any(isinstance(p, str) and not p or not isinstance(p, str) and not is_token_ids(p)
                          for p in prompts):
        raise ValueError(f"{name} must be a non-empty list of non-empty strings or token-id sequences, got "
                         f"{prompts!r:.200}")
    return prompts


@torch.no_grad()
def diff_in_means(model, hook: str, prompts_a, prompts_b, *,
                  normalize: bool = True, positions: str = "all", prepend_bos: bool = True) -> torch.Tensor:
    """mean(activations on prompts_a) − mean(activations on prompts_b) at `hook`, over tokens: a steering direction.

    Each prompt set is one prompt or a list; a prompt is text or token ids (see `token_input`). positions "all" pools
    every token but BOS (each token weighs the same), "last" takes each prompt's last token.
    `normalize` returns the unit vector (then α in a `DirectionEdit` is the norm added), else the raw difference.
    """
    if positions not in POSITION_KEYWORDS:
        raise ValueError(f"positions={positions!r} is not one of {POSITION_KEYWORDS}")
    validate_hooks(model, [hook])
    means = []
    for name, prompts in (("prompts_a", prompts_a), ("prompts_b", prompts_b)):
        rows = []
        for p in prompt_list(prompts, name):
            tokens, has_bos = prompt_tokens(model, p, prepend_bos=prepend_bos, what=name)
            x = hook_activations(model, hook, tokens)[0].float()
            rows.append(x[-1:] if positions == "last" else x[int(has_bos):])
        means.append(torch.cat(rows).double().mean(0))
    d = (means[0] - means[1]).float()
    if normalize:
        n = d.norm()
        if n == 0:
            raise ValueError("the two prompt sets have the same mean activation: the difference has no direction")
        d = d / n
    return d
