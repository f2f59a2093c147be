"""Read and write SAELens's on-disk format: a folder holding `cfg.json` and `sae_weights.safetensors`.

Followed from the SAELens source (github.com/jbloomAus/SAELens, 6.18.0 and 5.11.0):

* 6.x `cfg.json` (`SAEConfig.to_dict`): `architecture`, `d_in`, `d_sae`, `dtype`, `device`, `apply_b_dec_to_input`,
  `normalize_activations`, `reshape_activations`, `metadata: {sae_lens_version, model_name, hook_name,
  hook_name_out, hook_head_index, ...}`, plus `k` and `rescale_acts_by_decoder_norm` (topk / batchtopk) and
  `d_out` (transcoders). A config without `sae_lens_version` (top level or in `metadata`), or older than 6.0, is
  read the way SAELens's `handle_pre_6_0_config` reads it: flat keys, `hook_point` -> `hook_name`,
  `activation_fn_str` (`relu` / `topk` with `activation_fn_kwargs: {k}`), boolean `normalize_activations`.
* Tensors: `W_enc` [d_in, d_sae], `W_dec` [d_sae, d_out], `b_enc` [d_sae], `b_dec` [d_out]; JumpReLU `threshold`
  [d_sae]; a BatchTopK training checkpoint's scalar `topk_threshold`; legacy `scaling_factor` [d_sae] (the
  "finetuning scaling factor", multiplied into the latents before decoding).
* Forward: z = (x − b_dec·apply_b_dec_to_input) W_enc + b_enc; standard f = ReLU(z); topk f = ReLU of the k
  largest z (zero elsewhere); jumprelu f = ReLU(z)·[z > θ]; x̂ = f W_dec + b_dec. `rescale_acts_by_decoder_norm`
  multiplies z by ‖W_dec,i‖ and divides f by it before decoding. Transcoders never subtract b_dec.
  A trained BatchTopK SAE is saved by SAELens as JumpReLU with θ = topk_threshold for every latent.

Mapping: standard <-> relu, topk <-> topk, jumprelu <-> jumprelu (log_threshold = log θ), batchtopk -> jumprelu
(export) and SAELens batchtopk checkpoints -> batchtopk (load), transcoder / jumprelu_transcoder <-> relu /
jumprelu (and batchtopk on export) transcoders. Everything a SAELens folder can express that our SAE cannot hold
directly is folded into the weights so outputs agree; what cannot be folded (per-input normalisation, single-head
SAEs, gated / skip transcoders, ...) is refused with an error naming it.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from .atomic import json_digest, load_safetensors, save_safetensors_atomic, write_json_atomic
from .config_io import read_json
from .persistence import CONFIG_DIGEST_KEY, header_shapes, recorded_config_digest, refuse_pickles, sae_from_tensors
from .sae import SAE, SAEConfig

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
ACTIVATION_SCALER_FILE = "activation_scaler.json"  # SAELens training checkpoints: {"scaling_factor": s}
SAELENS_FORMAT_VERSION = "6.18.0"  # the SAELens release whose format export_saelens writes
# cfg.json's `metadata` entries that change what a loaded SAE is; the rest (exported_by, training versions, ...) is
# informational and may change freely. Every top-level entry counts (SAELens itself reads dtype, device, ...).
DIGESTED_METADATA = ("sae_lens_version", "model_name", "hook_name", "hook_name_out", "hook_head_index",
                     "hook_point", "hook_point_head_index")

# SAELens architecture -> (our arch, transcoder?)
LOADABLE = {
    "standard": ("relu", False), "topk": ("topk", False), "jumprelu": ("jumprelu", False),
    "batchtopk": ("batchtopk", False), "transcoder": ("relu", True), "jumprelu_transcoder": ("jumprelu", True),
}
# (our arch, transcoder?) -> SAELens architecture
EXPORTABLE = {
    ("relu", False): "standard", ("topk", False): "topk", ("jumprelu", False): "jumprelu",
    ("batchtopk", False): "jumprelu", ("relu", True): "transcoder", ("jumprelu", True): "jumprelu_transcoder",
    ("batchtopk", True): "jumprelu_transcoder",
}


# ================================================================================================ load
def load_saelens(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                 norm_scaling_factor: float | None = None) -> SAE:
    """Load an SAELens-format folder as an `SAE` (eval mode) whose forward equals SAELens's.

    `norm_scaling_factor`: for a folder with `normalize_activations: "expected_average_only_in"`, the factor s
    SAELens multiplies inputs by (its `pretrained_saes.yaml` holds it for released SAEs; a training checkpoint
    holds it in `activation_scaler.json`, which is read when this is not given). It becomes our in_scale /
    out_scale, so the SAE takes raw activations.
    """
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"no SAELens SAE at {folder}")
    try:
        refuse_pickles(folder)
    except ValueError as e:
        raise ValueError(f"{e}. An SAELens folder is loaded from {CFG_FILE} + {WEIGHTS_FILE} only; move the "
                         f"pickle file(s) out of the folder to load it") from e
    if folder.is_file():
        raise ValueError(f"{folder} is a file; pass the SAELens folder holding {CFG_FILE} and {WEIGHTS_FILE}")
    missing = [n for n in (CFG_FILE, WEIGHTS_FILE) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not an SAELens SAE folder: missing {missing} "
                                f"(expected {CFG_FILE} + {WEIGHTS_FILE})")
    cfg_file, weights_file = folder / CFG_FILE, folder / WEIGHTS_FILE
    cfg = read_json(cfg_file)
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_file} holds a {type(cfg).__name__}, not a JSON object")
    spec = _parse_cfg(cfg, str(cfg_file))
    recorded = recorded_config_digest(weights_file, ours=False)  # folders written by export_saelens record one
    if recorded is not None and recorded != cfg_digest(cfg):
        raise ValueError(f"{cfg_file} does not match the weights it was exported with (the digest in {weights_file} "
                         f"differs; only metadata other than {list(DIGESTED_METADATA)} may be edited): restore the "
                         f"exported {CFG_FILE} or export again")
    scale = _norm_scale(spec, folder, norm_scaling_factor)
    # shapes are checked from the header before any tensor is read; the config's sizes are only trusted after that
    where = f"{weights_file} (for the SAE {cfg_file} describes)"
    _check_shapes(spec, header_shapes(weights_file), where)
    state = _convert_tensors(spec, load_safetensors(weights_file), where)

    our = SAEConfig(arch=spec["arch"], d_in=spec["d_in"], d_sae=spec["d_sae"], d_out=spec["d_out"], k=spec["k"],
                    hook=spec["hook"] or "", out_hook=spec["out_hook"], model_name=spec["model_name"],
                    normalize=scale != 1.0)
    state["in_scale"] = torch.tensor(scale, dtype=torch.float32)
    state["out_scale"] = torch.tensor(scale, dtype=torch.float32)
    return sae_from_tensors(our, state, where).to(device).eval()


def cfg_digest(cfg: dict[str, Any]) -> str:
    """Digest of what cfg.json says about the weights: every top-level entry and the metadata entries that matter."""
    meta = cfg.get("metadata")
    kept = {k: meta[k] for k in DIGESTED_METADATA if k in meta} if isinstance(meta, dict) else meta
    return json_digest({**cfg, "metadata": kept})


def _saelens_version(cfg: dict[str, Any]) -> str | None:
    v = cfg.get("sae_lens_version")
    meta = cfg.get("metadata")
    if not v and isinstance(meta, dict):
        v = meta.get("sae_lens_version")
    return v if isinstance(v, str) and v else None


def _is_pre_6(version: str | None) -> bool:
    m = re.match(r"\s*v?(\d+)", version or "")
    return m is None or int(m.group(1)) < 6


def _parse_cfg(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """The SAELens config reduced to what the forward pass needs, with legacy (pre-6.0) keys mapped."""
    version = _saelens_version(cfg)
    legacy = _is_pre_6(version)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}

    def meta_get(key: str, *old: str) -> Any:
        for k in (key, *old):
            if meta.get(k) is not None:
                return meta[k]
            if cfg.get(k) is not None:
                return cfg[k]
        return None

    missing = [k for k in ("d_in", "d_sae") if k not in cfg]
    if "architecture" not in cfg and not legacy:
        missing.append("architecture")
    if missing:
        raise ValueError(f"{where}: missing config key(s) {missing} (SAELens {version or '<6'} format)")
    arch = cfg.get("architecture", "standard")
    if not isinstance(arch, str):
        raise ValueError(f"{where}: architecture={arch!r} must be a string, one of {sorted(LOADABLE)}")
    k = cfg.get("k")
    if legacy:
        act = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu")) or "relu"
        kwargs = cfg.get("activation_fn_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"{where}: activation_fn_kwargs={kwargs!r} must be a JSON object such as {{\"k\": 32}}")
        if act == "topk":
            if kwargs.get("k") is None and k is None:
                raise ValueError(f"{where}: activation_fn 'topk' needs activation_fn_kwargs.k")
            if arch not in ("standard", "topk"):
                raise ValueError(f"{where}: architecture {arch!r} with activation_fn 'topk' is not supported")
            arch, k = "topk", kwargs.get("k", k)
        elif act != "relu" and arch in ("standard", "jumprelu", "topk"):
            raise ValueError(f"{where}: activation function {act!r} is not supported (supported: 'relu', 'topk')")
    if arch not in LOADABLE:
        raise ValueError(f"{where}: SAELens architecture {arch!r} is not supported; supported architectures: "
                         f"{sorted(LOADABLE)} (-> our {sorted({a for a, _ in LOADABLE.values()})})")
    our_arch, transcoder = LOADABLE[arch]
    d_in, d_sae = _int_key(cfg, "d_in", where), _int_key(cfg, "d_sae", where)
    d_out = _int_key(cfg, "d_out", where) if transcoder else d_in
    if our_arch in ("topk", "batchtopk"):
        if isinstance(k, float) and k.is_integer():
            k = int(k)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= d_sae:
            raise ValueError(f"{where}: {arch} needs an integer k with 1 <= k <= d_sae={d_sae}, got k={k!r}"
                             + (" (our batchtopk keeps an integer mean k per token)" if arch == "batchtopk" else ""))
    else:
        k = None

    head = meta_get("hook_head_index", "hook_point_head_index")
    if head is not None:
        raise ValueError(f"{where}: hook_head_index={head} (an SAE on a single attention head) is not supported: "
                         f"our SAEs read the whole hook")
    hook = meta_get("hook_name", "hook_point")
    out_hook = meta_get("hook_name_out") if transcoder else None
    if transcoder and not out_hook:
        raise ValueError(f"{where}: transcoder config has no metadata.hook_name_out (the hook it reconstructs)")
    model_name = meta_get("model_name")
    for key, value in (("hook_name", hook), ("hook_name_out", out_hook), ("model_name", model_name)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: {key}={value!r} must be a string")
    reshape = cfg.get("reshape_activations", "none") or "none"
    if reshape not in ("none", "hook_z"):
        raise ValueError(f"{where}: reshape_activations={reshape!r} is not supported (supported: 'none', 'hook_z')")
    norm = cfg.get("normalize_activations", "none")
    if isinstance(norm, bool):  # SAELens < 6 wrote a bool: True meant the April-update constant scaling
        norm = "expected_average_only_in" if norm else "none"
    norm = norm or "none"
    if norm not in ("none", "expected_average_only_in"):
        raise ValueError(f"{where}: normalize_activations={norm!r} rescales each input by its own norm / "
                         f"statistics, which our SAE cannot represent (supported: 'none', 'expected_average_only_in')")
    if transcoder and norm != "none":
        raise ValueError(f"{where}: a transcoder with normalize_activations={norm!r} is not supported "
                         f"(SAELens scales only its input; only 'none' is supported for transcoders)")
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True))
    if transcoder and apply_b_dec:
        raise ValueError(f"{where}: apply_b_dec_to_input=true is invalid for a transcoder (SAELens refuses it too)")
    # SAELens's inference TopK config defaults this to False, its training configs (checkpoints) to True
    rescale = our_arch in ("topk", "batchtopk") and bool(cfg.get("rescale_acts_by_decoder_norm", arch == "batchtopk"))
    return {
        "saelens_arch": arch, "arch": our_arch, "transcoder": transcoder, "d_in": d_in, "d_sae": d_sae,
        "d_out": d_out, "k": k, "hook": hook, "out_hook": out_hook, "model_name": model_name,
        "apply_b_dec": apply_b_dec, "norm": norm, "rescale": rescale,
        "finetuning_scaling_factor": bool(cfg.get("finetuning_scaling_factor", False)), "version": version,
    }


def _int_key(cfg: dict[str, Any], key: str, where: str) -> int:
    v = cfg.get(key)
    if v is None:
        raise ValueError(f"{where}: missing config key {key!r}")
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{where}: {key}={v!r} must be a positive integer")
    return v


def _norm_scale(spec: dict[str, Any], folder: Path, given: float | None) -> float:
    if spec["norm"] == "none":
        if given is not None:
            raise ValueError(f"norm_scaling_factor={given} given, but {folder / CFG_FILE} has "
                             f"normalize_activations='none' (its scaling is already folded into the weights)")
        return 1.0
    s = given
    if s is None and (folder / ACTIVATION_SCALER_FILE).is_file():
        scaler = read_json(folder / ACTIVATION_SCALER_FILE)
        s = scaler.get("scaling_factor") if isinstance(scaler, dict) else None
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise ValueError(f"{folder / ACTIVATION_SCALER_FILE} must hold {{\"scaling_factor\": <number>}}, "
                             f"got {repr(scaler)[:80]}")
    if s is None:
        raise ValueError(f"{folder / CFG_FILE} has normalize_activations='expected_average_only_in': SAELens multiplies "
                         f"inputs by a constant that this folder does not record (no {ACTIVATION_SCALER_FILE}). "
                         f"Pass norm_scaling_factor=... (SAELens's pretrained_saes.yaml lists it as "
                         f"norm_scaling_factor for released SAEs)")
    s = float(s)
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"norm scaling factor {s} must be finite and > 0")
    return s


def _check_shapes(spec: dict[str, Any], found: dict[str, tuple[int, ...]], where: str) -> dict[str, tuple[int, ...]]:
    """Name missing, unexpected or wrongly shaped tensors (`found`: name -> shape); returns the required shapes."""
    d_in, d_sae, d_out = spec["d_in"], spec["d_sae"], spec["d_out"]
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,)}
    arch = spec["saelens_arch"]
    optional: dict[str, tuple[int, ...]] = {"scaling_factor": (d_sae,), "finetuning_scaling_factor": (d_sae,)}
    if spec["arch"] == "jumprelu":
        if "threshold" in found or "log_threshold" not in found:
            shapes["threshold"] = (d_sae,)
        else:  # a training-class state dict that kept the log parametrisation
            shapes["log_threshold"] = (d_sae,)
    elif spec["arch"] == "batchtopk":
        if "threshold" in found or "topk_threshold" not in found:
            shapes["threshold"] = (d_sae,)
        else:
            shapes["topk_threshold"] = ()
    missing = sorted(set(shapes) - set(found))
    unexpected = sorted(set(found) - set(shapes) - set(optional))
    if missing or unexpected:
        raise ValueError(f"{where}: missing tensors {missing}, unexpected tensors {unexpected} for an SAELens "
                         f"{arch!r} SAE (expects {sorted(shapes)})")
    bad = {n: (tuple(found[n]), s) for n, s in {**shapes, **optional}.items() if n in found and tuple(found[n]) != s}
    if bad:
        raise ValueError(f"{where}: shape mismatch (found, expected) for d_in={d_in}, d_sae={d_sae}"
                         f"{f', d_out={d_out}' if spec['transcoder'] else ''}: {bad}")
    return shapes


def _convert_tensors(spec: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """SAELens tensors -> our state dict (float32), folding what our SAE cannot hold directly (in float64)."""
    shapes = _check_shapes(spec, {n: tuple(t.shape) for n, t in tensors.items()}, where)
    for n, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"{where}: tensor {n!r} has dtype {t.dtype}, expected a floating-point dtype")
    t64 = {n: t.double() for n, t in tensors.items()}
    W_enc, W_dec, b_enc, b_dec = t64["W_enc"], t64["W_dec"], t64["b_enc"], t64["b_dec"]
    changed = set()

    # legacy finetuning scaling factor: f ⊙ s before W_dec. SAELens drops an all-ones one; else W_dec' = diag(s) W_dec
    sf = t64.get("scaling_factor", t64.get("finetuning_scaling_factor"))
    if sf is not None and not torch.equal(sf, torch.ones_like(sf)):
        if not spec["finetuning_scaling_factor"]:
            raise ValueError(f"{where}: holds a non-trivial scaling_factor tensor but the config has "
                             f"finetuning_scaling_factor=false (SAELens refuses this too)")
        W_dec = W_dec * sf[:, None]
        changed.add("W_dec")
    # rescale_acts_by_decoder_norm: z·n, then f/n before decoding ⇒ W_enc' = W_enc n, b_enc' = b_enc n, W_dec' = W_dec/n
    if spec["rescale"]:
        n = W_dec.norm(dim=1)
        W_enc, b_enc = W_enc * n[None, :], b_enc * n
        W_dec = W_dec / torch.where(n > 0, n, torch.ones_like(n))[:, None]
        changed |= {"W_enc", "b_enc", "W_dec"}
    # apply_b_dec_to_input=false: our SAE always centres by b_dec, so b_enc' = b_enc + b_dec W_enc keeps z unchanged
    if not spec["apply_b_dec"] and not spec["transcoder"]:
        b_enc = b_enc + b_dec @ W_enc
        changed.add("b_enc")

    def f32(name: str, t64_: torch.Tensor) -> torch.Tensor:
        # untouched tensors are cast directly, so float32 files round-trip bit for bit
        return tensors[name].float() if name not in changed else t64_.float()

    state = {"W_enc": f32("W_enc", W_enc), "W_dec": f32("W_dec", W_dec), "b_enc": f32("b_enc", b_enc),
             "b_dec": f32("b_dec", b_dec)}
    if spec["arch"] == "jumprelu":
        if "log_threshold" in shapes:
            state["log_threshold"] = tensors["log_threshold"].float()
        else:
            state["log_threshold"] = _log_threshold(tensors["threshold"].float())
    elif spec["arch"] == "batchtopk":
        if "topk_threshold" in shapes:
            theta = float(tensors["topk_threshold"].double())
        else:
            th = tensors["threshold"].float()
            if not torch.all(th == th[0]):
                raise ValueError(f"{where}: a batchtopk 'threshold' must be one value for every latent (ours is a "
                                 f"single global threshold); per-latent thresholds are a jumprelu SAE")
            theta = float(th[0])
        # SAELens applies ReLU before its threshold, so a negative θ acts like 0; ours treats θ < 0 as "not estimated"
        state["threshold"] = torch.tensor(max(theta, 0.0), dtype=torch.float32)
    return state


def _log_threshold(theta: torch.Tensor) -> torch.Tensor:
    """log θ in float32, chosen among neighbouring floats so that exp() (as our forward computes it) is as close to θ
    as float32 allows (often exactly θ). SAELens computes ReLU(z)·[z > θ]: θ ≤ 0 is plain ReLU, so it maps to
    θ = 0, i.e. log θ = −inf (exp(−inf) = 0 exactly)."""
    theta = theta.clamp_min(0.0)
    best = torch.log(theta.double()).float()
    best_err = (best.exp() - theta).abs()
    for direction in (torch.inf, -torch.inf):
        cand = best.clone()
        for _ in range(4):
            cand = torch.nextafter(cand, torch.full_like(cand, direction))
            err = (cand.exp() - theta).abs()
            better = (err < best_err) & torch.isfinite(cand)
            best, best_err = torch.where(better, cand, best), torch.where(better, err, best_err)
    return torch.where(theta > 0, best, torch.full_like(best, -torch.inf))


# ================================================================================================ export
def export_saelens(sae: SAE, path: str | os.PathLike) -> Path:
    """Write `path/cfg.json` + `path/sae_weights.safetensors` (SAELens 6.x format, each file atomically).

    Our input/output normalisation is folded into the weights (W_enc' = s_in W_enc, W_dec' = W_dec / s_out,
    b_dec' = b_dec / s_out, b_enc corrected when s_in ≠ s_out), so SAELens's plain forward with
    normalize_activations="none" gives our outputs; folded decoder rows are then not unit norm. A batchtopk SAE is
    written as SAELens writes a trained BatchTopK: jumprelu with its inference threshold for every latent.
    """
    from . import __version__

    cfg = sae.cfg
    key = (cfg.arch, cfg.is_transcoder)
    if key not in EXPORTABLE:
        what = f"{cfg.arch} transcoder" if cfg.is_transcoder else f"{cfg.arch} SAE"
        ok = ", ".join(f"{a}{' transcoder' if t else ''} -> {s}" for (a, t), s in EXPORTABLE.items())
        raise ValueError(f"cannot export a {what} to SAELens format: SAELens has no equivalent architecture "
                         f"(exportable: {ok})")
    arch = EXPORTABLE[key]
    with torch.no_grad():
        W_enc, W_dec = sae.W_enc.detach().double(), sae.W_dec.detach().double()
        b_enc, b_dec = sae.b_enc.detach().double(), sae.b_dec.detach().double()
        s_in, s_out = float(sae.in_scale), float(sae.out_scale)
        if not (s_in > 0 and s_out > 0 and math.isfinite(s_in) and math.isfinite(s_out)):
            raise ValueError(f"in_scale={s_in}, out_scale={s_out}: normalisation scales must be finite and > 0")
        # ours: z = (s_in x − b_dec) W_enc + b_enc; SAELens: z = (x − b_dec') W_enc' + b_enc' with b_dec' = b_dec/s_out
        if not cfg.is_transcoder and s_in != s_out:
            b_enc = b_enc + (s_in / s_out - 1.0) * (b_dec @ W_enc)
        tensors = {"W_enc": (W_enc * s_in).float(), "W_dec": (W_dec / s_out).float(),
                   "b_enc": b_enc.float(), "b_dec": (b_dec / s_out).float()}
        if cfg.arch == "jumprelu":
            tensors["threshold"] = sae.threshold_theta.detach().float().clone()  # exactly the θ our forward uses
        elif cfg.arch == "batchtopk":
            theta = float(sae.threshold)
            if theta < 0:
                raise ValueError("this batchtopk SAE has no inference threshold yet (threshold < 0): train it "
                                 "(or load a trained one) before exporting")
            tensors["threshold"] = torch.full((cfg.d_sae,), theta, dtype=torch.float32)

    metadata: dict[str, Any] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
        "model_name": cfg.model_name, "hook_name": cfg.hook or None, "exported_by": f"sae_widgets {__version__}",
    }
    if cfg.is_transcoder:
        metadata["hook_name_out"] = cfg.out_hook
    out_cfg: dict[str, Any] = {
        "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": not cfg.is_transcoder, "normalize_activations": "none",
        "reshape_activations": "hook_z" if cfg.hook.endswith("hook_z") and not cfg.is_transcoder else "none",
        "metadata": metadata, "architecture": arch,
    }
    if arch == "topk":
        out_cfg.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    if cfg.is_transcoder:
        out_cfg["d_out"] = cfg.d_out
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    # the digest is computed before either file is touched, so an unserialisable config writes nothing
    save_safetensors_atomic(out / WEIGHTS_FILE, tensors, metadata={CONFIG_DIGEST_KEY: cfg_digest(out_cfg)})
    write_json_atomic(out / CFG_FILE, out_cfg)
    return out
