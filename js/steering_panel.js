// SteeringPanel: prompt, steered latents (id or top-token search, mode, strength), sampling settings, a Generate
// button, the run history, and the baseline and steered completions side by side, coloured by the steered
// latents' activation. Buttons send messages that call the panel's Python methods. Concatenated after common.js.

const STEER_MODES = ["add", "clamp", "scale", "ablate"];

function render({ model, el }) {
  hideStaticCopy(model);
  const root = widgetRoot("sae-steer");
  const set = (k, v) => setTraits(model, { [k]: v });
  const send = (msg) => model.send(msg);

  const prompt = h("textarea", { class: "sae-prompt", rows: 2, placeholder: "prompt\u2026", "aria-label": "prompt" });
  onCommit(prompt, (v) => { if (v !== model.get("prompt")) set("prompt", v); });

  const latentInput = h("input", { class: "sae-sp-latent", type: "number", min: 0, step: 1, "aria-label": "latent" });
  const addButton = h("button", { class: "sae-sp-add", type: "button", text: "Add latent", onclick: () => {
    const v = Number(latentInput.value);
    if (latentInput.value !== "" && Number.isInteger(v)) send({ action: "add_latent", latent: v, value: 0, mode: "add" });
  } });
  onCommit(latentInput, () => addButton.click());
  const search = h("input", { class: "sae-search", type: "search", placeholder: "find latent by top token\u2026",
    "aria-label": "find latent by top token" });
  search.addEventListener("input", () => set("query", search.value));
  search.addEventListener("keydown", (e) => e.stopPropagation());
  const matches = h("div", { class: "sae-sp-matches" });

  const edits = h("table", { class: "sae-sp-edits" });
  const positions = h("select", { class: "sae-sp-positions", "aria-label": "positions" },
    ["all", "last"].map((p) => h("option", { value: p, text: p })));
  positions.addEventListener("change", () => set("positions", positions.value));
  const numberBox = (cls, label, key, attrs, parse) => {
    const box = h("input", { class: cls, type: "number", "aria-label": label, ...attrs });
    onCommit(box, (v) => {
      const x = parse(v);
      if (Number.isFinite(x)) set(key, x);
      else box.value = String(model.get(key));
    });
    return box;
  };
  const seed = numberBox("sae-sp-seed", "seed", "seed", { step: 1 }, (v) => Math.trunc(Number(v)));
  const temperature = numberBox("sae-sp-temperature", "temperature", "temperature", { step: 0.1, min: 0 }, Number);
  const length = numberBox("sae-sp-length", "length", "max_new_tokens", { step: 1, min: 1 }, (v) => Math.trunc(Number(v)));
  const generate = h("button", { class: "sae-sp-generate", type: "button", text: "Generate", onclick: () => {
    if (prompt.value !== model.get("prompt")) set("prompt", prompt.value);
    send({ action: "generate" });
  } });
  const status = h("span", { class: "sae-status" });
  const error = h("div", { class: "sae-error" });
  const history = h("div", { class: "sae-sp-history" });
  const info = h("div", { class: "sae-hint" });
  const columns = h("div", { class: "sae-sp-columns" });

  root.append(
    h("div", { class: "sae-controls" }, [prompt]),
    h("div", { class: "sae-controls" }, [latentInput, addButton, search]), matches, edits,
    h("div", { class: "sae-controls" }, [h("label", {}, ["positions ", positions]), h("label", {}, ["seed ", seed]),
      h("label", {}, ["temperature ", temperature]), h("label", {}, ["length ", length]), generate, status]),
    error, history, info, columns);
  const tooltip = makeTooltip(root);
  el.append(root);

  function drawSettings() {
    if (document.activeElement !== prompt) prompt.value = model.get("prompt");
    positions.value = model.get("positions");
    seed.value = String(model.get("seed"));
    temperature.value = String(model.get("temperature"));
    length.value = String(model.get("max_new_tokens"));
    latentInput.max = String(model.get("d_sae") - 1);
  }
  function drawEdits() {
    edits.replaceChildren(...model.get("edits").map((r) => {
      const mode = h("select", { class: "sae-sp-mode", "aria-label": `mode of latent ${r.latent}` },
        STEER_MODES.map((m) => h("option", { value: m, text: m })));
      mode.value = r.mode;
      const strength = h("input", { class: "sae-sp-strength", type: "number", step: "any",
        "aria-label": `strength of latent ${r.latent}` });
      strength.value = r.value === null ? "" : String(r.value);
      strength.disabled = r.mode === "ablate";
      const update = () => send({ action: "set_latent", latent: r.latent, mode: mode.value,
        value: mode.value === "ablate" ? null : Number(strength.value || 0) });
      mode.addEventListener("change", update);
      onCommit(strength, update);
      return h("tr", { dataset: { latent: r.latent } }, [
        h("td", { text: `#${r.latent}` }), h("td", {}, [mode]), h("td", {}, [strength]),
        h("td", {}, [h("button", { class: "sae-sp-remove", type: "button", text: "\u2715", title: "remove",
          onclick: () => send({ action: "remove_latent", latent: r.latent }) })]),
      ]);
    }));
  }
  function drawMatches() {
    matches.replaceChildren(...model.get("matches").map((m) => h("button", {
      type: "button", class: "sae-latent-chip", dataset: { latent: m.latent },
      text: `#${m.latent} ${displayToken(m.top_tokens)}`,
      onclick: () => send({ action: "add_latent", latent: m.latent, value: 0, mode: "add" }),
    })));
  }
  function drawStatus() {
    status.textContent = model.get("busy") ? "generating\u2026" : "";
    generate.disabled = model.get("busy");
    error.textContent = model.get("error");
    error.hidden = !model.get("error");
  }
  function completion(title, key, run) {
    const c = run[key];
    return h("div", { class: `sae-sp-column sae-sp-${key}` }, [
      h("div", { class: "sae-panel-title", text: title }),
      h("div", { class: "sae-hl-line" }, [renderTokens(c.tokens, c.values, {
        scale: run.scale, signed: run.signed, topLatents: c.latents, tooltip })]),
    ]);
  }
  function drawRuns() {
    const runs = model.get("history");
    const sel = model.get("selected");
    history.replaceChildren(...runs.map((r, i) => h("button", {
      type: "button", class: i === sel ? "sae-sp-run sae-active" : "sae-sp-run", dataset: { index: i },
      title: r.edits.map((e) => `#${e.latent} ${e.mode} ${fmt(e.value)}`).join(", ") || "no edits",
      text: `run ${i + 1}`, onclick: () => send({ action: "select", index: i }),
    })));
    const run = sel >= 0 ? runs[sel] : null;
    root.dataset.selected = String(sel);
    if (!run) {
      info.textContent = "";
      columns.replaceChildren();
      return;
    }
    const acts = (run.latent_activations || []).map((a) => `#${a.latent}: ${fmt(a.baseline)} \u2192 ${fmt(a.steered)}`);
    info.textContent = `run ${sel + 1} of ${runs.length} \u00b7 seed ${run.seed} \u00b7 KL ${fmt(run.kl)}` +
      (acts.length ? ` \u00b7 mean act ${acts.join(", ")}` : "");
    columns.replaceChildren(completion("baseline", "baseline", run), completion("steered", "steered", run));
  }

  drawSettings();
  drawEdits();
  drawMatches();
  drawStatus();
  drawRuns();
  return listen(model, {
    "change:prompt": drawSettings, "change:positions": drawSettings, "change:seed": drawSettings,
    "change:temperature": drawSettings, "change:max_new_tokens": drawSettings, "change:edits": drawEdits,
    "change:matches": drawMatches, "change:busy": drawStatus, "change:error": drawStatus,
    "change:history": drawRuns, "change:selected": drawRuns,
  });
}

export default { render };
