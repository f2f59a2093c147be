"""scripts/fetch_smollm2.py as a module (scripts/ is not a package), for the tests that call it."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fetch_smollm2.py"


def fetch_script():
    """The fetch script's module, loaded once per process."""
    name = "fetch_smollm2"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
