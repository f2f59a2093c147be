"""The README as a newcomer uses it: its Python blocks run as pasted, and its command lines name real options.

The ```python blocks run in order in one namespace, in a subprocess whose working directory is a temporary folder
(the blocks write runs/, caches and SAE folders), on the embedded model on CPU. A failure names the block's index,
its line in README.md and its first line. The ```bash blocks are not run: each `sae-widgets ...` command in them
(and in inline code) is parsed by the real argument parser, so a renamed subcommand or flag fails here.
"""
import json
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)


def fenced_blocks(text: str, lang: str) -> list[tuple[int, str]]:
    """(line number in the file, code) of every fenced block of `lang`, in order."""
    return [(text.count("\n", 0, m.start()) + 2, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == lang]


# Runs the blocks; prints one line naming the failing block, then its traceback, and exits 1.
DRIVER = r'''
import json, sys, time, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for i, (line, code) in enumerate(blocks):
    first, t0 = code.strip().splitlines()[0], time.perf_counter()
    try:
        exec(compile(code, f"README.md block {i} (line {line})", "exec"), namespace)
    except BaseException:
        print(f"README python block {i} (README.md line {line}: {first!r}) failed:", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
    print(f"[block {i} ok] {time.perf_counter() - t0:.1f} s", flush=True)
'''


def test_fenced_blocks_finds_code_and_its_line():
    text = "intro\n```python\nx = 1\ny = 2\n```\n\n```bash\nls\n```\n```python\nprint(x)\n```\n"
    assert fenced_blocks(text, "python") == [(3, "x = 1\ny = 2\n"), (11, "print(x)\n")]
    assert fenced_blocks(text, "bash") == [(8, "ls\n")]


def test_python_blocks_run_in_order(tmp_path):
    blocks = fenced_blocks(README.read_text(encoding="utf-8"), "python")
    assert len(blocks) >= 4 and blocks[0][1].startswith("import sae_widgets as sw"), blocks[:1]
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "driver.py").write_text(DRIVER)
    r = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "blocks.json")], cwd=work,
                       capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stderr[-6000:]
    assert r.stdout.count(" ok] ") == len(blocks), r.stdout[-3000:]


def readme_commands(text: str) -> list[str]:
    """Every `sae-widgets ...` / `-m sae_widgets ...` / `scripts/run.sh quickstart ...` command of the bash blocks and
    of inline code, from the subcommand on (comments and continuation lines handled; run.sh's --latest dropped)."""
    lines = []
    for _, code in fenced_blocks(text, "bash"):
        lines += code.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`([^`\n]*(?:sae-widgets|run\.sh quickstart) [^`\n]+)`", text)
    found = []
    for line in lines:
        words = shlex.split(line, comments=True)
        for i, w in enumerate(words):
            if w == "sae-widgets" or w.endswith("/sae-widgets") or (w == "sae_widgets" and words[i - 1] == "-m"):
                found.append(shlex.join(words[i + 1:]))
                break
            if w.endswith("scripts/run.sh") and words[i + 1:i + 2] == ["quickstart"]:  # run.sh passes these on
                found.append(shlex.join(a for a in words[i + 1:] if a != "--latest"))
                break
    return found


def parse_error(argv: list[str]) -> str | None:
    """None if the CLI's parser accepts `argv`, else its message. JupyterLab's --Option=value arguments, which
    quickstart passes on, are accepted there; nothing is run."""
    from sae_widgets.cli import UsageError, build_parser, notebook_parameters, packaged_notebook, parse_parameters

    err = StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(StringIO()):
            args, extra = build_parser().parse_known_args(argv)
    except SystemExit as e:
        return None if e.code == 0 else err.getvalue().strip()
    passed_on = [a for a in extra if args.command == "quickstart" and re.fullmatch(r"--\w+\.\w+=.*", a)]
    unknown = [a for a in extra if a not in passed_on]
    if unknown:
        return f"unrecognized arguments: {unknown}"
    if args.command == "quickstart" and args.parameter:  # -p NAME VALUE: a parameter of the notebook, of its type
        try:
            parse_parameters(args.parameter, notebook_parameters(packaged_notebook()))
        except UsageError as e:
            return str(e)
    return None


def test_readme_commands_finds_commands():
    text = ("```bash\nsae-widgets train --hook h \\\n  --k 4   # note\ntorchrun --nproc-per-node 2 -m sae_widgets eval "
            "runs/x\nbash scripts/run.sh quickstart --latest --headless\nbash scripts/run.sh test -k x\n```\n"
            "then `.venv/bin/sae-widgets --help`.")
    assert readme_commands(text) == ["train --hook h --k 4", "eval runs/x", "quickstart --headless", "--help"]
    assert parse_error(["train", "--hook", "h", "--k", "4"]) is None
    assert "unrecognized arguments" in parse_error(["train", "--hook", "h", "--no-such-flag", "4"])
    assert "invalid choice" in parse_error(["trian", "--hook", "h"])
    assert parse_error(["quickstart", "--ServerApp.token=t"]) is None
    assert "unrecognized" in parse_error(["eval", "runs/x", "--ServerApp.token=t"])
    assert "no parameter 'nbatches'" in parse_error(["quickstart", "--headless", "-p", "nbatches", "2"])


def test_readme_commands_parse():
    commands = readme_commands(README.read_text(encoding="utf-8"))
    subcommands = {c.split()[0] for c in commands if c}
    assert {"train", "eval", "quickstart"} <= subcommands, commands  # the scan really finds the README's commands
    errors = {c: parse_error(shlex.split(c)) for c in commands}
    assert not {c: e for c, e in errors.items() if e}, errors
