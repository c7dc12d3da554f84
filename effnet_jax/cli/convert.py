"""`effnet-convert SRC --variant V --out DIR`: an EfficientNet weight file as a model directory.

SRC is read through `effnet_jax.load`: a PyTorch .pth (torchvision, lukemelas/Lite or timm layout, without torch), a
timm checkpoint (`hf-hub:timm/NAME`, a timm directory or `.safetensors`) or a Keras `.keras` / `.weights.h5` file;
`--variant` is needed only where SRC does not name it. The directory (`effnet_jax.weights.model_dir`) then loads with
`--init DIR` everywhere.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from effnet_jax.errors import UserError, cli
from effnet_jax.loader import load, names_its_variant
from effnet_jax.weights.timm_checkpoint import HUB_PREFIX
from effnet_jax.model import variants
from effnet_jax.weights import model_dir


@cli
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="effnet-convert", description=(
        "Convert an EfficientNet weight file (PyTorch .pth, timm checkpoint, Keras file) into an effnet_jax "
        "model directory."))
    p.add_argument("src", help="a .pth, .safetensors, .keras or .weights.h5 file, a timm directory, or "
                               "hf-hub:timm/NAME")
    p.add_argument("--variant", default=None, choices=variants.VARIANTS,
                   help="required where SRC does not name it (.pth, .weights.h5)")
    p.add_argument("--out", required=True, help="output directory (created; must not hold a checkpoint)")
    p.add_argument("--num-classes", type=int, default=None, help="new head size (default: keep the file's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hub = args.src.startswith(HUB_PREFIX)
    if not hub and not os.path.exists(args.src):
        raise UserError(f"{args.src}: no such file")
    if args.variant is None and not names_its_variant(args.src):
        raise UserError(f"--variant is required: {args.src} does not say which EfficientNet it holds")
    loaded = load(args.src, args.variant, args.num_classes)
    classes = loaded.model.num_classes
    try:
        model_dir.save_model(args.out, loaded.variables, {
            "variant": loaded.variant, "num_classes": int(classes), "overrides": loaded.overrides,
            "source": args.src if hub else os.path.abspath(args.src), "layout": loaded.layout,
            "class_names": list(loaded.class_names), "preprocess": loaded.preprocess.to_dict()})
    except OSError as e:  # an existing checkpoint, an unwritable directory
        raise UserError(str(e)) from None
    print(f"wrote {loaded.variant} ({classes} classes, {loaded.layout} layout) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
