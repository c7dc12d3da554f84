#!/usr/bin/env python3
"""Fine-tune an (ImageNet-pretrained) EfficientNet: the same command as `effnet-train` (effnet_jax/cli/train.py).

    python train.py --variant b0 --dataset cifar10 --init imagenet
"""

import sys

from effnet_jax.cli.train import command, main, parse, parse_args  # noqa: F401 (the command line's API)

if __name__ == "__main__":
    sys.exit(command())
