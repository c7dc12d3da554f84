"""effnet_jax: EfficientNet B0-B7, Lite0-4 and V2-S/M/L in JAX/Flax, equal to torchvision's and the TF Lite models.

The public API; names are imported lazily (`import effnet_jax` stays cheap). The package by concern: `model/`,
`kernels/`, `weights/`, `data/`, `train/`, `cli/`, and `loader` (every source of weights).
"""

import importlib

_EXPORTS = {
    "EfficientNet": "model.network", "create_model": "model.network", "count_params": "model.network",
    "count_flops": "model.network", "VARIANTS": "model.variants", "model_config": "model.variants",
    "read_torch_state_dict": "weights.torch_reader", "convert_state_dict": "weights.convert",
    "load": "loader", "Loaded": "loader", "pretrained": "loader", "EvalTransform": "data.transform",
    "TrainConfig": "train.config", "train_and_evaluate": "train.loop", "UserError": "errors",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'effnet_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
