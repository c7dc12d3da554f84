"""`effnet-evaluate --workdir RUN`: a run's checkpoint on a dataset split, per class and overall.

The data's classes are matched to the run's by name; with the run's own dataset and `--split val` it recomputes
the validation numbers the run logged. Options and examples: docs/training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np

from effnet_jax.errors import UserError, cli


def evaluate_run(workdir: str | pathlib.Path, dataset: str | None = None, data_dir: str | None = None,
                 split: str = "val", which: str = "best", batch_size: int | None = None,
                 flip: bool | None = None, stream: bool | None = None, resolution: int | None = None) -> dict:
    """`flip`: average each image's and its mirror's logits; None: as the run's validation did (`eval_flip`).
    `stream`: read the images as it goes instead of loading the split (None: as the run's --stream says).
    `resolution`: the input side (None: the run's `--resolution`, the side its checkpoints/best was validated at)."""
    from effnet_jax.loader import load
    from effnet_jax.train.build import load_data
    from effnet_jax.train.mesh import Mesh
    from effnet_jax.train.rundir import existing_run
    from effnet_jax.train.steps import evaluate, jit_eval_step

    run = load(existing_run(workdir).path, which=which)
    cfg, run_classes, meta = run.run.train_config, run.class_names, run.run.meta
    if dataset is not None:
        cfg = dataclasses.replace(cfg, dataset=dataset, data_dir=data_dir)
    elif data_dir is not None:
        cfg = dataclasses.replace(cfg, data_dir=data_dir)
    if stream is not None:
        cfg = dataclasses.replace(cfg, stream=stream)
    if resolution is not None:
        cfg = dataclasses.replace(cfg, resolution=resolution)   # checked in TrainConfig.__post_init__
    ds = load_data(dataclasses.replace(cfg, max_train_examples=None))
    chosen = {"val": ds.val, "test": ds.test, "train": ds.train}.get(split)
    if chosen is None:
        raise UserError(f"{cfg.dataset}: no {split!r} split" + (" (the data has no test split; use --split val)"
                                                                if split == "test" else ""))
    missing = [c for c in ds.class_names if c not in run_classes]
    if missing:
        raise UserError(f"classes {missing[:5]} of the evaluated data are not among the run's {len(run_classes)} "
                        "classes")
    to_run = np.asarray([run_classes.index(c) for c in ds.class_names], np.int32)
    labels = to_run[chosen.labels]

    transform = cfg.eval_transform()
    mesh = Mesh()
    streamed = chosen.streamed
    if streamed:  # read as it goes
        split_data = dataclasses.replace(chosen, labels=labels)
    else:
        split_data = mesh.replicate((jnp.asarray(chosen.images), jnp.asarray(labels)))
    flip = cfg.eval_flip if flip is None else flip
    eval_fn = jit_eval_step(run.model, transform, flip, streamed)
    res = evaluate(mesh.replicate(run.variables), split_data, len(chosen), eval_fn, mesh,
                   batch_size or cfg.eval_batch_size, return_logits=True)
    pred = res.pop("logits").argmax(-1)
    per_class = {run_classes[c]: float(np.mean(pred[labels == c] == c)) for c in np.unique(labels)}
    return {"per_class": per_class, "top1": res["top1"], "top5": res["top5"], "loss": res["loss"], "n": res["n"],
            "epoch": meta.get("epoch"), "split": split, "which": which,
            "flip": bool(flip), "resolution": transform.input_size}


@cli
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="effnet-evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="the training run's directory")
    p.add_argument("--dataset", default=None, help="dataset spec (default: the run's)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="val", choices=("val", "test", "train"))
    p.add_argument("--which", default="best", choices=("best", "latest"))
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time augmentation: average each image's and its mirror's logits (default: as the "
                        "run's validation, its --eval-flip)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="read the images as evaluation goes instead of loading the split into memory (default: as "
                        "the run, its --stream)")
    p.add_argument("--resolution", type=int, default=None,
                   help="input side to evaluate at (default: the run's --resolution)")
    args = p.parse_args(argv)
    out = evaluate_run(args.workdir, args.dataset, args.data_dir, args.split, args.which, args.batch_size,
                       args.flip, args.stream, args.resolution)
    width = max(len(c) for c in out["per_class"])
    for name, acc in out["per_class"].items():
        print(f"{name:<{width}}  {100 * acc:6.2f} %")
    summary = {k: out[k] for k in ("top1", "top5", "loss", "n", "epoch", "split", "which", "flip", "resolution")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
