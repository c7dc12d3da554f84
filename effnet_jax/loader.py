"""One loader for every source of an EfficientNet's weights: `load(init, variant, num_classes)`.

`init` is one of
* `'imagenet'` — the published ImageNet weights of `variant` (`effnet_jax.weights.published`: torchvision's files for
  B0-B7 and V2, the packaged files for Lite0-2), the ImageNet class names, the weights' eval preprocessing;
* `'scratch'` — `variant` with fresh weights: the model's own initializers from `key`, or (no `key`) random
  values drawn in numpy without compiling anything (for exports and tests);
* a PyTorch `.pth`/`.pt` state dict (torchvision, lukemelas/Lite or timm layout, read without torch) for `variant`;
  a lukemelas-layout B file brings its TF-style model overrides (`weights.convert.layout_overrides`);
* `'hf-hub:timm/<name>[@revision]'` — timm's checkpoint on the Hugging Face Hub (`weights.hub`: huggingface_hub's
  cache), a downloaded timm directory (`config.json` + `model.safetensors`) or a `.safetensors` file
  (`weights.timm_checkpoint`): the variant, class names and eval preprocessing come from its `config.json`;
* a Keras applications file, `.keras` or `.weights.h5` (`weights.keras`, read with h5py): the variant from a
  `.keras` file's config (a bare `.weights.h5` needs `variant`), the preprocessing from its own input layers;
* a model directory (`model.json` + orbax `variables/`, written by `effnet-convert`); its
  `model.json` names the variant, the class names and the preprocessing when it has them;
* a training run directory (`effnet_jax.train.rundir`): the checkpoint `which` ('best' or 'latest'), its evaluation
  weights (the EMA when the run keeps one), its class names and its evaluation preprocessing (`crop_style='run'`).

`num_classes`, when given and different from the loaded head's, keeps the backbone and puts a new head
(`model.network.new_classifier`: `head_init` 'zero' or torchvision's 'uniform' from `key`). The result, `Loaded`, holds
the model, its variables, class names, preprocessing (`data.transform.EvalTransform`) and where it came from.
Every failure a user can fix raises `errors.UserError`. `pretrained(variant)` is `load`'s variables.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any

from effnet_jax.data.transform import EvalTransform, eval_transform
from effnet_jax.errors import CheckpointReadError, ConfigError, UserError, describe
from effnet_jax.model import variants
from effnet_jax.model.network import EfficientNet, create_model, new_classifier
from effnet_jax.train.config import TrainConfig
from effnet_jax.train.rundir import RunDir, evaluation_variables
from effnet_jax.weights import model_dir as checkpoint
from effnet_jax.weights import timm_checkpoint
from effnet_jax.weights.timm_checkpoint import HUB_PREFIX
from effnet_jax.weights.published import imagenet_class_names

log = logging.getLogger(__name__)
SOURCES = ("'imagenet', 'scratch', 'hf-hub:timm/<name>', a .pth, .safetensors, .keras or .weights.h5 file, a run "
           "directory, a timm directory or a converted model directory")
KERAS_SUFFIXES = (".keras", ".h5")


@dataclasses.dataclass
class RunInfo:
    """What `load` read from a training run directory besides the weights."""
    config: dict           # config.json as written (TrainConfig fields + model_overrides, num_classes)
    train_config: TrainConfig  # the same, read into today's layout (TrainConfig.from_saved)
    meta: dict             # the checkpoint's meta (epoch, val_top1, ...)
    which: str             # 'best' or 'latest'
    uses_ema: bool


@dataclasses.dataclass
class Loaded:
    model: EfficientNet            # built for the variables (with `overrides` and the caller's model options)
    variables: dict                # {'params', 'batch_stats'}
    variant: str
    class_names: list[str]
    preprocess: EvalTransform      # the eval preprocessing that goes with these weights
    overrides: dict                # create_model overrides the weights need (file layout; a run's width/depth)
    source: str                    # provenance, one line
    run: RunInfo | None = None     # for a training run directory
    layout: str | None = None      # for a state dict: its key layout ('torchvision', 'lukemelas' or 'timm')


def load(init: str, variant: str | None = None, num_classes: int | None = None, *, which: str = "best",
         head_init: str = "uniform", key=None, **model_options: Any) -> Loaded:
    """Load `init` (see the module docstring). `variant` is required for 'imagenet', 'scratch' and .pth files,
    and must agree with a directory's own. `model_options` go to `create_model` (e.g. `conv_impl='xla'`, `dtype`).
    """
    init = os.fspath(init)
    path = pathlib.Path(init)
    if variant is not None and not (path.suffix == ".safetensors" and variant in variants.TIMM_MODELS):
        check_variant(variant)
    if init.startswith(HUB_PREFIX):
        loaded = _from_hub(init, variant, model_options)
    elif (timm_files := _local_timm(path)) is not None:
        weights, config = timm_files
        loaded = _from_timm(weights, timm_checkpoint.read_config(config) if config else None, variant, model_options,
                            f"timm checkpoint {path}")
    elif path.suffix in KERAS_SUFFIXES and path.is_file():
        loaded = _from_keras(path, variant, model_options)
    elif init not in ("imagenet", "scratch") and path.is_dir():
        if RunDir.holds_run(path):
            loaded = _from_run(RunDir(path), variant, which, model_options)
        elif (path / checkpoint.META_FILE).exists():
            loaded = _from_model_dir(path, variant, model_options)
        else:
            raise UserError(f"--init {init}: a directory, but neither a training run (config.json, checkpoints/), "
                            f"a converted model ({checkpoint.META_FILE}) nor a timm checkpoint "
                            f"({timm_checkpoint.CONFIG_FILE} + {timm_checkpoint.WEIGHTS_FILE})")
    else:
        if variant is None:
            raise ConfigError(f"--variant is required with --init {init}")
        if init == "scratch":
            loaded = _scratch(variant, num_classes, key, model_options)
        elif init == "imagenet" or path.is_file():
            try:
                loaded = _from_state_dict(init, variant, model_options)
            except UserError as e:  # a corrupt file, another variant's: say which flag (the weights' own messages
                if init != "imagenet":  # name the file, the URL and what to do)
                    e.args = (f"--init {init}: {e}",)
                raise
        else:
            raise UserError(f"--init {init}: not {SOURCES} (no such path)")
    if num_classes is not None and num_classes != loaded.model.num_classes:
        loaded = _with_new_head(loaded, init, num_classes, head_init, key)
    return loaded


def names_its_variant(init: str) -> bool:
    """Whether `init` says which variant it holds (a run or model directory, a Hub repo, a timm directory or a
    `.safetensors` with its config.json beside it, a `.keras` file), so that no `--variant` is needed; by its
    name and neighbours alone, nothing is read."""
    init = os.fspath(init)
    path = pathlib.Path(init)
    timm_files = _local_timm(path)
    return (init.startswith(HUB_PREFIX) or path.is_dir() or path.suffix == ".keras"
            or (timm_files is not None and timm_files[1] is not None))


def init_defaults(init: str, variant: str | None = None) -> dict:
    """What a self-describing weight source fixes for a training run: {'variant', 'input_mean', 'input_std'} of a
    Hub repo, a timm checkpoint or a Keras file (its metadata; the Hub's files are downloaded into its cache for
    the run to read); {} for the others, whose `--variant` and the variant's published normalization decide."""
    init = os.fspath(init)
    path = pathlib.Path(init)
    if init.startswith(HUB_PREFIX):
        from effnet_jax.weights import hub
        config = hub.hub_files(*hub.parse_hub_id(init))[1]
    elif (timm_files := _local_timm(path)) is not None:
        if timm_files[1] is None:
            return {}
        config = timm_checkpoint.read_config(timm_files[1])
    elif path.suffix in KERAS_SUFFIXES and path.is_file() and (variant is not None or path.suffix == ".keras"):
        from effnet_jax.weights import keras
        k = keras.read_keras(path, variant)
        return {"variant": k.variant, "input_mean": tuple(k.mean), "input_std": tuple(k.std)}
    else:
        return {}
    port = variants.timm_port(timm_checkpoint.architecture_of(config, init))
    pre = timm_checkpoint.eval_transform_of(config, port, init)
    return {"variant": port.variant, "input_mean": pre.mean, "input_std": pre.std}


def _local_timm(path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path | None] | None:
    """(model.safetensors, its config.json or None) when `path` is a timm checkpoint on disk: a `.safetensors` file
    (its config.json beside it, if any) or a directory of both that is neither a run nor a converted model."""
    if path.suffix == ".safetensors" and path.is_file():
        config = path.with_name(timm_checkpoint.CONFIG_FILE)
        return path, config if config.is_file() else None
    weights, config = path / timm_checkpoint.WEIGHTS_FILE, path / timm_checkpoint.CONFIG_FILE
    if (path.is_dir() and weights.is_file() and config.is_file() and not RunDir.holds_run(path)
            and not (path / checkpoint.META_FILE).exists()):
        return weights, config
    return None


def check_variant(variant: str) -> None:
    if variant not in variants.VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; valid: {', '.join(variants.VARIANTS)}")


def class_names_for(num_classes: int) -> list[str]:
    """ImageNet's names for a 1000-class head, else 'class_<i>'."""
    return imagenet_class_names() if num_classes == 1000 else [f"class_{i}" for i in range(num_classes)]


def _scratch(variant: str, num_classes: int | None, key, options: dict) -> Loaded:
    num_classes = 1000 if num_classes is None else num_classes
    model = create_model(variant, num_classes, **options)
    if key is None:
        from effnet_jax.model.network import random_variables
        variables = random_variables(model, model.config.resolution)
        how = "random weights (numpy)"
    else:
        import jax
        import jax.numpy as jnp
        x = jnp.zeros((1, model.config.resolution, model.config.resolution, 3))
        variables = jax.jit(lambda k: model.init(k, x, train=False))(key)
        how = "initialized"
    return Loaded(model, variables, variant, class_names_for(num_classes), eval_transform(variant), {},
                  f"{variant} from scratch ({how})")


def _from_state_dict(init: str, variant: str, options: dict) -> Loaded:
    from effnet_jax.weights import convert
    from effnet_jax.weights.torch_reader import read_torch_state_dict
    if init == "imagenet":
        from effnet_jax.weights.published import weights_file
        src = os.fspath(weights_file(variant))
    else:
        src = init
    try:
        sd = read_torch_state_dict(src)
    except OSError as e:
        raise UserError(f"cannot read {src}: {e.strerror or e}") from None
    layout = convert.detect_layout(sd)
    variables = convert.convert_state_dict(sd, variant, None, source=src, layout=layout)
    overrides = convert.layout_overrides(layout, variant)
    n = int(variables["params"]["classifier"]["bias"].shape[0])
    model = create_model(variant, n, **overrides, **options)
    what = "ImageNet weights" if init == "imagenet" else f"{layout} state dict"
    return Loaded(model, variables, variant, class_names_for(n), eval_transform(variant), overrides,
                  f"{variant} {what} from {src}", layout=layout)


def _agree(source: str, holds: str, variant: str | None) -> None:
    if variant is not None and variant != holds:
        raise ConfigError(f"--init {source} holds a {holds} model, not --variant {variant}")


def _from_hub(init: str, variant: str | None, options: dict) -> Loaded:
    from effnet_jax.weights import hub
    repo, revision = hub.parse_hub_id(init)
    weights, config = hub.hub_files(repo, revision)
    return _from_timm(weights, config, variant, options, f"{init} ({weights})")


def _from_timm(weights: pathlib.Path, config: dict | None, variant: str | None, options: dict,
               source: str) -> Loaded:
    timm_name = variant if config is None and variant in variants.TIMM_MODELS else None
    ckpt = timm_checkpoint.read_timm(weights, config, timm_name)
    if timm_name is None:
        _agree(source, ckpt.port.variant, variant)
    overrides = ckpt.port.overrides()
    model = create_model(ckpt.port.variant, ckpt.num_classes, **overrides, **options)
    return Loaded(model, ckpt.variables, ckpt.port.variant, ckpt.class_names or class_names_for(ckpt.num_classes),
                  ckpt.preprocess, overrides, f"timm {ckpt.architecture} from {source}", layout="timm")


def _from_keras(path: pathlib.Path, variant: str | None, options: dict) -> Loaded:
    from effnet_jax.weights import keras
    k = keras.read_keras(path, variant)
    model = create_model(k.variant, k.num_classes, **k.overrides, **options)
    size = k.resolution or model.config.resolution
    # Keras applications resize the whole image to the model's side (`image_dataset_from_directory`, `load_img`
    # with `target_size`): no crop; the normalization is the model's own input layers
    preprocess = EvalTransform(size, size, "bilinear", k.mean, k.std, "squash")
    return Loaded(model, k.variables, k.variant, class_names_for(k.num_classes), preprocess, dict(k.overrides),
                  k.source, layout="keras")


def _from_model_dir(path: pathlib.Path, variant: str | None, options: dict) -> Loaded:
    try:
        model, variables, meta = checkpoint.load_model(path, **options)
    except Exception as e:  # noqa: BLE001 — orbax, json and metadata errors alike: the directory is unusable
        raise UserError(f"--init {path}: cannot load the model directory: {describe(e)}") from None
    saved_variant = meta["variant"]
    if variant is not None and variant != saved_variant:
        raise ConfigError(f"--init {path} holds a {saved_variant} model, not --variant {variant}")
    n = int(meta["num_classes"])
    names = meta.get("class_names")
    if names is not None and len(names) != n:
        raise UserError(f"--init {path}: model.json has {len(names)} class_names for a {n}-class model")
    pre = meta.get("preprocess")
    preprocess = EvalTransform(**pre) if isinstance(pre, dict) else eval_transform(saved_variant)
    return Loaded(model, variables, saved_variant, [str(c) for c in names] if names is not None else
                  class_names_for(n), preprocess, dict(meta.get("overrides", {})), f"model directory {path}")


def _from_run(run: RunDir, variant: str | None, which: str, options: dict) -> Loaded:
    saved = run.read_config()
    if variant is not None and variant != saved["variant"]:  # before the (slow) restore
        raise ConfigError(f"{run.path} holds a {saved['variant']} model, not --variant {variant}")
    names = run.read_class_names()
    try:
        tree, meta = run.restore(which)  # (checked against its SHA256SUMS first: rundir.restore_checkpoint)
    except CheckpointReadError as e:
        other = "latest" if which == "best" else "best"
        raise CheckpointReadError(f"{e}; checkpoints/{other} may still read (evaluate, predict and export take "
                                  f"--which {other})") from None
    overrides = dict(saved.get("model_overrides", {}))
    overrides |= {k: saved[k] for k in ("width", "depth", "drop_rate", "drop_path_rate") if saved.get(k) is not None}
    if "dtype" in saved and "dtype" not in options:
        import jax.numpy as jnp
        options = {**options, "dtype": jnp.dtype(saved["dtype"])}
    model = create_model(saved["variant"], len(names), **overrides, **options)
    variables = evaluation_variables(tree["params"], tree["batch_stats"], tree.get("ema"))
    train_config = TrainConfig.from_saved(saved)
    preprocess = train_config.eval_transform()
    uses_ema = "ema" in tree
    source = (f"run {os.fspath(run.path)} ({which} checkpoint, epoch {meta.get('epoch')}"
              f"{', EMA weights' if uses_ema else ''})")
    structural = {k: v for k, v in overrides.items() if k not in ("drop_rate", "drop_path_rate")}
    return Loaded(model, variables, saved["variant"], list(names), preprocess, structural, source,
                  RunInfo(saved, train_config, meta, which, uses_ema))


def _with_new_head(loaded: Loaded, init: str, num_classes: int, head_init: str, key) -> Loaded:
    import jax
    params = dict(loaded.variables["params"])
    old = params.pop("classifier", None)  # (None: a backbone without a head, e.g. a Keras include_top=False file)
    if num_classes > 0:  # (0: the backbone alone, for pooled features)
        params["classifier"] = new_classifier(jax.random.key(0) if key is None else key,
                                              loaded.model.config.head_channels, num_classes, head_init)
    log.info("--init %s: backbone loaded; new %d-class head (%s init; the weights had %d classes)", init,
             num_classes, head_init, 0 if old is None else old["bias"].shape[0])
    model = loaded.model.clone(num_classes=num_classes)
    return dataclasses.replace(loaded, model=model, variables={**loaded.variables, "params": params},
                               class_names=class_names_for(num_classes))


def pretrained(variant: str, path: str | os.PathLike | None = None, num_classes: int | None = None,
               rng=None) -> dict:
    """The variables of `load(path or 'imagenet', variant, num_classes)`: ImageNet-pretrained weights (torchvision's
    file for B0-B7 and V2, the packaged file for Lite0-2, or the .pth at `path`); a new `num_classes` head takes
    torchvision's init from `rng` (default key 0), `num_classes=0` leaves the backbone alone. The model that runs
    them, with a file layout's overrides, is `load(...).model`."""
    return load(os.fspath(path) if path is not None else "imagenet", variant, num_classes, key=rng).variables
