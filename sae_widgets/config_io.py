"""Configs from JSON: refuse unknown keys (a typo must not be silently ignored) and name the known ones."""
from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def strict_from_dict(cls: type[T], d: dict[str, Any], what: str) -> T:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {what} config keys {unknown}; known keys: {sorted(known)}")
    return cls(**d)
