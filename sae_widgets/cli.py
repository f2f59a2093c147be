"""The `sae-widgets` command line (also `python -m sae_widgets`).

One small module: each subcommand is an `add_parser` block in `build_parser` plus a `cmd_*` function.
Heavy imports (torch, papermill, the model) happen inside the commands, so `--help` stays instant.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata, resources
from pathlib import Path

QUICKSTART = "00_quickstart.ipynb"


class UsageError(Exception):
    """A mistake in what the user typed: reported in one line, exit status 2."""


class RunFailure(Exception):
    """A command that started well failed on the way (a full disk, a damaged file): one line, exit status 1."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors in one line (the usage itself is one `--help` away), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(e: BaseException) -> str:
    """An exception as one line: an OSError's reason and file, or the first line of the message."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def packaged_notebook(name: str = QUICKSTART) -> Path:
    """The pristine copy shipped in the package (`notebooks/` is installed as `sae_widgets/notebooks`)."""
    return Path(str(resources.files("sae_widgets") / "notebooks" / name))


def notebook_parameters(path: Path) -> dict:
    """Defaults of the cell tagged `parameters` (literal assignments only), so `-p` can be checked before running."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            tree = ast.parse("".join(cell["source"]))
            return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
                    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    return {}


def parse_parameters(pairs: list[list[str]] | None, defaults: dict) -> dict:
    """`-p NAME VALUE` pairs as Python values: VALUE is a Python literal, or else a plain string.

    The value must have the type of the notebook's default (None accepts anything), so a typo fails here
    in one line rather than minutes later inside the kernel.
    """
    params = {}
    for name, raw in pairs or []:
        if name not in defaults:
            raise UsageError(f"-p {name} {raw}: the notebook has no parameter {name!r}; "
                             f"its parameters are {', '.join(defaults) or '(none)'}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        default = defaults[name]
        ok = (default is None or type(value) is type(default)
              or (type(default) is float and type(value) is int))
        if not ok:
            raise UsageError(f"-p {name} {raw}: value {raw!r} is not of type {type(default).__name__} "
                             f"(the notebook's default is {default!r})")
        params[name] = value
    return params


def working_copy(folder: Path, name: str = QUICKSTART) -> Path:
    """Copy the packaged notebook into `folder` unless a copy is already there (it may hold the user's edits)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    if not target.exists():
        shutil.copyfile(packaged_notebook(name), target)
    return target


def cmd_quickstart(args: argparse.Namespace, extra: list[str]) -> int:
    out = Path(args.out).expanduser().resolve()
    params = parse_parameters(args.parameter, notebook_parameters(packaged_notebook()))
    if args.headless:
        if extra:
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
        return run_headless(out, params)
    if params:
        raise UsageError("-p applies to --headless runs; in JupyterLab, edit the notebook's parameters cell")
    notebook = working_copy(out)
    cmd = [sys.executable, "-m", "jupyterlab", str(notebook), f"--ServerApp.root_dir={out}"]
    if args.port is not None:  # a fixed port fails loudly instead of silently moving to another one
        cmd += [f"--ServerApp.port={args.port}", "--ServerApp.port_retries=0"]
    if args.ip is not None:
        cmd.append(f"--ServerApp.ip={args.ip}")
    if args.no_browser:
        cmd.append("--ServerApp.open_browser=False")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    cmd += extra
    print(f"[sae-widgets] opening {notebook} in JupyterLab", flush=True)
    if os.name == "posix":  # become JupyterLab, so signals (Ctrl-C, terminate) reach the server itself
        os.execv(sys.executable, cmd)
    return subprocess.call(cmd)


def run_headless(out: Path, params: dict) -> int:
    """Execute the quickstart with papermill in `out`, export HTML, print the paths and the metrics."""
    import papermill

    from .notebook_export import export_html

    out.mkdir(parents=True, exist_ok=True)
    executed, html = out / QUICKSTART, out / QUICKSTART.replace(".ipynb", ".html")
    metrics = out / params.get("metrics_path", notebook_parameters(packaged_notebook())["metrics_path"])
    metrics.unlink(missing_ok=True)  # a stale file from an earlier run must not pass for this run's result
    failure = None
    try:
        papermill.execute_notebook(str(packaged_notebook()), str(executed), parameters=params,
                                   kernel_name="python3", cwd=str(out), progress_bar=True)
    except papermill.PapermillExecutionError as e:
        failure = e
    export_html(executed, html)
    print(f"executed notebook: {executed}\nhtml: {html}")
    if failure is not None:
        print(f"[sae-widgets] the notebook failed in cell {failure.exec_count}: {failure.ename}: {failure.evalue}",
              file=sys.stderr)
        return 1
    print(f"metrics: {metrics}\n{metrics.read_text(encoding='utf-8').strip()}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """An executed notebook as one HTML file that opens with no network (widgets as their static copies)."""
    from .notebook_export import export_html

    try:
        html = export_html(Path(args.notebook), args.out)
    except (FileNotFoundError, ValueError) as e:  # a wrong path or not a notebook: the user's to fix
        raise UsageError(str(e)) from None
    print(f"html: {html}")
    return 0


def cmd_hooks(args: argparse.Namespace) -> int:
    from .models import load_model

    try:
        model = load_model(args.model, device="cpu")
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e
    names = list(model.hook_dict)
    print(f"model {model.sae_widgets_name}: n_layers={model.cfg.n_layers} d_model={model.cfg.d_model} "
          f"hooks={len(names)}")
    print("\n".join(names))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """Fill (or finish) a disk cache of activations, so later runs read shards instead of running the model."""
    from .activations import read_manifest, write_activation_cache
    from .models import load_model
    from .runs import RunConfig
    from .token_sources import TextFiles

    if len(args.hook) > 2:
        raise UsageError(f"--hook given {len(args.hook)} times: one hook, or two (input, output) for transcoders")
    if args.text and args.tokens_file:
        raise UsageError("give --text or --tokens-file, not both")
    try:
        given = {f: getattr(args, f) for f in DATA_FLAGS if getattr(args, f) is not None}
        cfg = RunConfig(hook=args.hook[0], split=args.split, **given)
        source = TextFiles(args.text) if args.text else cfg.token_source()
        model = load_model(args.model, device=args.device, dtype=args.model_dtype, tokenizer=cfg.tokenizer)
        hooks = args.hook[0] if len(args.hook) == 1 else tuple(args.hook)
        out = write_activation_cache(model, hooks, args.out, n_tokens=args.tokens, source=source, n_ctx=args.n_ctx,
                                     model_batch_size=args.model_batch_size, seed=args.seed, **cfg.row_options())
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e
    manifest = read_manifest(out)
    print(f"activation cache {out}: {manifest['n_rows']:,} rows of {manifest['hooks']} "
          f"(d={manifest['d_hooks']}) in {len(manifest['shards'])} shards")
    from .row_filter import counts_line

    print(counts_line("cached", manifest.get("counts", {})))
    return 0


# the RunConfig fields that say which tokens and rows a store uses: flags of `train` and of `cache` alike
DATA_FLAGS = ("tokenizer", "tokens_file", "prepend_bos", "bos_token", "separator_token", "exclude_special_tokens",
              "exclude_token_ids", "massive_norm_factor")


def _run_flags(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """One flag per RunConfig field (`d_sae` -> `--d-sae`; only those in `only` when given), default None so a
    config file's value survives."""
    import dataclasses
    import typing

    from .models import MODEL_DTYPES
    from .runs import FIELD_HELP, SAE_DTYPES, RunConfig

    from .sae import ARCHS

    choices = {"sae_dtype": SAE_DTYPES, "model_dtype": tuple(MODEL_DTYPES), "arch": ARCHS}
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if only is not None and f.name not in only:
            continue
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        kind = base[0]
        about = FIELD_HELP.get(f.name)
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=about)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, dest=f.name, type=int, nargs="+", default=None, help=about)
        else:
            shown = "required" if f.default is dataclasses.MISSING else f"default: {f.default}"
            parser.add_argument(flag, dest=f.name, type=kind, default=None, choices=choices.get(f.name),
                                help=f"{about} ({shown})" if about else f"({shown})")


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from .config_io import read_json
    from .distributed import launched_by_torchrun
    from .runs import RunConfig, train_run

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if getattr(args, f.name) is not None}
    try:
        if args.resume:
            cfg = RunConfig.load(args.resume)
            changed = {k: v for k, v in given.items() if k not in ("device", "progress") and getattr(cfg, k) != v}
            if changed:
                raise UsageError(f"--resume continues {args.resume} with its saved settings; these flags would change "
                                 f"it: {sorted(changed)} (only --device and --progress may differ)")
            cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if k in ("device", "progress")})
        else:
            base = read_json(args.config) if args.config else {}
            if "hook" not in {**base, **given}:
                raise UsageError("--hook is required (or a 'hook' key in --config)")
            cfg = RunConfig.from_dict({**base, **given})
        run = train_run
        if launched_by_torchrun():  # a rank's error goes into torchrun's failure summary, not just its own stderr
            from torch.distributed.elastic.multiprocessing.errors import record

            run = record(train_run)
        result = run(cfg, resume=bool(args.resume))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise UsageError(str(e)) from e
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last checkpoint is kept; continue with  sae-widgets train --resume {args.resume or cfg.out}",
              file=sys.stderr)
        return 130
    except OSError as e:  # a full or failing disk while training: the message names the last good checkpoint
        raise RunFailure(f"{one_line(e)}; continue with  sae-widgets train --resume {cfg.out}") from e
    if result is None:  # data-parallel: a rank other than 0 (rank 0 prints the result)
        return 0
    print(result["table"])
    print(f"SAE: {Path(cfg.out) / 'sae'}\nmetrics: {Path(cfg.out) / 'metrics.json'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses

    from .models import load_model
    from .persistence import load_sae
    from .runs import RunConfig, evaluate_run

    folder = Path(args.dir)
    try:
        sae_dir = folder / "sae" if (folder / "sae").is_dir() else folder
        sae = load_sae(sae_dir, device=args.device or "cpu")
        if (folder / "run_config.json").is_file():
            cfg = RunConfig.load(folder)
        else:
            cfg = RunConfig(hook=sae.cfg.hook, out_hook=sae.cfg.out_hook, model=sae.cfg.model_name, arch=sae.cfg.arch,
                            d_sae=sae.cfg.d_sae, k=sae.cfg.k, out=str(folder))
        cfg = dataclasses.replace(cfg, out=str(folder), device=args.device or "cpu", progress=False,
                                  **({"cache": args.cache} if args.cache else {}))
        model = None if cfg.cache else load_model(cfg.model, tokenizer=cfg.tokenizer, device=cfg.device, dtype=cfg.model_dtype)
        result = evaluate_run(cfg, sae, model, n_tokens=args.tokens)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e
    print(result["table"])
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from .models import DEFAULT_MODEL, embedded_model_dir

    summary = json.loads((embedded_model_dir() / "training_summary.json").read_text())
    arch = summary["architecture"]

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    device = f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "cpu"
    print(f"sae_widgets {__version__}")
    print(f"embedded model {DEFAULT_MODEL}: {arch['n_layer']} layers, d_model {arch['n_embd']}, "
          f"{arch['n_head']} heads, n_ctx {arch['n_positions']}, vocab {arch['vocab_size']}, "
          f"{arch['n_params']:,} parameters; held-out loss {summary['val_loss']} "
          f"(unigram baseline {summary['unigram_val_loss']}) after {summary['tokens_seen']:,} tokens")
    for dist in ("torch", "triton", "transformer_lens", "transformers"):
        print(f"{dist} {version(dist)}")
    print(f"device {device}")
    return 0


def cmd_course(args: argparse.Namespace) -> int:
    """Build the student and instructor copies of the course notebooks."""
    from .course import build_course

    try:
        counts = build_course(args.src, args.out)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from e
    print(f"{counts['notebooks']} notebooks, {counts['solution_cells']} exercises, {counts['check_cells']} check cells")
    print(f"student: {counts['student']}\ninstructor: {counts['instructor']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sae-widgets", description="Sparse autoencoders on transformer_lens "
                                     "models, in JupyterLab.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")

    q = sub.add_parser("quickstart", parents=[common],
                       help="open the quickstart notebook in JupyterLab, or run it headless",
                       description="Open the quickstart notebook in JupyterLab (a copy in --out; an existing copy "
                       "is kept). Other --Option=value arguments go to JupyterLab, e.g. --IdentityProvider.token=T.")
    q.add_argument("--headless", action="store_true",
                   help="execute with papermill and write the executed notebook, HTML and metrics to --out")
    q.add_argument("--out", default="out/quickstart", help="working folder (default: ./out/quickstart)")
    q.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="set a notebook parameter (headless); VALUE is a Python literal or a plain string")
    q.add_argument("--port", type=int, help="JupyterLab port")
    q.add_argument("--ip", help="address JupyterLab listens on (default: localhost, reached from another machine "
                   "through SSH port forwarding); 0.0.0.0 listens on every interface")
    q.add_argument("--no-browser", action="store_true", help="do not open a browser (a server without a display)")

    h = sub.add_parser("hooks", parents=[common], help="list a model's hook names")
    h.add_argument("--model", default=None, help="embedded name, local HF folder or cached hub name "
                   "(default: the embedded model)")

    sub.add_parser("info", parents=[common], help="versions, the embedded model and the device")

    c = sub.add_parser("cache", parents=[common],
                       help="write a resumable disk cache of activations (safetensors shards + manifest)",
                       description="Run the model over a token source and store the activations at one hook "
                       "(or an input/output pair) in shards; running it again finishes an interrupted cache.")
    c.add_argument("--hook", action="append", required=True, help="hook name; give it twice for a transcoder pair")
    c.add_argument("--tokens", type=int, required=True, help="activation rows (tokens) to store")
    c.add_argument("--out", required=True, help="cache folder")
    c.add_argument("--model", default=None, help="embedded name, local HF folder or cached hub name")
    c.add_argument("--text", nargs="+", help="text files to read (default: the embedded corpus)")
    c.add_argument("--split", default="train", help="embedded corpus split: train, val or all (default train)")
    c.add_argument("--n-ctx", type=int, default=128, help="tokens per context window (default 128)")
    c.add_argument("--model-batch-size", type=int, default=32, help="contexts per forward pass (default 32)")
    c.add_argument("--seed", type=int, default=0, help="recorded in the manifest; the default shuffle seed")
    c.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    c.add_argument("--model-dtype", default="float32", help="the language model's weights: float32 (default), "
                   "bfloat16 or float16")
    _run_flags(c, only=DATA_FLAGS)

    t = sub.add_parser("train", parents=[common],
                       help="train an SAE or transcoder headless (progress bar, checkpoints, metrics)",
                       description="Train an SAE on a model's activations. Settings come from flags and/or a JSON "
                       "--config with the same keys (underscores); flags win. Writes DIR/run_config.json, "
                       "DIR/checkpoints/, DIR/sae/ and DIR/metrics.json. Example: sae-widgets train --hook "
                       "blocks.1.hook_resid_post --arch topk --d-sae 4096 --k 32 --tokens 2000000 --out runs/l1")
    t.add_argument("--config", help="JSON file of run settings")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    _run_flags(t)

    e = sub.add_parser("eval", parents=[common],
                       help="print the metrics table of a trained SAE (held-out split)")
    e.add_argument("dir", help="a run folder (from train) or an SAE folder")
    e.add_argument("--tokens", type=int, default=None, help="evaluation tokens (default: the run's eval_tokens)")
    e.add_argument("--cache", default=None, help="evaluate on a disk cache instead of the held-out corpus split")
    e.add_argument("--device", default=None)

    co = sub.add_parser("course", help="build the course: student and instructor copies of the notebooks")
    co_sub = co.add_subparsers(dest="course_command", required=True, metavar="ACTION")
    cb = co_sub.add_parser("build", parents=[common],
                           help="write OUT/student/ (exercises stubbed) and OUT/instructor/ (all sources)",
                           description="Copy every notebook of --src twice, outputs cleared: OUT/instructor/ as "
                           "written, OUT/student/ with each cell tagged 'solution' replaced by its '# EXERCISE:' "
                           "line and a NotImplementedError naming the task. Both folders are replaced as a whole.")
    cb.add_argument("--src", default=None, help="folder of notebooks (default: the notebooks shipped in the package)")
    cb.add_argument("--out", required=True, help="output folder")

    x = sub.add_parser("export", parents=[common], help="export an executed notebook to HTML that needs no network",
                       description="Write NOTEBOOK as one self-contained HTML file: the widgets show as their static "
                       "copies, and no script, stylesheet, font or image is loaded from the web (no require.js, "
                       "MathJax or widget manager from a CDN; math shows as its TeX source).")
    x.add_argument("notebook", metavar="NOTEBOOK", help="an .ipynb file, e.g. one executed by papermill")
    x.add_argument("--out", metavar="HTML", default=None, help="HTML file to write (default: NOTEBOOK with .html)")

    # Later subcommands: add their parser here and a cmd_* function above.
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        return run_command(parser, args, extra)
    except (UsageError, RunFailure) as e:
        print(f"sae-widgets {args.command}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except Exception as e:  # anything else: still one line, and the traceback on request
        if args.debug:
            raise
        what = one_line(e) if isinstance(e, OSError) else f"{type(e).__name__}: {one_line(e)}"
        print(f"sae-widgets {args.command}: error: {what} (--debug shows the traceback)", file=sys.stderr)
        return 1


def run_command(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> int:
    if args.command == "quickstart":
        return cmd_quickstart(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    commands = {"hooks": cmd_hooks, "info": cmd_info, "cache": cmd_cache, "train": cmd_train, "eval": cmd_eval,
                "course": cmd_course, "export": cmd_export}
    return commands[args.command](args)
