"""Crash-safe writes and checked reads.

Writes go to a temp file beside the target, are fsynced and renamed over it, so a reader sees the old file or the
new one, never half of one; a failed write removes its temp file. Files get the permissions the umask allows (as
`open` gives them), so a shared run folder is readable by the group when the umask says so.

Every safetensors file written here records a SHA-256 digest of its tensors in its header, and `load_safetensors`
checks it: a truncated, bit-flipped or otherwise damaged file is a one-line `ValueError` naming the file, never a
silent load of other numbers. Files written before digests existed load unchecked.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from .faults import fault_point

DIGEST_KEY = "sae_widgets.sha256"
TMP_SUFFIX = ".tmp"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    view = memoryview(data)
    try:
        with open(tmp, "wb") as f:
            f.write(view[: len(view) // 2])
            fault_point("write", path)  # an injected ENOSPC / EIO / kill lands mid-file, where a real one does
            f.write(view[len(view) // 2:])
            f.flush()
            os.fsync(f.fileno())
        fault_point("write.replace", path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over each tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def save_safetensors_atomic(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                            metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {**(metadata or {}), DIGEST_KEY: tensors_digest(tensors)}
    write_bytes_atomic(path, save(tensors, metadata=meta))


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header's metadata of a safetensors file (a `ValueError` naming the file if the header is unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file, checking the digest recorded when it was written (if any)."""
    meta = safetensors_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    want = meta.get(DIGEST_KEY)
    if want is not None and tensors_digest(tensors) != want:
        raise ValueError(f"{path} is corrupt: its tensors do not match the SHA-256 digest recorded when it was "
                         f"written (a damaged disk or copy); use another copy or an older checkpoint")
    return tensors


def renamed_keys(keys, name: str) -> list[str]:
    """Keys a few flipped bytes could have made of `name` (same length, at most 4 characters differ): a file whose
    digest's key was damaged must not pass for an older file written without a digest."""
    return [k for k in keys if isinstance(k, str) and k != name and len(k) == len(name)
            and sum(a != b for a, b in zip(k, name)) <= 4]


def check_digest_field(path: str | os.PathLike, keys, name: str, required: bool = False) -> bool:
    """Whether `keys` hold the digest `name`; a ValueError naming `path` when it is damaged, or missing but required."""
    if name in keys:
        return True
    if renamed_keys(keys, name) or required:
        raise ValueError(f"{path} is damaged: its digest {name!r} is missing or misnamed "
                         f"({sorted(map(str, keys))}); use another copy or write it again")
    return False


def safetensors_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, tuple[str, list[int]]]]:
    """A safetensors file's metadata and its tensors' (dtype, shape), read from the header only (nothing allocated);
    a `ValueError` naming the file if the header is unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}
            return dict(f.metadata() or {}), shapes
    except (SafetensorError, OSError, ValueError, RuntimeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e


def load_checked_safetensors(path: str | os.PathLike, require_digest: bool = False) -> dict[str, torch.Tensor]:
    """`atomic.load_safetensors`, where a misnamed digest key is damage rather than a file written without one."""
    check_digest_field(Path(path), safetensors_metadata(path), DIGEST_KEY, required=require_digest)
    return load_safetensors(path)


def json_digest(obj: Any) -> str:
    """SHA-256 of `obj` as canonical JSON: the same for equal objects, whatever the key order or indentation."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def remove_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files an interrupted write left in `folder` (not recursive); returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    left = [p for p in folder.iterdir() if p.is_file() and p.name.endswith(TMP_SUFFIX)]
    for p in left:
        p.unlink(missing_ok=True)
    return left


def replace_dir_atomic(staging: Path, final: Path) -> None:
    """Move a fully written staging folder into place; an older folder of that name is swapped out first."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)
