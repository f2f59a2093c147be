"""The course build: student copies stub every solution cell (and stop there when run), instructor copies keep every
source; outputs are cleared in both; bad sources and outputs are clear errors. On a synthetic notebook and on ours."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from sae_widgets.course import CourseError, build_course, stub_source

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNELS_NB = NOTEBOOKS / "06_triton_kernels.ipynb"  # reaches its first exercise in a few seconds

TASK = "set answer to the sum of the first n integers"
CHECK = "assert answer == n * (n + 1) // 2, answer\nopen(metrics_path, 'w').write('{\"checks_passed\": true}')"


def synthetic_notebook() -> nbformat.NotebookNode:
    """Parameters, a solution cell, a cell that uses its result, a second exercise and a check; with outputs."""
    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nb.cells = [
        new_markdown_cell("# A tiny lesson"),
        new_code_cell("n = 10\nmetrics_path = 'm.json'", metadata={"tags": ["parameters"]}),
        new_code_cell(f"# EXERCISE: {TASK}\nanswer = sum(range(n + 1))", metadata={"tags": ["solution"]}),
        new_code_cell("print(answer)", outputs=[new_output("stream", name="stdout", text="55\n")], execution_count=3),
        new_code_cell("# EXERCISE: say \"it's done\" (quotes included)\ndone = True", metadata={"tags": ["solution"]}),
        new_code_cell(CHECK, metadata={"tags": ["check"]}),
    ]
    return nb


def write(folder: Path, name: str, nb) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / name)
    return folder / name


def code_sources(nb) -> list[tuple[str, str, list]]:
    return [(c.cell_type, c.source, c.get("metadata", {}).get("tags", [])) for c in nb.cells]


def test_student_and_instructor_copies_of_a_synthetic_notebook(tmp_path):
    src = tmp_path / "src"
    original = synthetic_notebook()
    write(src, "01_tiny.ipynb", original)
    counts = build_course(src, tmp_path / "out")
    assert counts == {"notebooks": 1, "solution_cells": 2, "check_cells": 1,
                      "student": str(tmp_path / "out" / "student"), "instructor": str(tmp_path / "out" / "instructor")}
    student = nbformat.read(tmp_path / "out" / "student" / "01_tiny.ipynb", as_version=4)
    instructor = nbformat.read(tmp_path / "out" / "instructor" / "01_tiny.ipynb", as_version=4)
    # instructor: every source and tag as written; student: only the two solution cells differ, and they are stubs
    assert code_sources(instructor) == code_sources(original)
    want = code_sources(original)
    want[2] = ("code", f"# EXERCISE: {TASK}\nraise NotImplementedError('Your turn: {TASK}')", ["solution"])
    want[4] = ("code", "# EXERCISE: say \"it's done\" (quotes included)\n"
               "raise NotImplementedError('Your turn: say \"it\\'s done\" (quotes included)')", ["solution"])
    assert code_sources(student) == want
    for nb in (student, instructor):
        assert all(c.outputs == [] and c.execution_count is None for c in nb.cells if c.cell_type == "code")
        nbformat.validate(nb)


def test_student_copy_stops_at_the_first_exercise_and_instructor_copy_passes(tmp_path):
    src = tmp_path / "src"
    write(src, "01_tiny.ipynb", synthetic_notebook())
    build_course(src, tmp_path / "out")
    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(str(tmp_path / "out" / "student" / "01_tiny.ipynb"), str(tmp_path / "s.ipynb"),
                                   kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    assert err.value.ename == "NotImplementedError" and f"Your turn: {TASK}" in str(err.value)
    assert not (tmp_path / "m.json").exists(), "the student copy must not reach the check"
    executed = nbformat.read(tmp_path / "s.ipynb", as_version=4)
    after = [c for c in executed.cells if c.cell_type == "code" and c.source == "print(answer)"]
    assert len(after) == 1 and after[0].execution_count is None, "nothing after the first exercise ran"
    papermill.execute_notebook(str(tmp_path / "out" / "instructor" / "01_tiny.ipynb"), str(tmp_path / "i.ipynb"),
                               kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    assert json.loads((tmp_path / "m.json").read_text()) == {"checks_passed": True}


def test_stub_is_the_exercise_line_and_an_error_naming_the_task():
    stub = stub_source(TASK)
    assert stub.splitlines()[0] == f"# EXERCISE: {TASK}"
    with pytest.raises(NotImplementedError, match=f"^Your turn: {TASK}$"):
        exec(compile(stub, "<stub>", "exec"), {})


def test_bad_sources_and_outputs_are_clear_errors(tmp_path):
    nb = synthetic_notebook()
    nb.cells[4].source = "done = True  # the task line is missing"
    write(tmp_path / "bad", "03_bad.ipynb", nb)
    with pytest.raises(CourseError, match=r"03_bad\.ipynb: cell 4 is tagged 'solution' but its first line is "
                                          r"'done = True  # the task line is missing'.*# EXERCISE:"):
        build_course(tmp_path / "bad", tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing is written when a notebook is bad"
    nb.cells[4].source = "# EXERCISE:   \ndone = True"  # an empty task is no task
    write(tmp_path / "bad", "03_bad.ipynb", nb)
    with pytest.raises(CourseError, match=r"cell 4 is tagged 'solution'"):
        build_course(tmp_path / "bad", tmp_path / "out")
    with pytest.raises(CourseError, match=r"source folder '.*missing' does not exist"):
        build_course(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CourseError, match=r"holds no \.ipynb notebooks"):
        build_course(tmp_path / "empty", tmp_path / "out")
    write(tmp_path / "good", "01_tiny.ipynb", synthetic_notebook())
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CourseError, match=r"output '.*a_file' is a file"):
        build_course(tmp_path / "good", tmp_path / "a_file")
    with pytest.raises(CourseError, match=r"source '.*a_file' is a file, not a folder"):
        build_course(tmp_path / "a_file", tmp_path / "out")


def test_rebuild_replaces_the_folders(tmp_path):
    write(tmp_path / "src", "01_tiny.ipynb", synthetic_notebook())
    write(tmp_path / "src", "02_other.ipynb", synthetic_notebook())
    build_course(tmp_path / "src", tmp_path / "out")
    (tmp_path / "src" / "02_other.ipynb").unlink()
    assert build_course(tmp_path / "src", tmp_path / "out")["notebooks"] == 1
    for side in ("student", "instructor"):
        assert sorted(p.name for p in (tmp_path / "out" / side).iterdir()) == ["01_tiny.ipynb"]


def test_cli_course_build(tmp_path):
    write(tmp_path / "src", "01_tiny.ipynb", synthetic_notebook())
    cli = [sys.executable, "-m", "sae_widgets", "course", "build"]
    r = subprocess.run(cli + ["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1 notebooks, 2 exercises, 1 check cells" in r.stdout and f"student: {tmp_path / 'out' / 'student'}" in r.stdout
    r = subprocess.run(cli + ["--src", str(tmp_path / "nope"), "--out", str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "sae-widgets course: error: source folder" in r.stderr and "nope" in r.stderr
    # default source: the notebooks shipped in the package, every one of them
    r = subprocess.run(cli + ["--out", str(tmp_path / "pkg")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    shipped = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert sorted(p.name for p in (tmp_path / "pkg" / "student").iterdir()) == shipped


def test_real_notebook_student_copy_stops_at_its_exercise(tmp_path):
    """A notebook of ours: the student copy differs only in its solution cells and stops at the first one when run. The
    instructor copy is the source cell for cell; tests/test_notebooks.py runs that source to the end and checks its
    metrics, so it is not executed a second time here."""
    original = nbformat.read(KERNELS_NB, as_version=4)
    build_course(NOTEBOOKS, tmp_path / "out")
    student = nbformat.read(tmp_path / "out" / "student" / KERNELS_NB.name, as_version=4)
    instructor = nbformat.read(tmp_path / "out" / "instructor" / KERNELS_NB.name, as_version=4)
    assert code_sources(instructor) == code_sources(original)
    solutions = [i for i, c in enumerate(original.cells) if "solution" in c.metadata.get("tags", [])]
    assert solutions, "the notebook has an exercise"
    tasks = {}
    for i, (a, b) in enumerate(zip(original.cells, student.cells)):
        if i in solutions:
            task = a.source.splitlines()[0].removeprefix("# EXERCISE:").strip()
            tasks[i] = task
            assert b.source == f"# EXERCISE: {task}\nraise NotImplementedError({'Your turn: ' + task!r})"
        else:
            assert (a.cell_type, a.source, a.metadata.get("tags", [])) == (b.cell_type, b.source,
                                                                          b.metadata.get("tags", []))
    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(str(tmp_path / "out" / "student" / KERNELS_NB.name), str(tmp_path / "s.ipynb"),
                                   kernel_name="python3",
                                   cwd=str(tmp_path), progress_bar=False)
    assert err.value.ename == "NotImplementedError"
    assert f"Your turn: {tasks[solutions[0]]}" in str(err.value)
    assert not list(tmp_path.glob("*metrics*.json")), "the student copy must not reach the check cell"
