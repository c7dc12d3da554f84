"""The command lines: `effnet-predict` (ImageNet Lite0 on real CIFAR-10 images against the PyTorch
Lite reference, a converted 10-class directory, bad inputs) and `effnet-convert` (a torchvision
file into a model directory, refusals), that the library path imports no torch, and that
`effnet-train` is `python train.py`.

XLA compiles slowly on CPU: the CLIs run in-process (`main([...])`) inside module-scoped fixtures, so that
lite0 and b0 are each compiled once here (lite0 once more in the no-torch subprocess)."""

import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from effnet_jax.cli import convert
from effnet_jax.weights import convert as tables, model_dir as checkpoint
from effnet_jax import loader
from effnet_jax.cli import predict
from effnet_jax.errors import UserError
from effnet_jax.data.transform import eval_transform
from effnet_jax.weights.published import imagenet_class_names
from helpers import REPO, cifar_jpegs, read_metrics, run_main, write_noise_folder

N_IMAGES = 5


def read_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, cifar_tar):
    """Real CIFAR-10 training JPEGs upscaled bicubic to 224, saved alternately as JPEG and PNG, in a folder with a
    subfolder holding a corrupt `.jpg` (random bytes)."""
    from PIL import Image
    d = tmp_path_factory.mktemp("images")
    counts: dict[str, int] = {}
    for cls, _, jpeg in cifar_jpegs(cifar_tar):  # grouped by class
        if counts.get(cls, 0) >= (2 if not counts or cls == next(iter(counts)) else 1):
            continue
        counts[cls] = counts.get(cls, 0) + 1
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        image = image.resize((224, 224), Image.Resampling.BICUBIC)
        n = sum(counts.values())
        image.save(d / f"{n:02d}_{cls}.{'png' if n % 2 == 0 else 'jpg'}")
        if n == N_IMAGES:
            break
    (d / "sub").mkdir()
    (d / "sub" / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    (d / "notes.txt").write_text("not an image, ignored\n")
    return d


@pytest.fixture(scope="module")
def lite0_run(image_dir, tmp_path_factory):
    """`predict --variant lite0 --init imagenet --batch-size 2 --progress --output FILE DIR`: (rc, lines, stderr)."""
    out = tmp_path_factory.mktemp("lite0") / "pred.jsonl"
    rc, stdout, stderr = run_main(predict.main, ["--variant", "lite0", "--init", "imagenet", "--batch-size", "2",
                                                 "--progress", "--output", out, image_dir])
    assert stdout == ""  # --output: nothing on stdout
    return rc, read_lines(out.read_text()) if out.exists() else [], stderr


def test_predict_imagenet_lines(lite0_run, image_dir):
    rc, lines, stderr = lite0_run
    assert rc == 0, stderr
    expected = sorted(p for p in image_dir.rglob("*") if p.suffix in (".jpg", ".png"))
    assert [rec["image"] for rec in lines] == [str(p) for p in expected]  # recursive, sorted, .txt ignored
    names = imagenet_class_names()
    good = [rec for rec in lines if "error" not in rec]
    assert len(good) == N_IMAGES
    for rec in good:
        top = rec["top5"]
        assert len(top) == 5 and set(rec) == {"image", "top5"}
        probs = [t["prob"] for t in top]
        assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
        assert sum(probs) <= 1 + 1e-6
        assert len({t["index"] for t in top}) == 5
        assert all(t["class"] == names[t["index"]] for t in top)
    assert "img" in stderr  # the progress bar: 6 images in batches of 2


def test_predict_corrupt_image_in_folder_is_reported(lite0_run, image_dir):
    rc, lines, stderr = lite0_run
    bad = [rec for rec in lines if "error" in rec]
    assert rc == 0
    assert [rec["image"] for rec in bad] == [str(image_dir / "sub" / "corrupt.jpg")]
    assert "cannot read image" in bad[0]["error"]
    assert "1 of 6 images could not be read" in stderr and "Traceback" not in stderr


def test_predict_folder_reads_what_training_reads(tmp_path):
    """A folder given to predict yields the files training reads as images (`data.IMAGE_EXTENSIONS`: .tif and .ppm
    too, any case), recursively and sorted, and each of them goes through the eval transform."""
    from PIL import Image

    from effnet_jax.data import IMAGE_EXTENSIONS
    (tmp_path / "sub").mkdir()
    names = ["a.tif", "b.ppm", "c.JPG", "sub/d.tiff", "sub/e.pgm", "sub/f.png"]
    for i, name in enumerate(names):
        Image.fromarray(np.full((40, 30, 3), 20 * i, np.uint8)).convert("L" if name.endswith(".pgm") else "RGB"
                                                                       ).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image\n")
    assert {".tif", ".ppm", ".pgm"} <= set(IMAGE_EXTENSIONS)
    items = predict.collect_images([str(tmp_path)])
    assert [item.path for item in items] == [str(tmp_path / n) for n in names] and all(i.in_folder for i in items)
    transform = eval_transform("lite0")
    for item in items:
        x = predict._load(item, transform)
        assert not isinstance(x, str), (item.path, x)
        assert x.shape == (224, 224, 3)


def test_predict_top1_equals_lite_reference(lite0_run, image_dir):
    torch = pytest.importorskip("torch")
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    from PIL import Image
    from effnet_jax.weights.published import weights_file

    _, lines, _ = lite0_run
    good = [rec for rec in lines if "error" not in rec]
    transform = eval_transform("lite0")
    x = np.stack([transform(Image.open(rec["image"])) for rec in good])
    ref = ref_pkg.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights_file("lite0"))).eval()
    with torch.no_grad():
        probs = torch.softmax(ref(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()), -1).numpy()
    assert [rec["top5"][0]["index"] for rec in good] == probs.argmax(1).tolist()
    for rec, p in zip(good, probs):
        np.testing.assert_allclose([t["prob"] for t in rec["top5"]], p[[t["index"] for t in rec["top5"]]],
                                   atol=1e-4)


@pytest.fixture(scope="module")
def converted_b0(tmp_path_factory):
    """A torchvision efficientnet_b0 (random weights) saved with torch.save, converted with
    `convert SRC --variant b0 --out DIR --num-classes 10`: (rc, stdout, stderr, src, DIR, torch state dict)."""
    torch = pytest.importorskip("torch")
    tv_models = pytest.importorskip("torchvision.models")
    d = tmp_path_factory.mktemp("convert")
    torch.manual_seed(0)
    sd = {k: v.numpy() for k, v in tv_models.efficientnet_b0().state_dict().items()}
    src = d / "b0.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, src)
    out = d / "model"
    rc, stdout, stderr = run_main(convert.main, [src, "--variant", "b0", "--out", out, "--num-classes", "10"])
    return rc, stdout, stderr, src, out, sd


def test_convert_cli_writes_a_model_directory(converted_b0):
    rc, stdout, stderr, src, out, sd = converted_b0
    assert rc == 0, stderr
    assert "wrote b0 (10 classes" in stdout
    model, variables, meta = checkpoint.load_model(out)
    assert meta["variant"] == "b0" and meta["num_classes"] == 10 and meta["layout"] == "torchvision"
    np.testing.assert_array_equal(np.asarray(variables["params"]["stem"]["kernel"]),
                                  sd["features.0.0.weight"].transpose(2, 3, 1, 0))
    assert variables["params"]["classifier"]["kernel"].shape == (1280, 10)
    assert model.num_classes == 10


def test_convert_cli_refuses_an_existing_directory(converted_b0):
    _, _, _, src, out, _ = converted_b0
    before = (out / "model.json").read_text()
    rc, _, stderr = run_main(convert.main, [src, "--variant", "b0", "--out", out, "--num-classes", "10"])
    assert rc == 2 and stderr.startswith("error: ") and "already holds a model checkpoint" in stderr
    assert (out / "model.json").read_text() == before


def test_convert_cli_wrong_variant_names_a_key(converted_b0, tmp_path):
    _, _, _, src, _, _ = converted_b0
    rc, _, stderr = run_main(convert.main, [src, "--variant", "b1", "--out", tmp_path / "m"])
    assert rc == 2
    assert stderr.startswith("error: ") and "key 'features." in stderr and "Traceback" not in stderr
    assert not (tmp_path / "m").exists()


def test_predict_converted_directory(converted_b0, image_dir):
    rc, _, stderr, _, out, _ = converted_b0
    assert rc == 0, stderr
    images = sorted(image_dir.glob("*.*g"))[:2]
    rc, stdout, stderr = run_main(predict.main, ["--init", out, "--batch-size", "2", "--topk", "3", *images])
    assert rc == 0, stderr
    lines = read_lines(stdout)
    assert [rec["image"] for rec in lines] == [str(p) for p in images]
    for rec in lines:
        top = rec["top3"]
        assert len(top) == 3 and all(t["class"] == f"class_{t['index']}" and 0 <= t["index"] < 10 for t in top)
        assert [t["prob"] for t in top] == sorted((t["prob"] for t in top), reverse=True)
    assert stderr == ""  # one batch: no progress bar


def test_class_names_of_a_model_directory(converted_b0, tmp_path):
    """model.json's class_names win; otherwise ImageNet's for 1000 classes, else class_<i>."""
    assert loader.class_names_for(1000) == imagenet_class_names()
    assert loader.class_names_for(3) == ["class_0", "class_1", "class_2"]
    _, _, _, _, out, _ = converted_b0
    d = tmp_path / "named"
    d.mkdir()
    (d / "variables").symlink_to(out / "variables", target_is_directory=True)
    meta = json.loads((out / "model.json").read_text())
    (d / "model.json").write_text(json.dumps({**meta, "class_names": [f"n{i}" for i in range(10)]}))
    pred = loader.load(str(d))
    assert pred.class_names[3] == "n3" and pred.class_names[1] == "n1" and pred.variant == "b0"
    (d / "model.json").write_text(json.dumps({**meta, "class_names": ["x"]}))
    with pytest.raises(UserError, match="1 class_names for a 10-class model"):
        loader.load(str(d))
    with pytest.raises(UserError, match="holds a b0 model, not --variant b1"):
        loader.load(str(out), "b1")


def test_predict_pth_init_layouts(converted_b0, tmp_path):
    """`--init PATH.pth`: a torchvision file needs no overrides; a lukemelas-layout B file gets SAME padding and
    BN eps 1e-3 (`convert.layout_overrides`). Checked on the loaded predictor: nothing is compiled."""
    torch = pytest.importorskip("torch")
    _, _, _, src, _, sd = converted_b0
    pred = loader.load(str(src), "b0")
    assert pred.model.config.padding == "symmetric" and pred.class_names == imagenet_class_names()

    from effnet_jax.model import variants
    cfg = variants.model_config("b0")
    tv_key = {(coll, path): key for key, coll, path, _ in tables.torchvision_table(cfg)}
    lm = {key: torch.from_numpy(sd[tv_key[(coll, path)]]) for key, coll, path, _ in tables.lukemelas_table(cfg)}
    torch.save(lm, tmp_path / "lm.pth")
    pred = loader.load(str(tmp_path / "lm.pth"), "b0")
    assert pred.model.config.padding == "same" and pred.model.config.bn_epsilon == 1e-3
    np.testing.assert_array_equal(np.asarray(pred.variables["params"]["stem"]["kernel"]),
                                  sd["features.0.0.weight"].transpose(2, 3, 1, 0))


def test_predict_bad_inputs(converted_b0, image_dir, tmp_path):
    _, _, _, src, _, _ = converted_b0
    good = sorted(image_dir.glob("*.jpg"))[0]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(np.random.default_rng(1).bytes(1000))
    (tmp_path / "empty").mkdir()
    cases = [
        (["--variant", "lite0", good, tmp_path / "missing.jpg"], "missing.jpg: no such file or folder"),
        (["--variant", "lite0", corrupt], "corrupt.jpg: cannot read image"),
        (["--variant", "lite0", tmp_path / "empty"], "no image files"),
        (["--variant", "lite0", "--init", tmp_path / "nope.pth", good], "not 'imagenet', 'scratch', 'hf-hub:timm/"),
        (["--variant", "b1", "--init", src, good], "key 'features."),
        (["--variant", "lite0", "--init", corrupt, good], "--init"),
        (["--init", src, good], "--variant is required"),
        (["--variant", "b9", good], "unknown variant 'b9'"),
        (["--variant", "lite0", "--topk", "0", good], "--topk must be >= 1"),
    ]
    for argv, message in cases:
        rc, stdout, stderr = run_main(predict.main, argv)
        assert rc == 2, (argv, stderr)
        assert stdout == "" and stderr.startswith("error: ") and message in stderr, (argv, stderr)
        assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_library_path_imports_no_torch(image_dir):
    """pretrained weights, model, apply, and the predict CLI itself, in a fresh interpreter: torch never imported."""
    image = sorted(image_dir.glob("*.png"))[0]
    code = f"""
import sys
import jax
import jax.numpy as jnp
import effnet_jax
from effnet_jax.cli import predict
variables = effnet_jax.pretrained('lite0')
model = effnet_jax.create_model('lite0')
logits = jax.jit(model.apply)(variables, jnp.zeros((1, 32, 32, 3)))
assert logits.shape == (1, 1000), logits.shape
assert predict.main(['--variant', 'lite0', '--batch-size', '1', {str(image)!r}]) == 0
assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)
print('OK no torch')
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("OK no torch")
    assert json.loads(r.stdout.splitlines()[0])["image"] == str(image)


def test_effnet_train_is_python_train_py(tmp_path):
    """The installed command and the root shim are one program: the same small seeded run through each logs the
    same metrics (all but the wall-clock fields) and writes the same config.json (but its --workdir)."""
    command = pathlib.Path(sys.executable).with_name("effnet-train")
    if not command.exists():
        command = pathlib.Path(shutil.which("effnet-train") or "effnet-train")
    images = write_noise_folder(tmp_path / "images")
    env = {**os.environ, "EFFNET_JAX_CACHE": str(tmp_path / "cache"),
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    argv = ["--dataset", f"folder:{images}", "--variant", "b0", "--init", "scratch", "--width", "0.1", "--depth",
            "0.1", "--resolution", "32", "--batch-size", "4", "--epochs", "1", "--eval-batch-size", "16",
            "--val-fraction", "0.25", "--no-progress"]
    runs = {}
    for name, prefix in (("script", [sys.executable, str(REPO / "train.py")]), ("command", [str(command)])):
        workdir = tmp_path / name
        done = subprocess.run([*prefix, *argv, "--workdir", str(workdir)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        metrics = [{k: v for k, v in r.items() if k not in ("time_s", "img_s")} for r in read_metrics(workdir)]
        config = json.loads((workdir / "config.json").read_text())
        runs[name] = (metrics, {k: v for k, v in config.items() if k != "workdir"})
    assert len(runs["script"][0]) == 2 and runs["script"][0][1]["train_loss"] is not None
    assert runs["command"] == runs["script"]
