"""Load a transformer_lens model: the embedded default, a local HF-format folder, or a hub name.

All three go through one loader (`TransformerBridge.boot_transformers`); they differ only in where the
files come from. Nothing here touches the network when `HF_HUB_OFFLINE=1` (the set-up scripts set it):
a hub name that is not in the local cache is a clear error instead of a download attempt.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch

DEFAULT_MODEL = "sotu-moby-4l"
EMBEDDED_MODELS = (DEFAULT_MODEL,)
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype for a model dtype given by name ('float32', 'bfloat16', 'float16') or as a torch dtype."""
    if isinstance(name, torch.dtype) and name in MODEL_DTYPES.values():
        return name
    if name not in MODEL_DTYPES:
        raise ValueError(f"model dtype {name!r} is not one of {sorted(MODEL_DTYPES)}")
    return MODEL_DTYPES[name]


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The HF-format folder of an embedded model inside the installed package."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"no embedded model {name!r}; embedded models: {EMBEDDED_MODELS}")
    return Path(str(resources.files("sae_widgets") / "assets" / "models" / name))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub (HF_ENDPOINT) cannot be reached right now, or None if a TCP connection opens."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub.constants import ENDPOINT

    url = urlparse(ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname}:{port}: {e.strerror or e}"
    return None


def resolve_model_source(name: str | os.PathLike | None = None) -> str:
    """Where the files of `name` are: an embedded model's folder, a local folder, or a cached hub snapshot."""
    if name is None or str(name) in EMBEDDED_MODELS:
        return str(embedded_model_dir(DEFAULT_MODEL if name is None else str(name)))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder but holds no config.json: not an HF-format model folder")
        return str(path)
    if isinstance(name, Path) or str(name).startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {str(name)!r} does not exist")
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    cache_dir = os.environ.get("HF_HUB_CACHE", HF_HUB_CACHE)
    cached = try_to_load_from_cache(str(name), "config.json", cache_dir=cache_dir)
    if isinstance(cached, str):  # in the cache: load the snapshot folder, with no network round trip at all
        return str(Path(cached).parent)
    hint = (f"Use the embedded default (load_model()), pass a local HF-format folder "
            f"(load_model('/path/to/{str(name).split('/')[-1]}')), or download it once with network access")
    if _offline():
        raise FileNotFoundError(f"model {str(name)!r} is not in the local Hugging Face cache ({cache_dir}) and "
                                f"HF_HUB_OFFLINE=1 forbids downloading it. {hint}.")
    unreachable = hub_unreachable()
    if unreachable:  # fail in seconds, instead of huggingface_hub's retries (about 25 s) and a long traceback
        raise FileNotFoundError(f"model {str(name)!r} is not in the local Hugging Face cache ({cache_dir}) and the "
                                f"hub cannot be reached ({unreachable}). {hint}.")
    return str(name)


# the files a tokenizer is built from (one of them must be there); tokenizer_config.json alone only configures one
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken")
NO_TOKENIZER = (False, "none")


def check_tokenizer_files(folder: str | os.PathLike) -> None:
    """A clear error when a local model folder holds no tokenizer: which files are missing and how to pass one."""
    path = Path(folder)
    if not path.is_dir() or any((path / f).is_file() for f in TOKENIZER_FILES):
        return
    present = sorted(p.name for p in path.glob("tokenizer*")) or ["none"]
    raise FileNotFoundError(
        f"{path} holds no tokenizer: none of {', '.join(TOKENIZER_FILES)} is there (tokenizer files present: "
        f"{', '.join(present)}). Pass one: load_model({str(folder)!r}, tokenizer='/path/to/tokenizer-folder' or a "
        f"hub name or a transformers tokenizer object) (CLI: --tokenizer PATH), or load without one "
        f"(tokenizer=False; CLI: --tokenizer none) and give token ids (TokenArray, --tokens-file)")


def resolve_tokenizer(tokenizer):
    """A transformers tokenizer from a folder / hub name (offline: from the local cache), or the object given."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    path = Path(tokenizer).expanduser()
    if path.is_dir():
        check_tokenizer_files(path)
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.is_dir() else str(tokenizer))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"tokenizer={str(tokenizer)!r} could not be loaded (a tokenizer folder, or a hub "
                                f"name in the local cache): {str(e).splitlines()[0]}") from e


def _boot_without_tokenizer(source: str, **kwargs):
    """boot_transformers with its tokenizer step skipped (it always loads one, except for audio / vision models)."""
    from unittest import mock

    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources.transformers import source as tl_source

    if not hasattr(tl_source, "skip_tokenizer_for_modality"):  # pragma: no cover - a transformer_lens change
        raise RuntimeError("this transformer_lens version cannot load a model without a tokenizer here; "
                           "pass tokenizer=...")
    with mock.patch.object(tl_source, "skip_tokenizer_for_modality", return_value=True):
        return TransformerBridge.boot_transformers(source, **kwargs)


def load_model(name: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
               dtype: str | torch.dtype = torch.float32, tokenizer=None):
    """A `TransformerBridge` for `name` (None = the embedded default model), in eval mode.

    The returned model speaks the classic hook API (`run_with_hooks`, `run_with_cache`, `blocks.L.hook_resid_post`, ...).
    `tokenizer`: None = the model's own tokenizer files; a folder or hub name, or a transformers tokenizer object;
    False (or "none") = no tokenizer: `model.tokenizer` is None and every entry point takes token ids instead of text.
    """
    from transformer_lens.model_bridge import TransformerBridge

    source = resolve_model_source(name)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = dict(device=device, dtype=model_dtype(dtype))
    tokenizer = None if tokenizer is True else tokenizer
    if isinstance(tokenizer, (bool, str)) and tokenizer in NO_TOKENIZER:
        model = _boot_without_tokenizer(source, **kwargs)
    else:
        if tokenizer is None:
            check_tokenizer_files(source)
        tok = resolve_tokenizer(tokenizer)
        model = TransformerBridge.boot_transformers(source, tokenizer=tok, **kwargs)
    model.eval()
    model.sae_widgets_source = source  # recorded in activation-cache manifests
    model.sae_widgets_name = str(name) if name is not None else DEFAULT_MODEL
    return model
