"""effnet_jax: EfficientNet B0-B7, Lite0-4 and V2-S/M/L in JAX/Flax, equal to torchvision's and the TF Lite models.

Names are imported lazily, so `python -m effnet_jax.<module>` runs each CLI without importing it twice.
"""

import importlib

_EXPORTS = {
    "EfficientNet": "models", "create_model": "models", "count_params": "models", "count_flops": "models",
    "VARIANTS": "variants", "model_config": "variants",
    "read_torch_state_dict": "torch_reader",
    "convert_state_dict": "convert", "pretrained": "convert",
    "load": "loader", "Loaded": "loader", "EvalTransform": "preprocess", "UserError": "errors",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'effnet_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
