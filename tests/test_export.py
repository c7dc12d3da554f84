"""Export to ONNX and StableHLO (`effnet-export`) and `predict --workdir`.

The exported files are checked against independent computations on real images (CIFAR-10 JPEGs from
../shared/data): onnxruntime's logits and the deserialized StableHLO's logits against JAX's `model.apply`
(depthwise convolutions by the CPU default, shifted sums, while the artifacts use XLA grouped convolutions / ONNX
grouped Conv), at batch sizes 1 and 7 from one file; for B0 also against torchvision itself. Models: Lite0 with its
real ImageNet weights, B0 from a torchvision state dict with random weights and randomized BN statistics, a
tiny fine-tuned Lite0 run, and a tiny V2-S run trained from scratch by train.py (Fused-MBConv in the ONNX
graph). Small resolutions (32-64 px) keep XLA's compile times low.

Figures (max |difference|) are printed with `-s`.
"""

import contextlib
import io
import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from effnet_jax.cli import export as export_cli
from effnet_jax.model import export, variants
from effnet_jax import loader
from effnet_jax.cli import predict
from effnet_jax.data.transform import EvalTransform, preprocess_config
from helpers import REPO, cifar_jpegs, last_json, load_train_cli, run_main

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

R = 64
TOL = 1e-4


def write_image_folder(root: pathlib.Path, files: dict[str, list[bytes]]) -> pathlib.Path:
    """<class>/NN.jpg from {class: [JPEG bytes, ...]}; returns `root`."""
    for cls, blobs in files.items():
        (root / cls).mkdir(parents=True)
        for i, b in enumerate(blobs):
            (root / cls / f"{i:02d}.jpg").write_bytes(b)
    return root


@pytest.fixture(scope="module")
def cifar_files(cifar_tar):
    """{class: [JPEG bytes, ...]}: the first 10 real CIFAR-10 training JPEGs of two classes."""
    files: dict[str, list[bytes]] = {}
    for cls, _, jpeg in cifar_jpegs(cifar_tar):
        if cls in files or len(files) < 2:
            if len(files.setdefault(cls, [])) < 10:
                files[cls].append(jpeg)
        if len(files) == 2 and all(len(v) == 10 for v in files.values()):
            break
    return files


@pytest.fixture(scope="module")
def images(cifar_files):
    """7 real images (PIL, RGB)."""
    data = [b for v in cifar_files.values() for b in v][::2][:7]
    return [Image.open(io.BytesIO(b)).convert("RGB") for b in data]


def ort_session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export_both(tmp, argv):
    """Export with the CLI in both formats; returns {format: path}."""
    paths = {}
    for fmt in export_cli.FORMATS:
        out = tmp / f"model.{fmt}"
        rc, stdout, stderr = run_main(export_cli.main, [*argv, "--format", fmt, "--out", out])
        assert rc == 0, stderr
        assert json.loads(stdout.splitlines()[-1])["out"] == str(out)
        paths[fmt] = out
    return paths


def check_against(paths, x, ref, label):
    """onnxruntime and the deserialized StableHLO, at batch 1 and 7 from one file, against `ref` logits."""
    assert x.shape[0] == 7
    sess = ort_session(paths["onnx"])
    assert sess.get_inputs()[0].shape[0] == "batch" and sess.get_outputs()[0].shape[0] == "batch"
    call, meta = export.load_stablehlo(paths["stablehlo"])
    diffs = {}
    for n in (1, 7):
        got_onnx = sess.run(["logits"], {"images": x[:n]})[0]
        got_shlo = np.asarray(call(x[:n]))
        assert got_onnx.shape == got_shlo.shape == (n, ref.shape[1])
        diffs[f"onnx@{n}"] = float(np.abs(got_onnx - ref[:n]).max())
        diffs[f"stablehlo@{n}"] = float(np.abs(got_shlo - ref[:n]).max())
    print(f"\n{label}: max |logits - JAX| {diffs} (logits scale {float(np.abs(ref).max()):.3g})")
    assert max(diffs.values()) <= TOL, diffs
    assert np.array_equal(sess.run(["logits"], {"images": x})[0].argmax(-1), ref.argmax(-1))
    return meta


def readme_snippet(onnx_path, shlo_path):
    """Run README.md's deployment snippet ("Export and deployment": the python block that rebuilds the transform
    with `EvalTransform(**meta["preprocess"])`) as written, with only its two file paths replaced; returns what it
    prints, split into (class name, max |StableHLO - onnxruntime|)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Export and deployment"):]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    (code,) = [b for b in blocks if 'EvalTransform(**meta["preprocess"])' in b]
    assert code.count('"export/lite0.onnx"') == 2 and code.count('"export/lite0.shlo"') == 1
    code = code.replace('"export/lite0.onnx"', repr(str(onnx_path))).replace('"export/lite0.shlo"', repr(str(shlo_path)))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    name, diff = out.getvalue().strip().rsplit(" ", 1)
    return name, float(diff)


def onnx_meta(path):
    meta = export.onnx_metadata(path)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["mean"]) == meta["preprocess"]["mean"]
    assert json.loads(props["class_names"]) == meta["class_names"]
    return meta


# ----------------------------------------------------------------------------------------- real weights

def test_lite0_imagenet(images, tmp_path):
    paths = export_both(tmp_path, ["--variant", "lite0", "--init", "imagenet", "--resolution", R])
    meta = onnx_meta(paths["onnx"])
    expected_pre = dict(preprocess_config("lite0"), input_size=R)
    assert meta["preprocess"] == expected_pre  # tf crop style: the crop ratio is a function of input_size
    assert meta["input"] == {"name": "images", "layout": "NHWC", "shape": ["batch", R, R, 3], "dtype": "float32",
                             "normalized": True}
    assert meta["num_classes"] == 1000 and meta["class_names"][0] == "tench"
    x = np.stack([EvalTransform(**meta["preprocess"])(im) for im in images])
    pred = loader.load("imagenet", "lite0")  # the JAX model, CPU default depthwise implementation
    ref = np.asarray(jax.jit(lambda v, x: pred.model.apply(v, x))(pred.variables, x))
    shlo_meta = check_against(paths, x, ref, "lite0 imagenet")
    assert {k: v for k, v in shlo_meta.items() if k != "format"} == {k: v for k, v in meta.items() if k != "format"}
    name, diff = readme_snippet(paths["onnx"], paths["stablehlo"])
    assert name in meta["class_names"] and diff <= TOL


def test_b0_from_torchvision_pth(images, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from test_convert import randomized_torchvision  # random weights, BN statistics calibrated then perturbed

    pre = dict(preprocess_config("b0"), input_size=R, resize_size=round(256 * R / 224))
    x = np.stack([EvalTransform(**pre)(im) for im in images])
    m = randomized_torchvision("b0", 3, x)
    src = tmp_path / "b0.pth"
    torch.save(m.state_dict(), src)
    paths = export_both(tmp_path, ["--variant", "b0", "--init", src, "--resolution", R])
    assert onnx_meta(paths["onnx"])["preprocess"] == pre
    with torch.no_grad():
        torch_logits = m(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
    pred = loader.load(str(src), "b0")
    ref = np.asarray(jax.jit(lambda v, x: pred.model.apply(v, x))(pred.variables, x))
    check_against(paths, x, ref, "b0 random .pth")
    onnx_vs_torch = float(np.abs(ort_session(paths["onnx"]).run(None, {"images": x})[0] - torch_logits).max())
    print(f"b0 random .pth: max |onnx - torch| {onnx_vs_torch:.3g}")
    assert onnx_vs_torch <= TOL


# ----------------------------------------------------------------------------------------- a fine-tuned run

@pytest.fixture(scope="module")
def run_dir(cifar_files, tmp_path_factory):
    """A 1-epoch Lite0 fine-tune (ImageNet init) at 32 px on 20 real CIFAR images of two classes, with a parameter
    EMA: the run's evaluation weights, which the export must carry, are the average, not the last parameters."""
    from effnet_jax.train.config import TrainConfig
    from effnet_jax.train.loop import train_and_evaluate
    root = tmp_path_factory.mktemp("run")
    data = write_image_folder(root / "data", cifar_files)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EFFNET_JAX_CACHE", str(root / "cache"))
        with contextlib.redirect_stdout(io.StringIO()):
            train_and_evaluate(TrainConfig(variant="lite0", dataset=f"folder:{data}", init="imagenet", epochs=1,
                                           batch_size=8, resolution=32, max_train_examples=16, ema_decay=0.5,
                                           progress=False, workdir=str(root / "work")))
    return root / "work", data


@pytest.fixture(scope="module")
def run_reference(run_dir):
    """(image files, normalized inputs, JAX logits of the run's eval weights) for 7 of the run's images."""
    from effnet_jax import data as data_lib
    from effnet_jax.train.rundir import restore_checkpoint
    from effnet_jax.train.config import TrainConfig
    from effnet_jax.train.build import build_model
    work, data = run_dir
    saved = json.loads((work / "config.json").read_text())
    files = sorted(data.rglob("*.jpg"))[::3][:7]
    u8 = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    x = np.asarray(data_lib.eval_batch(u8, saved["resolution"], saved["input_mean"], saved["input_std"]))
    tree, _ = restore_checkpoint(work / "checkpoints" / "best")
    model = build_model(TrainConfig(variant="lite0", resolution=32), saved["num_classes"],
                        overrides=saved["model_overrides"])
    apply = jax.jit(lambda v, x: model.apply(v, x))
    ref = np.asarray(apply(tree["ema"], x))
    last = np.asarray(apply({"params": tree["params"], "batch_stats": tree["batch_stats"]}, x))
    assert np.abs(ref - last).max() > 1e-3  # the EMA is not the last parameters: exporting those would fail below
    return files, x, ref


def test_finetuned_run(run_dir, run_reference, tmp_path):
    work, _ = run_dir
    files, x, ref = run_reference
    paths = export_both(tmp_path, ["--workdir", work])
    meta = onnx_meta(paths["onnx"])
    saved = json.loads((work / "config.json").read_text())
    assert meta["class_names"] == json.loads((work / "class_names.json").read_text())
    assert meta["preprocess"]["mean"] == saved["input_mean"] and meta["preprocess"]["std"] == saved["input_std"]
    assert meta["input"]["shape"] == ["batch", 32, 32, 3] and meta["variant"] == "lite0"
    check_against(paths, x, ref, "lite0 fine-tuned run")
    # the metadata's transform is the run's evaluation: on its 32 px images, what eval_batch computed for them
    transform = EvalTransform(**meta["preprocess"])
    got = np.stack([transform(Image.open(f)) for f in files])
    np.testing.assert_allclose(got, x, rtol=0, atol=1e-6)
    name, diff = readme_snippet(paths["onnx"], paths["stablehlo"])  # a 300 x 200 photo: cropped to 256, then 32
    assert name in meta["class_names"] and diff <= TOL


def test_predict_workdir(run_dir, run_reference, tmp_path):
    """predict --workdir on a folder: the run's class names, eval preprocessing and weights, batched."""
    work, _ = run_dir
    files, _, ref = run_reference
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, f in enumerate(files):
        (folder / f"{i:02d}.jpg").write_bytes(f.read_bytes())
    out = tmp_path / "pred.jsonl"
    rc, stdout, stderr = run_main(predict.main, ["--workdir", work, "--batch-size", 3, "--topk", 2,
                                                 "--no-progress", "--output", out, folder])
    assert rc == 0, stderr
    assert stderr == ""  # --no-progress
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    names = json.loads((work / "class_names.json").read_text())
    probs = np.asarray(jax.nn.softmax(ref, axis=-1))
    assert len(lines) == 7
    for rec, p in zip(lines, probs):
        top = rec["top2"]
        assert [t["index"] for t in top] == list(np.argsort(-p)[:2])
        assert [t["class"] for t in top] == [names[t["index"]] for t in top]
        np.testing.assert_allclose([t["prob"] for t in top], np.sort(p)[::-1][:2], atol=1e-5)


# ----------------------------------------------------------------------------------------- a V2 run, end to end

@pytest.fixture(scope="module")
def v2_run(cifar_files, tmp_path_factory):
    """`train.py --variant v2_s --init scratch --width 0.25 --depth 0.1 --freeze 5`: 1 epoch at 32 px on 16 real
    CIFAR images of two classes. That network has 7 blocks, 3 Fused-MBConv (the first the single-conv form) then 4
    MBConv; --freeze 5 trains blocks_2 (fused) onwards, so the frozen/trained line runs through the fused
    blocks. Returns (workdir, data folder, the initial variables, the CLI's (rc, stdout, stderr))."""
    from effnet_jax.train import build as trainer
    root = tmp_path_factory.mktemp("v2run")
    data = write_image_folder(root / "data", cifar_files)
    cli = load_train_cli("effnet_jax_train_cli_v2")
    argv = ["--variant", "v2_s", "--init", "scratch", "--width", 0.25, "--depth", 0.1, "--freeze", 5,
            "--dataset", f"folder:{data}", "--epochs", 1, "--batch-size", 8, "--resolution", 32,
            "--max-train-examples", 16, "--val-fraction", 0.2, "--no-progress", "--workdir", root / "work"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EFFNET_JAX_CACHE", str(root / "cache"))
        result = run_main(cli.main, argv)
    cfg = cli.parse_args([str(a) for a in argv])
    initial = trainer.initial_variables(cfg, 2, jax.random.fold_in(jax.random.key(cfg.seed), 1))[0]
    return root / "work", data, jax.device_get(initial), result


def test_v2_run_trains_freezes_evaluates_and_exports(v2_run, tmp_path):
    from effnet_jax import data as data_lib
    from effnet_jax.cli import evaluate as evaluate_cli
    from effnet_jax.train.optim import param_names
    from effnet_jax.train.rundir import restore_checkpoint
    work, data, initial, (rc, stdout, stderr) = v2_run
    assert rc == 0, stderr
    summary = last_json(stdout)
    assert summary["variant"] == "v2_s" and summary["epochs"] == 1 and summary["final_val_acc"] is not None

    # trained by units: stem, blocks_0, blocks_1 (and their BN statistics) untouched, blocks_2.. and the head moved
    tree, _ = restore_checkpoint(work / "checkpoints" / "latest")
    names = lambda t: dict(zip(jax.tree.leaves(param_names(t)), jax.tree.leaves(t)))  # noqa: E731
    params, init_params = names(tree["params"]), names(initial["params"])
    stats, init_stats = names(tree["batch_stats"]), names(initial["batch_stats"])
    assert params.keys() == init_params.keys() and "blocks_0/conv/kernel" in params
    assert sorted({k.split("/")[0] for k in params if k.startswith("blocks_")}) == [f"blocks_{i}" for i in range(7)]
    frozen = ("stem", "stem_bn", "blocks_0", "blocks_1")
    for k in params:
        moved = not np.array_equal(params[k], init_params[k])
        if k.startswith(frozen):
            assert not moved, k
        else:  # (a bias whose gradient is exactly 0, e.g. a BN bias feeding another BN, may stay)
            assert moved or k.endswith("bias"), k
    for k in stats:
        assert np.array_equal(stats[k], init_stats[k]) == k.startswith(frozen), k
    assert not np.array_equal(params["blocks_2/expand_conv/kernel"], init_params["blocks_2/expand_conv/kernel"])

    # evaluate reproduces the logged validation
    rc, out, err = run_main(evaluate_cli.main, ["--workdir", work, "--which", "latest"])
    assert rc == 0, err
    assert last_json(out)["top1"] == summary["final_val_acc"]

    # export: onnxruntime and StableHLO against the JAX model of the run's best checkpoint, on 7 real images
    run = loader.load(work, which="best")
    files = sorted(data.rglob("*.jpg"))[::3][:7]
    u8 = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    x = np.asarray(data_lib.eval_batch(u8, 32, run.run.config["input_mean"], run.run.config["input_std"]))
    ref = np.asarray(jax.jit(lambda v, x: run.model.apply(v, x))(run.variables, x))
    paths = export_both(tmp_path, ["--workdir", work])
    meta = onnx_meta(paths["onnx"])
    assert meta["variant"] == "v2_s" and meta["input"]["shape"] == ["batch", 32, 32, 3]
    check_against(paths, x, ref, "v2_s scratch run")


# ----------------------------------------------------------------------------------------- every variant

EXPORT_DEFAULT = ("b0", "lite0", "v2_s")  # one of each kind: torchvision-style B, TF-style Lite, V2 with fused blocks


@pytest.mark.parametrize("variant", [v if v in EXPORT_DEFAULT else pytest.param(v, marks=pytest.mark.slow)
                                     for v in variants.VARIANTS])
def test_every_variant_exports(variant, tmp_path):
    """`--init scratch` (random weights, no download) at 32 px: both formats export; the ONNX file runs in
    onnxruntime at batch 1 and 3; the StableHLO file deserializes with a symbolic batch dimension. One variant of
    each kind in the default run, the other 13 with `-m slow`."""
    paths = export_both(tmp_path, ["--variant", variant, "--init", "scratch", "--resolution", 32])
    sess = ort_session(paths["onnx"])
    for n in (1, 3):
        y = sess.run(None, {"images": np.zeros((n, 32, 32, 3), np.float32)})[0]
        assert y.shape == (n, 1000) and np.isfinite(y).all()
    exported = jax.export.deserialize(bytearray(paths["stablehlo"].read_bytes()))
    (aval,) = exported.in_avals
    assert not isinstance(aval.shape[0], int) and aval.shape[1:] == (32, 32, 3)
    assert exported.out_avals[0].shape[1:] == (1000,)


# ----------------------------------------------------------------------------------------- CLI errors

@pytest.mark.parametrize("argv, message", [
    (["--variant", "b9", "--init", "scratch", "--format", "onnx"], "unknown variant"),
    (["--workdir", "/nonexistent/run", "--format", "onnx"], "no such directory"),
    (["--variant", "b0", "--init", "scratch", "--format", "tflite"], "--format must be one of"),
    (["--variant", "b0", "--init", "scratch", "--format", "onnx", "--dtype", "bfloat16"], "float32 only"),
    (["--variant", "b0", "--init", "scratch", "--format", "onnx", "--resolution", 16], "too small"),
    (["--variant", "b0", "--init", "/nonexistent.pth", "--format", "onnx"], "--init"),
    (["--workdir", ".", "--variant", "b0", "--format", "onnx"], "excludes"),
])
def test_cli_errors(argv, message, tmp_path):
    rc, stdout, stderr = run_main(export_cli.main, [*argv, "--out", tmp_path / "m.onnx"])
    assert rc == 2 and stdout == ""
    assert stderr.startswith("error: ") and message in stderr and stderr.count("\n") == 1, stderr
    assert not (tmp_path / "m.onnx").exists()


def test_existing_out_needs_overwrite(tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep")
    argv = ["--variant", "lite0", "--init", "scratch", "--format", "onnx", "--resolution", 32, "--out", out]
    rc, _, stderr = run_main(export_cli.main, argv)
    assert rc == 2 and "--overwrite" in stderr and out.read_bytes() == b"keep"
    rc, _, stderr = run_main(export_cli.main, [*argv, "--overwrite"])
    assert rc == 0, stderr
    assert export.onnx_metadata(out)["variant"] == "lite0"
