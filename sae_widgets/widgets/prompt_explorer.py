"""PromptExplorer: type a prompt, see each token's top latents, click one to open its dashboard.

The model and the SAE run in Python when `text` changes; the front-end shows the tokens (coloured by the
selected latent's activation, or by each token's strongest latent when none is selected).
"""
from __future__ import annotations

import torch
import traitlets

from ..activations import stop_layer_for, validate_hooks
from ..token_input import decode, is_token_ids, prompt_tokens, token_ids, token_labels
from ._common import LiveStaticWidget, check_optional_index, esc, jsonable, widget_css, widget_esm
from .feature_dashboard import check_optional_latent, feature_payload
from .static_html import color_scale, dashboard_html, tokens_html


@torch.no_grad()
def prompt_latents(model, sae, text, *, prepend_bos: bool = True) -> tuple[list[str], torch.Tensor]:
    """(token strings, latents [n_tokens, d_sae]) of `text` (text or token ids) at the SAE's hook; the BOS position
    is dropped. Without a tokenizer the token strings are `#id`."""
    if isinstance(text, str) and not text or not isinstance(text, str) and len(token_ids(model, text)) == 0:
        raise ValueError("the prompt is empty: type some text")
    tokens, bos = prompt_tokens(model, text, prepend_bos=prepend_bos)
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ValueError(f"the prompt has {tokens.shape[1] - bos} tokens; the model's context is {model.cfg.n_ctx} "
                         f"tokens{' including BOS' if bos else ''}")
    hook = sae.cfg.hook
    validate_hooks(model, [hook])
    captured = {}

    def grab(act, hook):
        captured["x"] = act.detach()
        return act

    model.run_with_hooks(tokens, fwd_hooks=[(hook, grab)], stop_at_layer=stop_layer_for(model, [hook]))
    x = captured["x"].reshape(tokens.shape[1], -1)[int(bos):]
    param = next(sae.parameters())
    f = sae.encode(x.to(device=param.device, dtype=param.dtype)).float().cpu()
    return token_labels(model, tokens[0, int(bos):].tolist()), f


def top_latents_per_token(f: torch.Tensor, k: int) -> list[list[list[float]]]:
    """Per token, its k strongest active latents as [latent, value], by |value| (signed SAEs keep the sign)."""
    k = min(k, f.shape[1])
    vals, idx = f.abs().topk(k, dim=1)
    signed_vals = f.gather(1, idx)
    return [[[int(i), float(v)] for i, v, a in zip(ir, vr, ar) if a > 0]
            for ir, vr, ar in zip(idx.tolist(), signed_vals.tolist(), vals.tolist())]


class PromptExplorer(LiveStaticWidget):
    """A prompt box; per-token top latents of `sae` on `model`; the selected latent's dashboard from `stats`."""

    _esm = widget_esm("prompt_explorer")
    _css = widget_css()
    _static_traits = ("tokens", "values", "selected_latent", "feature", "error")

    text = traitlets.Unicode("").tag(sync=True)
    tokens = traitlets.List(traitlets.Unicode()).tag(sync=True)
    top_latents = traitlets.List().tag(sync=True)       # per token: [[latent, value], ...]
    values = traitlets.List().tag(sync=True)            # what colours each token (see the module docstring)
    signed = traitlets.Bool(False).tag(sync=True)
    scale = traitlets.Float(0.0).tag(sync=True)
    selected_index = traitlets.Int(-1).tag(sync=True)   # the clicked token
    selected_latent = traitlets.Int(-1).tag(sync=True)  # the clicked latent; its dashboard is `feature`
    feature = traitlets.Dict().tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)
    k = traitlets.Int(5).tag(sync=True)                 # top latents per token
    token_ids = traitlets.List(traitlets.Int())         # a prompt given as ids; `text` then shows it (typing clears it)

    def __init__(self, model, sae, stats, text="", *, k: int = 5, **kwargs):
        """`text`: the prompt, as text or as token ids (a list of ints or a 1-D tensor; needed without a tokenizer)."""
        if int(stats.d_sae) != sae.cfg.d_sae:
            raise ValueError(f"stats describe {stats.d_sae} latents but the SAE has d_sae={sae.cfg.d_sae}: "
                             f"pass the statistics computed for this SAE")
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        self.model, self.sae, self.stats = model, sae, stats
        self._latents = torch.zeros(0, sae.cfg.d_sae)
        self._showing_ids = False
        super().__init__(k=k, **kwargs)
        if not isinstance(text, str) and is_token_ids(text):
            self.token_ids = token_ids(model, text)
        elif text:
            self.text = text

    @traitlets.observe("token_ids")
    def _ids_changed(self, change):
        if not change["new"]:
            return
        self._showing_ids = True
        try:
            self.text = decode(self.model, change["new"])
        finally:
            self._showing_ids = False
        self._run()

    @traitlets.observe("text", "k")
    def _run(self, change=None):
        if change is not None and change["name"] == "text":
            if self._showing_ids:
                return  # _ids_changed runs it once the text shows the ids
            if self.token_ids:
                self.token_ids = []  # typed text replaces a prompt given as ids
        try:
            tokens, f = prompt_latents(self.model, self.sae, self.token_ids or self.text)
        except ValueError as e:
            tokens, f = [], torch.zeros(0, self.sae.cfg.d_sae)
            err = str(e)
        else:
            err = ""
        self._latents = f
        with self.hold_trait_notifications():
            self.error = err
            self.selected_index = -1
            self.tokens = tokens
            self.top_latents = top_latents_per_token(f, self.k) if tokens else []
            self._recolor()

    @traitlets.validate("selected_latent")
    def _check_selected_latent(self, proposal):
        return check_optional_latent(proposal["value"], self.sae.cfg.d_sae)

    @traitlets.validate("selected_index")
    def _check_selected_index(self, proposal):
        return check_optional_index("selected_index", proposal["value"], len(self.tokens))

    @traitlets.observe("selected_latent")
    def _latent_changed(self, change):
        latent = change["new"]
        with self.hold_trait_notifications():
            self.feature = feature_payload(self.stats, latent) if latent >= 0 else {}
            self._recolor()

    def _recolor(self):
        f = self._latents
        if f.shape[0] == 0:
            values = []
        elif self.selected_latent >= 0:
            values = f[:, self.selected_latent].tolist()
        else:  # each token's strongest latent, with its sign
            values = f.gather(1, f.abs().argmax(1, keepdim=True)).squeeze(1).tolist()
        self.scale, self.signed = color_scale([values])
        self.values = jsonable(values)

    def latents(self) -> torch.Tensor:
        """The latents of the current prompt, [n_tokens, d_sae] (BOS dropped)."""
        return self._latents.clone()

    def static_html(self) -> str:
        what = f"latent {self.selected_latent}" if self.selected_latent >= 0 else "strongest latent per token"
        head = (f'<div class="sae-controls"><span class="sae-prompt-static">{esc(self.text)}</span></div>'
                + (f'<div class="sae-error">{esc(self.error)}</div>' if self.error else "")
                + f'<div class="sae-hint">colour: {what}</div>')
        line = tokens_html(self.tokens, self.values, scale=self.scale, signed=self.signed,
                           top_latents=self.top_latents)
        dash = dashboard_html(self.feature) if self.feature else ""
        return f'<div class="sae-explorer">{head}<div class="sae-hl-line">{line}</div>{dash}</div>'

    def __repr__(self) -> str:
        return f"PromptExplorer(n_tokens={len(self.tokens)}, selected_latent={self.selected_latent})"
