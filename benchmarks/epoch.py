#!/usr/bin/env python3
"""Wall time of one CIFAR-10 fine-tune epoch, end to end: our trainer's path against a plain PyTorch loop
like the reference notebook's, side by side on the same images.

Both sides start from the same decoded uint8 training split (`effnet_jax.data.load_dataset`, 45,000 images
of CIFAR-10 after the seeded validation split; loading/decoding is shared and reported apart as
`data_load_s`), random initial weights (timing does not depend on them), the notebook's optimization (Adam
1e-3 constant, no label smoothing, batch 64, crop pad 4 + flip) and the same trainable parameters.

* JAX (`train.py`'s path, the trainer's functions reproduced step for step as in `train_and_evaluate`'s
  epoch loop, without its evaluation, checkpoints and plots): the `notebook` preset `TrainConfig`,
  `build_model`, `optim.make_optimizer`, `create_train_state`, the dataset put on the device (`Mesh.replicate`,
  timed), `jit_train_step` (state donated), and per step the host index batch
  (`epoch_permutation`/`batch_indices`, `Mesh.put_batch`), the on-device gather + augmentation (+ resize to
  `--resolution`) + step, the metric sums, and every 10 steps a read of the metrics (as the progress bar
  does). The XLA compilation is done ahead (`.lower().compile()`) and reported apart as `jax_compile_s`;
  `jax_epoch_s` = putting the whole training split and the train state on the device (once per run in the
  trainer, so it is timed once and never scaled) + the steps loop.
* PyTorch (the notebook's loop): a Dataset over the same uint8 array returning `PIL.Image`s, as
  torchvision's CIFAR10 does, with `RandomCrop(32, padding=4)`, `RandomHorizontalFlip()`, `Resize(R)` when
  R != 32, `ToTensor()`, `Normalize(ImageNet mean/std)`; `DataLoader(batch_size, shuffle=True,
  num_workers=W, drop_last=True)` (drop_last as the JAX side; `--workers` may be a comma list, each timed);
  torchvision `efficientnet_bX(weights=None, num_classes=10)`; `Adam(lr=1e-3)`; per batch zero_grad,
  forward, CrossEntropyLoss, backward, step, `running_loss += loss.item()`. `torch_epoch_s` = the whole loop,
  DataLoader worker start-up included; the fastest `--workers` setting is the one compared.
* `--freeze N|head-only` (default none: the notebook trains all layers): the JAX optimizer freezes as the
  trainer does (frozen parameters unchanged, their BatchNorm in inference mode); the torch side sets
  requires_grad=False on the same units (stem, blocks, head conv) and keeps their BatchNorm in eval mode, so
  both skip the same backward work.

`--max-examples N` times the steps over the first N // batch images of the trainer's shuffled epoch order (a
seeded random subset; the same images on both sides) and scales the step loops to the full split: JAX
`jax_transfer_s + jax_loop_s * full / N`, torch its whole measured loop * full / N (DataLoader worker
start-up included, so with `--workers` > 0 that start-up is scaled too) (`n_examples` measured,
`full_epoch_examples`, `extrapolated: true`; the compile time is not scaled). Both
sides use the same device (`--device-kind`, one device). The last stdout line is JSON with `jax_epoch_s`,
`torch_epoch_s`, `ratio` (torch / jax: the speedup), `n_examples`, `extrapolated`.

    python benchmarks/epoch.py --data-dir ../shared/data/cifar10-jpeg-train.tar.gz            # a full epoch, 32 px
    python benchmarks/epoch.py --data-dir ../shared/data/cifar10-jpeg-train.tar.gz --max-examples 3200 --workers 0,2
    python benchmarks/epoch.py --variant b0 --resolution 128 --freeze 8 --max-examples 3200  # our recipe's shape
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import throughput  # noqa: E402  (torch_model, torch_freeze: the same model on both sides)
from throughput import log  # noqa: E402

from effnet_jax import data as data_lib  # noqa: E402
from effnet_jax.train import optim  # noqa: E402
from effnet_jax.cli.host import with_fast_malloc  # noqa: E402
from effnet_jax.train.mesh import Mesh  # noqa: E402
from effnet_jax.train.steps import create_train_state, jit_train_step  # noqa: E402
from effnet_jax.train.config import PRESETS, TrainConfig  # noqa: E402
from effnet_jax.train.build import build_model  # noqa: E402
from effnet_jax.model.network import random_variables  # noqa: E402

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg-train.tar.gz"


def jax_epoch(cfg: TrainConfig, images: np.ndarray, labels: np.ndarray, num_classes: int, overrides: dict,
              device, batches: list[np.ndarray]) -> dict:
    """The whole training split `images` put on the device as the trainer does (timed once), then the steps
    over `batches` (index batches into it) with the trainer's functions (see the module docstring)."""
    mesh = Mesh([device])
    base = build_model(cfg, num_classes, overrides=overrides)
    ocfg = cfg.optim_config()
    fu = optim.frozen_units(base.config, ocfg.freeze)
    steps_per_epoch = len(labels) // cfg.batch_size
    variables = random_variables(base, cfg.resolution, cfg.seed)
    tx = optim.make_optimizer(ocfg, variables["params"], base.config, steps_per_epoch)
    step_fn = jit_train_step(build_model(cfg, num_classes, fu, overrides), tx,
                             cfg.augment, cfg.eval_transform(), cfg.label_smoothing, cfg.ema_decay)

    t0 = time.perf_counter()
    train_arrays = mesh.replicate((jnp.asarray(images), jnp.asarray(labels)))
    state = mesh.replicate(create_train_state(variables, tx, cfg.seed, cfg.ema_decay > 0))
    zero_sums = mesh.replicate({"loss": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.int32),
                                "count": jnp.zeros((), jnp.float32)})
    jax.block_until_ready((train_arrays, state, zero_sums))
    transfer_s = time.perf_counter() - t0

    t = time.perf_counter()
    compiled = step_fn.lower(state, *train_arrays, mesh.put_batch(batches[0])).compile()
    compile_s = time.perf_counter() - t

    t = time.perf_counter()
    sums = zero_sums
    for i, b in enumerate(batches):  # train_and_evaluate's loop body, less checkpoints and signals
        state, m = compiled(state, *train_arrays, mesh.put_batch(b.astype(np.int32)))
        sums = jax.tree.map(jnp.add, sums, {k: m[k] for k in sums})
        if i % 10 == 0 or i == len(batches) - 1:
            jax.device_get(m)
    sums = jax.device_get(sums)
    loop_s = time.perf_counter() - t
    return {"epoch_s": transfer_s + loop_s, "transfer_s": transfer_s, "loop_s": loop_s, "compile_s": compile_s,
            "examples": len(batches) * cfg.batch_size, "train_loss": float(sums["loss"] / sums["count"]),
            "frozen_units": fu}


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
    model, units = throughput.torch_model(args.variant, num_classes, args.width, args.depth)
    train_mode = throughput.torch_freeze(model, units, frozen_units)
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
    args.device_kind = throughput.device_kind(args.device_kind, args.compare)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = TrainConfig.from_flat((PRESETS["notebook"] | dict(
        variant=args.variant, dataset=args.dataset, data_dir=args.data_dir, init="scratch",
        resolution=args.resolution, batch_size=args.batch_size, freeze=args.freeze, dtype=args.dtype,
        seed=args.seed, progress=False)))
    t = time.perf_counter()
    ds = data_lib.load_dataset(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                               on_corrupt=cfg.on_corrupt)
    data_load_s = time.perf_counter() - t
    full_n = len(ds.train)
    n = min(args.max_examples or full_n, full_n)
    if n < args.batch_size:
        raise SystemExit(f"{n} training examples are fewer than one batch of {args.batch_size}")
    # the trainer's epoch-1 order over the whole split (it is stored grouped by class); time its first batches
    batches = data_lib.batch_indices(data_lib.epoch_permutation(full_n, cfg.seed, 1), cfg.batch_size)
    batches = batches[:n // args.batch_size]
    timed = np.concatenate(batches)
    images, labels = ds.train.images[timed], ds.train.labels[timed]
    overrides = {k: getattr(args, k) for k in ("width", "depth") if getattr(args, k) is not None}
    log(f"{ds.source}: {full_n} training images ({data_load_s:.1f} s to load); timing {n}")

    log("JAX epoch ...")
    j = jax_epoch(cfg, ds.train.images, ds.train.labels, ds.num_classes, overrides,
                  jax.devices(args.device_kind)[0], batches)
    scale = full_n / j["examples"]  # (both sides drop the last partial batch)
    out = {"variant": args.variant, "resolution": args.resolution, "batch_size": args.batch_size,
           "freeze": args.freeze, "dtype": args.dtype, "device": args.device_kind, "data_load_s": data_load_s,
           "n_examples": j["examples"], "full_epoch_examples": full_n, "extrapolated": n < full_n,
           "jax_epoch_s": j["transfer_s"] + j["loop_s"] * scale, "jax_compile_s": j["compile_s"],
           "jax_measured_s": j["epoch_s"], "jax_transfer_s": j["transfer_s"], "jax_loop_s": j["loop_s"],
           "jax_img_s": j["examples"] / j["loop_s"], "jax_train_loss": j["train_loss"],
           "torch_epoch_s": None, "ratio": None}
    if args.compare == "torch":
        import torch
        torch.set_num_threads(args.threads or throughput.cpu_threads())
        device = "cuda" if args.device_kind == "gpu" else "cpu"
        runs = []
        for w in (int(x) for x in args.workers.split(",")):
            log(f"PyTorch epoch (num_workers={w}) ...")
            runs.append(torch_epoch(args, images, labels, ds.num_classes, j["frozen_units"],
                                    *cfg.normalization(), w, device))
        best = min(runs, key=lambda r: r["epoch_s"])
        out.update(torch_epoch_s=best["epoch_s"] * full_n / best["examples"], torch_measured_s=best["epoch_s"],
                   torch_img_s=best["examples"] / best["epoch_s"], torch_workers=best["workers"],
                   torch_by_workers={str(r["workers"]): r["epoch_s"] * full_n / r["examples"] for r in runs},
                   torch_train_loss=best["train_loss"], threads=torch.get_num_threads())
        out["ratio"] = out["torch_epoch_s"] / out["jax_epoch_s"]

    ex = " (extrapolated from %d images)" % out["n_examples"] if out["extrapolated"] else ""
    print(f"one epoch of {full_n} images, {args.variant} at {args.resolution} px, batch {args.batch_size}, "
          f"freeze {args.freeze}, {args.device_kind}{ex}:")
    print(f"  JAX (train.py path):  {out['jax_epoch_s']:8.1f} s  ({out['jax_img_s']:.0f} img/s; + "
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
