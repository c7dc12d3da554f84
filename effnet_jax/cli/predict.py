"""`effnet-predict IMG_OR_DIR ...`: top-k predictions for image files, one JSON object per line.

The weights come through `effnet_jax.load` (`--init` imagenet, a .pth, a model directory; or `--workdir` a run)
with their class names and their preprocessing (`EvalTransform`), so a run's validation image gets the logits
`effnet-evaluate` computes for it. Options, output and errors: docs/export.md. Does not import torch.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import pathlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TextIO

import numpy as np

from effnet_jax.data.image import IMAGE_EXTENSIONS
from effnet_jax.errors import UserError, cli, describe
from effnet_jax.loader import Loaded, load


@dataclasses.dataclass(frozen=True)
class ImageItem:
    path: str
    in_folder: bool  # found by walking a folder argument: read errors are reported per image, not fatal


# ---------------------------------------------------------------------------------------------------- inputs

def collect_images(args: Sequence[str]) -> list[ImageItem]:
    """Expand the command-line arguments: files as given, folders into their image files (recursive, sorted)."""
    items: list[ImageItem] = []
    for arg in args:
        p = pathlib.Path(arg)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
            if not found:
                raise UserError(f"{arg}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
            items += [ImageItem(str(f), True) for f in found]
        elif p.is_file():
            items.append(ImageItem(arg, False))
        elif p.exists():
            raise UserError(f"{arg}: not a regular file or folder")
        else:
            raise UserError(f"{arg}: no such file or folder")
    if not items:
        raise UserError("no images given")
    return items


def _check_readable(item: ImageItem) -> None:
    """Cheap early check of a file named on the command line (header only), before the model is loaded."""
    from PIL import Image
    try:
        with Image.open(item.path) as im:
            im.size  # noqa: B018
    except Exception as e:  # noqa: BLE001 — PIL raises many types for bad files
        raise UserError(f"{item.path}: cannot read image: {describe(e)}") from None


def _load(item: ImageItem, transform: Callable) -> np.ndarray | str:
    """The preprocessed array of one image, or the error message when it cannot be read."""
    from PIL import Image
    try:
        with Image.open(item.path) as im:
            return np.asarray(transform(im), np.float32)
    except Exception as e:  # noqa: BLE001
        return f"cannot read image: {describe(e)}"


# ---------------------------------------------------------------------------------------------------- model

def load_run(workdir: str, which: str = "best", variant: str | None = None) -> Loaded:
    """A training run's evaluation weights (the EMA when kept), class names and eval preprocessing."""
    from effnet_jax.train.rundir import existing_run
    return load(existing_run(workdir).path, variant, which=which)


def make_eval_fn(model, k: int):
    """One jitted function (variables, images) -> (top-k probabilities, top-k indices), sorted descending."""
    import jax

    @jax.jit
    def top_k(variables, x):
        logits = model.apply(variables, x, train=False).astype("float32")
        return jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)

    return top_k


# ---------------------------------------------------------------------------------------------------- run

def _batches(items: list[ImageItem], size: int) -> Iterator[list[ImageItem]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def predict(pred: Loaded, items: list[ImageItem], out: TextIO, topk: int = 5, batch_size: int = 32,
            progress: bool | None = None) -> int:
    """Write one JSON line per image to `out`. Returns the number of images that could not be read (in folders).
    Raises `UserError` for an unreadable image named directly. `progress`: None shows a tqdm bar on stderr
    when it is a terminal and there is more than one batch."""
    import jax
    from tqdm import tqdm

    k = min(topk, len(pred.class_names))
    key = f"top{k}"
    eval_fn = make_eval_fn(pred.model, k)
    variables = jax.device_put(pred.variables)
    size = pred.preprocess.input_size
    batches = list(_batches(items, batch_size))
    failed = 0
    if progress is None:
        progress = len(batches) > 1 and sys.stderr.isatty()
    show = bool(progress)

    def prepare(batch: list[ImageItem]) -> list[np.ndarray | str]:
        return [_load(it, pred.preprocess) for it in batch]

    # decode/resize the next batch on a thread while the current one runs (PIL and XLA release the GIL)
    with concurrent.futures.ThreadPoolExecutor(1) as pool, \
            tqdm(total=len(items), unit="img", file=sys.stderr, disable=not show) as bar:
        pending = pool.submit(prepare, batches[0])
        for bi, batch in enumerate(batches):
            arrays = pending.result()
            if bi + 1 < len(batches):
                pending = pool.submit(prepare, batches[bi + 1])
            good = [a for a in arrays if not isinstance(a, str)]
            if good:
                x = np.zeros((batch_size,) + (good[0].shape if size is None else (size, size, 3)), np.float32)
                x[:len(good)] = np.stack(good)
                probs, idx = (np.asarray(a) for a in eval_fn(variables, x))
            j = 0
            for item, a in zip(batch, arrays):
                if isinstance(a, str):
                    if not item.in_folder:
                        raise UserError(f"{item.path}: {a}")
                    failed += 1
                    record = {"image": item.path, "error": a}
                else:
                    record = {"image": item.path, key: [
                        {"class": pred.class_names[int(c)], "index": int(c), "prob": float(p)}
                        for p, c in zip(probs[j], idx[j])]}
                    j += 1
                out.write(json.dumps(record) + "\n")
            out.flush()
            bar.update(len(batch))
    return failed


@cli
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="effnet-predict", description=(
        "Top-k class predictions of an EfficientNet for images (files or folders), as JSON lines."))
    p.add_argument("images", nargs="+", metavar="IMG", help="image files or folders (searched recursively)")
    p.add_argument("--variant", default=None,
                   help="b0..b7, lite0..lite4, v2_s, v2_m, v2_l, v2_b0..v2_b3 (not needed when --init names it: a "
                        "directory, a Hub repo, a .keras file)")
    p.add_argument("--init", default=None,
                   help="'imagenet' (default), hf-hub:timm/NAME, a .pth, .safetensors, .keras or .weights.h5 file, "
                        "a model directory from effnet-convert, or a timm directory")
    p.add_argument("--workdir", default=None,
                   help="a training run directory (effnet-train) instead of --init: its weights, classes and "
                        "eval preprocessing")
    p.add_argument("--which", default="best", choices=("best", "latest"), help="the run's checkpoint (--workdir)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bar on stderr (default: when stderr is a terminal and there are several "
                        "batches)")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--batch-size", type=int, default=32, help="images per jitted batch (default 32)")
    p.add_argument("--output", default=None, help="write the JSON lines to this file instead of stdout")
    args = p.parse_args(argv)
    if args.topk < 1:
        raise UserError(f"--topk must be >= 1, got {args.topk}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    items = collect_images(args.images)
    for item in items:
        if not item.in_folder:
            _check_readable(item)
    if args.workdir is not None:
        if args.init is not None:
            raise UserError("--workdir excludes --init")
        pred = load_run(args.workdir, args.which, args.variant)
    else:
        pred = load(args.init or "imagenet", args.variant)
    progress = args.progress
    if args.output is not None:
        try:
            out = open(args.output, "w", encoding="utf-8")
        except OSError as e:
            raise UserError(f"--output {args.output}: {e.strerror or e}") from None
        with out:
            failed = predict(pred, items, out, args.topk, args.batch_size, progress)
    else:
        failed = predict(pred, items, sys.stdout, args.topk, args.batch_size, progress)
    if failed:
        print(f"warning: {failed} of {len(items)} images could not be read (see their \"error\" lines)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
