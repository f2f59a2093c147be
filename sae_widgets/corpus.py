"""The embedded corpus: State of the Union addresses (1790-2021) and Moby-Dick (PDDL/CC0 data).

Shipped xz-compressed inside the package; `scripts/build_corpus.py` reproduces the file from npm.
The held-out split is fixed here once, so the model's training script, its recorded loss and the
tests all agree on which documents the model never saw.
"""
from __future__ import annotations

import json
import lzma
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

SPLITS = ("train", "val", "all")
VAL_EVERY = 20  # every 20th document (index % 20 == 10) is held out: ~5 % of the text


@dataclass(frozen=True)
class Document:
    source: str
    id: str
    title: str
    text: str


def corpus_path():
    return resources.files("sae_widgets") / "assets" / "corpus" / "corpus.jsonl.xz"


@lru_cache(maxsize=1)
def _all_documents() -> tuple[Document, ...]:
    raw = lzma.decompress(corpus_path().read_bytes()).decode("utf-8")
    return tuple(Document(**json.loads(line)) for line in raw.splitlines() if line)


def load_documents(split: str = "all") -> list[Document]:
    """Documents of the embedded corpus in their fixed order; `split` is 'train', 'val' or 'all'."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    docs = _all_documents()
    if split == "all":
        return list(docs)
    held_out = split == "val"
    return [d for i, d in enumerate(docs) if (i % VAL_EVERY == VAL_EVERY // 2) == held_out]


def load_texts(split: str = "all") -> list[str]:
    return [d.text for d in load_documents(split)]
