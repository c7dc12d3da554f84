#!/usr/bin/env python3
"""Fine-tune an (ImageNet-pretrained) EfficientNet:  python train.py --variant b0 --dataset cifar10 --init imagenet

Flags are the fields of `effnet_jax.train.TrainConfig`; `--preset notebook` starts from the reference
torchvision notebook's recipe (32 px, Adam 1e-3 constant, batch 64, 25 epochs) and later flags override it.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys

from effnet_jax.errors import cli

HELP = {
    "variant": "b0..b7, lite0..lite4, v2_s, v2_m, v2_l",
    "dataset": "tfds name (cifar10, cifar100, svhn_cropped, tf_flowers, ...) or folder:PATH",
    "data_dir": "tfds data dir, or the CIFAR python tarball / an image folder or .tar.gz",
    "init": "imagenet | scratch | PATH.pth | RUN_DIR (a previous run or a converted model directory)",
    "workdir": "where config, metrics.jsonl, curves.png and checkpoints go", "batch_size": "global batch size",
    "freeze": "none | head-only | N (train only the top N blocks + head); default: 8 with pretrained weights, "
    "none from scratch",
    "two_phase": "first --phase1-epochs head-only, then --freeze at lr * --phase2-lr-scale",
    "resolution": "input side after augmentation (32 px CIFAR images are resized to it)",
    "resolution_schedule": "progressive resizing: SIDE:EPOCHS[,...] trains the first epochs at smaller sides "
    "(e.g. 64:2), the rest at --resolution",
    "schedule": "cosine (warmup + cosine decay to 0) | constant", "ema_decay": "parameter EMA, 0 = off",
    "max_train_examples": "use only N training examples, a seeded random subset (smoke tests, quick looks)",
    "val_fraction": "seeded, stratified validation split of the training data",
    "width": "custom compound scaling: replaces the variant's width coefficient (channels, rounded to 8) in a "
    "network built from scratch; --init scratch only", "depth": "custom compound scaling: replaces the "
    "variant's depth coefficient (block repeats, rounded up); --init scratch only",
    "stream": "read the images from the source as training goes (grain threads decode the next batches) instead of "
    "holding the decoded dataset in memory and on the device: for datasets larger than memory; a tfds name or an "
    "image folder (a directory); same results as without. Default: streamed when the decoded images would take "
    "more than 4 GiB",
    "input_mean": "input normalization R,G,B for pixels in [0, 1], e.g. 0.4914,0.4822,0.4465; default: the init "
    "weights' (ImageNet's for B0-B7 and V2-S/M, 0.5 for V2-L, 0.498 for Lite)",
    "input_std": "as --input-mean, e.g. 0.247,0.243,0.261",
    "resume": "continue the run in --workdir (the same flags) from its newest checkpoint that reads back",
    "overwrite": "when --workdir holds a run, move it aside to WORKDIR.old-<UTC time> and start afresh (without it, "
    "a --workdir holding a run is refused)",
    "eval_flip": "test-time augmentation for the validation numbers: average each image's and its mirror's "
    "logits (one more forward pass per image)",
}


LAUNCH = ("coordinator_address", "num_processes", "process_id")


def parse(argv=None):
    """(TrainConfig, the jax.distributed arguments)."""
    from effnet_jax.train import PRESETS, TrainConfig
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named recipe")
    launch = p.add_argument_group("several processes (jax.distributed; without these flags JAX auto-detects "
                                  "SLURM / Open MPI / TPU pod launches, else one process)")
    launch.add_argument("--coordinator-address", metavar="HOST:PORT", help="process 0's address, the same for all")
    launch.add_argument("--num-processes", type=int, metavar="N")
    launch.add_argument("--process-id", type=int, metavar="I", help="0..N-1")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool", "bool | None"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP.get(f.name))
        else:
            typ = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
            p.add_argument(flag, type=typ, default=None, metavar=f.name.upper(),
                           help=f"{HELP.get(f.name, '')} (default: {f.default})".strip())
    args = vars(p.parse_args(argv))
    preset = args.pop("preset")
    launch = {k: args.pop(k) for k in LAUNCH}
    values = dict(PRESETS[preset]) if preset else {}
    values.update({k: v for k, v in args.items() if v is not None})
    return TrainConfig(**values), launch


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
    from effnet_jax.mesh import initialize_distributed
    from effnet_jax.stopping import Interrupted, StoppedBeforeTraining
    from effnet_jax.train import train_and_evaluate
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


if __name__ == "__main__":
    from effnet_jax.host import with_fast_malloc
    with_fast_malloc()  # restarts once with huge-page malloc: effnet_jax/host.py
    sys.exit(main(exit_at_once=True))
