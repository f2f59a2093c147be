"""SteeringPanel: choose SAE latents and strengths, press Generate, compare baseline and steered text side by side.

Every action is a Python method (`add_latent`, `remove_latent`, `generate`, `select`), so the panel works with no
front-end; the widget's buttons send messages that call the same methods. `generate()` runs
`steering_report.steer` (one seed shared by the baseline and the steered completion), then reads the steered
latents on each completion with the unmodified model, so each token is coloured by how strongly the *text* evokes
those latents. Every run is kept in `history`; `selected` is the run on screen.
"""
from __future__ import annotations

import torch
import traitlets

from ..steering import POSITION_KEYWORDS, LatentEdit, check_sae_fits, latent_activations
from ..steering_report import steer
from ..token_input import decode, is_token_ids, token_ids
from ._common import LiveStaticWidget, check_choice, check_optional_index, esc, fmt, jsonable, widget_css, widget_esm
from .feature_dashboard import check_latent
from .static_html import color_scale, tokens_html

PANEL_CSS = """
.sae-sp-edits { border-collapse: collapse; margin: 4px 0; }
.sae-sp-edits td { padding: 1px 6px; }
.sae-sp-edits input[type="number"] { width: 6em; }
.sae-sp-columns { display: flex; gap: 16px; flex-wrap: wrap; align-items: flex-start; }
.sae-sp-column { flex: 1 1 320px; min-width: 240px; }
.sae-sp-history { display: flex; gap: 4px; flex-wrap: wrap; margin: 4px 0; }
.sae-sp-history button.sae-active { background: #1f6feb; color: #fff; }
.sae-sp-matches { display: flex; gap: 4px; flex-wrap: wrap; margin: 2px 0; }
"""
ACTIONS = ("generate", "add_latent", "remove_latent", "set_latent", "select")


def _top_token_text(top) -> str:
    return " / ".join(top) if isinstance(top, (list, tuple)) else str(top)


class SteeringPanel(LiveStaticWidget):
    """Steer `model` through `sae`'s latents; `stats` (optional) lets one find latents by their top tokens."""

    _esm = widget_esm("steering_panel")
    _css = widget_css() + PANEL_CSS
    _static_traits = ("prompt", "edits", "history", "selected", "error")

    prompt = traitlets.Unicode("").tag(sync=True)
    prompt_ids = traitlets.List(traitlets.Int())      # a prompt given as token ids; `prompt` shows it (typing clears it)
    edits = traitlets.List().tag(sync=True)           # [{latent, mode, value}], one per latent
    positions = traitlets.Unicode("all").tag(sync=True)
    seed = traitlets.Int(0).tag(sync=True)
    temperature = traitlets.Float(1.0).tag(sync=True)
    max_new_tokens = traitlets.Int(20).tag(sync=True)
    d_sae = traitlets.Int(1).tag(sync=True)
    query = traitlets.Unicode("").tag(sync=True)      # top-token search (needs stats)
    matches = traitlets.List().tag(sync=True)         # [{latent, top_tokens, density}]
    history = traitlets.List().tag(sync=True)         # one dict per run (see `_run_record`)
    selected = traitlets.Int(-1).tag(sync=True)       # the run shown, an index into history (-1: none)
    busy = traitlets.Bool(False).tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)

    def __init__(self, model, sae, stats=None, *, prompt="", max_matches: int = 20, **kwargs):
        """`prompt`: text, or token ids (a list of ints or a 1-D tensor; what works without a tokenizer)."""
        check_sae_fits(model, sae)
        if stats is not None and int(stats.d_sae) != sae.cfg.d_sae:
            raise ValueError(f"stats describe {stats.d_sae} latents but the SAE has d_sae={sae.cfg.d_sae}: "
                             f"pass the statistics computed for this SAE")
        self.model, self.sae, self.stats, self.max_matches = model, sae, stats, max_matches
        self._columns = stats.columns() if stats is not None else None
        ids = token_ids(model, prompt) if not isinstance(prompt, str) and is_token_ids(prompt) else []
        super().__init__(d_sae=sae.cfg.d_sae, prompt=decode(model, ids) if ids else prompt, **kwargs)
        self.prompt_ids = ids
        self.on_msg(self._on_front_end_msg)

    @traitlets.observe("prompt")
    def _prompt_typed(self, change):
        if self.prompt_ids and change["new"] != decode(self.model, self.prompt_ids):
            self.prompt_ids = []  # typed text replaces a prompt given as ids

    # -- validation of the settings
    @traitlets.validate("positions")
    def _check_positions(self, proposal):
        return check_choice("positions", proposal["value"], POSITION_KEYWORDS)

    @traitlets.validate("selected")
    def _check_selected(self, proposal):
        return check_optional_index("selected", proposal["value"], len(self.history))

    # -- latents
    def add_latent(self, latent: int, value: float | None = None, mode: str = "add") -> None:
        """Steer `latent` with `mode` and `value` (ablate takes none); replaces an edit of the same latent."""
        latent = check_latent(latent, self.sae.cfg.d_sae)
        if mode == "ablate":
            value = None
        edit = LatentEdit(latent, mode, value)  # checks mode and value with clear errors
        row = {"latent": edit.latent, "mode": edit.mode, "value": edit.value}
        rows = [r for r in self.edits if r["latent"] != latent]
        at = next((i for i, r in enumerate(self.edits) if r["latent"] == latent), len(rows))
        self.edits = rows[:at] + [row] + rows[at:]

    def remove_latent(self, latent: int) -> None:
        if all(r["latent"] != latent for r in self.edits):
            raise ValueError(f"latent {latent} is not steered; steered latents: {[r['latent'] for r in self.edits]}")
        self.edits = [r for r in self.edits if r["latent"] != latent]

    def latent_edits(self) -> list[LatentEdit]:
        """The panel's edits as `LatentEdit`s at the chosen positions."""
        return [LatentEdit(r["latent"], r["mode"], None if r["mode"] == "ablate" else r["value"], self.positions)
                for r in self.edits]

    @traitlets.observe("query")
    def _search(self, change):
        self.matches = self.search_latents(change["new"]) if change["new"].strip() else []

    def search_latents(self, query: str) -> list[dict]:
        """Latents whose top tokens contain `query` (case-insensitive), densest first; needs `stats`."""
        if self._columns is None:
            raise ValueError("searching latents by top-token text needs stats: SteeringPanel(model, sae, stats)")
        q = query.strip().lower()
        cols = self._columns
        hits = []
        for i, top in enumerate(cols["top_tokens"]):
            tops = [top] if isinstance(top, str) else list(top)
            if any(q in t.lower() for t in tops):
                hits.append({"latent": int(cols["latent"][i]), "top_tokens": _top_token_text(top),
                             "density": float(cols["density"][i])})
        hits.sort(key=lambda r: -r["density"])
        return jsonable(hits[: self.max_matches])

    # -- generation
    def generate(self, *, n_heldout_windows: int = 0) -> dict:
        """Baseline and steered completions of `prompt` (same seed); appends the run to `history` and selects it."""
        if not (self.prompt_ids or self.prompt):
            raise ValueError("the prompt is empty: set panel.prompt first")
        edits = self.latent_edits()
        latents = [e.latent for e in edits]
        self.busy = True
        try:
            result = steer(self.model, self.sae, self.prompt_ids or self.prompt, edits, seed=self.seed, n_samples=1,
                           max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                           track_latents=latents, n_heldout_windows=n_heldout_windows)
            run = self._run_record(result, latents)
        finally:
            self.busy = False
        with self.hold_trait_notifications():
            self.history = self.history + [run]
            self.selected = len(self.history) - 1
            self.error = ""
        return run

    @torch.no_grad()
    def _completion(self, gen, latents: list[int]) -> dict:
        """One completion's new tokens with, per token, each steered latent's activation on the unmodified model."""
        n_prompt = len(gen.prompt_tokens)
        acts = []
        if latents:
            tokens = torch.tensor([gen.tokens], device=self.model.cfg.device)
            acts = latent_activations(self.model, self.sae, tokens, latents)[0, n_prompt:].float().cpu().tolist()
        per_token = [[[lat, a] for lat, a in zip(latents, row)] for row in acts] or [[] for _ in gen.new_tokens]
        values = [max(row, key=abs) if row else None for row in acts] or [None] * len(gen.new_tokens)
        return {"tokens": list(gen.new_str_tokens), "text": gen.completion, "values": values, "latents": per_token}

    def _run_record(self, result, latents: list[int]) -> dict:
        base = self._completion(result.baseline[0], latents)
        steered = self._completion(result.steered[0], latents)
        scale, signed = color_scale([base["values"], steered["values"]])
        return jsonable({"prompt": result.prompt, "edits": [dict(r) for r in self.edits], "positions": self.positions,
                         "seed": self.seed, "temperature": self.temperature, "max_new_tokens": self.max_new_tokens,
                         "baseline": base, "steered": steered, "scale": scale, "signed": signed, "kl": result.kl,
                         "latent_activations": [a.to_dict() for a in result.latent_activations],
                         "perplexity_baseline": result.perplexity_baseline,
                         "perplexity_steered": result.perplexity_steered})

    def select(self, index: int) -> dict:
        """Show run `index` of the history again (negative indices count from the end); returns it."""
        n = len(self.history)
        if not -n <= index < n:
            raise ValueError(f"run {index} does not exist: the history holds {n} runs (0..{n - 1})")
        self.selected = index % n
        return self.history[self.selected]

    @property
    def current(self) -> dict | None:
        return self.history[self.selected] if self.selected >= 0 else None

    # -- the front-end's buttons
    def _on_front_end_msg(self, _widget, content, _buffers) -> None:
        action = content.get("action") if isinstance(content, dict) else None
        try:
            if action == "generate":
                self.generate()
            elif action == "add_latent":
                self.add_latent(content.get("latent"), content.get("value", 0.0), content.get("mode", "add"))
            elif action == "set_latent":
                self.add_latent(content.get("latent"), content.get("value"), content.get("mode"))
            elif action == "remove_latent":
                self.remove_latent(content.get("latent"))
            elif action == "select":
                self.select(content.get("index"))
            else:
                raise ValueError(f"unknown action {action!r} from the front-end; valid: {ACTIONS}")
        except (ValueError, TypeError, traitlets.TraitError) as e:
            self.error = str(e)
        else:
            if action != "generate":
                self.error = ""

    # -- static copy
    def static_html(self) -> str:
        edits = "".join(f'<tr><td>#{int(r["latent"])}</td><td>{esc(r["mode"])}</td>'
                        f'<td class="sae-num">{esc(fmt(r["value"]))}</td></tr>' for r in self.edits)
        out = [f'<style>{PANEL_CSS}</style><div class="sae-steer">',
               f'<div class="sae-controls"><span class="sae-prompt-static">{esc(self.prompt)}</span></div>',
               f'<table class="sae-sp-edits"><tbody>{edits}</tbody></table>']
        if self.error:
            out.append(f'<div class="sae-error">{esc(self.error)}</div>')
        run = self.current
        if run:
            cols = []
            for key, title in (("baseline", "baseline"), ("steered", "steered")):
                c = run[key]
                line = tokens_html(c["tokens"], c["values"], scale=run["scale"], signed=run["signed"],
                                   top_latents=c["latents"])
                cols.append(f'<div class="sae-sp-column sae-sp-{key}"><div class="sae-panel-title">{title}</div>'
                            f'<div class="sae-hl-line">{line}</div></div>')
            out.append(f'<div class="sae-hint">run {self.selected + 1} of {len(self.history)} \u00b7 seed {run["seed"]}'
                       f' \u00b7 KL {esc(fmt(run["kl"]))}</div><div class="sae-sp-columns">{"".join(cols)}</div>')
        return "".join(out) + "</div>"

    def __repr__(self) -> str:
        return f"SteeringPanel(edits={len(self.edits)}, runs={len(self.history)}, selected={self.selected})"
