// TokenHighlighter: coloured tokens, a tooltip on hover, click to select (synced to Python's selected_index).
// Concatenated after common.js.

function render({ model, el }) {
  hideStaticCopy(model);
  const root = widgetRoot("sae-hl");
  const line = h("div", { class: "sae-hl-line" });
  root.append(line);
  const tooltip = makeTooltip(root);
  el.append(root);

  function draw() {
    const selected = model.get("selected_index");
    const box = renderTokens(model.get("tokens"), model.get("values"), {
      scale: model.get("scale"),
      signed: model.get("signed"),
      topLatents: model.get("top_latents"),
      selected: selected >= 0 ? selected : null,
      tooltip,
      onClick: (i) => setTraits(model, { selected_index: model.get("selected_index") === i ? -1 : i }),
    });
    line.replaceChildren(box);
  }

  draw();
  return listen(model, {
    "change:tokens": draw, "change:values": draw, "change:top_latents": draw, "change:scale": draw,
    "change:signed": draw, "change:selected_index": draw,
  });
}

export default { render };
