"""The repository never shadows an installed distribution, whatever folder of it is first on sys.path.

`python -c`, `python -m` and pytest put the working directory (or the test folder) first on sys.path. A regular
package or a module there wins over site-packages, so a top-level `kernels/__init__.py` once replaced the PyPI
package `kernels` that transformers imports. The kernels, js and notebooks folders hold no `__init__.py` for that
reason (kernels/README.md): a folder without one is at most a namespace portion, which loses to any regular package.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folders that end up first on sys.path: the root (python -c / -m), tests/ (pytest), benchmarks/ and scripts/
# (their scripts run directly).
PATH_FOLDERS = ("", "tests", "benchmarks", "scripts")
OWN = {"sae_widgets"}


def root_env() -> dict[str, str]:
    """The environment without the settings that would hide the clash (safe path, an extra path first)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}


def importable_names(folder: Path) -> set[str]:
    """Top-level names that `folder` offers when it is on sys.path: modules, regular packages, namespace portions."""
    names = set()
    for p in folder.iterdir():
        if p.name.startswith(".") or not p.name.replace("-", "_").split(".")[0].isidentifier():
            continue
        if p.is_dir():
            if "-" not in p.name and "." not in p.name:
                names.add(p.name)
        elif p.suffix in (".py", ".pyc", ".so", ".pyd"):
            names.add(p.name.split(".")[0])
    return names


def in_repository(path: str) -> bool:
    """A path in the checkout's own files (a virtual environment inside the checkout does not count)."""
    p = Path(path).resolve()
    return p.is_relative_to(ROOT) and not p.is_relative_to(Path(sys.prefix).resolve())


def installed_top_level() -> set[str]:
    """Top-level import names of every installed distribution but this project, and the standard library's."""
    dists = metadata.packages_distributions()
    names = {name for name, owners in dists.items() if not {o.lower().replace("-", "_") for o in owners} <= OWN}
    return names | set(sys.stdlib_module_names)


def test_pypi_kernels_is_installed_so_the_clash_test_means_something():
    files = [str(f) for f in metadata.distribution("kernels").files]
    assert "kernels/__init__.py" in files, files[:10]


def test_root_first_on_sys_path_loads_the_real_kernels_package_and_the_model():
    code = (
        "import os, sys\n"
        "assert os.path.realpath(sys.path[0] or os.getcwd()) == os.getcwd(), sys.path[:2]\n"
        "import transformers.integrations.hub_kernels\n"
        "import kernels\n"
        "assert getattr(kernels, '__file__', None) and 'site-packages' in kernels.__file__, kernels\n"
        "import sae_widgets as sw\n"
        "m = sw.load_model(device='cpu')\n"
        "from sae_widgets.kernels.autograd import SparseDecode\n"
        "print(type(m).__name__, m.cfg.n_layers)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=root_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-2:] == ["TransformerBridge", "4"], r.stdout
    r = subprocess.run([sys.executable, "-m", "sae_widgets", "--help"], cwd=ROOT, env=root_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "quickstart" in r.stdout, r.stderr[-3000:]


def test_nothing_the_repository_puts_on_sys_path_shadows_an_installed_module():
    installed = installed_top_level()
    assert {"kernels", "transformers", "json"} <= installed  # the oracle sees what it must
    for rel in PATH_FOLDERS:
        folder = ROOT / rel
        clashes = sorted(importable_names(folder) & installed)
        # Each clashing name must still resolve outside the repository with `folder` first on sys.path.
        code = ("import importlib.util, json, sys\n"
                f"sys.path.insert(0, {str(folder)!r})\n"
                "out = {}\n"
                f"for n in {clashes!r}:\n"
                "    s = importlib.util.find_spec(n)\n"
                "    out[n] = [s.origin] if s.origin else list(s.submodule_search_locations or [])\n"
                "print(json.dumps(out))\n")
        r = subprocess.run([sys.executable, "-I", "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        where = json.loads(r.stdout)
        shadowed = {n: w for n, w in where.items() if any(in_repository(p) for p in w)}
        assert not shadowed, f"{folder} shadows installed modules: {shadowed}"
