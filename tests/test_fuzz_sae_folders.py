"""Damaged SAE folders: the loaders either give back exactly the SAE that was saved, or fail with a ValueError /
OSError naming the damaged file. Never another exception, never a hang, never a large allocation.

Hypothesis truncates files and flips 1-4 bytes anywhere (JSON, safetensors header and tensor data) of small native
folders (topk, jumprelu, a transcoder) and of an exported SAELens folder; the settings are derandomized so CI
sees the same cases every run. Memory is the peak resident set (VmHWM, reset through /proc/self/clear_refs so the
measure covers only the test itself, whatever earlier tests did).
"""
from __future__ import annotations

import resource
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file, save_file

from sae_widgets.persistence import CONFIG, WEIGHTS, load_sae, save_sae
from sae_widgets.sae import SAE, SAEConfig
from sae_widgets.saelens_format import CFG_FILE, WEIGHTS_FILE, export_saelens, load_saelens

EXAMPLES_PER_FILE = 1000  # 8 files: 8000 cases, about 20 s on 2 cores
MB = 1 << 20


# ------------------------------------------------------------------------------------------------ memory
def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _ru_maxrss_kb() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, kB on Linux


class PeakRSS:
    """Peak resident memory growth since construction: VmHWM reset via clear_refs (Linux), else ru_maxrss."""

    def __init__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.start_kb, self.field = _status_kb("VmRSS"), "VmHWM"
        except OSError:  # no resettable peak: ru_maxrss only sees growth beyond the process's earlier peak
            self.start_kb, self.field = _ru_maxrss_kb(), None

    def growth_bytes(self) -> int:
        peak = _status_kb(self.field) if self.field else _ru_maxrss_kb()
        return (peak - self.start_kb) * 1024


# ------------------------------------------------------------------------------------------------ folders
def small_sae(arch: str, transcoder: bool = False) -> SAE:
    """A small SAE with every tensor non-trivial (biases, scales, thresholds), so a changed byte changes a value."""
    torch.manual_seed(0)
    kw = {"k": 3} if arch == "topk" else {}
    if transcoder:
        kw.update(out_hook="blocks.0.hook_mlp_out", d_out=6)
    sae = SAE(SAEConfig(arch=arch, d_in=8, d_sae=16, hook="blocks.0.hook_resid_pre", model_name="tiny", **kw))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        sae.in_scale.fill_(0.75)
        sae.out_scale.fill_(0.75 if not transcoder else 1.5)
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.rand(16).add(0.1).log())
    return sae.eval()


NATIVE = {"topk": ("topk", False), "jumprelu": ("jumprelu", False), "transcoder": ("relu", True)}
TARGETS = [(name, f) for name in NATIVE for f in (CONFIG, WEIGHTS)] + [("saelens", CFG_FILE), ("saelens", WEIGHTS_FILE)]


def loader_for(name: str):
    return load_saelens if name == "saelens" else load_sae


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    out = {}
    for name, (arch, tc) in NATIVE.items():
        out[name] = save_sae(small_sae(arch, tc), root / name, training={"lr": 3e-4, "steps": 100, "note": "fuzz"})
    out["saelens"] = export_saelens(small_sae("jumprelu"), root / "saelens")
    return out


def header_end(data: bytes, filename: str) -> int:
    """Bytes up to the end of the safetensors JSON header (the whole file for JSON)."""
    if not filename.endswith(".safetensors"):
        return len(data)
    return min(len(data), 8 + int.from_bytes(data[:8], "little"))


def damaged(data: bytes, filename: str) -> st.SearchStrategy[bytes]:
    """A truncation, or 1-4 byte flips (XOR with 1..255) anywhere; positions are drawn from the safetensors header,
    the whole file and its last quarter equally often (hypothesis favours small integers; JSON ends in 'training')."""
    n = len(data)
    position = st.one_of(st.integers(0, header_end(data, filename) - 1), st.integers(0, n - 1),
                         st.integers(n * 3 // 4, n - 1))

    def flip(flips: list[tuple[int, int]]) -> bytes:
        b = bytearray(data)
        for pos, mask in flips:
            b[pos] ^= mask
        return bytes(b)

    truncation = st.integers(0, n - 1).map(lambda i: data[:i])
    flip_list = st.lists(st.tuples(position, st.integers(1, 255)), min_size=1, max_size=4, unique_by=lambda f: f[0])
    flips = flip_list.map(flip)  # distinct positions and non-zero masks: the file always changes
    return st.one_of(truncation, flips)


def same_sae(a: SAE, b: SAE) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return a.cfg == b.cfg and sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------ fuzz
@pytest.mark.timeout(120)
@pytest.mark.parametrize("name,filename", TARGETS, ids=[f"{n}-{f}" for n, f in TARGETS])
def test_damaged_file_loads_identically_or_fails_naming_it(folders, name, filename):
    load = loader_for(name)
    folder = folders[name]
    path = folder / filename
    original_bytes = path.read_bytes()
    reference = load(folder)
    outcomes: Counter[str] = Counter()
    peak = PeakRSS()

    @settings(max_examples=EXAMPLES_PER_FILE, deadline=None, derandomize=True, database=None)
    @given(data=damaged(original_bytes, filename))
    def check(data: bytes) -> None:
        path.write_bytes(data)
        try:
            try:
                sae = load(folder)
            except (ValueError, OSError) as e:
                assert filename in str(e), f"error does not name the damaged {filename}: {e!r}"
                outcomes["error"] += 1
                return
            assert same_sae(sae, reference), f"damaged {filename} loaded as a different SAE"
            outcomes["identical"] += 1
        finally:
            path.write_bytes(original_bytes)

    check()
    growth = peak.growth_bytes()
    print(f"\n{name}/{filename}: {sum(outcomes.values())} cases {dict(outcomes)}, peak RSS growth {growth / MB:.1f} MB")
    assert sum(outcomes.values()) >= EXAMPLES_PER_FILE * 0.9  # hypothesis ran (almost) every case
    assert outcomes["error"] > EXAMPLES_PER_FILE // 3  # damage was detected, not silently tolerated
    assert growth < 200 * MB
    assert same_sae(load(folder), reference)  # the folder was restored after every case


# ------------------------------------------------------------------------------------------------ allocation
def strip_digests(weights: Path) -> None:
    """Rewrite a safetensors file without header metadata, as files written before digests existed."""
    save_file(load_file(weights), weights)


def rewrite_json(path: Path, **changes) -> None:
    import json

    obj = json.loads(path.read_text())
    target = obj["config"] if path.name == CONFIG else obj
    target.update(changes)
    path.write_text(json.dumps(obj))


CASES = [(kind, digest) for kind in ("native", "saelens") for digest in (True, False)]


@pytest.mark.parametrize("kind,digest", CASES, ids=[f"{k}-{'digest' if d else 'no-digest'}" for k, d in CASES])
@pytest.mark.parametrize("d_sae", [10 ** 12, 3 * 10 ** 6])
def test_huge_d_sae_in_config_is_refused_before_allocating(tmp_path, kind, digest, d_sae):
    sae = small_sae("topk")
    if kind == "native":
        folder, cfg_name, weights_name, load = save_sae(sae, tmp_path / "s"), CONFIG, WEIGHTS, load_sae
    else:
        folder, cfg_name, weights_name, load = export_saelens(sae, tmp_path / "s"), CFG_FILE, WEIGHTS_FILE, load_saelens
    if not digest:
        strip_digests(folder / weights_name)
    rewrite_json(folder / cfg_name, d_sae=d_sae)
    peak = PeakRSS()
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as e:
        load(folder)
    elapsed, growth = time.perf_counter() - t0, peak.growth_bytes()
    # with a digest, the config is refused as not matching its weights; without, its shapes do not fit them
    assert cfg_name in str(e.value) and ("does not match the weights" if digest else "shape mismatch") in str(e.value)
    assert elapsed < 1.0 and growth < 32 * MB, (elapsed, growth / MB)
