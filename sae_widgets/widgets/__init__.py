"""Two-way notebook widgets (anywidget) for inspecting SAE features, each with a static HTML copy for exports.

    TokenHighlighter(tokens, acts)      tokens coloured by activation; `selected_index` follows clicks
    FeatureDashboard(stats, latent)     one latent: stats, histogram, contexts, quantiles, logit effects
    FeatureBrowser(stats)               all latents, sorted / filtered / paged in Python; `selected_latent`
    PromptExplorer(model, sae, stats)   a prompt's per-token top latents and the clicked latent's dashboard
    SteeringPanel(model, sae, stats)    steer latents, baseline and steered completions side by side, run history
    TrainingMonitor(trainer)            train in a background thread with live charts, ETA, pause/resume/stop

`stats` is the feature-statistics object (d_sae, n_tokens, feature(i), columns(), token_strings). The names
load lazily, so the three widgets that need no model do not import torch.
"""
from importlib import import_module

_EXPORTS = {"TokenHighlighter": "token_highlighter", "FeatureDashboard": "feature_dashboard",
            "FeatureBrowser": "feature_browser", "PromptExplorer": "prompt_explorer",
            "SteeringPanel": "steering_panel", "TrainingMonitor": "training_monitor"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'sae_widgets.widgets' has no attribute {name!r}")
