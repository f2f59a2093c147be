"""Where the activation store's tokens come from: the embedded corpus, text files, token arrays, HF datasets.

A source yields documents as lists of token ids, one at a time (so a store starts instantly and never holds a
tokenised corpus it does not need). The store joins documents with the end-of-text token and cuts windows.
Each source also describes itself in JSON, for activation-cache manifests.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch


class TokenSource(Protocol):
    def documents(self, tokenizer) -> Iterator[list[int]]: ...
    def describe(self) -> dict[str, Any]: ...


def _encode(tokenizer, text: str) -> list[int]:
    if tokenizer is None:
        raise ValueError("this token source is text but the model has no tokenizer: give token ids instead "
                         "(TokenArray / TokenFile; CLI --tokens-file), or load the model with tokenizer=...")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class EmbeddedCorpus:
    """The corpus shipped in the package (State of the Union + Moby-Dick); split 'train', 'val' or 'all'."""

    def __init__(self, split: str = "train"):
        from .corpus import SPLITS

        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {SPLITS}")
        self.split = split

    def documents(self, tokenizer) -> Iterator[list[int]]:
        from .corpus import load_texts

        for text in load_texts(self.split):
            yield _encode(tokenizer, text)

    def describe(self) -> dict[str, Any]:
        return {"kind": "embedded_corpus", "split": self.split}


class TextFiles:
    """UTF-8 text files, each file one document."""

    def __init__(self, paths: Sequence[str | os.PathLike] | str | os.PathLike):
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise ValueError("TextFiles needs at least one path")
        self.paths = [Path(p) for p in paths]
        missing = [str(p) for p in self.paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"text files not found: {missing}")

    def documents(self, tokenizer) -> Iterator[list[int]]:
        for p in self.paths:
            text = p.read_text(encoding="utf-8")
            if text.strip():
                yield _encode(tokenizer, text)

    def describe(self) -> dict[str, Any]:
        return {"kind": "text_files", "paths": [str(p) for p in self.paths]}


class TokenArray:
    """Token ids already made: a 1-D array is one document (a stream), a 2-D array one document per row."""

    def __init__(self, tokens, name: str = "token_array"):
        t = torch.as_tensor(tokens)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"token ids must be integers, got dtype {t.dtype}")
        if t.dim() not in (1, 2):
            raise ValueError(f"token array must be 1-D (a stream) or 2-D (documents), got shape {tuple(t.shape)}")
        if t.numel() and int(t.min()) < 0:
            raise ValueError(f"token ids must be >= 0, found {int(t.min())}")
        self.tokens = t.long()
        self.name = name

    def documents(self, tokenizer) -> Iterator[list[int]]:
        vocab = len(tokenizer) if tokenizer is not None else None
        if vocab is not None and self.tokens.numel() and int(self.tokens.max()) >= vocab:
            raise ValueError(f"token id {int(self.tokens.max())} is outside the model's vocabulary of {vocab}")
        rows = [self.tokens] if self.tokens.dim() == 1 else self.tokens
        for row in rows:
            if row.numel():
                yield row.tolist()

    def describe(self) -> dict[str, Any]:
        return {"kind": "token_array", "name": self.name, "shape": list(self.tokens.shape)}


def read_token_file(path: str | os.PathLike) -> torch.Tensor:
    """The integer tensor of a token file: `.safetensors` (one tensor, or the one named 'tokens' / 'input_ids'; its
    digest checked when it has one) or `.npy` (read without pickle, its header checked against the file's size before
    anything is allocated). A damaged file is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {str(path)!r} does not exist")
    if path.suffix == ".npy":
        tokens = _read_npy(path)
    elif path.suffix == ".safetensors":
        from .atomic import load_checked_safetensors

        tensors = load_checked_safetensors(path)
        named = [k for k in ("tokens", "input_ids") if k in tensors]
        if len(tensors) != 1 and not named:
            raise ValueError(f"token file {str(path)!r} holds tensors {sorted(tensors)}: keep one, or name it 'tokens'")
        tokens = tensors[named[0]] if named else next(iter(tensors.values()))
    else:
        raise ValueError(f"token file {str(path)!r} must be .safetensors (one integer tensor) or .npy")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"token file {str(path)!r} holds dtype {tokens.dtype}; token ids must be integers")
    return tokens


def _read_npy(path: Path) -> torch.Tensor:
    """An .npy file's array, after checking that its header's shape and dtype account for exactly the file's bytes
    (a damaged header must not make us allocate more than the file holds)."""
    import numpy as np

    try:
        shape, dtype, data_start = _npy_header(path)
        if dtype.hasobject:
            raise ValueError("it holds Python objects, not integers")
        want = data_start + math.prod(shape) * dtype.itemsize
        if want != path.stat().st_size:
            raise ValueError(f"its header says {dtype} {shape} ({want} bytes) but the file holds "
                             f"{path.stat().st_size} bytes (truncated or damaged?)")
        return torch.from_numpy(np.load(path, allow_pickle=False))
    except (ValueError, TypeError, OSError, EOFError) as e:
        raise ValueError(f"token file {str(path)!r} is not a readable .npy file: {e}") from e


def _npy_header(path: Path):
    """(shape, dtype, offset of the data) from an .npy header; numpy parses the header's Python literal with
    tokenize and ast, whose errors on damaged bytes are of many types: all become one ValueError."""
    from numpy.lib import format as npy

    readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
    with open(path, "rb") as f:
        try:
            version = npy.read_magic(f)
            if version not in readers:
                raise ValueError(f"npy format version {version} is not one of {sorted(readers)}")
            shape, _, dtype = readers[version](f)
        except Exception as e:  # noqa: BLE001 - untrusted bytes through a literal parser: any failure is damage
            raise ValueError(f"its header is damaged ({type(e).__name__}: {e})") from e
        return shape, dtype, f.tell()


class TokenFile(TokenArray):
    """Token ids from a file (see `read_token_file`): a 1-D tensor is one stream, a 2-D tensor one document per row."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(read_token_file(path), name=Path(path).name)
        self.path = Path(path)

    def describe(self) -> dict[str, Any]:
        return {"kind": "token_file", "path": str(self.path), "shape": list(self.tokens.shape)}


class HFDataset:
    """A Hugging Face `datasets` dataset available locally: a Dataset object, a `save_to_disk` folder, or a cached name.

    Uses `input_ids` when the dataset is pre-tokenised, else tokenises `text_column`.
    """

    def __init__(self, dataset, text_column: str = "text", split: str = "train"):
        try:
            import datasets
        except ImportError as e:  # pragma: no cover - datasets comes with transformer_lens
            raise ImportError("HFDataset needs the `datasets` package: pip install datasets") from e
        self.label = dataset if isinstance(dataset, (str, os.PathLike)) else getattr(dataset, "info", None) and dataset.info.dataset_name
        if isinstance(dataset, (str, os.PathLike)):
            path = Path(dataset)
            if path.is_dir():
                dataset = datasets.load_from_disk(str(path))
            else:
                try:
                    dataset = datasets.load_dataset(str(dataset), split=split)
                except Exception as e:
                    raise FileNotFoundError(
                        f"dataset {str(dataset)!r} is neither a local folder nor loadable from the local cache "
                        f"(offline: HF_DATASETS_OFFLINE={os.environ.get('HF_DATASETS_OFFLINE', '')!r}): {e}") from e
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"split {split!r} not in the dataset; it has {list(dataset)}")
            dataset = dataset[split]
        self.dataset = dataset
        self.text_column = text_column
        cols = dataset.column_names
        if "input_ids" not in cols and text_column not in cols:
            raise ValueError(f"dataset has no 'input_ids' and no text column {text_column!r}; its columns: {cols}")

    def documents(self, tokenizer) -> Iterator[list[int]]:
        pretokenised = "input_ids" in self.dataset.column_names
        for row in self.dataset:
            if pretokenised:
                yield list(row["input_ids"])
            elif row[self.text_column]:
                yield _encode(tokenizer, row[self.text_column])

    def describe(self) -> dict[str, Any]:
        return {"kind": "hf_dataset", "name": str(self.label), "rows": len(self.dataset),
                "fingerprint": getattr(self.dataset, "_fingerprint", None), "text_column": self.text_column}
