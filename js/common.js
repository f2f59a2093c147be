// Shared helpers of the sae_widgets front-ends. Python puts this file in front of each widget's own file
// (sae_widgets/widgets/_common.py: widget_esm), so every widget is one self-contained ES module.
// Text from Python (tokens above all) is untrusted: it only ever reaches the page as text nodes or
// attribute values set through the DOM, never through innerHTML.

const SEQUENTIAL_RGB = [230, 85, 13];
const POSITIVE_RGB = [178, 24, 43];
const NEGATIVE_RGB = [33, 102, 172];
const MAX_ALPHA = 0.85;
const SVG_NS = "http://www.w3.org/2000/svg";

// Background of a token; the same formula as token_color() in _common.py.
function tokenColor(value, scale, signed) {
  if (value === null || value === undefined || !Number.isFinite(value) || !(scale > 0)) return "transparent";
  if (value <= 0 && !signed) return "transparent";
  const t = Math.min(1, Math.abs(value) / scale) * MAX_ALPHA;
  const alpha = Math.floor(t * 1000 + 0.5) / 1000;
  if (alpha <= 0) return "transparent";
  const [r, g, b] = signed ? (value > 0 ? POSITIVE_RGB : NEGATIVE_RGB) : SEQUENTIAL_RGB;
  return `rgba(${r}, ${g}, ${b}, ${alpha})`;
}

// Newlines and tabs become visible marks, bidirectional controls (which would silently reorder the text)
// show as [U+XXXX]; everything else stays literal (display_token in _common.py).
const BIDI_CONTROLS = /[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;
function displayToken(token) {
  return String(token).replaceAll("\n", "\u21b5").replaceAll("\t", "\u2192")
    .replace(BIDI_CONTROLS, (c) => `[U+${c.codePointAt(0).toString(16).toUpperCase().padStart(4, "0")}]`);
}

// 3 significant digits, exponent form outside [1e-3, 1e4) (fmt in _common.py).
function fmt(v) {
  if (v === null || v === undefined) return "\u2013";
  v = Number(v);
  if (Number.isNaN(v)) return "nan";
  if (!Number.isFinite(v)) return v > 0 ? "inf" : "-inf";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e4 || a < 1e-3) return v.toExponential(2);
  const decimals = Math.max(0, 2 - Math.floor(Math.log10(a)));
  let s = v.toFixed(decimals);
  if (s.includes(".")) s = s.replace(/0+$/, "").replace(/\.$/, "");
  return s;
}

function fmtPercent(p) {
  return p === null || p === undefined ? "\u2013" : fmt(Number(p) * 100) + "%";
}

// h("div", {class: "x", dataset: {index: 3}}, ["text", child]) — strings become text nodes.
function h(tag, attrs, children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  appendAll(el, children);
  return el;
}

function s(tag, attrs, children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  appendAll(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "style") el.style.cssText = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
}

function appendAll(el, children) {
  if (children === null || children === undefined) return;
  for (const c of Array.isArray(children) ? children : [children]) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

// The colour scale of a set of values: signed when any is negative, scaled by the largest |value|.
function colorScale(valueLists, scaleHint) {
  let maxAbs = 0;
  let signed = false;
  for (const values of valueLists) {
    for (const v of values || []) {
      if (v === null || !Number.isFinite(v)) continue;
      if (v < 0) signed = true;
      maxAbs = Math.max(maxAbs, Math.abs(v));
    }
  }
  return { scale: scaleHint > 0 ? scaleHint : maxAbs, signed };
}

// One floating tooltip per widget root, placed in viewport coordinates (position: fixed) so the output
// area's overflow does not clip it; content is built from text nodes only.
function makeTooltip(root) {
  const tip = h("div", { class: "sae-tooltip", role: "tooltip" });
  tip.hidden = true;
  root.append(tip);
  return {
    el: tip,
    show(anchor, content) {
      tip.replaceChildren(...content);
      tip.hidden = false;
      const a = anchor.getBoundingClientRect();
      const below = a.bottom + 4 + tip.offsetHeight <= window.innerHeight;
      const left = Math.max(4, Math.min(a.left, window.innerWidth - tip.offsetWidth - 4));
      const top = below ? a.bottom + 4 : Math.max(4, a.top - tip.offsetHeight - 4);
      // an ancestor with a transform or containment moves the origin of "fixed": measure it and correct
      tip.style.left = "0px";
      tip.style.top = "0px";
      const origin = tip.getBoundingClientRect();
      tip.style.left = `${left - origin.left}px`;
      tip.style.top = `${top - origin.top}px`;
    },
    hide() {
      tip.hidden = true;
    },
  };
}

function tooltipContent(token, value, topLatents) {
  const out = [
    h("div", { class: "sae-tooltip-token" }, [h("code", { text: JSON.stringify(String(token)) })]),
    h("div", { class: "sae-tooltip-value" }, ["activation ", h("b", { text: fmt(value) })]),
  ];
  if (topLatents && topLatents.length) {
    const rows = topLatents.map(([latent, v]) =>
      h("tr", {}, [h("td", { text: `#${latent}` }), h("td", { class: "sae-num", text: fmt(v) })]));
    out.push(h("table", { class: "sae-tooltip-latents" }, [
      h("thead", {}, [h("tr", {}, [h("th", { text: "top latents" }), h("th", { text: "act" })])]),
      h("tbody", {}, rows),
    ]));
  }
  return out;
}

// A run of coloured tokens. opts: {scale, signed, topLatents, peak, selected, tooltip, onClick}
function renderTokens(tokens, values, opts) {
  const o = opts || {};
  const box = h("span", { class: "sae-tokens" });
  const spans = tokens.map((tok, i) => {
    const v = values ? values[i] : null;
    const cls = ["sae-tok"];
    if (o.peak === i) cls.push("sae-peak");
    if (o.selected === i) cls.push("sae-selected");
    const span = h("span", {
      class: cls.join(" "),
      dataset: { index: i },
      style: `background-color: ${tokenColor(v, o.scale, o.signed)}`,
      text: displayToken(tok),
    });
    if (o.tooltip) {
      const top = o.topLatents ? o.topLatents[i] : null;
      span.addEventListener("mouseenter", () => o.tooltip.show(span, tooltipContent(tok, v, top)));
      span.addEventListener("mouseleave", () => o.tooltip.hide());
    } else {
      span.title = `${displayToken(tok)}: ${fmt(v)}`;
    }
    if (o.onClick) span.addEventListener("click", () => o.onClick(i));
    return span;
  });
  box.append(...spans);
  return box;
}

// Histogram of activations as SVG; the same geometry as histogram_svg() in static_html.py.
const HIST = { width: 360, height: 120, left: 40, right: 8, top: 8, bottom: 20 };

function histogramSvg(hist) {
  const edges = (hist && hist.edges) || [];
  const counts = (hist && hist.counts) || [];
  const { width, height, left, right, top, bottom } = HIST;
  const svg = s("svg", { class: "sae-hist", width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  if (counts.length === 0 || edges.length !== counts.length + 1) {
    svg.append(s("text", { x: left, y: height / 2, class: "sae-axis", text: "no activations" }));
    return svg;
  }
  const lo = edges[0];
  const hi = edges[edges.length - 1];
  const span = hi > lo ? hi - lo : 1;
  const maxCount = Math.max(1, ...counts);
  const plotW = width - left - right;
  const plotH = height - top - bottom;
  const x = (e) => left + ((e - lo) / span) * plotW;
  counts.forEach((c, i) => {
    const bh = (c / maxCount) * plotH;
    const x0 = x(edges[i]);
    const w = Math.max(0.5, x(edges[i + 1]) - x0 - 0.5);
    svg.append(s("rect", {
      class: "sae-bar", x: x0.toFixed(2), y: (top + plotH - bh).toFixed(2), width: w.toFixed(2), height: bh.toFixed(2),
    }, [s("title", { text: `${fmt(edges[i])} to ${fmt(edges[i + 1])}: ${c}` })]));
  });
  svg.append(s("line", { class: "sae-axis-line", x1: left, y1: top + plotH, x2: width - right, y2: top + plotH }));
  svg.append(s("text", { class: "sae-axis", x: left, y: height - 4, text: fmt(lo) }));
  svg.append(s("text", { class: "sae-axis", x: width - right, y: height - 4, "text-anchor": "end", text: fmt(hi) }));
  svg.append(s("text", { class: "sae-axis", x: left - 4, y: top + 10, "text-anchor": "end", text: String(maxCount) }));
  svg.append(s("text", { class: "sae-axis", x: left - 4, y: top + plotH, "text-anchor": "end", text: "0" }));
  return svg;
}

function logitTable(title, entries, cls) {
  return h("table", { class: `sae-logit-table ${cls}` }, [
    h("thead", {}, [h("tr", {}, [h("th", { text: title }), h("th", { text: "logit" })])]),
    h("tbody", {}, (entries || []).map((e) => h("tr", {}, [
      h("td", {}, [h("span", { class: "sae-tok", text: displayToken(e.token) })]),
      h("td", { class: "sae-num", text: fmt(e.value) }),
    ]))),
  ]);
}

function contextRow(ctx, scale, signed, tooltip) {
  return h("div", { class: "sae-ctx" }, [
    h("span", { class: "sae-ctx-act sae-num", text: fmt(ctx.act) }),
    renderTokens(ctx.tokens || [], ctx.acts || [], { scale, signed, peak: ctx.peak, tooltip }),
  ]);
}

function featureScale(feature) {
  const lists = [];
  for (const c of feature.top_contexts || []) lists.push(c.acts);
  for (const q of feature.quantiles || []) for (const c of q.contexts || []) lists.push(c.acts);
  const cs = colorScale(lists, 0);
  const maxAct = Number(feature.max_act);
  return { signed: cs.signed, scale: Number.isFinite(maxAct) && maxAct > cs.scale ? Math.abs(maxAct) : cs.scale };
}

// The body of a feature dashboard (everything below the header controls). Returns the element and how long
// building and laying it out took, in milliseconds.
function renderDashboardBody(feature, tooltip) {
  const t0 = performance.now();
  const { scale, signed } = featureScale(feature);
  const logits = feature.logits || {};
  const body = h("div", { class: "sae-dash-body" }, [
    h("div", { class: "sae-dash-stats" }, [
      h("span", { class: "sae-stat" }, ["density ", h("b", { class: "sae-density", text: fmtPercent(feature.density) })]),
      h("span", { class: "sae-stat" }, ["max act ", h("b", { class: "sae-max-act", text: fmt(feature.max_act) })]),
      h("span", { class: "sae-stat" }, ["mean act ", h("b", { text: fmt(feature.mean_act) })]),
    ]),
    h("div", { class: "sae-dash-row" }, [
      h("div", { class: "sae-panel" }, [h("div", { class: "sae-panel-title", text: "Activation histogram" }),
        histogramSvg(feature.histogram)]),
      h("div", { class: "sae-panel" }, [h("div", { class: "sae-panel-title", text: "Logit effects" }),
        h("div", { class: "sae-logits" }, [logitTable("positive", logits.positive, "sae-pos"),
          logitTable("negative", logits.negative, "sae-neg")])]),
    ]),
    h("div", { class: "sae-panel sae-top-contexts" }, [
      h("div", { class: "sae-panel-title", text: "Top contexts" }),
      ...(feature.top_contexts || []).map((c) => contextRow(c, scale, signed, tooltip)),
    ]),
    h("div", { class: "sae-panel sae-quantiles" }, [
      h("div", { class: "sae-panel-title", text: "Quantile bins" }),
      ...(feature.quantiles || []).map((q) => h("div", { class: "sae-qbin" }, [
        h("div", { class: "sae-qbin-title", text: `${fmt(q.lo)} \u2013 ${fmt(q.hi)}` }),
        ...(q.contexts || []).map((c) => contextRow(c, scale, signed, tooltip)),
      ])),
    ]),
  ]);
  return { body, t0 };
}

// Replace `slot`'s content with the dashboard of `feature`, record the render time on the slot.
function showDashboard(slot, feature, tooltip) {
  if (!feature || feature.latent === undefined) {
    slot.replaceChildren();
    return;
  }
  const { body, t0 } = renderDashboardBody(feature, tooltip);
  slot.replaceChildren(body);
  void slot.offsetHeight; // force layout, so the time includes it
  const ms = performance.now() - t0;
  slot.dataset.renderMs = ms.toFixed(2);
  slot.dataset.latent = String(feature.latent);
}

// Hide the static copy of this widget in the same notebook (see LiveStaticWidget in _common.py).
function hideStaticCopy(model) {
  const id = model.get("_static_id");
  if (!id || !/^[A-Za-z0-9_-]+$/.test(id)) return;
  const styleId = `sae-hide-static-${id}`;
  if (document.getElementById(styleId)) return;
  const style = document.createElement("style");
  style.id = styleId;
  style.textContent = `.jp-OutputArea-child:has(.sae-static[data-sae-static="${id}"]) { display: none; }`;
  document.head.append(style);
}

// A widget's root element: notebook keyboard shortcuts stay off while typing in its inputs.
function widgetRoot(cls) {
  const root = h("div", { class: `sae-root ${cls}` });
  root.dataset.lmSuppressShortcuts = "true";
  return root;
}

// An input whose value is committed with Enter or when it loses focus.
function onCommit(input, commit) {
  input.addEventListener("change", () => commit(input.value));
  input.addEventListener("keydown", (e) => {
    e.stopPropagation();
    if (e.key === "Enter" && input.tagName !== "TEXTAREA") commit(input.value);
  });
}

// Set traits and send them to Python in one message.
function setTraits(model, changes) {
  for (const [k, v] of Object.entries(changes)) model.set(k, v);
  model.save_changes();
}

// model.on(...) for several events; returns the function that removes them all.
function listen(model, handlers) {
  for (const [ev, fn] of Object.entries(handlers)) model.on(ev, fn);
  return () => {
    for (const [ev, fn] of Object.entries(handlers)) model.off(ev, fn);
  };
}
