"""Save and load SAEs as safetensors + JSON: `sae.safetensors` (parameters and buffers) and `sae_config.json`.

Never pickle: loading refuses pickle files outright, because unpickling runs arbitrary code. The JSON holds the
architecture config, normalisation scales, thresholds, the training config and the library version, so a
folder is self-describing and readable without sae_widgets.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .atomic import save_safetensors_atomic, write_json_atomic
from .config_io import read_json
from .sae import SAE, SAEConfig

WEIGHTS, CONFIG = "sae.safetensors", "sae_config.json"
FORMAT = "sae_widgets.sae/1"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def save_sae(sae: SAE, path: str | os.PathLike, training: dict[str, Any] | None = None) -> Path:
    """Write `path/sae.safetensors` and `path/sae_config.json` (each atomically); returns the folder."""
    from . import __version__

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = dict(sae.state_dict())
    meta = {
        "format": FORMAT, "sae_widgets_version": __version__, "config": sae.cfg.to_dict(),
        "normalization": {"in_scale": float(sae.in_scale), "out_scale": float(sae.out_scale)},
        "thresholds": _thresholds(sae), "training": training or {},
    }
    json.dumps(meta)  # fail before touching either file: weights and config must never disagree
    save_safetensors_atomic(out / WEIGHTS, tensors, metadata={"format": FORMAT})
    write_json_atomic(out / CONFIG, meta)
    return out


def _thresholds(sae: SAE) -> dict[str, Any]:
    if sae.cfg.arch == "jumprelu":
        t = sae.threshold_theta.detach()
        return {"kind": "per_latent", "mean": float(t.mean()), "min": float(t.min()), "max": float(t.max())}
    if hasattr(sae, "threshold"):
        return {"kind": "global", "value": float(sae.threshold)}
    return {}


def refuse_pickles(path: Path) -> None:
    candidates = [path] if path.is_file() else list(path.iterdir()) if path.is_dir() else []
    pickles = [p.name for p in candidates if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(f"refusing to load pickle file(s) {pickles} in {path}: unpickling can run arbitrary code. "
                         f"sae_widgets loads only safetensors + JSON ({WEIGHTS} + {CONFIG})")


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE saved by `save_sae`; clear errors for pickles, missing files, bad keys or shapes."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"no SAE at {folder}")
    refuse_pickles(folder)
    if folder.is_file():
        raise ValueError(f"{folder} is a file; pass the SAE folder holding {WEIGHTS} and {CONFIG}")
    missing = [n for n in (WEIGHTS, CONFIG) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not an SAE folder: missing {missing}")
    meta = read_json(folder / CONFIG)
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{folder / CONFIG} must be a JSON object with a 'config' object; got {type(meta).__name__}"
                         f"{' without config' if isinstance(meta, dict) else ''}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder / CONFIG} has format {meta.get('format')!r}, expected {FORMAT!r}")
    sae = SAE(SAEConfig.from_dict(meta["config"]))
    try:
        tensors = load_file(folder / WEIGHTS)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{folder / WEIGHTS} is not a readable safetensors file: {e}") from e
    load_tensors_checked(sae, tensors, str(folder / WEIGHTS))
    return sae.to(device).eval()


def load_tensors_checked(sae: SAE, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy `tensors` into `sae`, naming any missing, unexpected or wrongly shaped tensor."""
    expected = sae.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: missing tensors {missing}, unexpected tensors {unexpected} for a "
                         f"{sae.cfg.arch} SAE (d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae}, d_out={sae.cfg.d_out})")
    bad = {k: (tuple(tensors[k].shape), tuple(v.shape)) for k, v in expected.items() if tensors[k].shape != v.shape}
    if bad:
        raise ValueError(f"{where}: shape mismatch (found, expected): {bad}")
    sae.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})


def check_sae_fits_model(sae: SAE, model) -> None:
    """The SAE's hooks exist in `model` and their widths are the SAE's d_in / d_out."""
    from .activations import ModelRows, validate_hooks
    from .token_sources import TokenArray

    hooks = [sae.cfg.hook] + ([sae.cfg.out_hook] if sae.cfg.out_hook else [])
    validate_hooks(model, hooks)
    probe = ModelRows(model, hooks, TokenArray(torch.arange(4)), n_ctx=2, prepend_bos=False, keep_bos_rows=True,
                      model_batch_size=1, dtype=torch.float32)
    widths = probe.d_hooks
    if widths[0] != sae.cfg.d_in:
        raise ValueError(f"SAE d_in={sae.cfg.d_in} but hook {sae.cfg.hook!r} of this model has width {widths[0]}")
    if sae.cfg.out_hook and widths[1] != sae.cfg.d_out:
        raise ValueError(f"SAE d_out={sae.cfg.d_out} but hook {sae.cfg.out_hook!r} of this model has width {widths[1]}")
