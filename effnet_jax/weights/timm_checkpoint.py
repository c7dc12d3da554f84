"""timm's checkpoints without torch: a `model.safetensors` (read with safetensors' numpy API) and the `config.json`
beside it (the Hub's layout, `timm.models.push_to_hf_hub`), which names the architecture and the eval recipe.

`read_timm(weights, config)` gives the variant and overrides of the architecture (`variants.TIMM_MODELS`), the
variables through the strict key table `weights.convert.timm_table`, the class names and the `EvalTransform` of
the weights' `pretrained_cfg` (timm's `resolve_data_config` + `create_transform(is_training=False)`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib

import numpy as np

from effnet_jax.data.transform import EvalTransform
from effnet_jax.errors import CheckpointReadError, ConfigError, UserError
from effnet_jax.model import variants

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
HUB_PREFIX = "hf-hub:"  # `--init hf-hub:timm/<name>`, timm's own spelling (`timm.create_model('hf-hub:...')`)
_CROP_STYLES = {"center": "torchvision", "squash": "squash"}  # timm's crop_mode -> EvalTransform.crop_style


@dataclasses.dataclass
class TimmCheckpoint:
    architecture: str            # timm's name, e.g. 'tf_efficientnet_b0'
    port: variants.Port          # our variant and overrides for it
    variables: dict              # {'params', 'batch_stats'}, numpy float32
    num_classes: int
    class_names: list[str] | None
    preprocess: EvalTransform


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a `.safetensors` file as numpy arrays (no torch); a CheckpointReadError names a file that is
    not one."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return load_file(os.fspath(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointReadError(f"{os.fspath(path)}: not a readable safetensors file ({e})") from None


def read_config(path: str | os.PathLike) -> dict:
    try:
        config = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointReadError(f"{os.fspath(path)}: not a readable timm config.json ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointReadError(f"{os.fspath(path)}: not a timm config.json (not a JSON object)")
    return config


def architecture_of(config: dict, source: str) -> str:
    arch = config.get("architecture") or config.get("model_name")
    if not isinstance(arch, str):
        raise CheckpointReadError(f"{source}: config.json names no timm 'architecture'")
    return arch


def eval_transform_of(config: dict, port: variants.Port, source: str) -> EvalTransform:
    """timm's eval transform of the weights: resize the shorter side to floor(input_size / crop_pct) (both sides,
    crop_mode 'squash'), center crop input_size, normalize with the weights' mean/std."""
    pcfg = config.get("pretrained_cfg") or {}
    size = int((pcfg.get("input_size") or (3, variants.model_config(port.variant).resolution))[-1])
    crop_pct = float(pcfg.get("crop_pct") or 0.875)
    interpolation = pcfg.get("interpolation") or "bicubic"
    mode = pcfg.get("crop_mode") or "center"
    if interpolation not in ("bicubic", "bilinear") or mode not in _CROP_STYLES:
        raise ConfigError(f"{source}: pretrained_cfg asks for interpolation {interpolation!r} / crop_mode {mode!r}; "
                          f"supported: bicubic, bilinear / {', '.join(_CROP_STYLES)}")
    return EvalTransform(size, max(size, math.floor(size / crop_pct)), interpolation,
                         pcfg.get("mean") or (0.485, 0.456, 0.406), pcfg.get("std") or (0.229, 0.224, 0.225),
                         _CROP_STYLES[mode])


def read_timm(weights: str | os.PathLike, config: dict | None, architecture: str | None = None) -> TimmCheckpoint:
    """A timm checkpoint: `weights` (.safetensors) with its parsed `config` (None: a bare file, whose timm
    `architecture` must then be given). Strict: a key the table does not know, a missing key or a wrong shape is
    refused by name before any model is built."""
    from effnet_jax.weights import convert

    source = os.fspath(weights)
    if config is not None:
        arch = architecture_of(config, source)
        if architecture is not None and architecture.split(".")[0] != arch.split(".")[0]:
            raise ConfigError(f"{source} holds a timm {arch}, not {architecture}")
    elif architecture is None:
        raise ConfigError(f"{source}: a bare .safetensors file does not say which timm architecture it holds: put "
                          f"its {CONFIG_FILE} beside it, or pass --variant with the timm name (one of "
                          f"{', '.join(variants.TIMM_MODELS)})")
    else:
        arch = architecture
    port = variants.timm_port(arch)
    state_dict = read_safetensors(weights)
    if "conv_stem.weight" not in state_dict:
        raise UserError(f"{source}: not a timm EfficientNet checkpoint (no 'conv_stem.weight'; first keys: "
                        f"{list(state_dict)[:5]})")
    variables = convert.convert_state_dict(state_dict, port.variant, None, source=source, layout="timm",
                                           overrides=port.overrides())
    n = int(variables["params"]["classifier"]["bias"].shape[0])
    names = (config or {}).get("label_names")
    names = [str(c) for c in names] if isinstance(names, list) and len(names) == n else None
    preprocess = eval_transform_of(config or {}, port, source)
    return TimmCheckpoint(arch, port, variables, n, names, preprocess)
