"""TrainingMonitor: run a `Trainer` in a background thread and watch it live (charts, progress, ETA), with pause,
resume and stop from the widget or from Python.

The monitor is one more callback on the trainer's event API (no second training loop). The callback keeps every
logged row in Python and pushes the traitlets at most once per `refresh_s` (plus at once on finish, failure,
checkpoint, pause and stop), so a fast run does not flood the front-end. Pausing blocks the training thread inside
the callback on a `threading.Event`; stopping calls `trainer.request_stop()`, after which the trainer writes its
final checkpoint (when `out_dir` is set). With no front-end (papermill, a script) everything works the same and
`wait()` returns the trained SAE or re-raises the training thread's error.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

import traitlets

from ._common import LiveStaticWidget, esc, fmt, jsonable, widget_css, widget_esm

# what the charts show, in order: (metric key, title); the same list is in js/training_monitor.js
CHARTS = (("loss", "loss"), ("l0", "L0"), ("explained_variance", "explained variance"),
          ("dead_fraction", "dead fraction"), ("lr", "learning rate"), ("tokens_per_s", "tokens/s"))
ROW_KEYS = ("step", "tokens") + tuple(k for k, _ in CHARTS)
# same geometry as CHART in js/training_monitor.js
CHART_WIDTH, CHART_HEIGHT, CHART_LEFT, CHART_RIGHT, CHART_TOP, CHART_BOTTOM = 248, 110, 52, 8, 8, 18
ACTIONS = ("pause", "resume", "stop")
# styles of this widget only (js/widgets.css holds the shared ones); added to the live and the static copy alike
MONITOR_CSS = """
.sae-tm-head { display: flex; gap: 10px; align-items: center; flex-wrap: wrap; margin-bottom: 4px; }
.sae-tm-status { font-weight: 600; min-width: 6em; }
.sae-tm-status[data-status="failed"] { color: #b00020; }
.sae-tm-progress { display: inline-block; width: 240px; height: 10px; background: rgba(0, 0, 0, 0.08); border-radius: 5px; overflow: hidden; }
.sae-tm-bar { display: block; height: 100%; background: #e6550d; }
.sae-tm-charts { display: flex; flex-wrap: wrap; gap: 8px; }
.sae-chart .sae-line { fill: none; stroke: #e6550d; stroke-width: 1.5; }
.sae-chart .sae-axis { font-size: 10px; fill: #555; }
.sae-chart .sae-axis-line { stroke: #888; stroke-width: 1; }
.sae-tm-final { width: auto; }
"""


def chart_points(rows: list[dict], max_points: int) -> list[dict]:
    """At most `max_points` rows for the charts: an even stride through the history, always ending at the last row."""
    if max_points < 2:
        raise ValueError(f"max_points={max_points} must be >= 2")
    n = len(rows)
    if n <= max_points:
        return list(rows)
    stride = (n - 1) / (max_points - 1)
    return [rows[round(i * stride)] for i in range(max_points)]


def eta_seconds(tokens: int, total_tokens: int, tokens_per_s: float | None) -> float | None:
    """Seconds left at the current rate (None while the rate is unknown)."""
    if not tokens_per_s or tokens_per_s <= 0:
        return None
    return max(0, total_tokens - tokens) / tokens_per_s


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "\u2013"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def line_chart_svg(xs: list[float], ys: list[float | None], title: str) -> str:
    """One metric against tokens as an SVG polyline (lineChartSvg in js/training_monitor.js draws the same)."""
    w, ht = CHART_WIDTH, CHART_HEIGHT
    head = (f'<svg class="sae-chart" width="{w}" height="{ht}" viewBox="0 0 {w} {ht}" role="img" '
            f'xmlns="http://www.w3.org/2000/svg"><title>{esc(title)}</title>')
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if not pts:
        return head + f'<text x="{CHART_LEFT}" y="{ht / 2:g}" class="sae-axis">no data yet</text></svg>'
    x0, x1 = pts[0][0], pts[-1][0]
    lo, hi = min(y for _, y in pts), max(y for _, y in pts)
    xspan = x1 - x0 if x1 > x0 else 1.0
    yspan = hi - lo if hi > lo else 1.0
    pw, ph = w - CHART_LEFT - CHART_RIGHT, ht - CHART_TOP - CHART_BOTTOM
    coords = " ".join(f"{CHART_LEFT + (x - x0) / xspan * pw:.2f},{CHART_TOP + ph - (y - lo) / yspan * ph:.2f}"
                      for x, y in pts)
    return (head + f'<polyline class="sae-line" points="{coords}"></polyline>'
            f'<line class="sae-axis-line" x1="{CHART_LEFT}" y1="{CHART_TOP + ph}" x2="{w - CHART_RIGHT}" y2="{CHART_TOP + ph}"></line>'
            f'<text class="sae-axis" x="{CHART_LEFT - 4}" y="{CHART_TOP + 10}" text-anchor="end">{esc(fmt(hi))}</text>'
            f'<text class="sae-axis" x="{CHART_LEFT - 4}" y="{CHART_TOP + ph}" text-anchor="end">{esc(fmt(lo))}</text>'
            f'<text class="sae-axis" x="{CHART_LEFT}" y="{ht - 4}">{esc(fmt(x0))}</text>'
            f'<text class="sae-axis" x="{w - CHART_RIGHT}" y="{ht - 4}" text-anchor="end">{esc(fmt(x1))} tok</text></svg>')


class TrainingMonitor(LiveStaticWidget):
    """Live view and controls of `trainer`: `start()`, `pause()`, `resume()`, `stop()`, `wait()` / `result()`."""

    _esm = widget_esm("training_monitor")
    _css = widget_css() + MONITOR_CSS
    _static_traits = ("status", "points", "progress", "final_metrics", "error")

    status = traitlets.Unicode("idle").tag(sync=True)  # idle|running|paused|stopping|finished|stopped|failed
    points = traitlets.List().tag(sync=True)           # chart rows (chart_points of the history)
    progress = traitlets.Dict().tag(sync=True)         # tokens, total_tokens, step, total_steps, eta_s, elapsed_s
    final_metrics = traitlets.Dict().tag(sync=True)    # the last logged row once the run ends
    checkpoint = traitlets.Unicode("").tag(sync=True)  # the last checkpoint written
    error = traitlets.Unicode("").tag(sync=True)
    n_pushes = traitlets.Int(0)                        # how many throttled updates were sent (for tests)

    def __init__(self, trainer, *, refresh_s: float = 0.5, max_points: int = 400,
                 clock: Callable[[], float] = time.monotonic, **kwargs):
        if not refresh_s > 0:
            raise ValueError(f"refresh_s={refresh_s!r} must be > 0 seconds")
        self.trainer, self.refresh_s, self.max_points, self._clock = trainer, float(refresh_s), int(max_points), clock
        chart_points([], self.max_points)  # checks max_points
        self.rows: list[dict] = []
        self._resume = threading.Event()
        self._resume.set()
        self._thread: threading.Thread | None = None
        self._outcome: tuple[str, object] | None = None  # ("ok", sae) or ("error", exception)
        self._last_push = -float("inf")
        self._t_start = None
        self._paused_s, self._paused_at = 0.0, None
        self._lock = threading.Lock()
        super().__init__(**kwargs)
        self.progress = self._progress(trainer.tokens, trainer.step)
        trainer.callbacks.append(self._on_event)
        self.on_msg(self._on_front_end_msg)

    # -- control
    def start(self, *, resume: bool = False) -> "TrainingMonitor":
        """Run `trainer.run(resume=...)` in a background thread; returns at once (the kernel stays responsive)."""
        if self._thread is not None:
            raise RuntimeError(f"this monitor already started its run (status {self.status!r}); make a new Trainer "
                               f"and TrainingMonitor to train again")
        self._t_start = self._clock()
        self.status = "running"
        self._thread = threading.Thread(target=self._run, args=(resume,), name="sae-training", daemon=True)
        self._thread.start()
        return self

    def _run(self, resume: bool) -> None:
        try:
            sae = self.trainer.run(resume=resume)
        except BaseException as e:  # shown in the widget, re-raised by wait()/result()
            self._outcome = ("error", e)
            with self.hold_trait_notifications():
                self.error = f"{type(e).__name__}: {e}"
                self.status = "failed"
                self._push()
        else:
            self._outcome = ("ok", sae)
            with self.hold_trait_notifications():
                self.status = "stopped" if self.trainer.tokens < self.trainer.cfg.total_tokens else "finished"
                self.final_metrics = jsonable(self.rows[-1]) if self.rows else {}
                self._push()
                self.progress = self._progress(self.trainer.tokens, self.trainer.step)  # a last step not logged too

    def pause(self) -> None:
        """Block the training thread at its next logged step until `resume()` (or `stop()`)."""
        if self.status == "running":
            self._resume.clear()
            self._paused_at = self._clock()
            self.status = "paused"

    def resume(self) -> None:
        if self.status == "paused":
            self._end_pause()
            self.status = "running"

    def stop(self) -> None:
        """Stop after the current step; the trainer then writes its final checkpoint when `out_dir` is set."""
        if self.status in ("running", "paused"):
            self.trainer.request_stop()
            self.status = "stopping"
            self._end_pause()

    def _end_pause(self) -> None:
        if self._paused_at is not None:
            self._paused_s += self._clock() - self._paused_at
            self._paused_at = None
        self._resume.set()

    def _on_front_end_msg(self, _widget, content, _buffers) -> None:
        action = content.get("action") if isinstance(content, dict) else None
        if action not in ACTIONS:
            self.error = f"unknown action {action!r} from the front-end; valid: {ACTIONS}"
            return
        getattr(self, action)()

    # -- results
    @property
    def done(self) -> bool:
        return self._outcome is not None

    def wait(self, timeout: float | None = None):
        """Block until training ends; return the trained SAE or re-raise the training thread's error."""
        if self._thread is None:
            raise RuntimeError("the monitor has not started: call start() first")
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"training still running after {timeout} s (status {self.status!r})")
        return self.result()

    def result(self):
        """The trained SAE once training ended (re-raises its error); RuntimeError while it still runs."""
        if self._outcome is None:
            raise RuntimeError(f"training has not ended (status {self.status!r}): use wait()")
        kind, value = self._outcome
        if kind == "error":
            raise value
        return value

    # -- the trainer's callback (runs in the training thread)
    def _on_event(self, ev) -> None:
        if ev.kind == "step":
            self.rows.append({"step": ev.step, "tokens": ev.tokens, **{k: ev.metrics.get(k) for k in ROW_KEYS[2:]}})
            if self._clock() - self._last_push >= self.refresh_s:
                self._push()
            while not self._resume.wait(0.05):  # paused: hold the training thread here
                pass
        elif ev.kind == "checkpoint":
            self.checkpoint = ev.path or ""
            self._push()

    def _progress(self, tokens: int, step: int) -> dict:
        total = int(self.trainer.cfg.total_tokens)
        rate = self.rows[-1].get("tokens_per_s") if self.rows else None
        elapsed = None
        if self._t_start is not None:
            paused = self._paused_s + (self._clock() - self._paused_at if self._paused_at is not None else 0.0)
            elapsed = self._clock() - self._t_start - paused
        return jsonable({"tokens": tokens, "total_tokens": total, "step": step,
                         "total_steps": self.trainer.total_steps, "fraction": min(1.0, tokens / total),
                         "tokens_per_s": rate, "eta_s": eta_seconds(tokens, total, rate), "elapsed_s": elapsed})

    def _push(self) -> None:
        """Send the charts and the progress now (throttled by the callback, not here)."""
        with self._lock:
            self._last_push = self._clock()
            with self.hold_trait_notifications():
                self.points = jsonable(chart_points(self.rows, self.max_points))
                last = self.rows[-1] if self.rows else {"tokens": self.trainer.tokens, "step": self.trainer.step}
                self.progress = self._progress(last["tokens"], last["step"])
                self.n_pushes += 1

    # -- static copy
    def static_html(self) -> str:
        p = self.progress
        pct = 100 * float(p.get("fraction") or 0)
        eta = f' \u00b7 ETA {fmt_duration(p.get("eta_s"))}' if self.status in ("running", "paused") else ""
        head = (f'<div class="sae-tm-head"><span class="sae-tm-status" data-status="{esc(self.status)}">{esc(self.status)}</span>'
                f'<span class="sae-tm-progress"><span class="sae-tm-bar" style="width: {pct:.1f}%"></span></span>'
                f'<span class="sae-tm-counts">{esc(fmt(p.get("tokens")))} / {esc(fmt(p.get("total_tokens")))} tokens'
                f'{eta}</span></div>')
        err = f'<div class="sae-error">{esc(self.error)}</div>' if self.error else ""
        xs = [r["tokens"] for r in self.points]
        charts = "".join(f'<div class="sae-panel sae-tm-chart" data-metric="{k}"><div class="sae-panel-title">{esc(t)}</div>'
                         f'{line_chart_svg(xs, [r.get(k) for r in self.points], t)}</div>' for k, t in CHARTS)
        table = ""
        if self.final_metrics:
            rows = "".join(f'<tr><td>{esc(k)}</td><td class="sae-num">{esc(fmt(v))}</td></tr>'
                           for k, v in self.final_metrics.items())
            table = f'<table class="sae-table sae-tm-final"><thead><tr><th>metric</th><th>final</th></tr></thead><tbody>{rows}</tbody></table>'
        return f'<style>{MONITOR_CSS}</style><div class="sae-monitor">{head}{err}<div class="sae-tm-charts">{charts}</div>{table}</div>'

    def __repr__(self) -> str:
        return f"TrainingMonitor(status={self.status!r}, tokens={self.progress.get('tokens')})"
