"""The EfficientNet family as data: stage tables, the published scaling coefficients and two rounding rules.

Everything that distinguishes B0 from B7, a Lite model from a full one or V2 from V1 lives here, as tables;
`network` only interprets the `ModelConfig` that `model_config` resolves from them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

from effnet_jax.errors import ConfigError

__all__ = [
    "ALPHA", "BETA", "GAMMA", "B0_STAGES", "V2_STAGES", "COMPOUND_SCALING", "LITE_SCALING", "V2_SCALING",
    "VARIANTS", "Port", "TIMM_MODELS", "KERAS_MODELS", "timm_port",
    "StageSpec", "Scaling", "BlockConfig", "ModelConfig",
    "round_filters", "round_repeats", "scaling_for_phi", "model_config",
]

ALPHA, BETA, GAMMA = 1.2, 1.1, 1.15  # depth, width and resolution bases of compound scaling


class StageSpec(NamedTuple):
    """One row of a stage table (B0's, or V2's with `fused` rows)."""
    expand_ratio: int
    kernel: int
    stride: int
    in_channels: int
    out_channels: int
    repeats: int
    fused: bool = False  # Fused-MBConv (EfficientNetV2): k×k expansion conv, no depthwise, no SE


# EfficientNet-B0's MBConv stages (Tan & Le 2019, table 1): the same seven rows torchvision, timm and the TF
# reference use.
B0_STAGES: tuple[StageSpec, ...] = (
    #         expand kernel stride  in   out  repeats
    StageSpec(1,     3,     1,      32,  16,  1),
    StageSpec(6,     3,     2,      16,  24,  2),
    StageSpec(6,     5,     2,      24,  40,  2),
    StageSpec(6,     3,     2,      40,  80,  3),
    StageSpec(6,     5,     1,      80,  112, 3),
    StageSpec(6,     5,     2,      112, 192, 4),
    StageSpec(6,     3,     1,      192, 320, 1),
)
STEM_CHANNELS = 32


def fused(*row) -> StageSpec:
    """A Fused-MBConv stage (one full k x k convolution in place of expand + depthwise)."""
    return StageSpec(*row, fused=True)


mbconv = StageSpec  # an MBConv stage

# EfficientNetV2 (torchvision 0.29.1 `_efficientnet_conf('efficientnet_v2_*')`, = Tan & Le 2021, table 4, for S).
# The stem has the first row's input channels; the head is 1280 (not 4x the last stage).
V2_STAGES: dict[str, tuple[StageSpec, ...]] = {
    #               expand kernel stride in   out  repeats
    "v2_s": (fused( 1,      3,     1,     24,  24,  2),
             fused( 4,      3,     2,     24,  48,  4),
             fused( 4,      3,     2,     48,  64,  4),
             mbconv(4,      3,     2,     64,  128, 6),
             mbconv(6,      3,     1,     128, 160, 9),
             mbconv(6,      3,     2,     160, 256, 15)),
    "v2_m": (fused( 1,      3,     1,     24,  24,  3),
             fused( 4,      3,     2,     24,  48,  5),
             fused( 4,      3,     2,     48,  80,  5),
             mbconv(4,      3,     2,     80,  160, 7),
             mbconv(6,      3,     1,     160, 176, 14),
             mbconv(6,      3,     2,     176, 304, 18),
             mbconv(6,      3,     1,     304, 512, 5)),
    "v2_l": (fused( 1,      3,     1,     32,  32,  4),
             fused( 4,      3,     2,     32,  64,  7),
             fused( 4,      3,     2,     64,  96,  7),
             mbconv(4,      3,     2,     96,  192, 10),
             mbconv(6,      3,     1,     192, 224, 19),
             mbconv(6,      3,     2,     224, 384, 25),
             mbconv(6,      3,     1,     384, 640, 7)),
}
# EfficientNetV2-B0 (TF EfficientNetV2's `v2-b0`, = Keras' EfficientNetV2B0 and timm's tf_efficientnetv2_b0); B1-B3
# scale it like a B-model (V2_SCALING). The stem (32) is wider than the first stage (16): no shortcut there.
V2_STAGES["v2_b0"] = (
    #       expand kernel stride in   out  repeats
    fused( 1,      3,     1,     32,  16,  1),
    fused( 4,      3,     2,     16,  32,  2),
    fused( 4,      3,     2,     32,  48,  2),
    mbconv(4,      3,     2,     48,  96,  3),
    mbconv(6,      3,     1,     96,  112, 5),
    mbconv(6,      3,     2,     112, 192, 8))
V2_STAGES["v2_b1"] = V2_STAGES["v2_b2"] = V2_STAGES["v2_b3"] = V2_STAGES["v2_b0"]
HEAD_CHANNELS_V2 = 1280
HEAD_CHANNELS_LITE = 1280  # Lite models keep stem (32) and head (1280) unscaled
SE_RATIO = 0.25  # squeeze width = max(1, block input channels * 0.25)
STOCHASTIC_DEPTH_RATE = 0.2  # drop-path rate of the last block; block i gets rate * i / num_blocks


class Scaling(NamedTuple):
    width: float
    depth: float
    resolution: int
    dropout: float
    round_limit: float = 0.9  # `round_filters`' floor; TF EfficientNetV2's B-models round without it (0)


# The published (width, depth, resolution, dropout) of B0..B7. The paper derives them from a compound coefficient
# phi, depth = ALPHA**phi, width = BETA**phi, resolution = GAMMA**phi (`scaling_for_phi`), but the released B1..B7
# values were rounded by hand: the table, not the formula, is what every set of published weights was trained with.
COMPOUND_SCALING: dict[str, Scaling] = {
    "b0": Scaling(1.0, 1.0, 224, 0.2),
    "b1": Scaling(1.0, 1.1, 240, 0.2),
    "b2": Scaling(1.1, 1.2, 260, 0.3),
    "b3": Scaling(1.2, 1.4, 300, 0.3),
    "b4": Scaling(1.4, 1.8, 380, 0.4),
    "b5": Scaling(1.6, 2.2, 456, 0.4),
    "b6": Scaling(1.8, 2.6, 528, 0.5),
    "b7": Scaling(2.0, 3.1, 600, 0.5),
}
# The same for Lite0..Lite4.
LITE_SCALING: dict[str, Scaling] = {
    "lite0": Scaling(1.0, 1.0, 224, 0.2),
    "lite1": Scaling(1.0, 1.1, 240, 0.2),
    "lite2": Scaling(1.1, 1.2, 260, 0.3),
    "lite3": Scaling(1.2, 1.4, 280, 0.3),
    "lite4": Scaling(1.4, 1.8, 300, 0.3),
}
# EfficientNetV2: width/depth 1 (the tables above are the models; `--width`/`--depth` scale them further like a
# B-model, TF EfficientNetV2's rules), resolution = torchvision's eval crop size (the weights'
# `transforms().crop_size`), dropout = torchvision's per-model default.
V2_SCALING: dict[str, Scaling] = {
    "v2_s": Scaling(1.0, 1.0, 384, 0.2),
    "v2_m": Scaling(1.0, 1.0, 480, 0.3),
    "v2_l": Scaling(1.0, 1.0, 480, 0.4),
    # V2-B0..B3: Keras' EfficientNetV2B0..B3 (width, depth, default_size, dropout_rate); no 0.9 floor in rounding
    "v2_b0": Scaling(1.0, 1.0, 224, 0.2, 0.0),
    "v2_b1": Scaling(1.0, 1.1, 240, 0.2, 0.0),
    "v2_b2": Scaling(1.1, 1.2, 260, 0.2, 0.0),
    "v2_b3": Scaling(1.2, 1.4, 300, 0.2, 0.0),
}
VARIANTS: tuple[str, ...] = tuple(COMPOUND_SCALING) + tuple(LITE_SCALING) + tuple(V2_SCALING)

# BatchNorm settings of the published weights, in PyTorch's convention (running = (1-m)*running + m*batch).
# torchvision: B0-B4 eps 1e-5 / momentum 0.1, B5-B7 eps 1e-3 / momentum 0.01 (ported from TF);
# Lite (TF weights via lukemelas): eps 1e-3 / momentum 0.01. V2-S/M/L: eps 1e-3, PyTorch's default momentum 0.1
# (`partial(nn.BatchNorm2d, eps=1e-03)`, also for V2-L's TF-ported weights).
_BN_TORCHVISION_SMALL = (1e-5, 0.1)
_BN_TF = (1e-3, 0.01)
_BN_V2 = (1e-3, 0.1)


# V2-B0..B3 exist only as TF ports (Keras, timm's tf_efficientnetv2_b*): TF's SAME padding is their own
_TF_ONLY = ("v2_b0", "v2_b1", "v2_b2", "v2_b3")


class Port(NamedTuple):
    """A model another library publishes, as one of ours: the variant and the `create_model` overrides that make it
    compute what that library's model computes (None: the variant's own setting)."""
    variant: str
    padding: str | None = None
    bn_epsilon: float | None = None
    bn_momentum: float | None = None  # PyTorch convention

    def overrides(self) -> dict:
        return {k: v for k, v in self._asdict().items() if k != "variant" and v is not None}


_TIMM_TF = dict(padding="same", bn_epsilon=1e-3, bn_momentum=0.1)  # timm's tf_* ports: SAME, eps 1e-3, torch momentum
# timm's EfficientNets (`timm.create_model(name)`): its own B0-B4 (= torchvision's) and the TF ports.
TIMM_MODELS: dict[str, Port] = {
    **{f"efficientnet_b{i}": Port(f"b{i}") for i in range(5)},
    **{f"tf_efficientnet_b{i}": Port(f"b{i}", **_TIMM_TF) for i in range(8)},
    **{f"tf_efficientnet_lite{i}": Port(f"lite{i}", **_TIMM_TF) for i in range(5)},
    **{f"tf_efficientnetv2_b{i}": Port(f"v2_b{i}", **_TIMM_TF) for i in range(4)},
    **{f"tf_efficientnetv2_{s}": Port(f"v2_{s}", **_TIMM_TF) for s in "sml"},
}
# Keras applications' EfficientNets, by the model's `name` (`keras.applications.EfficientNetB0` ... 'efficientnetb0',
# `EfficientNetV2B0` ... 'efficientnetv2-b0'): SAME padding, BN eps 1e-3, Keras momentum 0.99 (V1) / 0.9 (V2).
KERAS_MODELS: dict[str, Port] = {
    **{f"efficientnetb{i}": Port(f"b{i}", "same", 1e-3, 0.01) for i in range(8)},
    **{f"efficientnetv2-{s}": Port(f"v2_{s}", "same", 1e-3, 0.1) for s in ("b0", "b1", "b2", "b3", "s", "m", "l")},
}


def timm_port(architecture: str) -> Port:
    """The `Port` of a timm architecture name ('tf_efficientnet_b0'; a Hub tag such as '.ns_jft_in1k' is ignored),
    or a ConfigError naming the ones supported."""
    name = architecture.split(".")[0]
    if name not in TIMM_MODELS:
        raise ConfigError(f"timm architecture {name!r} is not one of the EfficientNets supported here: "
                          f"{', '.join(TIMM_MODELS)}")
    return TIMM_MODELS[name]


MIN_RESOLUTION = 32  # the network downsamples by 32: the last stage needs at least a 1 x 1 map


def check_resolution(side: int, what: str = "--resolution") -> int:
    """`side` if an input of side x side pixels fits every variant, else a ConfigError naming `what`."""
    if side < MIN_RESOLUTION:
        raise ConfigError(f"{what} {side} is too small: EfficientNet downsamples by {MIN_RESOLUTION}; use >= "
                         f"{MIN_RESOLUTION}")
    return side


def round_filters(channels: float, width: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Scale a channel count by `width` and round to a multiple of `divisor`, never below `round_limit` (0.9)
    times the scaled value nor below `divisor` (torchvision's `_make_divisible`, TF's `round_filters`, timm's
    `make_divisible`; TF EfficientNetV2's B-models: `round_limit` 0)."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < round_limit * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """Scale a stage's block count by `depth`, rounding up."""
    return int(math.ceil(repeats * depth))


def scaling_for_phi(phi: float) -> Scaling:
    """Compound scaling from the paper's formula: width beta**phi, depth alpha**phi, resolution 224*gamma**phi
    (rounded to a multiple of 8 for convenience). For custom sizes; the named variants use the table."""
    resolution = int(round(224 * GAMMA**phi / 8)) * 8
    return Scaling(BETA**phi, ALPHA**phi, resolution, 0.2)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """One MBConv or Fused-MBConv block, fully resolved."""
    stage: int           # the row of the stage table it comes from (0..6)
    in_channels: int
    out_channels: int
    expand_channels: int  # == in_channels when there is no expansion conv
    kernel: int
    stride: int
    se_channels: int      # 0: no squeeze-excitation
    drop_path_rate: float
    fused: bool = False   # Fused-MBConv: k×k (stride) expansion conv + 1×1 project, or one k×k conv when
                          # expand_channels == in_channels; no depthwise, no SE

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A whole network, fully resolved: what `models.EfficientNet` builds."""
    name: str
    resolution: int
    stem_channels: int
    head_channels: int
    blocks: tuple[BlockConfig, ...]
    activation: str       # 'silu' or 'relu6'
    padding: str          # 'symmetric' ((k-1)//2 each side, torchvision) or 'same' (TF, asymmetric)
    bn_epsilon: float
    bn_momentum: float    # PyTorch convention; Flax's momentum is 1 - this
    dropout: float
    stem_stride: int = 2

    @property
    def num_stages(self) -> int:
        return self.blocks[-1].stage + 1


def model_config(variant: str, *, width: float | None = None, depth: float | None = None,
                 drop_path_rate: float = STOCHASTIC_DEPTH_RATE) -> ModelConfig:
    """Resolve a variant name (`VARIANTS`: 'b0'..'b7', 'lite0'..'lite4', 'v2_s', 'v2_m', 'v2_l', 'v2_b0'..'v2_b3')
    into a `ModelConfig`.

    `width`/`depth` override the variant's coefficients (custom compound scaling). For V2 the stage table is
    width = depth = 1, and the coefficients scale its channels (stem, stages and the 1280 head: `round_filters`)
    and repeats (`round_repeats`), as TF EfficientNetV2's builder does.
    """
    variant = variant.lower()
    lite, v2 = variant in LITE_SCALING, variant in V2_SCALING
    table = LITE_SCALING if lite else V2_SCALING if v2 else COMPOUND_SCALING
    if variant not in table:
        raise ConfigError(f"unknown EfficientNet variant {variant!r}; valid names: {', '.join(VARIANTS)}")
    scaling = table[variant]
    w = scaling.width if width is None else width
    d = scaling.depth if depth is None else depth
    stages = V2_STAGES[variant] if v2 else B0_STAGES

    rf = lambda channels, width: round_filters(channels, width, round_limit=scaling.round_limit)  # noqa: E731
    stem = STEM_CHANNELS if lite else rf(stages[0].in_channels, w)
    repeats = [round_repeats(s.repeats, d) for s in stages]
    if lite:  # Lite keeps the first and last stage at one block each
        repeats[0], repeats[-1] = B0_STAGES[0].repeats, B0_STAGES[-1].repeats
    total = sum(repeats)

    blocks: list[BlockConfig] = []
    in_ch = stem
    for stage, (spec, n) in enumerate(zip(stages, repeats)):
        out_ch = rf(spec.out_channels, w)
        for i in range(n):
            expand = round_filters(in_ch, spec.expand_ratio)  # in_ch is a multiple of 8: exact product
            # SE squeeze: block input channels / 4 (torchvision: max(1, input_channels // 4)); none in Lite
            # and in Fused-MBConv
            se = 0 if (lite or spec.fused) else max(1, int(in_ch * SE_RATIO))
            blocks.append(BlockConfig(
                stage=stage, in_channels=in_ch, out_channels=out_ch, expand_channels=expand,
                kernel=spec.kernel, stride=spec.stride if i == 0 else 1, se_channels=se,
                drop_path_rate=drop_path_rate * len(blocks) / total, fused=spec.fused))
            in_ch = out_ch

    if v2:
        head, (eps, mom) = rf(HEAD_CHANNELS_V2, w), _BN_V2
    else:
        head = HEAD_CHANNELS_LITE if lite else 4 * in_ch
        eps, mom = _BN_TF if (lite or variant in ("b5", "b6", "b7")) else _BN_TORCHVISION_SMALL
    return ModelConfig(
        name=variant, resolution=scaling.resolution, stem_channels=stem, head_channels=head,
        blocks=tuple(blocks), activation="relu6" if lite else "silu",
        padding="same" if lite or variant in _TF_ONLY else "symmetric",
        bn_epsilon=eps, bn_momentum=mom, dropout=scaling.dropout)
