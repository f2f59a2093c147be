import os
import shutil

# Triton runs as its interpreter on machines without a GPU (CI, laptops); a GPU machine compiles for real.
if not (os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi")):
    os.environ["TRITON_INTERPRET"] = "1"  # no GPU here: triton kernels run in the interpreter
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download; subprocesses inherit this too

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def model():
    """The embedded default model on CPU, loaded once per test session."""
    from sae_widgets.models import load_model

    return load_model(device="cpu")


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless, driven by playwright: one per browser-test module."""
    from browser_harness import CHROMIUM_ARGS, chromium_path
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()
