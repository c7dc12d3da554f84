"""How each unit is computed: the planner (`planner`: every choice of form, from unit, mode, backend, dtype and
machine), its measurements on this machine (`autotune`: the cached plan), and `python -m effnet_jax.kernels plan`,
which prints a model's plan with the timings behind it. The C++ kernels themselves are `effnet_jax.kernels.native`."""

from effnet_jax.kernels import autotune, planner
from effnet_jax.kernels.planner import (
                                        CONV_IMPLS,
                                        DEPTHWISE_IMPLS,
                                        FUSED_EXPANSION_MIN_WIDTH,
                                        LOOP_MIN_ELEMENTS,
                                        PATCH_DOT_MAX_DEPTH,
                                        POINTWISE_SUM_MAX_DEPTH,
                                        block_depthwise_form,
                                        conv_form,
                                        fuses_expansion,
                                        fuses_stem,
                                        resolve_conv_impl,
                                        resolve_depthwise_impl,
)

__all__ = ["autotune", "planner", "CONV_IMPLS", "DEPTHWISE_IMPLS", "FUSED_EXPANSION_MIN_WIDTH", "LOOP_MIN_ELEMENTS",
           "PATCH_DOT_MAX_DEPTH", "POINTWISE_SUM_MAX_DEPTH", "block_depthwise_form", "conv_form", "fuses_expansion",
           "fuses_stem", "resolve_conv_impl", "resolve_depthwise_impl"]
