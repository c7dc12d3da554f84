"""Top-k predictions of an EfficientNet for image files, one JSON object per line.

    python -m effnet_jax.predict (--variant lite0 --init imagenet | --workdir RUN_DIR [--which best|latest])
        IMG_OR_DIR [...] [--topk 5] [--batch-size 32] [--output FILE] [--[no-]progress]

prints for every image `{"image": path, "top5": [{"class": name, "index": i, "prob": p}, ...]}` (the key is
`top<K>` for `--topk K`, probabilities sorted descending).

`--init` chooses the weights:

* `imagenet` — the published ImageNet weights of `--variant` (`effnet_jax.pretrained`), ImageNet class names;
* `PATH.pth` — a PyTorch EfficientNet state dict (torchvision or lukemelas/Lite layout, read without torch) for
  `--variant`; a lukemelas-layout B file gets its TF-style model overrides (`convert.layout_overrides`). Class
  names are ImageNet's when the file has 1000 classes, else `class_<i>`;
* `DIR` — a model directory written by `python -m effnet_jax.convert` (or training), read with
  `effnet_jax.checkpoint.load_model`; the variant comes from its `model.json` (`--variant` is then optional and
  must agree), class names from its `class_names`, else ImageNet's for 1000 classes, else `class_<i>`.

`--workdir RUN_DIR` uses a training run (`effnet_jax.train`): its best (or `--which latest`) checkpoint, the EMA
weights when the run kept an EMA (as its evaluation does; `effnet_jax.loader.load`), the class names of its
`class_names.json`, and its evaluation preprocessing (`effnet_jax.preprocess.run_preprocess_config`, the transform
that `export --workdir` writes into its metadata): the RGB image as the data loader stores it (kept as is when
square, else shorter side resized to 256 and center-cropped, as for a folder of mixed sizes), then
`effnet_jax.data.eval_batch` (bilinear resize to the run's resolution, the run's mean/std) — so a validation
image gets the logits that `python -m effnet_jax.evaluate` computes for it.

A progress bar (tqdm) goes to stderr when it is a terminal and there is more than one batch; `--progress` forces
it on, `--no-progress` off.

Otherwise images are preprocessed with the variant's ImageNet eval transform (`effnet_jax.preprocess.eval_transform`) and
run in batches of `--batch-size` through one jitted function (the last batch is padded, so it compiles once).
Arguments may be folders: all image files below them (the extensions training reads, `data.IMAGE_EXTENSIONS`:
.jpg/.jpeg/.png/.ppm/.bmp/.pgm/.tif/.tiff/.webp), recursively, in sorted order. An
image inside a folder that cannot be read gets `{"image": path, "error": "..."}` and the run goes on; a missing
or unreadable image named on the command line, or an `--init` that cannot be loaded, is an error: one message on
stderr and exit status 2.

This module does not import torch.
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

from .data.image import IMAGE_EXTENSIONS
from .errors import UserError, cli, describe
from .loader import Loaded, load


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
    from .rundir import existing_run
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
    from tqdm import tqdm

    import jax

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
    p = argparse.ArgumentParser(prog="python -m effnet_jax.predict", description=(
        "Top-k class predictions of an EfficientNet for images (files or folders), as JSON lines."))
    p.add_argument("images", nargs="+", metavar="IMG", help="image files or folders (searched recursively)")
    p.add_argument("--variant", default=None,
                   help="b0..b7, lite0..lite4, v2_s, v2_m, v2_l (from model.json for --init DIR)")
    p.add_argument("--init", default=None,
                   help="'imagenet' (default), a PyTorch .pth file, or a model directory from effnet_jax.convert")
    p.add_argument("--workdir", default=None,
                   help="a training run directory (effnet_jax.train) instead of --init: its weights, classes and "
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
