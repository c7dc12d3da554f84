"""`effnet-train` (= `python train.py`): fine-tune an (ImageNet-pretrained) EfficientNet.

    effnet-train --variant b0 --dataset cifar10 --init imagenet

Flags are the fields of `effnet_jax.train.config.TrainConfig` (the augmentation's among them); `--preset
notebook` starts from the reference torchvision notebook's recipe (32 px, Adam 1e-3 constant, batch 64, 25
epochs) and later flags override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from effnet_jax.errors import cli

LAUNCH = ("coordinator_address", "num_processes", "process_id")


def _flag_fields():
    """The config's fields as flags: TrainConfig's, with `augment` replaced by AugmentConfig's own."""
    from effnet_jax.data.augment import AugmentConfig
    from effnet_jax.train.config import TrainConfig
    for f in dataclasses.fields(TrainConfig):
        if f.name == "augment":
            yield from ((a, a.default) for a in dataclasses.fields(AugmentConfig))
        else:
            yield f, f.default


def parse(argv=None):
    """(TrainConfig, the jax.distributed arguments)."""
    from effnet_jax.train.config import PRESETS, TrainConfig
    p = argparse.ArgumentParser(prog="effnet-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named recipe")
    launch = p.add_argument_group("several processes (jax.distributed; without these flags JAX auto-detects "
                                  "SLURM / Open MPI / TPU pod launches, else one process)")
    launch.add_argument("--coordinator-address", metavar="HOST:PORT", help="process 0's address, the same for all")
    launch.add_argument("--num-processes", type=int, metavar="N")
    launch.add_argument("--process-id", type=int, metavar="I", help="0..N-1")
    for f, default in _flag_fields():
        flag, help_text = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        if f.type in (bool, "bool", "bool | None"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text or None)
        else:
            typ = f.metadata.get("flag_type") or {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
            shown = ",".join(f"{v:g}" for v in default) if isinstance(default, tuple) else default
            p.add_argument(flag, type=typ, default=None, metavar=f.name.upper(),
                           help=f"{help_text} (default: {shown})".strip())
    args = vars(p.parse_args(argv))
    preset = args.pop("preset")
    launch = {k: args.pop(k) for k in LAUNCH}
    values = dict(PRESETS[preset]) if preset else {}
    values.update({k: v for k, v in args.items() if v is not None})
    # a Hub repo, a timm checkpoint or a Keras file names its variant and normalization: the defaults of both
    from effnet_jax.loader import init_defaults
    for k, v in init_defaults(values.get("init", TrainConfig.init), values.get("variant")).items():
        values.setdefault(k, v)
    return TrainConfig.from_flat(values), launch


def parse_args(argv=None):
    return parse(argv)[0]


@cli
def main(argv=None, exit_at_once: bool = False) -> int:
    """Train; returns the exit status. `exit_at_once` (the command line): a signal before the first training step
    ends the process with `os._exit` after its message, so that neither a worker thread still retrying a download
    nor jax.distributed's shutdown barrier (which waits for the other processes) holds it. A user error (a flag,
    a path, the network: `effnet_jax.errors.UserError`) prints as one line with exit status 2 (`cli`); any other
    exception shows its traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("effnet_jax").setLevel(logging.INFO)
    from effnet_jax.train.loop import train_and_evaluate
    from effnet_jax.train.mesh import initialize_distributed
    from effnet_jax.train.stopping import Interrupted, StoppedBeforeTraining
    cfg, launch = parse(argv)
    try:
        initialize_distributed(**launch)
        summary = train_and_evaluate(cfg)
    except StoppedBeforeTraining as e:  # SIGTERM / SIGINT while loading: nothing to save
        print(f"stopped: {e}", file=sys.stderr)
        if exit_at_once:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.exit_code)
        return e.exit_code
    except Interrupted as e:  # SIGTERM / SIGINT: checkpoint saved
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(summary))
    return 0


def command() -> int:
    """The installed command and `python train.py`: the huge-page malloc restart (`cli.host`), then `main`."""
    from effnet_jax.cli.host import with_fast_malloc
    with_fast_malloc()
    return main(exit_at_once=True)


if __name__ == "__main__":
    sys.exit(command())
