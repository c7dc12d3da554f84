"""`effnet-convert SRC.pth --variant V --out DIR`: a PyTorch EfficientNet file as a model directory.

The file is read through `effnet_jax.load` (torchvision or lukemelas/Lite layout, without torch); the directory
(`effnet_jax.weights.model_dir`) then loads with `--init DIR` everywhere.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from effnet_jax.errors import UserError, cli
from effnet_jax.loader import load
from effnet_jax.model import variants
from effnet_jax.weights import model_dir


@cli
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="effnet-convert", description=(
        "Convert a PyTorch EfficientNet .pth (torchvision or lukemelas/Lite layout) into an effnet_jax "
        "model directory."))
    p.add_argument("src", help="the .pth file")
    p.add_argument("--variant", required=True, choices=variants.VARIANTS)
    p.add_argument("--out", required=True, help="output directory (created; must not hold a checkpoint)")
    p.add_argument("--num-classes", type=int, default=None, help="new head size (default: keep the file's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not os.path.isfile(args.src):
        raise UserError(f"{args.src}: no such file")
    loaded = load(args.src, args.variant, args.num_classes)
    classes = loaded.model.num_classes
    try:
        model_dir.save_model(args.out, loaded.variables, {
            "variant": args.variant, "num_classes": int(classes), "overrides": loaded.overrides,
            "source": os.path.abspath(args.src), "layout": loaded.layout,
            "preprocess": loaded.preprocess.to_dict()})
    except OSError as e:  # an existing checkpoint, an unwritable directory
        raise UserError(str(e)) from None
    print(f"wrote {args.variant} ({classes} classes, {loaded.layout} layout) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
