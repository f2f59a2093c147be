// FeatureBrowser: controls (search, density bounds, pager), the visible rows, and the selected latent's
// dashboard. Python sorts, filters and pages; this file only shows `rows`. Concatenated after common.js.

const COLUMNS = [
  ["latent", "latent", true], ["density", "density", true], ["max_act", "max act", true],
  ["mean_act", "mean act", true], ["top_tokens", "top tokens", false],
];

function render({ model, el }) {
  hideStaticCopy(model);
  const root = widgetRoot("sae-browser");
  const set = (changes) => setTraits(model, changes);

  const search = h("input", { class: "sae-search", type: "search", placeholder: "search top tokens\u2026",
    "aria-label": "search top tokens" });
  let timer = null;
  search.addEventListener("keydown", (e) => e.stopPropagation());
  search.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => set({ query: search.value }), 200);
  });
  const bound = (cls, label, key, placeholder) => {
    const input = h("input", { class: cls, type: "number", min: 0, max: 1, step: "any", "aria-label": label,
      placeholder });
    onCommit(input, (value) => {
      const v = Number(value);
      set({ [key]: value === "" || !Number.isFinite(v) ? null : v });
    });
    return input;
  };
  const minD = bound("sae-min-density", "min density", "min_density", "min");
  const maxD = bound("sae-max-density", "max density", "max_density", "max");
  const count = h("span", { class: "sae-count" });
  const prev = h("button", { class: "sae-prev", type: "button", text: "\u25c0", title: "previous page",
    onclick: () => set({ page: Math.max(0, model.get("page") - 1) }) });
  const next = h("button", { class: "sae-next", type: "button", text: "\u25b6", title: "next page",
    onclick: () => set({ page: Math.min(model.get("n_pages") - 1, model.get("page") + 1) }) });
  const pageLabel = h("span", { class: "sae-page" });
  root.append(h("div", { class: "sae-controls" }, [search, "density", minD, "to", maxD, count, prev, pageLabel, next]));

  const headRow = h("tr", {}, COLUMNS.map(([key, label, sortable]) => {
    const th = h("th", { dataset: { key }, text: label });
    if (sortable) {
      th.classList.add("sae-sortable");
      th.addEventListener("click", () => {
        const same = model.get("sort_by") === key;
        set({ sort_by: key, descending: same ? !model.get("descending") : key !== "latent" });
      });
    }
    return th;
  }));
  const tbody = h("tbody");
  root.append(h("table", { class: "sae-table" }, [h("thead", {}, [headRow]), tbody]));
  const dashTitle = h("div", { class: "sae-dash-head" });
  const dashSlot = h("div", { class: "sae-dash-slot" });
  const dash = h("div", { class: "sae-dash" }, [dashTitle, dashSlot]);
  root.append(dash);
  const tooltip = makeTooltip(root);
  el.append(root);

  function drawRows() {
    const selected = model.get("selected_latent");
    tbody.replaceChildren(...model.get("rows").map((r) => {
      const tr = h("tr", { dataset: { latent: r.latent }, class: r.latent === selected ? "sae-selected-row" : null }, [
        h("td", { class: "sae-num", text: String(r.latent) }),
        h("td", { class: "sae-num", text: fmtPercent(r.density) }),
        h("td", { class: "sae-num", text: fmt(r.max_act) }),
        h("td", { class: "sae-num", text: fmt(r.mean_act) }),
        h("td", {}, (r.top_tokens || []).map((t) => h("span", { class: "sae-chip", text: displayToken(t) }))),
      ]);
      tr.addEventListener("click", () => set({ selected_latent: r.latent === model.get("selected_latent") ? -1 : r.latent }));
      return tr;
    }));
    const page = model.get("page");
    const size = model.get("page_size");
    const n = model.get("rows").length;
    count.textContent = `${model.get("n_matches")} of ${model.get("n_latents")} latents`;
    pageLabel.textContent = `rows ${n ? page * size + 1 : 0}\u2013${page * size + n} \u00b7 page ${page + 1}/${model.get("n_pages")}`;
    prev.disabled = page <= 0;
    next.disabled = page >= model.get("n_pages") - 1;
    for (const th of headRow.children) {
      const key = th.dataset.key;
      th.classList.toggle("sae-sorted", key === model.get("sort_by"));
      th.dataset.dir = key === model.get("sort_by") ? (model.get("descending") ? "desc" : "asc") : "";
    }
  }
  function drawControls() {
    if (document.activeElement !== search) search.value = model.get("query");
    const lo = model.get("min_density");
    const hi = model.get("max_density");
    if (document.activeElement !== minD) minD.value = lo === null ? "" : String(lo);
    if (document.activeElement !== maxD) maxD.value = hi === null ? "" : String(hi);
  }
  function drawDashboard() {
    const f = model.get("feature");
    dash.hidden = !(f && f.latent !== undefined);
    dashTitle.replaceChildren(h("span", { class: "sae-dash-title", text: dash.hidden ? "" : `Latent ${f.latent}` }));
    showDashboard(dashSlot, f, tooltip);
  }

  drawControls();
  drawRows();
  drawDashboard();
  const off = listen(model, {
    "change:rows": drawRows, "change:selected_latent": drawRows, "change:n_matches": drawRows,
    "change:query": drawControls, "change:min_density": drawControls, "change:max_density": drawControls,
    "change:feature": drawDashboard,
  });
  return () => {
    clearTimeout(timer);
    off();
  };
}

export default { render };
