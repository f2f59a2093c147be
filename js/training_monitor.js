// TrainingMonitor: status, progress bar with ETA, pause / resume / stop buttons (sent to Python as messages),
// one SVG line chart per metric, and the final metrics table. Concatenated after common.js.

// what the charts show, in order; the same list as CHARTS in training_monitor.py
const CHARTS = [["loss", "loss"], ["l0", "L0"], ["explained_variance", "explained variance"],
  ["dead_fraction", "dead fraction"], ["lr", "learning rate"], ["tokens_per_s", "tokens/s"]];
// the same geometry as line_chart_svg() in training_monitor.py
const CHART = { width: 248, height: 110, left: 52, right: 8, top: 8, bottom: 18 };

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "\u2013";
  let s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  s -= h * 3600;
  const m = Math.floor(s / 60);
  s -= m * 60;
  const pad = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${pad(m)}:${pad(s)}` : `${m}:${pad(s)}`;
}

function lineChartSvg(xs, ys, title) {
  const { width, height, left, right, top, bottom } = CHART;
  const svg = s("svg", { class: "sae-chart", width, height, viewBox: `0 0 ${width} ${height}`, role: "img" },
    [s("title", { text: title })]);
  const pts = [];
  xs.forEach((x, i) => { if (ys[i] !== null && ys[i] !== undefined) pts.push([x, ys[i]]); });
  if (pts.length === 0) {
    svg.append(s("text", { x: left, y: height / 2, class: "sae-axis", text: "no data yet" }));
    return svg;
  }
  const x0 = pts[0][0];
  const x1 = pts[pts.length - 1][0];
  const lo = Math.min(...pts.map((p) => p[1]));
  const hi = Math.max(...pts.map((p) => p[1]));
  const xspan = x1 > x0 ? x1 - x0 : 1;
  const yspan = hi > lo ? hi - lo : 1;
  const pw = width - left - right;
  const ph = height - top - bottom;
  const coords = pts.map(([x, y]) =>
    `${(left + ((x - x0) / xspan) * pw).toFixed(2)},${(top + ph - ((y - lo) / yspan) * ph).toFixed(2)}`).join(" ");
  svg.append(s("polyline", { class: "sae-line", points: coords }));
  svg.append(s("line", { class: "sae-axis-line", x1: left, y1: top + ph, x2: width - right, y2: top + ph }));
  svg.append(s("text", { class: "sae-axis", x: left - 4, y: top + 10, "text-anchor": "end", text: fmt(hi) }));
  svg.append(s("text", { class: "sae-axis", x: left - 4, y: top + ph, "text-anchor": "end", text: fmt(lo) }));
  svg.append(s("text", { class: "sae-axis", x: left, y: height - 4, text: fmt(x0) }));
  svg.append(s("text", { class: "sae-axis", x: width - right, y: height - 4, "text-anchor": "end", text: `${fmt(x1)} tok` }));
  return svg;
}

function render({ model, el }) {
  hideStaticCopy(model);
  const root = widgetRoot("sae-monitor");
  const status = h("span", { class: "sae-tm-status" });
  const bar = h("span", { class: "sae-tm-bar" });
  const counts = h("span", { class: "sae-tm-counts" });
  const act = (action) => model.send({ action });
  const pause = h("button", { class: "sae-tm-pause", type: "button", text: "Pause", onclick: () => act("pause") });
  const resume = h("button", { class: "sae-tm-resume", type: "button", text: "Resume", onclick: () => act("resume") });
  const stop = h("button", { class: "sae-tm-stop", type: "button", text: "Stop", onclick: () => act("stop") });
  const error = h("div", { class: "sae-error" });
  const charts = h("div", { class: "sae-tm-charts" });
  const final = h("div", { class: "sae-tm-final-slot" });
  root.append(h("div", { class: "sae-tm-head" }, [status, h("span", { class: "sae-tm-progress" }, [bar]), counts,
    pause, resume, stop]), error, charts, final);
  el.append(root);

  function drawHead() {
    const st = model.get("status");
    status.textContent = st;
    status.dataset.status = st;
    pause.disabled = st !== "running";
    resume.disabled = st !== "paused";
    stop.disabled = !(st === "running" || st === "paused");
    const p = model.get("progress") || {};
    bar.style.width = `${(100 * Number(p.fraction || 0)).toFixed(1)}%`;
    const rate = p.tokens_per_s ? ` \u00b7 ${fmt(p.tokens_per_s)} tok/s` : "";
    const eta = st === "running" || st === "paused" ? ` \u00b7 ETA ${fmtDuration(p.eta_s)}` : "";
    counts.textContent = `${fmt(p.tokens)} / ${fmt(p.total_tokens)} tokens \u00b7 step ${p.step ?? 0}${rate}${eta}`;
    error.textContent = model.get("error");
    error.hidden = !model.get("error");
  }
  function drawCharts() {
    const pts = model.get("points") || [];
    const xs = pts.map((r) => r.tokens);
    charts.replaceChildren(...CHARTS.map(([key, title]) => h("div", { class: "sae-panel sae-tm-chart",
      dataset: { metric: key, n: pts.length } }, [h("div", { class: "sae-panel-title", text: title }),
      lineChartSvg(xs, pts.map((r) => r[key]), title)])));
    root.dataset.points = String(pts.length);
  }
  function drawFinal() {
    const m = model.get("final_metrics") || {};
    const rows = Object.entries(m).map(([k, v]) => h("tr", {}, [h("td", { text: k }),
      h("td", { class: "sae-num", text: fmt(v) })]));
    final.replaceChildren(...(rows.length ? [h("table", { class: "sae-table sae-tm-final" }, [
      h("thead", {}, [h("tr", {}, [h("th", { text: "metric" }), h("th", { text: "final" })])]),
      h("tbody", {}, rows)])] : []));
  }

  drawHead();
  drawCharts();
  drawFinal();
  return listen(model, {
    "change:status": drawHead, "change:progress": drawHead, "change:error": drawHead,
    "change:points": drawCharts, "change:final_metrics": drawFinal,
  });
}

export default { render };
