// PromptExplorer: a prompt box, the prompt's tokens (hover: top latents; click: list them as buttons), and
// the dashboard of the clicked latent. The model runs in Python when `text` changes. Concatenated after common.js.

function render({ model, el }) {
  hideStaticCopy(model);
  const root = widgetRoot("sae-explorer");
  const set = (changes) => setTraits(model, changes);
  const prompt = h("textarea", { class: "sae-prompt", rows: 2, placeholder: "type a prompt\u2026",
    "aria-label": "prompt" });
  const status = h("span", { class: "sae-status" });
  const run = () => {
    if (prompt.value === model.get("text")) return;
    status.textContent = "running\u2026";
    set({ text: prompt.value });
  };
  const runButton = h("button", { class: "sae-run", type: "button", text: "Run", onclick: run });
  prompt.addEventListener("keydown", (e) => {
    e.stopPropagation();
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey || e.shiftKey)) {
      e.preventDefault();
      run();
    }
  });
  const error = h("div", { class: "sae-error" });
  const hint = h("div", { class: "sae-hint" });
  const line = h("div", { class: "sae-hl-line" });
  const chips = h("div", { class: "sae-token-latents" });
  const dashTitle = h("div", { class: "sae-dash-head" });
  const dashSlot = h("div", { class: "sae-dash-slot" });
  const dash = h("div", { class: "sae-dash" }, [dashTitle, dashSlot]);
  root.append(h("div", { class: "sae-controls" }, [prompt, runButton, status]), error, hint, line, chips, dash);
  const tooltip = makeTooltip(root);
  el.append(root);

  function drawTokens() {
    status.textContent = "";
    error.textContent = model.get("error");
    error.hidden = !model.get("error");
    const latent = model.get("selected_latent");
    hint.textContent = latent >= 0 ? `colour: latent #${latent} (click it again to clear)` :
      "colour: strongest latent per token \u00b7 click a token, then one of its latents";
    const selected = model.get("selected_index");
    line.replaceChildren(renderTokens(model.get("tokens"), model.get("values"), {
      scale: model.get("scale"), signed: model.get("signed"), topLatents: model.get("top_latents"),
      selected: selected >= 0 ? selected : null, tooltip,
      onClick: (i) => set({ selected_index: model.get("selected_index") === i ? -1 : i }),
    }));
    drawChips();
  }
  function drawChips() {
    const i = model.get("selected_index");
    const top = i >= 0 ? (model.get("top_latents")[i] || []) : [];
    const current = model.get("selected_latent");
    chips.replaceChildren(...top.map(([latent, v]) => h("button", {
      type: "button", class: latent === current ? "sae-latent-chip sae-active" : "sae-latent-chip",
      dataset: { latent }, text: `#${latent} ${fmt(v)}`,
      onclick: () => set({ selected_latent: latent === model.get("selected_latent") ? -1 : latent }),
    })));
  }
  function drawDashboard() {
    const f = model.get("feature");
    dash.hidden = !(f && f.latent !== undefined);
    dashTitle.replaceChildren(h("span", { class: "sae-dash-title", text: dash.hidden ? "" : `Latent ${f.latent}` }));
    showDashboard(dashSlot, f, tooltip);
  }

  prompt.value = model.get("text");
  drawTokens();
  drawDashboard();
  return listen(model, {
    "change:text": () => { if (document.activeElement !== prompt) prompt.value = model.get("text"); },
    "change:tokens": drawTokens, "change:values": drawTokens, "change:selected_index": drawTokens,
    "change:error": drawTokens, "change:selected_latent": drawTokens, "change:feature": drawDashboard,
  });
}

export default { render };
