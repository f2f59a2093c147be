"""Fault injection and loader fuzzing for the activation disk cache, feature-statistics files and token files.

The reference is always the same file(s) written without a fault: after a SIGKILL (a forked child dies at a chosen
write) or an injected ENOSPC / EIO, rerunning the writer must end bit-identical to it with no stray file; a damaged
file (truncated, 1-4 bytes flipped) must load equal to the original or fail with a ValueError / OSError naming it,
without hanging or allocating much more than the file holds.
"""
from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from sae_widgets import faults
from sae_widgets.activations import (MANIFEST, MANIFEST_DIGEST, ActivationStore, CachedRows, read_manifest,
                                     write_activation_cache)
from sae_widgets.atomic import DIGEST_KEY, load_safetensors, save_safetensors_atomic, write_json_atomic
from sae_widgets.feature_stats import FILE_NAME, FeatureStats
from sae_widgets.sae import SAE, SAEConfig
from sae_widgets.token_sources import read_token_file

HOOK = "blocks.0.hook_resid_post"
CACHE = dict(n_tokens=90, n_ctx=16, model_batch_size=2, shard_tokens=30, show_progress=False)  # 3 shards of 30 rows
N_SHARDS, ROWS_PER_SHARD = 3, 30
WRITES = 2 * N_SHARDS  # each shard, then the manifest
STATS = dict(batch_size=4, n_top=3, n_quantile_bins=2, per_bin=2, context=(2, 1), n_hist_bins=4, n_logits=3,
             show_progress=False, device="cpu")
FUZZ_EXAMPLES = 250  # per file kind
TALLY: Counter = Counter()  # printed at the end (pytest -s): what was tried


# ----------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """libgomp's thread pool does not survive fork; one thread also makes parent and children compute alike."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    print(f"\n[faults] {dict(TALLY)}")


def fresh_faults(monkeypatch, spec: str | None) -> None:
    """Set (or clear) SAE_WIDGETS_FAULT with the fault counter at zero, even when the same spec was used before."""
    faults._state.update(spec=None, count=0)
    if spec is None:
        monkeypatch.delenv(faults.ENV, raising=False)
    else:
        monkeypatch.setenv(faults.ENV, spec)


def in_child(fn, fault: str) -> int:
    """Run `fn` in a forked child with SAE_WIDGETS_FAULT=fault; its exit status, or minus the signal that ended it."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        rc = 99
        try:
            faults._state.update(spec=None, count=0)
            os.environ[faults.ENV] = fault
            fn()
            rc = 0
        finally:
            os._exit(rc)
    for _ in range(6000):  # 60 s: a child that neither finishes nor dies is a hang
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the child running {fault} hung")


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def write_cache(model, folder: Path) -> Path:
    return write_activation_cache(model, HOOK, folder, **CACHE)


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """An uninterrupted cache, and the files its writes go to (in order), from a fault trace."""
    root = tmp_path_factory.mktemp("ref")
    trace = root / "trace.txt"
    os.environ[faults.TRACE_ENV] = str(trace)
    try:
        cache = write_cache(model, root / "cache")
    finally:
        del os.environ[faults.TRACE_ENV]
    lines = [line.split("\t") for line in trace.read_text().splitlines()]
    writes = [Path(path).name for site, path in lines if site == "write"]
    assert writes == [n for i in range(N_SHARDS) for n in (f"shard_{i:05d}.safetensors", MANIFEST)]
    assert [s["n_rows"] for s in read_manifest(cache)["shards"]] == [ROWS_PER_SHARD] * N_SHARDS
    return cache, writes


def rows_of(cache: Path) -> torch.Tensor:
    rows = CachedRows(cache, dtype=torch.float32, device="cpu")
    return torch.cat([rows.next_rows() for _ in rows.manifest["shards"]])


# ----------------------------------------------------------------------------------------------- cache writer: kills
@pytest.mark.parametrize("site", ["write", "write.replace"])
def test_cache_killed_at_every_write_then_resumed_is_bit_identical(model, reference, tmp_path, site):
    """SIGKILL at each shard and manifest write (mid-file, and just before the rename); the rerun finishes the cache
    with every file byte-equal to the uninterrupted one and nothing else in the folder."""
    ref, writes = reference
    for n in range(1, WRITES + 1):
        folder = tmp_path / f"{site}-{n}"
        assert in_child(lambda: write_cache(model, folder), f"{site}:{n}:kill") == -signal.SIGKILL
        TALLY["kills"] += 1
        left = {p.name for p in folder.iterdir()}
        assert f"{writes[n - 1]}.tmp" in left  # the kill left the temp file of the very write it hit
        write_cache(model, folder)
        assert folder_bytes(folder) == folder_bytes(ref), f"killed at {site}:{n}"
        TALLY["reruns bit-identical"] += 1


def test_cache_killed_again_and_again_makes_progress_and_ends_identical(model, reference, tmp_path):
    """A kill at the third write of every run: each rerun resumes after the last complete shard, and the last one
    ends the same cache."""
    ref, _ = reference
    folder = tmp_path / "c"
    statuses = []
    while (status := in_child(lambda: write_cache(model, folder), "write:3:kill")) != 0:
        statuses.append(status)
        TALLY["kills"] += 1
        assert len(statuses) < N_SHARDS, "each resumed run must finish at least one shard"
    assert statuses == [-signal.SIGKILL] * (N_SHARDS - 1)  # shards 1+2, then 3 (+ its manifest) and done
    assert folder_bytes(folder) == folder_bytes(ref)
    TALLY["reruns bit-identical"] += 1


def test_rerun_removes_a_shard_the_manifest_does_not_list(model, reference, tmp_path):
    """Files of the writer's own naming that the manifest does not list, and temp files, are an interrupted (or
    other) run's leftovers: a rerun removes them, even when the cache is already complete."""
    ref, _ = reference
    folder = tmp_path / "c"
    shutil.copytree(ref, folder)
    (folder / "shard_00007.safetensors").write_bytes(b"left over")
    (folder / "manifest.json.tmp").write_bytes(b"{")
    write_cache(model, folder)
    assert folder_bytes(folder) == folder_bytes(ref)


# ----------------------------------------------------------------------------------------------- cache writer: ENOSPC / EIO
@pytest.mark.parametrize("action, code", [("enospc", errno.ENOSPC), ("eio", errno.EIO)])
@pytest.mark.parametrize("site", ["write", "write.replace"])
def test_cache_write_errors_say_how_far_it_got_and_rerun_is_identical(model, reference, tmp_path, monkeypatch,
                                                                      site, action, code):
    ref, writes = reference
    for n in range(1, WRITES + 1):
        folder = tmp_path / f"{n}"
        fresh_faults(monkeypatch, f"{site}:{n}:{action}")
        with pytest.raises(OSError) as err:
            write_cache(model, folder)
        TALLY["write faults"] += 1
        held = ROWS_PER_SHARD * ((n - 1) // 2)  # the shards whose manifest was written before the failing write
        msg = str(err.value)
        assert err.value.errno == code and "\n" not in msg
        assert writes[n - 1] in msg and f"{folder} holds {held} of 90 rows" in msg
        assert ("free space" if action == "enospc" else "fix the disk") in msg and "run write_activation_cache again" in msg
        assert not list(folder.glob("*.tmp"))
        if held:
            assert read_manifest(folder)["n_rows"] == held
        fresh_faults(monkeypatch, None)
        write_cache(model, folder)
        assert folder_bytes(folder) == folder_bytes(ref), f"{site}:{n}:{action}"
        TALLY["reruns bit-identical"] += 1


# ----------------------------------------------------------------------------------------------- cache readers
def test_manifest_edit_is_caught_by_its_digest(reference, tmp_path):
    """A changed value that still parses (here windows_done) used to load silently."""
    ref, _ = reference
    folder = tmp_path / "c"
    shutil.copytree(ref, folder)
    m = json.loads((folder / MANIFEST).read_text())
    m["windows_done"] += 1
    write_json_atomic(folder / MANIFEST, m)
    with pytest.raises(ValueError, match=f"{MANIFEST} is corrupt: it does not match the digest"):
        CachedRows(folder, torch.float32, "cpu")


def test_cache_without_manifest_digest_still_loads_and_resumes(model, reference, tmp_path, monkeypatch):
    """Caches written before the manifest digest existed: a finished one loads and is left as it is; an unfinished
    one is finished, its manifest then carrying a digest, and ends identical."""
    ref, _ = reference
    for folder, stop in ((tmp_path / "finished", None), (tmp_path / "unfinished", "write:3:enospc")):
        fresh_faults(monkeypatch, stop)
        if stop:
            with pytest.raises(OSError, match="holds 30 of 90 rows"):
                write_cache(model, folder)
        else:
            shutil.copytree(ref, folder)
        fresh_faults(monkeypatch, None)
        legacy = {k: v for k, v in read_manifest(folder).items() if k != MANIFEST_DIGEST}
        write_json_atomic(folder / MANIFEST, legacy)
        assert MANIFEST_DIGEST not in read_manifest(folder)
        write_cache(model, folder)
        assert torch.equal(rows_of(folder), rows_of(ref))
        if stop:
            assert folder_bytes(folder) == folder_bytes(ref)
        else:
            assert (folder / MANIFEST).read_text() == json.dumps(legacy, indent=2) + "\n"


def test_misnamed_digest_keys_are_damage_not_an_old_file(reference, tmp_path):
    """One flipped byte in a digest's key name must not turn the check off."""
    ref, _ = reference
    folder = tmp_path / "c"
    shutil.copytree(ref, folder)
    man = folder / MANIFEST
    man.write_bytes(man.read_bytes().replace(MANIFEST_DIGEST.encode(), b"manifest_sha257"))
    with pytest.raises(ValueError, match=f"{MANIFEST} is damaged: its digest 'manifest_sha256' is missing or misnamed"):
        read_manifest(folder)
    shutil.copy(ref / MANIFEST, man)
    shard = folder / "shard_00001.safetensors"
    raw = bytearray(shard.read_bytes().replace(DIGEST_KEY.encode(), b"sae_widgets.sha257"))
    raw[-1] ^= 0x01  # and a flipped byte in the data, which the digest would have caught
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="shard_00001.safetensors is damaged"):
        rows_of(folder)


def test_shard_header_is_checked_against_the_manifest_before_loading(reference, tmp_path):
    """A shard that is a sound file (its own digest right) but not the one the manifest lists."""
    ref, _ = reference
    folder = tmp_path / "c"
    shutil.copytree(ref, folder)
    good = load_safetensors(folder / "shard_00002.safetensors")
    save_safetensors_atomic(folder / "shard_00002.safetensors", {HOOK: good[HOOK][:29]})
    with pytest.raises(ValueError, match=r"shard_00002.safetensors holds .*'F32', \[29, 256\].* says .*\[30, 256\]"):
        rows_of(folder)


# ----------------------------------------------------------------------------------------------- feature stats
@pytest.fixture(scope="module")
def stats_pair(model, tmp_path_factory):
    """Stats of two SAEs over 3 windows of 8 tokens (the old file and the new one), and the new one's reference save."""
    from sae_widgets.tokens import chunk_windows

    ids = model.tokenizer("The President spoke to the nation about the whale and the sea.")["input_ids"] * 3
    windows = chunk_windows(torch.tensor(ids), 8, model.tokenizer.bos_token_id)[:3]
    made = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        sae = SAE(SAEConfig(arch="topk", d_in=256, d_sae=12, k=3, hook=HOOK)).eval()
        made.append(FeatureStats.compute(model, sae, windows, seed=seed, **STATS))
    ref = made[1].save(tmp_path_factory.mktemp("stats-ref"))
    return made[0], made[1], ref


def stats_content(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Everything a stats file holds: the header's metadata and every array (the lazy ones too)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def same_stats(a: Path, b: Path) -> bool:
    (ma, ta), (mb, tb) = stats_content(a), stats_content(b)
    return ma == mb and ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k])
                                                        for k in ta)


@pytest.mark.parametrize("previous", [False, True])
@pytest.mark.parametrize("action", ["kill", "enospc", "eio"])
@pytest.mark.parametrize("site", ["write", "write.replace"])
def test_stats_save_fault_keeps_the_old_file_and_rerun_is_identical(stats_pair, tmp_path, monkeypatch, site,
                                                                     action, previous):
    old, new, ref = stats_pair
    file = tmp_path / FILE_NAME
    if previous:
        old.save(tmp_path)
    before = file.read_bytes() if previous else None
    if action == "kill":
        assert in_child(lambda: new.save(tmp_path), f"{site}:1:kill") == -signal.SIGKILL
        TALLY["kills"] += 1
    else:
        fresh_faults(monkeypatch, f"{site}:1:{action}")
        with pytest.raises(OSError) as err:
            new.save(tmp_path)
        TALLY["write faults"] += 1
        msg = str(err.value)
        assert "\n" not in msg and f"could not save feature statistics to {file}" in msg
        assert ("the file there before is unchanged" if previous else "no file was written") in msg
        assert ("free space" if action == "enospc" else "fix the disk") in msg
        assert not list(tmp_path.glob("*.tmp"))
        fresh_faults(monkeypatch, None)
    assert (file.read_bytes() if file.exists() else None) == before
    if previous:
        assert FeatureStats.load(tmp_path).feature(3) == old.feature(3)
    new.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE_NAME]
    assert same_stats(file, ref)
    TALLY["reruns bit-identical"] += 1


def test_stats_metadata_edit_is_caught(stats_pair, tmp_path):
    """The tensors' digest does not cover the header; an edited metadata JSON used to load silently."""
    _, new, ref = stats_pair
    meta, tensors = stats_content(ref)
    meta["meta"] = meta["meta"].replace('"n_tokens": 21', '"n_tokens": 22')
    assert meta["meta"] != stats_content(ref)[0]["meta"]
    (tmp_path / FILE_NAME).write_bytes(save(tensors, metadata=meta))
    with pytest.raises(ValueError, match=f"{FILE_NAME} is corrupt: its metadata does not match"):
        FeatureStats.load(tmp_path)


def test_stats_array_damage_is_caught_at_load_and_old_files_still_load(stats_pair, tmp_path):
    """A flipped value in a lazily read array is found by the load's digest pass; files without digests (older
    versions) still load."""
    _, new, ref = stats_pair
    meta, tensors = stats_content(ref)
    tensors["top_ctx_acts"] = tensors["top_ctx_acts"].clone()
    tensors["top_ctx_acts"].view(-1)[5] += 1.0
    (tmp_path / FILE_NAME).write_bytes(save(tensors, metadata=meta))
    with pytest.raises(ValueError, match="do not match the digest"):
        FeatureStats.load(tmp_path)
    assert FeatureStats.load(tmp_path, verify=False).n_tokens == new.n_tokens  # the caller chose not to check
    legacy = {"format": meta["format"], "meta": meta["meta"]}
    (tmp_path / FILE_NAME).write_bytes(save(stats_content(ref)[1], metadata=legacy))
    assert FeatureStats.load(tmp_path).feature(4) == new.feature(4)


# ----------------------------------------------------------------------------------------------- token files
def test_token_file_checks(tmp_path):
    """A float token file, and an .npy header that claims more than the file holds, are errors naming the file."""
    np.save(tmp_path / "f.npy", np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="f.npy' holds dtype torch.float32; token ids must be integers"):
        read_token_file(tmp_path / "f.npy")
    big = tmp_path / "huge.npy"
    np.save(big, np.arange(10, dtype=np.int64))
    big.write_bytes(big.read_bytes().replace(b"(10,)", b"(90,)"))  # 90 int64 claimed, 10 present
    with pytest.raises(ValueError, match=r"huge.npy' is not a readable .npy file: its header says int64 \(90,\)"):
        read_token_file(big)
    save_safetensors_atomic(tmp_path / "t.safetensors", {"tokens": torch.arange(7)})
    assert torch.equal(read_token_file(tmp_path / "t.safetensors"), torch.arange(7))


# ----------------------------------------------------------------------------------------------- fuzzing
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Make the peak RSS the current one (Linux: clear_refs 5), so growth is measured from here, not from the
    model's load; where that is not allowed, growth past the earlier peak is still measured."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class Hang(BaseException):
    """Raised by the alarm: a load that takes seconds on a file of kilobytes is hanging."""


def _on_alarm(signum, frame):
    raise Hang()


@pytest.fixture(scope="module")
def originals(reference, stats_pair, tmp_path_factory):
    """The files to damage, each with a function that loads it (and what it holds) and its original content."""
    root = tmp_path_factory.mktemp("orig")
    ref, _ = reference
    _, _, stats_file = stats_pair
    tokens = torch.randint(0, 5000, (200,), generator=torch.Generator().manual_seed(0))
    save_safetensors_atomic(root / "tokens.safetensors", {"tokens": tokens})
    np.save(root / "tokens.npy", tokens.numpy().astype(np.int32))

    def load_cache(folder: Path):
        return read_manifest(folder), rows_of(folder)

    def load_stats(folder: Path):
        s = FeatureStats.load(folder)
        return s.meta, {k: s._full(k) if k in ("top_ctx_ids", "top_ctx_acts", "q_ctx_ids", "q_ctx_acts")
                        else s._arrays[k] for k in stats_content(folder / FILE_NAME)[1]}

    return {
        "shard": (ref, "shard_00001.safetensors", load_cache),
        "manifest": (ref, MANIFEST, load_cache),
        "stats": (stats_file.parent, FILE_NAME, load_stats),
        "tokens.safetensors": (root, "tokens.safetensors", lambda f: read_token_file(f / "tokens.safetensors")),
        "tokens.npy": (root, "tokens.npy", lambda f: read_token_file(f / "tokens.npy")),
    }


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def damage(raw: bytes, data) -> bytes:
    if data.draw(st.booleans(), label="truncate"):
        return raw[:data.draw(st.integers(0, len(raw) - 1), label="keep")]
    out = bytearray(raw)
    for at in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4, unique=True), label="at"):
        out[at] ^= data.draw(st.integers(1, 255), label="xor")
    return bytes(out)


@pytest.mark.parametrize("kind", ["shard", "manifest", "stats", "tokens.safetensors", "tokens.npy"])
def test_damaged_files_load_equal_or_fail_naming_the_file(originals, tmp_path_factory, kind):
    folder, name, load = originals[kind]
    want = load(folder)
    raw = (folder / name).read_bytes()
    work = tmp_path_factory.mktemp(f"fuzz-{kind}")
    shutil.rmtree(work)
    shutil.copytree(folder, work)
    reset_peak_rss()
    rss_before = peak_rss_mb()
    outcomes = Counter()
    npy_data_start = raw.index(b"\n") + 1 if kind == "tokens.npy" else None

    @settings(deadline=None, derandomize=True, database=None, max_examples=FUZZ_EXAMPLES,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def check(data):
        bad = damage(raw, data)
        (work / name).write_bytes(bad)
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, 10.0)
        try:
            got = load(work)
        except (ValueError, OSError) as e:
            assert name in str(e), f"{type(e).__name__} does not name {name}: {e}"
            outcomes["error naming the file"] += 1
            return
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        if equal(got, want):
            outcomes["equal"] += 1
        elif kind == "tokens.npy" and len(bad) == len(raw) and bad[:npy_data_start] == raw[:npy_data_start]:
            # .npy has no checksum: flips in its data are loaded as written, never misread
            assert got.numpy().tobytes() == bad[npy_data_start:] and got.shape == want.shape
            outcomes["npy data loaded as written"] += 1
        else:
            raise AssertionError(f"{name} damaged but loaded as other data")

    check()
    (work / name).write_bytes(raw)
    grown_mb = peak_rss_mb() - rss_before
    assert grown_mb < 200, f"peak memory grew by {grown_mb:.0f} MB while loading damaged {kind} files"
    assert outcomes["error naming the file"] > 0
    TALLY[f"fuzz cases {kind}"] += sum(outcomes.values())
    print(f"\n[fuzz {kind}] {dict(outcomes)}, peak RSS grew {grown_mb:.1f} MB")


def test_cached_rows_equal_the_shards_as_written(reference):
    """The checked shard reads serve exactly the tensors the writer saved, through the store as well."""
    ref, _ = reference
    shards = [load_safetensors(ref / f"shard_{i:05d}.safetensors")[HOOK] for i in range(N_SHARDS)]
    store = ActivationStore.from_cache(ref, batch_size=90, buffer_size=90, shuffle=False, show_progress=False)
    assert torch.equal(store.next_batch(), torch.cat(shards))
