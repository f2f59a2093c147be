"""Every public name the README, the docs and the notebooks use exists.

The scan collects `sw.<name>` (for whatever alias `import sae_widgets as <alias>` sets; `sw` always), `from
sae_widgets import A, B` and `from sae_widgets.<module> import A` from README.md, docs/*.md, notebooks/*.md and
the code and markdown cells of notebooks/*.ipynb, prose and inline code included. Top-level names must be public
names of the package (`__all__`, lazily loaded), not submodules that happen to be imported already.
"""
import importlib
import json
import re
from pathlib import Path

import sae_widgets

ROOT = Path(__file__).resolve().parents[1]
IDENT = r"[A-Za-z_]\w*"
ALIAS = re.compile(rf"\bimport\s+sae_widgets\s+as\s+({IDENT})")
FROM_IMPORT = re.compile(rf"\bfrom\s+sae_widgets((?:\.{IDENT})*)\s+import\s+(\([^)]*\)|[^\n#]+)")


def documents() -> dict[str, str]:
    """Path -> text of every place a newcomer reads code from; a notebook is the text of all its cells."""
    out = {}
    for path in [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md")), *sorted(ROOT.glob("notebooks/*.md"))]:
        out[str(path.relative_to(ROOT))] = path.read_text(encoding="utf-8")
    for path in sorted(ROOT.glob("notebooks/*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        out[str(path.relative_to(ROOT))] = "\n".join("".join(c["source"]) for c in cells
                                                     if c["cell_type"] in ("code", "markdown"))
    return out


def used_names(text: str) -> set[tuple[str, str]]:
    """(module, name) pairs that `text` uses: ("", X) for the package's top level, (".widgets", X) for a submodule."""
    found = set()
    for alias in {"sw", *ALIAS.findall(text)}:
        found |= {("", n) for n in re.findall(rf"(?<![\w.]){re.escape(alias)}\.({IDENT})", text)}
    for module, names in FROM_IMPORT.findall(text):
        for item in names.strip("()").split(","):
            name = item.split(" as ")[0].strip()
            if re.fullmatch(IDENT, name):
                found.add((module, name))
    return found


def resolves_as_from_import(module: str, name: str) -> bool:
    """What `from module import name` accepts: an attribute of the module, or a submodule of that name."""
    if hasattr(importlib.import_module(module), name):
        return True
    try:
        importlib.import_module(f"{module}.{name}")
        return True
    except ModuleNotFoundError:
        return False


def test_used_names_reads_aliases_and_imports():
    text = ("import sae_widgets as s2\nx = s2.load_model()  # and sw.steer(...)\n`sw.SteeringPanel(model)` in prose\n"
            "from sae_widgets import (SAE,\n    SAEConfig as Cfg)\nfrom sae_widgets.widgets import TrainingMonitor\n"
            "not_sw.nothing, self.sw.nor_this, from sae_widgets_x import no\n")
    assert used_names(text) == {("", "load_model"), ("", "steer"), ("", "SteeringPanel"), ("", "SAE"),
                                ("", "SAEConfig"), (".widgets", "TrainingMonitor")}


def test_scan_finds_the_documented_names():
    found = set().union(*map(used_names, documents().values()))
    top = {n for m, n in found if m == ""}
    # the names issue 15 found missing, plus a few that always worked: the scan really reads every source
    assert {"SteeringPanel", "TrainingMonitor", "export_saelens", "load_saelens", "load_model", "ActivationStore",
            "steer", "FeatureStats"} <= top, sorted(top)
    assert (".widgets", "TrainingMonitor") in found and len(documents()) >= 10


def test_every_documented_name_resolves():
    missing = {}
    for where, text in documents().items():
        for module, name in sorted(used_names(text)):
            if module == "":
                ok = name in sae_widgets.__all__ and hasattr(sae_widgets, name)
            else:
                ok = resolves_as_from_import("sae_widgets" + module, name)
            if not ok:
                missing.setdefault(f"sae_widgets{module}.{name}", []).append(where)
    assert not missing, f"names used in the docs that `import sae_widgets as sw` does not provide: {missing}"


def test_dir_lists_the_lazy_names():
    """Tab completion (`sw.<TAB>`) reads dir(): it must offer the public names that load lazily."""
    assert set(sae_widgets.__all__) <= set(dir(sae_widgets))
