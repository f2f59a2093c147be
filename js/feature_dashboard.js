// FeatureDashboard: header with latent navigation and the explanation, then the dashboard body.
// Changing the latent here sets `latent`; Python answers with the new `feature`. Concatenated after common.js.

function render({ model, el }) {
  hideStaticCopy(model);
  const root = widgetRoot("sae-dash");
  const title = h("span", { class: "sae-dash-title" });
  const input = h("input", { class: "sae-latent-input", type: "number", min: 0, step: 1, "aria-label": "latent" });
  const go = (latent) => {
    const d = model.get("d_sae");
    const v = Math.min(d - 1, Math.max(0, Math.trunc(Number(latent))));
    if (!Number.isFinite(v) || v === model.get("latent")) return;
    setTraits(model, { latent: v });
  };
  const prev = h("button", { class: "sae-prev", type: "button", text: "\u25c0", title: "previous latent",
    onclick: () => go(model.get("latent") - 1) });
  const next = h("button", { class: "sae-next", type: "button", text: "\u25b6", title: "next latent",
    onclick: () => go(model.get("latent") + 1) });
  onCommit(input, go);
  const expl = h("input", { class: "sae-expl-input", type: "text", placeholder: "explanation\u2026",
    "aria-label": "explanation" });
  onCommit(expl, (value) => {
    if (value === model.get("explanation")) return;
    setTraits(model, { explanation: value });
  });
  const head = h("div", { class: "sae-dash-head" }, [title, h("span", { class: "sae-nav" }, [prev, input, next])]);
  const body = h("div", { class: "sae-dash-slot" });
  root.append(head, h("div", { class: "sae-expl" }, [expl]), body);
  const tooltip = makeTooltip(root);
  el.append(root);

  function drawHead() {
    const latent = model.get("latent");
    title.textContent = `Latent ${latent}`;
    input.value = String(latent);
    input.max = String(model.get("d_sae") - 1);
  }
  function drawExplanation() {
    expl.value = model.get("explanation"); // only Python changes it while one types: nothing is lost
  }
  function drawBody() {
    showDashboard(body, model.get("feature"), tooltip);
    root.dataset.renderMs = body.dataset.renderMs || "";
  }

  drawHead();
  drawExplanation();
  drawBody();
  return listen(model, {
    "change:latent": drawHead, "change:d_sae": drawHead, "change:feature": drawBody,
    "change:explanation": drawExplanation,
  });
}

export default { render };
