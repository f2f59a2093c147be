"""Fault points for crash tests: the practice behind SQLite's crash tests, at our scale.

Code that writes files or changes a run's state calls `fault_point(site)` at the places where a crash or an I/O
error would hurt most. Normally that is one environment lookup. With `SAE_WIDGETS_FAULT=SITE:N:ACTION` the N-th
pass (1-based) through SITE acts: `kill` sends SIGKILL to this process (as a power cut or an OOM kill would),
`enospc` / `eio` raise the OSError a full or failing disk raises. SITE `write` counts every file write of
`sae_widgets.atomic`, so "fail the N-th write" needs no knowledge of the file names. With
`SAE_WIDGETS_FAULT_TRACE=FILE` every pass appends its site and path to FILE, so a test can list the points a run
passes through and pick among them.
"""
from __future__ import annotations

import errno
import os
import signal

ENV, TRACE_ENV = "SAE_WIDGETS_FAULT", "SAE_WIDGETS_FAULT_TRACE"
ACTIONS = ("kill", "enospc", "eio")
_state: dict = {"spec": None, "count": 0}


def parse_fault(spec: str) -> tuple[str, int, str]:
    try:
        site, n, action = spec.rsplit(":", 2)
        n = int(n)
    except ValueError:
        raise ValueError(f"{ENV}={spec!r} is not SITE:N:ACTION (for example write:3:enospc)") from None
    if action not in ACTIONS or n < 1:
        raise ValueError(f"{ENV}={spec!r}: N must be >= 1 and ACTION one of {ACTIONS}")
    return site, n, action


def fault_point(site: str, path: object = "") -> None:
    """Pass through a named point where a crash or an I/O error is possible (see the module docstring)."""
    trace = os.environ.get(TRACE_ENV)
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(f"{site}\t{path}\n")
    spec = os.environ.get(ENV)
    if not spec:
        return
    if spec != _state["spec"]:  # a new spec (a test set another one): count from zero
        _state.update(spec=spec, count=0)
    want_site, n, action = parse_fault(spec)
    if site != want_site:
        return
    _state["count"] += 1
    if _state["count"] != n:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = errno.ENOSPC if action == "enospc" else errno.EIO
    raise OSError(code, f"{os.strerror(code)} (injected by {ENV}={spec})", str(path))
