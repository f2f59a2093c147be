"""Every course notebook (`notebooks/NN_*.ipynb`, found when the tests are collected) follows the conventions of
notebooks/README.md, runs with its default parameters, passes its own check cell, and exports to HTML.

The conventions test covers all of them, the quickstart (00) included. The quickstart is executed by
tests/test_quickstart.py, through the CLI that students use, which also checks its metrics JSON and HTML export;
it is left out of the execution here so CI does not run it twice."""
from __future__ import annotations

import ast
import html
import json
import re
from pathlib import Path

import nbformat
import papermill
import pytest

from sae_widgets.course import EXERCISE_PREFIX

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ALL = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
RUN_BY_TEST_QUICKSTART = {"00_quickstart.ipynb"}
RUN_HERE = [p for p in ALL if p.name not in RUN_BY_TEST_QUICKSTART]
REQUIRED_PARAMETERS = ("model_name", "hook", "d_sae", "k", "n_tokens", "device", "seed", "metrics_path")


def tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def parameter_names(cell) -> set[str]:
    return {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}


def check_cell(nb):
    return [c for c in nb.cells if c.cell_type == "code"][-1]


def test_the_course_is_there():
    assert [p.name[:2] for p in ALL] == [f"{i:02d}" for i in range(8)], [p.name for p in ALL]
    assert ALL[0].name == "00_quickstart.ipynb" and ALL[0].name in RUN_BY_TEST_QUICKSTART
    assert [p.name[:2] for p in RUN_HERE] == [f"{i:02d}" for i in range(1, 8)], [p.name for p in RUN_HERE]
    assert (Path(__file__).parent / "test_quickstart.py").is_file(), "00 is executed by tests/test_quickstart.py"


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_notebook_follows_the_conventions(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", nb.metadata.get("kernelspec")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and "parameters" in tags(code[0]), f"{path.name}: the first code cell must be tagged 'parameters'"
    missing = [n for n in REQUIRED_PARAMETERS if n not in parameter_names(code[0])]
    assert not missing, f"{path.name}: the parameters cell lacks {missing}"
    assert sum("parameters" in tags(c) for c in code) == 1, f"{path.name}: one parameters cell"
    assert "check" in tags(code[-1]), f"{path.name}: the last code cell must be tagged 'check'"
    assert "metrics_path" in code[-1].source and "checks_passed" in code[-1].source, path.name
    solutions = [c for c in code if "solution" in tags(c)]
    assert 1 <= len(solutions) <= 3, f"{path.name}: {len(solutions)} solution cells (1 to 3 exercises)"
    for c in solutions:
        first = c.source.splitlines()[0]
        assert first.startswith(EXERCISE_PREFIX) and first[len(EXERCISE_PREFIX):].strip(), (path.name, first)
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name}: outputs must be cleared"
    assert any(c.cell_type == "markdown" for c in nb.cells), f"{path.name}: markdown cells teach"


def first_heading(nb) -> str:
    for c in nb.cells:
        if c.cell_type == "markdown":
            m = re.search(r"^#+\s+(.+)$", c.source, re.M)
            if m:
                return m.group(1).strip()
    raise AssertionError("no markdown heading")


def stream_lines(cell) -> list[str]:
    return [line for o in cell.outputs if o.output_type == "stream" for line in o.text.splitlines() if line.strip()]


@pytest.mark.parametrize("path", RUN_HERE, ids=lambda p: p.stem)
def test_notebook_runs_with_default_parameters_and_passes_its_checks(path, tmp_path):
    from nbconvert import HTMLExporter

    metrics = tmp_path / f"metrics_{path.stem}.json"
    executed = tmp_path / path.name
    try:
        papermill.execute_notebook(str(path), str(executed), parameters={"metrics_path": str(metrics)},
                                   kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    except papermill.PapermillExecutionError as e:  # the failing cell's traceback, not papermill's
        pytest.fail(f"{path.name} failed in cell {e.exec_count}: {e.ename}: {e.evalue}\n{e}", pytrace=False)
    assert metrics.is_file(), f"{path.name}: the check cell wrote no {metrics.name}"
    result = json.loads(metrics.read_text())
    assert result.get("checks_passed") is True, result
    nb = nbformat.read(executed, as_version=4)
    body, _ = HTMLExporter().from_notebook_node(nb)
    text = html.unescape(re.sub(r"<[^>]+>", "", body))  # the page's text, as a reader sees it
    assert re.sub(r"[*_`]", "", first_heading(nb)) in text
    for line in stream_lines(check_cell(nb))[:5]:  # what the check cell printed is in the export
        assert line.strip() in text, line
