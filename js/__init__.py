"""Widget front-end sources (anywidget ESM), shipped in the wheel as `sae_widgets.js` so they load with no CDN."""
