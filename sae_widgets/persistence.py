"""Save and load SAEs as safetensors + JSON: `sae.safetensors` (parameters and buffers) and `sae_config.json`.

Never pickle: loading refuses pickle files outright, because unpickling runs arbitrary code. The JSON holds the
architecture config, normalisation scales, thresholds, the training config and the library version, so a
folder is self-describing and readable without sae_widgets.
"""
from __future__ import annotations

import json
import os
import types
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import torch
from .atomic import (DIGEST_KEY, json_digest, load_safetensors, safetensors_header, safetensors_metadata,
                     save_safetensors_atomic, write_json_atomic)
from .config_io import read_json
from .sae import SAE, SAEConfig

WEIGHTS, CONFIG = "sae.safetensors", "sae_config.json"
FORMAT = "sae_widgets.sae/1"
# The safetensors header records a digest of the config it was saved with, so an edited or damaged config cannot
# silently describe other weights. Only these entries are covered: the `training` record may change freely.
CONFIG_DIGEST_KEY = "sae_widgets.config_sha256"
DIGESTED_ENTRIES = ("format", "config", "normalization", "thresholds")
HEADER_KEYS = frozenset({"format", DIGEST_KEY, CONFIG_DIGEST_KEY})  # all the header metadata our writers write
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
    save_safetensors_atomic(out / WEIGHTS, tensors, metadata={"format": FORMAT, CONFIG_DIGEST_KEY: config_digest(meta)})
    write_json_atomic(out / CONFIG, meta)
    return out


def config_digest(meta: dict[str, Any]) -> str:
    """Digest of what sae_config.json says about the weights (not the free-form training record)."""
    return json_digest({k: meta.get(k) for k in DIGESTED_ENTRIES})


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
    """Load an SAE saved by `save_sae`; clear errors for pickles, missing files, bad keys or shapes.

    Everything is checked before any tensor is allocated: the config's types and values, the config against the
    digest its weights recorded, and the shapes it implies against the safetensors header. So a damaged or hostile
    folder is a ValueError naming the file, never a huge allocation or a silently different SAE."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"no SAE at {folder}")
    refuse_pickles(folder)
    if folder.is_file():
        raise ValueError(f"{folder} is a file; pass the SAE folder holding {WEIGHTS} and {CONFIG}")
    missing = [n for n in (WEIGHTS, CONFIG) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not an SAE folder: missing {missing}")
    config_file, weights_file = folder / CONFIG, folder / WEIGHTS
    meta = read_json(config_file)
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{config_file} must be a JSON object with a 'config' object; got {type(meta).__name__}"
                         f"{' without config' if isinstance(meta, dict) else ''}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{config_file} has format {meta.get('format')!r}, expected {FORMAT!r}")
    cfg = config_from_dict(meta["config"], str(config_file))
    recorded = recorded_config_digest(weights_file, ours=True)
    if recorded is not None and recorded != config_digest(meta):
        raise ValueError(f"{config_file} does not match the weights it was saved with (the digest in {weights_file} "
                         f"differs; only its 'training' entry may be edited): restore the saved {CONFIG} or use "
                         f"another copy of the folder")
    where = f"{weights_file} (for the SAE {config_file} describes)"
    check_tensor_shapes(header_shapes(weights_file), expected_shapes(cfg, str(config_file)), cfg, where)
    return sae_from_tensors(cfg, load_safetensors(weights_file), where).to(device).eval()


def recorded_config_digest(weights: Path, ours: bool) -> str | None:
    """The config digest `weights` recorded (None for files written before config digests).

    A flipped byte in a digest's key name would silently switch its check off, so a file we wrote (`ours`, or any
    file holding one of our digests) must hold only the header keys we write, and the config digest only together
    with the tensor digest (they are written together; older files have the tensor digest alone, or neither)."""
    meta = safetensors_metadata(weights)
    keys = set(meta)
    ours = ours or bool(keys & {DIGEST_KEY, CONFIG_DIGEST_KEY})
    if (ours and not keys <= HEADER_KEYS) or (CONFIG_DIGEST_KEY in keys and DIGEST_KEY not in keys):
        raise ValueError(f"{weights} has a damaged header: its metadata keys {sorted(keys)} are not the ones "
                         f"sae_widgets writes ({sorted(HEADER_KEYS)}); use another copy")
    return meta.get(CONFIG_DIGEST_KEY)


def config_from_dict(d: dict[str, Any], where: str) -> SAEConfig:
    """An SAEConfig from JSON, with wrong types, missing keys and invalid values a ValueError naming `where`."""
    hints = get_type_hints(SAEConfig)
    for key, value in d.items():
        if key in hints and not _json_value_is(value, hints[key]):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise ValueError(f"{where}: config {key}={shown} has the wrong type; expected {_type_name(hints[key])}")
    required = [f.name for f in fields(SAEConfig) if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{where}: config lacks the required key(s) {missing}")
    try:
        return SAEConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from e


def _json_value_is(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits a type hint of SAEConfig (int | None, list[int], float, ...); bool is not a number."""
    if isinstance(tp, types.UnionType):
        return any(_json_value_is(value, t) for t in get_args(tp))
    if get_origin(tp) is list:
        (item,) = get_args(tp)
        return isinstance(value, list) and all(_json_value_is(v, item) for v in value)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if tp is float:
        return isinstance(value, (int, float))
    return isinstance(tp, type) and isinstance(value, tp)


def _type_name(tp: Any) -> str:
    if isinstance(tp, types.UnionType):
        return " or ".join(_type_name(t) for t in get_args(tp))
    return "null" if tp is type(None) else str(tp) if get_origin(tp) else tp.__name__


def expected_shapes(cfg: SAEConfig, where: str) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of an SAE with this config, from one built on the meta device (no memory)."""
    return {k: tuple(v.shape) for k, v in _meta_sae(cfg, where).state_dict().items()}


def _meta_sae(cfg: SAEConfig, where: str) -> SAE:
    try:
        with torch.device("meta"):
            return SAE(cfg)
    except (ValueError, TypeError, RuntimeError, OverflowError) as e:  # e.g. a negative d_out, log of θ_init <= 0
        raise ValueError(f"{where}: cannot build an SAE from this config: {e}") from e


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, without reading the data (ValueError naming the file if unreadable)."""
    return {name: tuple(shape) for name, (_, shape) in safetensors_header(path)[1].items()}


def check_tensor_shapes(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], cfg: SAEConfig,
                        where: str) -> None:
    """Name any missing, unexpected or wrongly shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: missing tensors {missing}, unexpected tensors {unexpected} for a "
                         f"{cfg.arch} SAE (d_in={cfg.d_in}, d_sae={cfg.d_sae}, d_out={cfg.d_out})")
    bad = {k: (tuple(found[k]), tuple(v)) for k, v in expected.items() if tuple(found[k]) != tuple(v)}
    if bad:
        raise ValueError(f"{where}: shape mismatch (found, expected): {bad}")


def sae_from_tensors(cfg: SAEConfig, tensors: dict[str, torch.Tensor], where: str) -> SAE:
    """An SAE holding `tensors` (cast to its dtypes), allocated only once the names and shapes are checked."""
    sae = _meta_sae(cfg, where)
    expected = sae.state_dict()
    check_tensor_shapes({k: tuple(v.shape) for k, v in tensors.items()},
                        {k: tuple(v.shape) for k, v in expected.items()}, cfg, where)
    sae.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, assign=True)
    left = [n for n, t in [*sae.named_parameters(), *sae.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"SAE tensors {left} are not in its state dict, so loading cannot fill them")
    return sae


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
