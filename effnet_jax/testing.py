"""Test utilities (as `jax.test_util`): torchvision's and timm's EfficientNets with random weights and randomized
BatchNorm statistics, converted to this library's variables, and both frameworks' per-stage outputs, for comparing
the converted model with the PyTorch one.

tests/test_convert.py asserts the equivalence with them, benchmarks/equivalence.py measures it. torch and
torchvision (timm) are needed by the functions that build or run a PyTorch model and are imported inside them: the
library imports without them.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effnet_jax.weights import convert
from effnet_jax.weights.torch_reader import read_torch_state_dict

__all__ = ["variant_seed", "randomized_torchvision", "randomized_timm", "randomize_batchnorm", "torch_stage_outputs",
           "save_and_convert", "jax_stage_outputs"]


def variant_seed(variant: str) -> int:
    """The torch seed of a variant's random model: its number for b0..b7, 11..13 for v2_s/m/l."""
    return int(variant[1]) if variant.startswith("b") else 11 + ["v2_s", "v2_m", "v2_l"].index(variant)


def randomized_torchvision(variant: str, seed: int, x_nhwc: np.ndarray, num_classes: int = 1000):
    """torchvision's model (`efficientnet_<variant>`) with random weights and randomized BN running statistics
    (`randomize_batchnorm`)."""
    import torch
    from torchvision import models as tv_models

    torch.manual_seed(seed)
    m = getattr(tv_models, f"efficientnet_{variant}")(num_classes=num_classes).eval()
    return randomize_batchnorm(m, seed, x_nhwc, m.classifier[1])


def randomized_timm(architecture: str, seed: int, x_nhwc: np.ndarray, num_classes: int = 1000):
    """timm's model (`timm.create_model(architecture)`, dropout and drop-path off) with random weights and
    randomized BN running statistics (`randomize_batchnorm`)."""
    import timm
    import torch

    torch.manual_seed(seed)
    m = timm.create_model(architecture, num_classes=num_classes, drop_rate=0.0, drop_path_rate=0.0).eval()
    return randomize_batchnorm(m, seed, x_nhwc, m.classifier)


def randomize_batchnorm(m, seed: int, x_nhwc: np.ndarray, classifier):
    """`m` (a torch module in eval mode) with random BN scales and biases, a random `classifier` bias, and BN running
    statistics set from the data.

    Each BN's running mean/var are set, in forward order, to the statistics of its actual input on `x_nhwc`
    perturbed by 0.1 std in mean and a factor in [0.75, 1.25] in variance. Setting them in order, each on the
    already perturbed upstream network, keeps activations O(1) through all 55 blocks of B7 even at 64 px (statistics set
    independently compound into 1e7-sized activations where float32 rounding no longer compares), while
    eval mode still differs from batch statistics, so a mix-up of the two is caught."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)

    def calibrate(mod, inputs):
        x = inputs[0]
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        mod.running_mean.copy_(mean + 0.1 * var.sqrt() * torch.randn(mean.shape, generator=g))
        mod.running_var.copy_(var * (0.75 + 0.5 * torch.rand(var.shape, generator=g)))

    with torch.no_grad():
        bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
        for mod in bns:
            mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
            mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
        hooks = [mod.register_forward_pre_hook(calibrate) for mod in bns]
        m(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous())
        for h in hooks:
            h.remove()
        classifier.bias.copy_(torch.randn(classifier.bias.shape, generator=g) * 0.1)
    return m


def torch_stage_outputs(m, x_nchw) -> tuple[list[np.ndarray], np.ndarray]:
    """Outputs of features[0] (stem), features[1..S] (stages), features[S+1] (head) and the logits."""
    import torch

    outs = []
    hooks = [f.register_forward_hook(lambda mod, i, o: outs.append(o.detach().numpy())) for f in m.features]
    with torch.no_grad():
        logits = m(x_nchw).numpy()
    for h in hooks:
        h.remove()
    return outs, logits


def save_and_convert(m, tmp_path: pathlib.Path, variant: str, num_classes: int | None = None, **kw) -> dict[str, Any]:
    """`m`'s state dict saved with `torch.save(..., **kw)` as tmp_path/<variant>.pth, read back and converted
    (`convert.convert_state_dict`): this library's variables of the same weights."""
    import torch

    path = tmp_path / f"{variant}.pth"
    torch.save(m.state_dict(), path, **kw)
    return convert.convert_state_dict(read_torch_state_dict(path), variant, num_classes, source=str(path))


def jax_stage_outputs(model, variables, x_nhwc) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """(stem, stage and head outputs, logits, their names) of `model` on `x_nhwc`, from its sown intermediates;
    the outputs in the order of `torch_stage_outputs`."""
    # compiled: op by op, B6/B7 spent most of a minute dispatching and compiling single operations
    logits, state = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))(variables, jnp.asarray(x_nhwc))
    inter = state["intermediates"]
    names = ["stem_out"] + [f"stage{s}" for s in range(model.config.num_stages)] + ["head_out"]
    return [np.asarray(inter[n][0]) for n in names], np.asarray(logits), names
