"""Configs from JSON: a clear error for a file that is not JSON, and for unknown keys (a typo must not be silently
ignored) with the known ones named."""
from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; any damage (bad bytes, bad syntax, absurd nesting) is a `ValueError` naming the file."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (corrupt?): byte {e.start} is {e.object[e.start:e.start + 1]!r}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    except RecursionError:
        raise ValueError(f"{path} is not a config: its JSON nests too deeply") from None


def strict_from_dict(cls: type[T], d: dict[str, Any], what: str) -> T:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {what} config keys {unknown}; known keys: {sorted(known)}")
    return cls(**d)
