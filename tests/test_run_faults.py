"""Fault injection on `sae-widgets train`: kills at random points (inside checkpoint writes too), full and failing
disks on every file write, damaged checkpoints, moved and copied run folders. The reference is always the same run
left alone: after any fault, resuming must end bit-identical to it (SAE, optimizer state, metrics), with no stray
file left and the original of a copied run never written.

Runs are forked from this (already warmed-up) test process, so a SIGKILL hits a child and a run costs a fraction of
a second; torch uses one thread here, so parent and children compute bit for bit alike.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_widgets.activations import write_activation_cache
from sae_widgets.cli import main
from sae_widgets.faults import ENV, TRACE_ENV
from sae_widgets.train import checkpoint_dirs

HOOK = "blocks.0.hook_resid_post"
STEPS, BATCH = 32, 128
ORPHAN_SUFFIXES = (".tmp", ".staging", ".old")


def run_args(cache: Path, *extra: str) -> list[str]:
    return ["train", "--cache", str(cache), "--hook", HOOK, "--d-sae", "32", "--k", "4", "--tokens",
            str(STEPS * BATCH), "--batch-size", str(BATCH), "--buffer-size", "512", "--eval-tokens", "512",
            "--checkpoint-every", "4", "--no-progress", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache(model, tmp_path_factory, one_thread):
    return write_activation_cache(model, HOOK, tmp_path_factory.mktemp("cache") / "c", n_tokens=4096, n_ctx=16,
                                  model_batch_size=8, show_progress=False)


def cli(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run the CLI in this process: (exit status, stderr)."""
    err = io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            rc = main(args)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return rc, err.getvalue()


def forked(args: list[str], env: dict[str, str], cwd: Path | None = None) -> int:
    """Run the CLI in a forked child; its exit status, or minus the signal that ended it."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        rc = 99
        try:
            os.environ.update(env)
            if cwd:
                os.chdir(cwd)
            with open(os.devnull, "w") as null, redirect_stderr(null), redirect_stdout(null):
                rc = main(args)
        finally:
            os._exit(rc)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def outcome(run: Path) -> dict[str, object]:
    """What must match the uninterrupted run exactly: SAE, last checkpoint's state (Adam, RNG, store), metrics."""
    last = checkpoint_dirs(run)[0]
    metrics = json.loads((run / "metrics.json").read_text())
    return {"sae": load_file(run / "sae" / "sae.safetensors"), "state": load_file(last / "state.safetensors"),
            "step": last.name, "metrics": metrics["metrics"]}


def assert_identical(got: dict, want: dict, what: str) -> None:
    assert got["step"] == want["step"] and got["metrics"] == want["metrics"], what
    for part in ("sae", "state"):
        assert got[part].keys() == want[part].keys(), what
        for k in want[part]:
            assert torch.equal(got[part][k], want[part][k]), f"{what}: {part} tensor {k} differs"


def files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*")}


def assert_no_orphans(run: Path, reference: Path, what: str) -> None:
    stray = [p for p in files(run) if p.endswith(ORPHAN_SUFFIXES)]
    assert not stray, f"{what}: left {stray}"
    assert files(run) == files(reference), f"{what}: files differ from the uninterrupted run's"


def recover(run: Path, args: list[str]) -> tuple[int, str]:
    """What a user does after a crash: resume the run folder, or rerun the command if it never got that far."""
    if (run / "run_config.json").is_file():
        return cli(["train", "--resume", str(run)])
    return cli(args)


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """The uninterrupted run, and the fault points it passes through, in order."""
    root = tmp_path_factory.mktemp("ref")
    trace = root / "trace.tsv"
    rc, err = cli(run_args(cache, "--out", str(root / "run")), env={TRACE_ENV: str(trace)})
    assert rc == 0, err
    points = [line.split("\t")[0] for line in trace.read_text().splitlines()]
    return root / "run", points


def kill_points(points: list[str], n: int, seed: int = 16) -> list[tuple[str, int]]:
    """n distinct (site, k-th pass) pairs, half of them inside checkpoint writes."""
    seen: dict[str, int] = {}
    passes = []
    for site in points:
        seen[site] = seen.get(site, 0) + 1
        passes.append((site, seen[site]))
    rng = random.Random(seed)
    in_ckpt = [p for p in passes if p[0] != "train.step"]
    steps = [p for p in passes if p[0] == "train.step"]
    return rng.sample(in_ckpt, n // 2) + rng.sample(steps, n - n // 2)


def test_sigkill_at_20_random_points_resumes_bit_identical(cache, reference, tmp_path):
    ref_run, points = reference
    chosen = kill_points(points, 20)
    sites = {s for s, _ in chosen}
    assert {"write", "write.replace", "train.step"} <= sites and sites & {"checkpoint.staged", "checkpoint.placed",
                                                                            "checkpoint.prune"}
    want = outcome(ref_run)
    identical = 0
    for i, (site, k) in enumerate(chosen):
        run = tmp_path / f"kill{i}"
        args = run_args(cache, "--out", str(run))
        assert forked(args, {ENV: f"{site}:{k}:kill"}) == -signal.SIGKILL, f"{site}:{k} was never reached"
        rc, err = recover(run, args)
        assert rc == 0, f"after a kill at {site}:{k}: {err}"
        assert_identical(outcome(run), want, f"kill at {site}:{k}")
        assert_no_orphans(run, ref_run, f"kill at {site}:{k}")
        identical += 1
    print(f"\nkills tried: {len(chosen)}, resumes bit-identical: {identical}")
    assert identical == 20


@pytest.mark.parametrize("action", ["enospc", "eio"])
def test_every_write_failing_gives_one_line_and_resumes_bit_identical(cache, reference, tmp_path, action):
    ref_run, points = reference
    n_writes = points.count("write")
    want = outcome(ref_run)
    reason = "No space left on device" if action == "enospc" else "Input/output error"
    for k in range(1, n_writes + 1):
        run = tmp_path / f"w{k}"
        args = run_args(cache, "--out", str(run))
        rc, err = cli(args, env={ENV: f"write:{k}:{action}"})
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc in (1, 2) and len(lines) == 1, f"write {k}: exit {rc}, stderr {err!r}"
        assert reason in lines[0] and "Traceback" not in err, lines[0]
        if "checkpoint" in lines[0]:  # a failed checkpoint names the good one, or says none was written yet
            assert "last good checkpoint is" in lines[0] or "no checkpoint was written yet" in lines[0], lines[0]
            assert f"--resume {run}" in lines[0], lines[0]
        rc, err = recover(run, args)
        assert rc == 0, f"after {action} on write {k}: {err}"
        assert_identical(outcome(run), want, f"{action} on write {k}")
        assert_no_orphans(run, ref_run, f"{action} on write {k}")
    print(f"\n{action}: write faults tried: {n_writes}, resumes bit-identical: {n_writes}")


def test_relative_out_resumed_from_another_directory_trains_in_that_folder(cache, reference, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    args = run_args(cache, "--out", "rel")
    assert forked(args, {ENV: "train.step:20:kill"}, cwd=tmp_path / "a") == -signal.SIGKILL
    old_cwd = Path.cwd()
    os.chdir(tmp_path / "b")
    try:
        rc, err = cli(["train", "--resume", "../a/rel"])
    finally:
        os.chdir(old_cwd)
    assert rc == 0, err
    assert "resuming from step 16 (2,048 tokens)" in err
    assert list((tmp_path / "b").iterdir()) == [], "resuming wrote into the current directory"
    assert_identical(outcome(tmp_path / "a" / "rel"), outcome(reference[0]), "relative --out resumed elsewhere")


def tree_digest(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_copied_run_resumes_in_the_copy_and_never_writes_the_original(cache, reference, tmp_path):
    original, copy = tmp_path / "original", tmp_path / "copy"
    assert forked(run_args(cache, "--out", str(original)), {ENV: "train.step:11:kill"}) == -signal.SIGKILL
    shutil.copytree(original, copy)
    before = tree_digest(original)
    rc, err = cli(["train", "--resume", str(copy)])
    assert rc == 0, err
    assert tree_digest(original) == before, "resuming the copy changed the original"
    assert not (original / "sae").exists() and (copy / "sae").is_dir()
    assert_identical(outcome(copy), outcome(reference[0]), "copied run resumed")


def test_short_run_is_checkpointed_by_wall_time(cache, reference, tmp_path):
    run = tmp_path / "short"
    # --checkpoint-every 100 is never reached in 32 steps: only the wall-time rule can save this run
    args = run_args(cache, "--out", str(run), "--checkpoint-every", "100", "--checkpoint-minutes", "0.000001")
    assert forked(args, {ENV: "train.step:20:kill"}) == -signal.SIGKILL
    assert checkpoint_dirs(run), "a killed short run had no checkpoint"
    rc, err = cli(["train", "--resume", str(run)])
    assert rc == 0 and "resuming from step" in err, err
    assert_identical({**outcome(run), "step": outcome(reference[0])["step"]}, outcome(reference[0]), "wall-time")
    from sae_widgets.runs import RunConfig

    assert RunConfig(hook=HOOK).checkpoint_minutes == 10.0


def kill_after_two_checkpoints(cache: Path, run: Path) -> None:
    assert forked(run_args(cache, "--out", str(run)), {ENV: "train.step:14:kill"}) == -signal.SIGKILL
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000012", "step_00000008"]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_newest_checkpoint_is_named_and_the_older_one_resumes(cache, reference, tmp_path, damage):
    run = tmp_path / "run"
    kill_after_two_checkpoints(cache, run)
    state = run / "checkpoints" / "step_00000012" / "state.safetensors"
    data = bytearray(state.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-100] ^= 0x10
    state.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint .*step_00000012.*{state.name}"):
        rc, err = cli(["train", "--resume", str(run)])
    assert rc == 0 and "resuming from step 8 " in err, err
    assert_identical(outcome(run), outcome(reference[0]), f"{damage}d newest checkpoint")


@pytest.mark.parametrize("pointer", ["garbled", "deleted step"])
def test_bad_latest_pointer_does_not_stop_a_resume(cache, reference, tmp_path, pointer):
    run = tmp_path / "run"
    kill_after_two_checkpoints(cache, run)
    latest = run / "checkpoints" / "latest.json"
    if pointer == "garbled":
        latest.write_bytes(b'{"dir": "step_\x01\xff')
    else:
        latest.write_text(json.dumps({"dir": "step_00000099", "step": 99, "tokens": 1}))
    rc, err = cli(["train", "--resume", str(run)])
    assert rc == 0 and "resuming from step 12 " in err, err
    assert_identical(outcome(run), outcome(reference[0]), f"{pointer} latest.json")


def test_no_usable_checkpoint_is_one_line_naming_each_file(cache, tmp_path):
    run = tmp_path / "run"
    kill_after_two_checkpoints(cache, run)
    for d in checkpoint_dirs(run):
        (d / "state.json").write_bytes(b"\xff\xfe not json")
    with pytest.warns(UserWarning):
        rc, err = cli(["train", "--resume", str(run)])
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert "no usable checkpoint" in lines[0] and "step_00000012/state.json" in lines[0] and \
        "step_00000008/state.json" in lines[0]


def test_too_little_free_space_is_said_before_the_first_write(cache, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=100_000))
    rc, err = cli(run_args(cache, "--out", str(run)))
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1 and len(lines) == 1, err
    assert "MiB free" in lines[0] and "checkpoints take" in lines[0] and "--buffer-size" in lines[0]
    assert not checkpoint_dirs(run)


@pytest.mark.parametrize("out", ["/proc/sae_widgets_run", "FILE/run"])
def test_unwritable_out_is_one_line_before_anything_runs(cache, tmp_path, out):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = out.replace("FILE", str(blocker))
    rc, err = cli(run_args(cache, "--out", out))
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "cannot be written" in lines[0] and out in lines[0], err


@pytest.mark.parametrize("bad, named", [("--d-sae 0", "d_sae=0"), ("--tokens -5", "tokens=-5"),
                                        ("--arch foo", "invalid choice: 'foo'"), ("--k 0", "k=0"),
                                        ("--batch-size 1024 --buffer-size 512", "buffer_size=512")])
def test_bad_arguments_fail_before_the_model_loads(tmp_path, bad, named):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sae_widgets", "train", "--hook", HOOK, *bad.split(), "--out",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and named in lines[0], proc.stderr
    assert not (tmp_path / "r").exists()
    # the check itself is instant: what remains is interpreter start-up and imports, not a model load
    assert "transformer_lens" not in sys.modules or time.perf_counter() - t0 < 60


def test_unknown_errors_are_one_line_unless_debug(tmp_path, monkeypatch):
    import sae_widgets.cli as cli_module

    def boom(args):
        raise KeyError("kaput")

    monkeypatch.setattr(cli_module, "cmd_info", boom)
    rc, err = cli(["info"])
    assert rc == 1 and err.strip() == "sae-widgets info: error: KeyError: 'kaput' (--debug shows the traceback)"
    with pytest.raises(KeyError):
        cli(["info", "--debug"])


def test_hub_name_without_network_fails_fast_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hub"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sae_widgets", "hooks", "--model", "someorg/some-model"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    took = time.perf_counter() - t0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "'someorg/some-model' is not in the local Hugging Face cache" in lines[0]
    assert "cannot be reached (127.0.0.1:9: Connection refused)" in lines[0] and "local HF-format folder" in lines[0]
    assert took < 20, f"took {took:.1f} s (huggingface_hub's own retries take about 25 s)"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_follow_the_umask(tmp_path, umask, mode):
    from sae_widgets.persistence import save_sae
    from sae_widgets.sae import SAE, SAEConfig

    old = os.umask(umask)
    try:
        folder = save_sae(SAE(SAEConfig(arch="topk", d_in=8, d_sae=16, k=2, hook=HOOK)), tmp_path / "sae")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes == {"sae.safetensors": mode, "sae_config.json": mode}, {k: oct(v) for k, v in modes.items()}


def test_undefined_scores_are_null_in_metrics_json():
    from sae_widgets.runs import finite_or_null

    text = json.dumps(finite_or_null({"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": -float("inf")}}),
                      allow_nan=False)
    assert json.loads(text) == {"a": None, "b": [1.5, None], "c": {"d": None}}


@pytest.mark.parametrize("name", ["state.json", "state.safetensors"])
def test_fuzzed_checkpoint_reads_identically_or_fails_naming_the_file(reference, tmp_path, name):
    """Random truncations and 1-4 byte flips of a checkpoint file: `read_checkpoint` gives the very same state, or a
    ValueError / OSError naming the damaged file; never another exception, never other numbers."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from sae_widgets.train import flatten_state, read_checkpoint

    source = checkpoint_dirs(reference[0])[0]
    want_tensors, want_tree = flatten_state(read_checkpoint(source)[1])
    original = (source / name).read_bytes()
    ckpt = tmp_path / source.name
    shutil.copytree(source, ckpt)
    counts = {"cases": 0, "identical": 0}

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.one_of(st.integers(0, len(original) - 1).map(lambda n: ("truncate", n)),
                     st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(1, 255)), min_size=1,
                              max_size=4).map(lambda flips: ("flip", flips))))
    def damaged_load(damage):
        kind, how = damage
        data = bytearray(original)
        if kind == "truncate":
            data = data[:how]
        else:
            for at, mask in how:
                data[at] ^= mask
        (ckpt / name).write_bytes(bytes(data))
        counts["cases"] += 1
        try:
            _, state = read_checkpoint(ckpt)
        except (ValueError, OSError) as e:
            assert str(ckpt / name) in str(e) or str(ckpt / "state.json") in str(e), str(e)
            return
        tensors, tree = flatten_state(state)
        assert tree == want_tree and tensors.keys() == want_tensors.keys()
        assert all(torch.equal(tensors[k], want_tensors[k]) for k in tensors), f"{damage} loaded other numbers"
        counts["identical"] += 1

    damaged_load()
    print(f"\n{name}: fuzz cases {counts['cases']}, loaded unchanged {counts['identical']}")
    assert counts["cases"] == 300
