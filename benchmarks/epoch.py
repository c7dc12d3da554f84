#!/usr/bin/env python3
"""Wall time of one CIFAR-10 fine-tune epoch, end to end: our trainer's own loop against a plain PyTorch loop
like the reference notebook's, side by side on the same images.

Both sides train on the same decoded uint8 training split (`effnet_jax.data.load_dataset`, 45,000 images
of CIFAR-10 after the seeded validation split; loading/decoding is shared and reported apart as
`data_load_s`), random initial weights (timing does not depend on them), the notebook's optimization (Adam
1e-3 constant, no label smoothing, batch 64, crop pad 4 + flip) and the same trainable parameters.

* JAX (`train.py`'s path, run by the trainer's own functions rather than a copy of them): the `notebook`
  preset `TrainConfig` (a temporary `--workdir`), `effnet_jax.train.loop.setup` (the data, the initial
  weights, the optimizer, the split on the device), `resume_or_begin` (the train state; its accuracy before
  fine-tuning is not timed), then `train_epoch` for epoch 1: per step the host index batch, the on-device
  gather + augmentation (+ resize to `--resolution`) + step (state donated), the metric sums, every 10 steps a
  read of the metrics, the stop check. Epoch-end validation, checkpoints and plots (`end_epoch`) are left out.
  The step is compiled by a warm-up `train_epoch` over the epoch's last two batches on a copy of the state
  (reported apart as `jax_compile_s`), so the timed epoch runs the compiled step (`trainer.step_fns`).
  `jax_epoch_s` = putting the whole training split on the device (`jax_transfer_s`: once per run in the
  trainer, so it is timed once and never scaled) + the timed `train_epoch` (`jax_loop_s`). The trainer runs on
  every device of JAX's default backend, which must be `--device-kind`'s (`JAX_PLATFORMS=cpu` for a CPU run on
  a GPU machine); `jax_devices` says how many.
* PyTorch (the notebook's loop): a Dataset over the same uint8 array returning `PIL.Image`s, as
  torchvision's CIFAR10 does, with `RandomCrop(32, padding=4)`, `RandomHorizontalFlip()`, `Resize(R)` when
  R != 32, `ToTensor()`, `Normalize(ImageNet mean/std)`; `DataLoader(batch_size, shuffle=True,
  num_workers=W, drop_last=True)` (drop_last as the JAX side; `--workers` may be a comma list, each timed);
  torchvision `efficientnet_bX(weights=None, num_classes=10)` (`common.torch_model`); `Adam(lr=1e-3)`; per
  batch zero_grad, forward, CrossEntropyLoss, backward, step, `running_loss += loss.item()`. `torch_epoch_s` =
  the whole loop, DataLoader worker start-up included; the fastest `--workers` setting is the one compared.
* `--freeze N|head-only` (default none: the notebook trains all layers): the JAX optimizer freezes as the
  trainer does (frozen parameters unchanged, their BatchNorm in inference mode); the torch side sets
  requires_grad=False on the same units (stem, blocks, head conv; `common.torch_freeze`) and keeps their
  BatchNorm in eval mode, so both skip the same backward work.

`--max-examples N` trains on the trainer's own seeded random subset of N training images
(`--max-train-examples`; the same images on both sides) and scales the step loops to the full split: JAX
`jax_transfer_s + jax_loop_s * full / N`, torch its whole measured loop * full / N (DataLoader worker
start-up included, so with `--workers` > 0 that start-up is scaled too) (`n_examples` measured,
`full_epoch_examples`, `extrapolated: true`; the compile time is not scaled). The torch side uses one device
of `--device-kind`. The last stdout line is JSON with `jax_epoch_s`, `torch_epoch_s`, `ratio` (torch / jax:
the speedup), `n_examples`, `extrapolated`.

    python benchmarks/epoch.py --data-dir ../shared/data/cifar10-jpeg-train.tar.gz            # a full epoch, 32 px
    python benchmarks/epoch.py --data-dir ../shared/data/cifar10-jpeg-train.tar.gz --max-examples 3200 --workers 0,2
    python benchmarks/epoch.py --variant b0 --resolution 128 --freeze 8 --max-examples 3200  # our recipe's shape
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import cpu_threads, device_kind, log, torch_freeze, torch_model
from effnet_jax import data as data_lib
from effnet_jax.cli.host import with_fast_malloc
from effnet_jax.train import loop
from effnet_jax.train.config import PRESETS, TrainConfig
from effnet_jax.train.stopping import StopRequest

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg-train.tar.gz"


def jax_epoch(cfg: TrainConfig, full_split) -> dict:
    """Epoch 1 of the trainer on `cfg` (`loop.setup`, `loop.resume_or_begin`, a warm-up, then the timed
    `loop.train_epoch`), and the time to put `full_split`, the whole training split, on its devices."""
    trainer = loop.setup(cfg)
    state, epoch, first, sums = loop.resume_or_begin(trainer)  # (a fresh run: epoch 1 from batch 0)
    t = time.perf_counter()  # what setup does with the training split, for the whole split
    jax.block_until_ready(trainer.mesh.replicate((jnp.asarray(full_split.images), jnp.asarray(full_split.labels))))
    transfer_s = time.perf_counter() - t
    stop = StopRequest()  # (its signal handlers not installed: Ctrl-C stops the benchmark at once)
    latest, best = trainer.dir.managers()
    with latest, best:
        t = time.perf_counter()  # the last two batches: the step compiles, then runs on a state it made itself
        warm = jax.tree.map(jnp.copy, state)  # (the step donates its state)
        jax.block_until_ready(loop.train_epoch(trainer, warm, epoch, max(0, trainer.steps_per_epoch - 2),
                                               loop.zero_sums(trainer), stop, latest)[:2])
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        state, sums, _, _ = loop.train_epoch(trainer, state, epoch, first, sums, stop, latest)
        sums = jax.device_get(sums)
        loop_s = time.perf_counter() - t
    (frozen_units, _), = trainer.step_fns  # the epoch's compiled step, by (frozen units, input side)
    return {"epoch_s": transfer_s + loop_s, "transfer_s": transfer_s, "loop_s": loop_s, "compile_s": compile_s,
            "examples": trainer.steps_per_epoch * cfg.batch_size, "train_loss": float(sums["loss"] / sums["count"]),
            "frozen_units": frozen_units, "devices": trainer.mesh.size, "train": trainer.ds.train}


def torch_epoch(args, images: np.ndarray, labels: np.ndarray, num_classes: int, frozen_units: int,
                mean, std, workers: int, device: str) -> dict:
    """One epoch of the notebook's loop over the same images (see the module docstring)."""
    import torch
    from PIL import Image
    from torchvision import transforms as T

    class ArrayDataset(torch.utils.data.Dataset):  # as torchvision.datasets.CIFAR10: uint8 HWC -> PIL
        def __init__(self, images, labels, transform):
            self.images, self.labels, self.transform = images, labels, transform

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])

    size = images.shape[1]
    transform = T.Compose([T.RandomCrop(size, padding=args.crop_padding), T.RandomHorizontalFlip(),
                           *([T.Resize(args.resolution)] if args.resolution != size else []),
                           T.ToTensor(), T.Normalize(mean, std)])
    loader = torch.utils.data.DataLoader(ArrayDataset(images, labels, transform), batch_size=args.batch_size,
                                         shuffle=True, num_workers=workers, drop_last=True)
    torch.manual_seed(0)
    model, units = torch_model(args.variant, num_classes, args.width, args.depth)
    train_mode = torch_freeze(model, units, frozen_units)
    model = model.to(device)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    t = time.perf_counter()
    train_mode()
    running_loss, count = 0.0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
        count += len(y)
    epoch_s = time.perf_counter() - t
    return {"epoch_s": epoch_s, "examples": count, "workers": workers,
            "train_loss": running_loss / max(1, count // args.batch_size)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="b0")
    p.add_argument("--dataset", default="cifar10", help="a load_dataset spec (cifar10, folder:PATH, ...)")
    p.add_argument("--data-dir", default=None, help="for cifar10: the tarball or folder (default: "
                   "../shared/data/cifar10-jpeg-train.tar.gz beside the repository, when it exists)")
    p.add_argument("--resolution", type=int, default=32, help="the notebook's 32 (images resized when larger)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-examples", type=int, default=None,
                   help="time N training images (seeded random) and extrapolate both sides to the full split")
    p.add_argument("--workers", default="2", help="DataLoader num_workers; a comma list times each (e.g. 0,2)")
    p.add_argument("--freeze", default="none", help="none | head-only | N, both sides (see the docstring)")
    p.add_argument("--crop-padding", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="JAX compute dtype")
    p.add_argument("--compare", default="torch", choices=("torch", "none"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable cores)")
    p.add_argument("--device-kind", default="auto", choices=("auto", "cpu", "gpu"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=float, default=None, help="custom width coefficient (both sides; for tests)")
    p.add_argument("--depth", type=float, default=None, help="custom depth coefficient (both sides; for tests)")
    args = p.parse_args(argv)
    if args.data_dir is None and args.dataset == "cifar10" and DEFAULT_DATA.exists():
        args.data_dir = str(DEFAULT_DATA)
    args.device_kind = device_kind(args.device_kind, args.compare)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if jax.default_backend() != args.device_kind:  # (setup's mesh: every device of the default backend)
        raise SystemExit(f"--device-kind {args.device_kind}: the trainer runs on JAX's default backend, "
                         f"{jax.default_backend()}; set JAX_PLATFORMS to choose it")
    cfg = TrainConfig.from_flat((PRESETS["notebook"] | dict(
        variant=args.variant, dataset=args.dataset, data_dir=args.data_dir, init="scratch",
        resolution=args.resolution, batch_size=args.batch_size, freeze=args.freeze, dtype=args.dtype,
        seed=args.seed, width=args.width, depth=args.depth, max_train_examples=args.max_examples, stream=False,
        progress=False)))
    t = time.perf_counter()  # the whole split (setup reads it again, from the cache, and keeps its subset)
    ds = data_lib.load_dataset(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                               on_corrupt=cfg.on_corrupt)
    data_load_s = time.perf_counter() - t
    full_n = len(ds.train)
    n = min(args.max_examples or full_n, full_n)
    if n < args.batch_size:
        raise SystemExit(f"{n} training examples are fewer than one batch of {args.batch_size}")
    log(f"{ds.source}: {full_n} training images ({data_load_s:.1f} s to load); timing {n}")

    log("JAX epoch (the trainer's loop) ...")
    with tempfile.TemporaryDirectory(prefix="effnet-epoch-") as workdir:
        j = jax_epoch(dataclasses.replace(cfg, workdir=workdir), ds.train)
    scale = full_n / j["examples"]  # (both sides drop the last partial batch)
    out = {"variant": args.variant, "resolution": args.resolution, "batch_size": args.batch_size,
           "freeze": args.freeze, "dtype": args.dtype, "device": args.device_kind, "jax_devices": j["devices"],
           "data_load_s": data_load_s, "n_examples": j["examples"], "full_epoch_examples": full_n,
           "extrapolated": n < full_n,
           "jax_epoch_s": j["transfer_s"] + j["loop_s"] * scale, "jax_compile_s": j["compile_s"],
           "jax_measured_s": j["epoch_s"], "jax_transfer_s": j["transfer_s"], "jax_loop_s": j["loop_s"],
           "jax_img_s": j["examples"] / j["loop_s"], "jax_train_loss": j["train_loss"],
           "torch_epoch_s": None, "ratio": None}
    if args.compare == "torch":
        import torch
        torch.set_num_threads(args.threads or cpu_threads())
        device = "cuda" if args.device_kind == "gpu" else "cpu"
        runs = []
        for w in (int(x) for x in args.workers.split(",")):
            log(f"PyTorch epoch (num_workers={w}) ...")
            runs.append(torch_epoch(args, j["train"].images, j["train"].labels, ds.num_classes,
                                    j["frozen_units"], *cfg.normalization(), w, device))
        best = min(runs, key=lambda r: r["epoch_s"])
        out.update(torch_epoch_s=best["epoch_s"] * full_n / best["examples"], torch_measured_s=best["epoch_s"],
                   torch_img_s=best["examples"] / best["epoch_s"], torch_workers=best["workers"],
                   torch_by_workers={str(r["workers"]): r["epoch_s"] * full_n / r["examples"] for r in runs},
                   torch_train_loss=best["train_loss"], threads=torch.get_num_threads())
        out["ratio"] = out["torch_epoch_s"] / out["jax_epoch_s"]

    ex = " (extrapolated from %d images)" % out["n_examples"] if out["extrapolated"] else ""
    print(f"one epoch of {full_n} images, {args.variant} at {args.resolution} px, batch {args.batch_size}, "
          f"freeze {args.freeze}, {args.device_kind}{ex}:")
    print(f"  JAX (the trainer):    {out['jax_epoch_s']:8.1f} s  ({out['jax_img_s']:.0f} img/s; + "
          f"{out['jax_compile_s']:.1f} s compile, once per run)")
    if out["torch_epoch_s"] is not None:
        for w, s in out["torch_by_workers"].items():
            print(f"  PyTorch loop, {w} workers: {s:8.1f} s")
        print(f"  speedup (torch / JAX): {out['ratio']:.2f}x")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    with_fast_malloc()  # both frameworks run in this process with the allocator train.py uses
    main()
