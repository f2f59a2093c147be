"""sae_widgets: train, inspect and steer sparse autoencoders on transformer_lens models, in JupyterLab.

The public names load lazily, so `import sae_widgets` (and `sae-widgets --help`) does not pay for torch.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "models", "DEFAULT_MODEL": "models",
    "ActivationStore": "activations", "write_activation_cache": "activations",
    "EmbeddedCorpus": "token_sources", "TextFiles": "token_sources", "TokenArray": "token_sources",
    "HFDataset": "token_sources", "TokenFile": "token_sources", "boundary_tokens": "special_tokens",
    "SAE": "sae", "SAEConfig": "sae", "Trainer": "train", "TrainConfig": "train", "TrainEvent": "train",
    "save_sae": "persistence", "load_sae": "persistence", "evaluate": "metrics",
    "load_saelens": "saelens_format", "export_saelens": "saelens_format",
    "SyntheticActivations": "synthetic", "recovery": "synthetic", "RunConfig": "runs", "train_run": "runs",
    "FeatureStats": "feature_stats",
    "TokenHighlighter": "widgets", "FeatureDashboard": "widgets", "FeatureBrowser": "widgets", "PromptExplorer": "widgets",
    "SteeringPanel": "widgets", "TrainingMonitor": "widgets",
    "LatentEdit": "steering", "DirectionEdit": "steering", "diff_in_means": "steering", "generate": "generation",
    "steer": "steering_report",
}
__all__ = ["__version__", *_EXPORTS]


def __dir__():  # tab completion offers the lazy names too
    return sorted({*globals(), *_EXPORTS})


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'sae_widgets' has no attribute {name!r}")
