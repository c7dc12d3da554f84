"""Model checkpoints on disk: variables through orbax, plus a `model.json` saying how to rebuild the module.

A model directory holds `model.json` ({"variant", "num_classes", "overrides", "preprocess" (the fields of
`data.transform.EvalTransform`), "class_names" (optional), ...}) and `variables/`
(an orbax PyTree checkpoint of {'params', 'batch_stats'}). `effnet-convert` writes one;
`load_model` reads it back as (module, variables, meta).
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

META_FILE = "model.json"


def save_model(directory: str | os.PathLike, variables: dict, meta: dict) -> pathlib.Path:
    """Write `variables` and `meta` (must contain 'variant' and 'num_classes') into `directory`."""
    d = pathlib.Path(directory).absolute()
    if (d / META_FILE).exists():
        raise FileExistsError(f"{d} already holds a model checkpoint; choose another --out")
    d.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(d / "variables", jax.tree_util.tree_map(np.asarray, variables))
    (d / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return d


def load_model(directory: str | os.PathLike, **overrides):
    """(module, variables, meta) from a directory written by `save_model`. `overrides` go to `create_model`
    (e.g. dtype), on top of the ones saved in the metadata."""
    from effnet_jax.model.network import create_model

    d = pathlib.Path(directory).absolute()
    if not (d / META_FILE).exists():
        raise FileNotFoundError(f"{d}: no {META_FILE}; not a model directory written by effnet_jax")
    meta = json.loads((d / META_FILE).read_text())
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(d / "variables")
    model = create_model(meta["variant"], meta["num_classes"], **{**meta.get("overrides", {}), **overrides})
    return model, variables, meta
