"""The course build: a student and an instructor copy of every notebook, from one annotated source.

A notebook's exercises are code cells tagged `solution` whose first line is `# EXERCISE: <task>`. The student
copy replaces each such cell by that line and `raise NotImplementedError("Your turn: <task>")`, so it runs up to
the first exercise and stops there with the task in the error. The instructor copy keeps every cell as written.
Both have their outputs cleared, so neither leaks a result that the student should compute.

    build_course("notebooks", "course")   # -> course/student/*.ipynb, course/instructor/*.ipynb
"""
from __future__ import annotations

import tempfile
from importlib import resources
from pathlib import Path

SOLUTION_TAG = "solution"
CHECK_TAG = "check"
EXERCISE_PREFIX = "# EXERCISE:"


class CourseError(ValueError):
    """A course source that cannot be built (bad folder, or a solution cell without its task line)."""


def packaged_notebooks() -> Path:
    """The notebooks shipped in the package (`notebooks/` is installed as `sae_widgets/notebooks`)."""
    return Path(str(resources.files("sae_widgets") / "notebooks"))


def exercise_task(cell, where: str) -> str:
    """The task written on a solution cell's first line (`# EXERCISE: <task>`); `where` names the cell in errors."""
    first = cell.source.split("\n", 1)[0].strip()
    task = first[len(EXERCISE_PREFIX):].strip() if first.startswith(EXERCISE_PREFIX) else ""
    if not task:
        raise CourseError(f"{where} is tagged {SOLUTION_TAG!r} but its first line is {first!r}; a solution cell must "
                          f"start with '{EXERCISE_PREFIX} <one-line task for the student>'")
    return task


def stub_source(task: str) -> str:
    """What a student sees in place of a solution: the task, and an error that names it when the cell runs."""
    return f"{EXERCISE_PREFIX} {task}\nraise NotImplementedError({'Your turn: ' + task!r})"


def is_solution(cell) -> bool:
    return cell.cell_type == "code" and SOLUTION_TAG in cell.get("metadata", {}).get("tags", [])


def clear_outputs(nb) -> None:
    """Drop outputs, execution counts and run records (papermill timings, saved widget state) in place."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.get("metadata", {}).pop("execution", None)
        cell.get("metadata", {}).pop("papermill", None)
    nb.metadata.pop("widgets", None)
    nb.metadata.pop("papermill", None)


def student_version(nb, name: str):
    """A copy of `nb` with each solution cell replaced by its stub and the outputs cleared."""
    import copy

    out = copy.deepcopy(nb)
    for index, cell in enumerate(out.cells):
        if is_solution(cell):
            cell.source = stub_source(exercise_task(cell, f"{name}: cell {index}"))
    clear_outputs(out)
    return out


def instructor_version(nb):
    """A copy of `nb` with the outputs cleared and every source kept."""
    import copy

    out = copy.deepcopy(nb)
    clear_outputs(out)
    return out


def _write_folder(target: Path, notebooks: dict[str, object]) -> None:
    """Write `notebooks` (name -> node) into a staging folder, then swap it in for `target` in one rename."""
    import nbformat

    from .atomic import replace_dir_atomic

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    for name, nb in notebooks.items():
        (staging / name).write_text(nbformat.writes(nb), encoding="utf-8")
    replace_dir_atomic(staging, target)


def build_course(src: str | Path | None, out: str | Path) -> dict:
    """Write `out/student/` and `out/instructor/` from every `*.ipynb` in `src` (None: the packaged notebooks).

    Every notebook is read and checked before anything is written, so a bad source leaves `out` as it was. The two
    folders are replaced as a whole (a notebook removed from `src` disappears from them). Returns the counts.
    """
    import nbformat

    src = packaged_notebooks() if src is None else Path(src).expanduser()
    out = Path(out).expanduser()
    if not src.exists():
        raise CourseError(f"source folder {str(src)!r} does not exist")
    if not src.is_dir():
        raise CourseError(f"source {str(src)!r} is a file, not a folder of notebooks")
    if out.exists() and not out.is_dir():
        raise CourseError(f"output {str(out)!r} is a file; --out must be a folder (it gets student/ and instructor/)")
    paths = sorted(src.glob("*.ipynb"))
    if not paths:
        raise CourseError(f"source folder {str(src)!r} holds no .ipynb notebooks")
    student, instructor, n_solutions, n_checks = {}, {}, 0, 0
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        student[path.name] = student_version(nb, path.name)
        instructor[path.name] = instructor_version(nb)
        n_solutions += sum(is_solution(c) for c in nb.cells)
        n_checks += sum(c.cell_type == "code" and CHECK_TAG in c.get("metadata", {}).get("tags", []) for c in nb.cells)
    out.mkdir(parents=True, exist_ok=True)
    _write_folder(out / "student", student)
    _write_folder(out / "instructor", instructor)
    return {"notebooks": len(paths), "solution_cells": n_solutions, "check_cells": n_checks,
            "student": str(out / "student"), "instructor": str(out / "instructor")}
