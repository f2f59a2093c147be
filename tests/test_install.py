"""Packaging: the wheel ships kernels/, js/, notebooks and the embedded assets under sae_widgets; no CUDA on CPU set-ups."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_the_mapped_folders_and_assets(tmp_path):
    r = subprocess.run([sys.executable, "-m", "uv", "build", "--wheel", "--out-dir", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("sae_widgets-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for must in ["sae_widgets/kernels/autograd.py", "sae_widgets/kernels/runtime.py", "sae_widgets/kernels/topk_merge.py", "sae_widgets/js/README.md",
                 "sae_widgets/js/common.js", "sae_widgets/js/feature_dashboard.js", "sae_widgets/js/widgets.css",
                 "sae_widgets/widgets/__init__.py", "sae_widgets/notebooks/00_quickstart.ipynb",
                 "sae_widgets/assets/models/sotu-moby-4l/model.safetensors",
                 "sae_widgets/assets/models/sotu-moby-4l/tokenizer.json",
                 "sae_widgets/assets/corpus/corpus.jsonl.xz", "sae_widgets/assets/corpus/LICENSE.md"]:
        assert must in names, f"{must} missing from the wheel"
    assert not any(n.startswith(("kernels/", "js/", "notebooks/", "tests/")) for n in names), "generic top-level names"
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "sae-widgets = sae_widgets.cli:main" in zipfile.ZipFile(wheel).read(entry[0]).decode()


def test_cpu_torch_pulls_no_cuda_packages():
    if torch.version.cuda is not None:  # a CUDA build legitimately brings the nvidia-* wheels
        return
    cuda = sorted(d.metadata["Name"] for d in metadata.distributions()
                  if d.metadata["Name"].lower().startswith(("nvidia-", "cuda-")))
    assert cuda == [], f"CUDA packages installed next to a CPU torch: {cuda}"
    assert torch.__version__.endswith("+cpu")
