"""Tests of `effnet_jax.data`: loading (image folders and their archives, the CIFAR python version, tfds through
`tfds.testing.mock_data`), the validation split, the cache, augmentation and batching. All data is made here."""

from __future__ import annotations

import importlib.util
import pathlib
import pickle
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from effnet_jax import data
from effnet_jax.data import AugmentConfig, DatasetError, DatasetUnavailableError, load_dataset
from effnet_jax.weights.published import IMAGENET_MEAN, IMAGENET_STD

CLASSES = ("cat", "dog", "zebra")
PER_CLASS = 5


def write_image(path: pathlib.Path, value: int, size: tuple[int, int] = (8, 8)) -> None:
    """A flat image of gray level `value` (PNG: lossless, so the level tells which file it was)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def make_folder(root: pathlib.Path, train_level: bool = True, test: bool = True) -> pathlib.Path:
    """Class c, image j has gray level 40 c + j; the test split has only the first two classes."""
    base = root / "train" if train_level else root
    for c, name in enumerate(CLASSES):
        for j in range(PER_CLASS):
            write_image(base / name / f"{j:02d}.png", 40 * c + j)
    if test:
        for c, name in enumerate(CLASSES[:2]):
            for j in range(2):
                write_image(root / "test" / name / f"t{j}.png", 40 * c + 20 + j)
    return root


def make_tar(src: pathlib.Path, out: pathlib.Path, wrapper: str | None) -> pathlib.Path:
    with tarfile.open(out, "w:gz" if out.name.endswith(".gz") else "w") as archive:
        if wrapper:
            archive.add(src, arcname=wrapper)
        else:
            for child in sorted(src.iterdir()):
                archive.add(child, arcname=child.name)
    return out


def levels(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, 0].astype(int)


@pytest.fixture
def cache(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "cache"


# ------------------------------------------------------------------------------------------------ image folders


def test_folder_with_train_and_test(tmp_path: pathlib.Path, cache: pathlib.Path) -> None:
    root = make_folder(tmp_path / "data")
    write_image(root / "extra" / "cat" / "0.png", 0)
    with pytest.warns(UserWarning, match=r"ignoring the top-level folders \['extra'\]"):
        ds = load_dataset(f"folder:{root}", val_fraction=0.2, cache_dir=cache)
    assert ds.class_names == CLASSES and ds.num_classes == 3 and str(root) in ds.source
    assert ds.train.images.shape == (12, 8, 8, 3) and ds.train.images.dtype == np.uint8
    assert ds.train.labels.dtype == np.int32 and len(ds.val) == 3
    assert sorted(ds.val.labels.tolist()) == [0, 1, 2]  # stratified: one per class
    for split in (ds.train, ds.val):
        np.testing.assert_array_equal(levels(split.images) // 40, split.labels)
    assert ds.test is not None and ds.test.labels.tolist() == [0, 0, 1, 1]
    assert levels(ds.test.images).tolist() == [20, 21, 60, 61]


@pytest.mark.parametrize("layout", ["tar.gz", "tar.gz+wrapper", "tar", "flat", "flat.tar.gz+wrapper"])
def test_folder_layouts_and_archives_agree(tmp_path: pathlib.Path, cache: pathlib.Path, layout: str) -> None:
    reference = load_dataset(f"folder:{make_folder(tmp_path / 'ref')}", cache_dir=False)
    flat = layout.startswith("flat")
    root = make_folder(tmp_path / "src", train_level=not flat, test=not flat)
    if layout == "flat":
        path = root
    else:
        path = make_tar(root, tmp_path / f"data.{layout.split('+')[0].removeprefix('flat.')}",
                        "mydata" if "wrapper" in layout else None)
    ds = load_dataset(f"folder:{path}", cache_dir=cache)
    assert ds.class_names == CLASSES
    np.testing.assert_array_equal(ds.train.images, reference.train.images)
    np.testing.assert_array_equal(ds.val.labels, reference.val.labels)
    if flat:
        assert ds.test is None
    else:
        np.testing.assert_array_equal(ds.test.images, reference.test.images)


@pytest.mark.parametrize("layout", ["folder", "tar.gz+wrapper"])
def test_folder_of_only_a_test_split(tmp_path: pathlib.Path, cache: pathlib.Path, layout: str) -> None:
    """Only test/<class>/ (a new test set for a run): the test split, with its own class names; no training or
    validation examples. (It was read as one class named 'test'.) The streamed folder agrees."""
    root = tmp_path / "data"
    for c, name in enumerate(CLASSES[1:]):
        for j in range(3):
            write_image(root / "test" / name / f"{j}.png", 40 * c + j)
    path = root if layout == "folder" else make_tar(root, tmp_path / "data.tar.gz", "mydata")
    ds = load_dataset(f"folder:{path}", cache_dir=cache)
    assert ds.class_names == CLASSES[1:]
    assert ds.test is not None and ds.test.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert levels(ds.test.images).tolist() == [0, 1, 2, 40, 41, 42]
    assert len(ds.train) == len(ds.val) == 0 and ds.train.images.shape[1:] == (8, 8, 3)
    assert load_dataset(f"folder:{path}", cache_dir=cache).test.labels.tolist() == ds.test.labels.tolist()  # cached
    if layout == "folder":
        stream = load_dataset(f"folder:{root}", stream=True)
        assert stream.class_names == ds.class_names and len(stream.train) == len(stream.val) == 0
        images, labels = _streamed(stream.test)
        np.testing.assert_array_equal(images, ds.test.images)
        np.testing.assert_array_equal(labels, ds.test.labels)


def test_data_dir_image_folder_for_a_tfds_name(tmp_path: pathlib.Path, cache: pathlib.Path) -> None:
    archive = make_tar(make_folder(tmp_path / "src"), tmp_path / "mine.tar.gz", None)
    ds = load_dataset("cifar10", data_dir=archive, cache_dir=cache)
    assert ds.class_names == CLASSES and "image folder" in ds.source


def test_corrupt_image_error_or_skip(tmp_path: pathlib.Path, cache: pathlib.Path) -> None:
    root = make_folder(tmp_path / "data", test=False)
    (root / "train" / "dog" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DatasetError, match="bad.jpg"):
        load_dataset(f"folder:{root}", cache_dir=cache)
    with pytest.warns(UserWarning, match=r"skipped 1 corrupt image.*dog/bad\.jpg"):
        ds = load_dataset(f"folder:{root}", cache_dir=cache, on_corrupt="skip")
    assert len(ds.train) + len(ds.val) == 3 * PER_CLASS
    with pytest.raises(DatasetError, match="bad.jpg"):  # the cached entry remembers what it skipped
        load_dataset(f"folder:{root}", cache_dir=cache)


def test_folder_errors(tmp_path: pathlib.Path) -> None:
    def fails(path: pathlib.Path, match: str) -> None:
        with pytest.raises(DatasetError, match=match):
            load_dataset(f"folder:{path}", cache_dir=False)

    fails(tmp_path / "missing", "does not exist")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "no images")
    write_image(tmp_path / "loose" / "a.png", 0)
    write_image(tmp_path / "loose" / "b.png", 0)
    fails(tmp_path / "loose", "inside class folders")
    root = make_folder(tmp_path / "hollow", test=False)
    (root / "train" / "unicorn").mkdir()
    fails(root, r"unicorn: class folder with no images")
    root = make_folder(tmp_path / "extra")
    write_image(root / "test" / "yak" / "0.png", 0)
    fails(root, r"\['yak'\] are not in the train classes")
    (tmp_path / "notes.txt").write_text("hello")
    fails(tmp_path / "notes.txt", "not a .tar")


def test_image_size(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "sizes"
    write_image(root / "a" / "0.png", 10, size=(300, 260))
    write_image(root / "a" / "1.png", 10, size=(320, 400))
    write_image(root / "b" / "0.png", 50, size=(300, 260))
    ds = load_dataset(f"folder:{root}", val_fraction=0, cache_dir=False)
    assert ds.train.images.shape == (3, data.DEFAULT_RESIZE, data.DEFAULT_RESIZE, 3)
    assert levels(ds.train.images).tolist() == [10, 10, 50]
    ds = load_dataset(f"folder:{root}", val_fraction=0, image_size=16, cache_dir=False)
    assert ds.train.images.shape == (3, 16, 16, 3) and len(ds.val) == 0 and ds.val.images.shape == (0, 16, 16, 3)


# ------------------------------------------------------------------------------------------------ CIFAR python


def _pickle(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=2)


def make_cifar_python(root: pathlib.Path, kind: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The official layout with small batches (4 images each); returns the data rows written."""
    rows = {}
    if kind == "cifar10":
        folder = root / "cifar-10-batches-py"
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        label_key, meta = b"labels", ("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)],
                                                       b"num_cases_per_batch": 4, b"num_vis": 3072})
    else:
        folder = root / "cifar-100-python"
        names = ["train", "test"]
        label_key, meta = b"fine_labels", ("meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                                    b"coarse_label_names": [b"x"] * 20})
    folder.mkdir(parents=True)
    for name in names:
        rows[name] = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        batch = {b"batch_label": name.encode(), b"data": rows[name], label_key: [1, 0, 3, 2],
                 b"filenames": [b"x.png"] * 4}
        (folder / name).write_bytes(_pickle(batch))
    (folder / meta[0]).write_bytes(_pickle(meta[1]))
    return rows


def test_cifar10_python_tarball(tmp_path: pathlib.Path, cache: pathlib.Path) -> None:
    rows = make_cifar_python(tmp_path / "src", "cifar10", np.random.default_rng(0))
    archive = make_tar(tmp_path / "src" / "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz",
                       "cifar-10-batches-py")
    ds = load_dataset("cifar10", data_dir=archive, val_fraction=0, cache_dir=cache)
    assert ds.class_names == tuple(f"c{i}" for i in range(10)) and "python" in ds.source
    assert ds.train.images.shape == (20, 32, 32, 3) and ds.train.labels.tolist() == [1, 0, 3, 2] * 5
    n, y, x, c = 5, 7, 3, 2  # row n of the concatenated batches: the R plane, then G, then B, each row-major
    assert ds.train.images[n, y, x, c] == rows["data_batch_2"][n - 4, c * 1024 + y * 32 + x]
    assert ds.test is not None and ds.test.images[0, y, x, c] == rows["test_batch"][0, c * 1024 + y * 32 + x]
    with pytest.raises(DatasetError, match="cifar10"):
        load_dataset("cifar100", data_dir=archive, cache_dir=False)


def test_cifar100_python_folder(tmp_path: pathlib.Path) -> None:
    make_cifar_python(tmp_path, "cifar100", np.random.default_rng(1))
    ds = load_dataset("cifar100", data_dir=tmp_path, val_fraction=0.25, cache_dir=False)
    assert ds.num_classes == 100 and ds.class_names[3] == "f3"
    assert len(ds.train) == 3 and len(ds.val) == 1 and len(ds.test) == 4


def test_cifar_pickle_may_not_run_code(tmp_path: pathlib.Path) -> None:
    make_cifar_python(tmp_path, "cifar100", np.random.default_rng(2))
    (tmp_path / "cifar-100-python" / "meta").write_bytes(b"cos\nsystem\n(S'echo hacked'\ntR.")
    with pytest.raises(DatasetError, match="os.system is not allowed"):
        load_dataset("cifar100", data_dir=tmp_path, cache_dir=False)


# ---------------------------------------------------------------------------------------------------------- tfds


def test_tfds_mock_cifar10(cache: pathlib.Path) -> None:
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=20):  # 'tfds:': through tfds ('cifar10' alone downloads the archive)
        ds = load_dataset("tfds:cifar10", val_fraction=0.25, cache_dir=cache)
    assert ds.train.images.shape == (15, 32, 32, 3) and ds.train.images.dtype == np.uint8
    assert len(ds.val) == 5 and ds.num_classes == 10 and ds.train.labels.dtype == np.int32
    assert ds.test is None  # the mock knows no split list: only 'train' is read
    assert "tfds cifar10" in ds.source


def test_tfds_unavailable_and_unknown(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    tfds = pytest.importorskip("tensorflow_datasets")
    calls: list[bool] = []

    def offline(*args: object, download: bool = True, **kwargs: object) -> None:
        calls.append(download)
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(tfds, "data_source", offline)
    # With TensorFlow (simulated): tfds may prepare, and its failure is reported with the ways out.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "tensorflow" else real_find_spec(name, *a))
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("cifar10", data_dir=tmp_path / "tfds", cache_dir=False)
    message = str(info.value)
    assert "name resolution" in message and "cifar-10-python.tar.gz" in message and "--data-dir" in message
    assert calls == [False, True]
    monkeypatch.undo()
    with pytest.raises(DatasetError, match="folder:PATH"):
        load_dataset("no_such_dataset_xyz", cache_dir=False)


def test_tfds_without_tensorflow_stops_before_downloading(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: pathlib.Path) -> None:
    """tfds prepares a dataset only with TensorFlow; without it, an unprepared dataset is refused before tfds
    downloads anything, with the extra to install and the other ways in."""
    tfds = pytest.importorskip("tensorflow_datasets")
    assert importlib.util.find_spec("tensorflow") is None  # the README's test venv has no TensorFlow
    calls: list[bool] = []
    real = tfds.data_source

    def spy(*args: object, download: bool = True, **kwargs: object) -> object:
        calls.append(download)
        return real(*args, download=download, **kwargs)

    monkeypatch.setattr(tfds, "data_source", spy)
    for spec in ("svhn_cropped", "tfds:cifar10"):
        with pytest.raises(DatasetUnavailableError) as info:
            load_dataset(spec, data_dir=tmp_path / "tfds", cache_dir=False)
        message = str(info.value)
        assert "pip install -e '.[tfds]'" in message and "folder:PATH" in message and "--data-dir" in message
        assert "nothing was downloaded" in message
    assert "without --data-dir downloads the official archive" in message
    assert calls == [False, False]  # never asked to download
    assert not (tmp_path / "tfds" / "downloads").exists()


# ------------------------------------------------------------------------------------------ split and the cache


def test_stratified_split() -> None:
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    train, val = data.stratified_split(labels, 0.1, seed=0)
    assert np.bincount(labels[val]).tolist() == [5, 3, 2]
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    np.testing.assert_array_equal(val, data.stratified_split(labels, 0.1, seed=0)[1])
    assert not np.array_equal(val, data.stratified_split(labels, 0.1, seed=1)[1])
    assert len(data.stratified_split(labels, 0.0, seed=0)[1]) == 0
    assert len(data.stratified_split(np.repeat([0, 1, 2], 3), 0.5, seed=0)[1]) == 4  # round(4.5), 1 + 1 + 2


def test_cache_hit_and_invalidation(tmp_path: pathlib.Path, cache: pathlib.Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_folder(tmp_path / "data")
    first = load_dataset(f"folder:{root}", cache_dir=cache, seed=3)
    assert len(list(cache.glob("*.npz"))) == 1 and not list(cache.glob(".*"))  # no temp file left

    def no_decoding(data_bytes: bytes) -> Image.Image:
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(data.folder, "decode_image", no_decoding)
    second = load_dataset(f"folder:{root}", cache_dir=cache, seed=3)
    for a, b in [(first.train, second.train), (first.val, second.val), (first.test, second.test)]:
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
    assert second.class_names == first.class_names and second.source == first.source
    write_image(root / "train" / "cat" / "00.png", 7)  # the data changed: decoded again
    with pytest.raises(DatasetError, match="decoded although cached"):
        load_dataset(f"folder:{root}", cache_dir=cache)


def test_cache_write_stopped_leaves_no_temp_file(tmp_path: pathlib.Path, cache: pathlib.Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal while the cache is written (train.py stops at once before the first step) takes the temp file,
    which may be gigabytes, with it."""
    root = make_folder(tmp_path / "data")

    def interrupted_savez(f, **arrays):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted_savez)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(f"folder:{root}", cache_dir=cache)
    assert cache.is_dir() and not list(cache.iterdir())


def test_default_cache_dir_from_env(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.CACHE_ENV_VAR, str(tmp_path / "home"))
    assert data.default_cache_dir() == tmp_path / "home" / "datasets"
    load_dataset(f"folder:{make_folder(tmp_path / 'data')}")
    assert len(list((tmp_path / "home" / "datasets").glob("*.npz"))) == 1


# ------------------------------------------------------------------------------------------------- augmentation


def random_images(n: int, size: int = 12, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def test_augment_shapes_determinism_and_batch_split() -> None:
    cfg = AugmentConfig(rotation=20, zoom=0.2, translation=0.1, contrast=0.3)

    def augment(key, images, indices):  # then resized to 16 px and normalized, as the train step does
        return data.resize_normalize(data.augment_batch(key, images, indices, cfg), 16, IMAGENET_MEAN, IMAGENET_STD)

    images, indices, key = random_images(8), jnp.arange(100, 108, dtype=jnp.int32), jax.random.key(0)
    out = augment(key, images, indices)
    assert out.shape == (8, 16, 16, 3) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, augment(key, images, indices))
    halves = [augment(key, images[s], indices[s]) for s in (slice(0, 4), slice(4, 8))]
    np.testing.assert_allclose(np.concatenate(halves), out, atol=1e-5)
    assert not np.allclose(out, augment(jax.random.key(1), images, indices))


def test_flip_flips_half() -> None:
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(1, 4, 4, 3)
    n = 2000
    cfg = AugmentConfig(crop_padding=0, flip=True)  # (in [0, 1]: not normalized)
    out = np.asarray(data.augment_batch(jax.random.key(0), jnp.asarray(np.repeat(image, n, 0)),
                                        jnp.arange(n, dtype=jnp.int32), cfg)) * 255
    plain = np.isclose(out, image, atol=1e-3).all(axis=(1, 2, 3))
    flipped = np.isclose(out, image[:, :, ::-1], atol=1e-3).all(axis=(1, 2, 3))
    assert (plain ^ flipped).all()
    assert abs(flipped.mean() - 0.5) < 0.05


def test_crop_stays_within_padding() -> None:
    p, n = 2, 64
    images = np.asarray(random_images(n, size=8, seed=1))
    cfg = AugmentConfig(crop_padding=p, flip=False)
    out = np.rint(np.asarray(data.augment_batch(jax.random.key(0), jnp.asarray(images),
                                                jnp.arange(n, dtype=jnp.int32), cfg)) * 255).astype(np.uint8)
    offsets = set()
    for image, result in zip(images, out):
        padded = np.pad(image, ((p, p), (p, p), (0, 0)))
        found = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                 if np.array_equal(padded[dy:dy + 8, dx:dx + 8], result)]
        assert found, "the crop is not a window of the padded image"
        offsets.update(found)
    assert len(offsets) > 10


def test_affine_near_identity_and_contrast_keeps_mean() -> None:
    images = random_images(4, size=10, seed=2)
    reference = data.eval_batch(images)  # (normalized with ImageNet's mean/std, as the augmented batch below)
    cfg = AugmentConfig(crop_padding=0, flip=False, rotation=1e-3, zoom=1e-4, translation=1e-5)
    augmented = data.augment_batch(jax.random.key(0), images, jnp.arange(4), cfg)
    np.testing.assert_allclose(data.resize_normalize(augmented, None, IMAGENET_MEAN, IMAGENET_STD), reference,
                               atol=2e-2)
    gray = jnp.asarray(np.random.default_rng(3).integers(100, 156, (4, 10, 10, 3), dtype=np.uint8))
    cfg = AugmentConfig(crop_padding=0, flip=False, contrast=0.5)
    out = data.augment_batch(jax.random.key(0), gray, jnp.arange(4), cfg)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), (gray / 255.0).mean(axis=(1, 2)), atol=1e-5)
    assert not np.allclose(out, gray / 255.0, atol=1e-3)


def test_eval_batch_is_plain_normalize() -> None:
    images = random_images(3)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    expected = (np.asarray(images, np.float32) / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(data.eval_batch(images, None, mean, std), expected, rtol=1e-5, atol=1e-5)
    assert data.eval_batch(images, 20).shape == (3, 20, 20, 3)


# ----------------------------------------------------------------------------------------------------- batching


def test_epoch_permutation_and_batches() -> None:
    perm = data.epoch_permutation(10, seed=0, epoch=1)
    assert sorted(perm.tolist()) == list(range(10)) and perm.dtype == np.int32
    np.testing.assert_array_equal(perm, data.epoch_permutation(10, seed=0, epoch=1))
    assert not np.array_equal(perm, data.epoch_permutation(10, seed=0, epoch=2))
    assert [len(b) for b in data.batch_indices(perm, 4)] == [4, 4]
    batches = data.batch_indices(perm, 4, drop_last=False)
    assert [len(b) for b in batches] == [4, 4, 2] and np.array_equal(np.concatenate(batches), perm)


@pytest.mark.parametrize("n", [0, 7, 8, 10])
def test_eval_batches_cover_each_example_once(n: int) -> None:
    indices, mask = data.eval_batches(n, 4)
    assert indices.shape == mask.shape == (-(-n // 4), 4)
    assert sorted(indices[mask].tolist()) == list(range(n))
    assert ((indices >= 0) & (indices < max(n, 1))).all()


# ----------------------------------------------------------------------------------------------------- streaming


def _streamed(split: data.Split) -> tuple[np.ndarray, np.ndarray]:
    return split.read_batch(np.arange(len(split)))


def test_stream_of_a_folder_equals_the_loaded_folder(tmp_path: pathlib.Path) -> None:
    root = make_folder(tmp_path / "data")
    loaded = load_dataset(f"folder:{root}", val_fraction=0.25, seed=3, cache_dir=False)
    stream = load_dataset(f"folder:{root}", val_fraction=0.25, seed=3, stream=True)
    assert stream.class_names == loaded.class_names and stream.image_size == 8
    assert stream.streamed and stream.train.streamed and not loaded.streamed and loaded.image_size == 8
    for got, want in ((stream.train, loaded.train), (stream.val, loaded.val), (stream.test, loaded.test)):
        images, labels = _streamed(got)
        np.testing.assert_array_equal(images, want.images)
        np.testing.assert_array_equal(labels, want.labels)
    sampled = stream.train.sample(4, seed=1)
    np.testing.assert_array_equal(_streamed(sampled)[0], loaded.train.sample(4, seed=1).images)


@pytest.mark.parametrize("image_size", [None, 6])
def test_stream_sizes_like_the_loader(tmp_path: pathlib.Path, image_size: int | None) -> None:
    """Mixed sizes: every image resized and center-cropped to S, or to DEFAULT_RESIZE, as load_dataset does."""
    write_image(tmp_path / "a" / "0.png", 10, (16, 16))  # square, but not the size of the other
    write_image(tmp_path / "b" / "0.png", 200, (12, 20))
    loaded = load_dataset(f"folder:{tmp_path}", val_fraction=0.0, image_size=image_size, cache_dir=False)
    stream = load_dataset(f"folder:{tmp_path}", val_fraction=0.0, image_size=image_size, stream=True)
    assert stream.image_size == (image_size or data.DEFAULT_RESIZE)
    np.testing.assert_array_equal(_streamed(stream.train)[0], loaded.train.images)


def test_stream_batches_in_order_from_threads(tmp_path: pathlib.Path) -> None:
    stream = load_dataset(f"folder:{make_folder(tmp_path / 'data', test=False)}", val_fraction=0.0, stream=True)
    batches = data.batch_indices(data.epoch_permutation(len(stream.train), 0, 1), 4)
    got = list(data.stream_batches(stream.train, batches, num_threads=2, prefetch=3))
    assert len(got) == len(batches) == len(stream.train) // 4
    for (images, labels), idx in zip(got, batches):
        want_images, want_labels = stream.train.read_batch(idx)
        np.testing.assert_array_equal(images, want_images)
        np.testing.assert_array_equal(labels, want_labels)
        assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8


def test_stream_refuses_what_it_cannot_read_at_random(tmp_path: pathlib.Path) -> None:
    root = make_folder(tmp_path / "data")
    tar = make_tar(root, tmp_path / "data.tar.gz", None)
    with pytest.raises(DatasetError, match="extract it"):
        load_dataset(f"folder:{tar}", stream=True)
    make_cifar_python(tmp_path / "cifar", "cifar10", np.random.default_rng(0))
    with pytest.raises(DatasetError, match="without streaming"):
        load_dataset("cifar10", data_dir=tmp_path / "cifar" / "cifar-10-batches-py", stream=True)
    (root / "train" / CLASSES[-1] / "04.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="04.png"):  # the size check reads every header
        load_dataset(f"folder:{root}", val_fraction=0.0, stream=True)
    stream = load_dataset(f"folder:{root}", val_fraction=0.0, image_size=8, stream=True)  # reads no image
    with pytest.raises(DatasetError, match="04.png"):
        stream.train.read_batch(np.arange(len(stream.train)))
    with pytest.raises(DatasetError, match="04.png"):  # from grain's threads to the consumer, as it was raised
        list(data.stream_batches(stream.train, [np.arange(len(stream.train))]))


def test_stream_none_decides_by_the_decoded_size(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stream=None (train.py without --stream/--no-stream): streamed when `decoded_bytes` exceeds
    STREAM_ABOVE_BYTES; stream=True/False win; on_corrupt='skip' needs the images decoded first."""
    root = make_folder(tmp_path / "data")
    size = data.decoded_bytes(f"folder:{root}")
    assert not load_dataset(f"folder:{root}", stream=None, cache_dir=False).streamed
    monkeypatch.setattr(data.load, "STREAM_ABOVE_BYTES", size - 1)
    streamed = load_dataset(f"folder:{root}", val_fraction=0.2, stream=None)
    loaded = load_dataset(f"folder:{root}", val_fraction=0.2, stream=False, cache_dir=False)
    assert streamed.streamed and not loaded.streamed
    np.testing.assert_array_equal(_streamed(streamed.val)[0], loaded.val.images)
    with pytest.raises(ValueError, match=r"does not go with --stream \(folder:.* GiB decoded, more than"):
        load_dataset(f"folder:{root}", stream=None, on_corrupt="skip")
    with pytest.raises(ValueError, match=r"does not go with --stream$"):
        load_dataset(f"folder:{root}", stream=True, on_corrupt="skip")


@pytest.mark.parametrize("stream", [False, True])
def test_max_train_examples_samples_the_train_split(tmp_path: pathlib.Path, stream: bool) -> None:
    root = make_folder(tmp_path / "data")
    full = load_dataset(f"folder:{root}", val_fraction=0.2, seed=3, cache_dir=False)
    few = load_dataset(f"folder:{root}", val_fraction=0.2, seed=3, cache_dir=False, stream=stream,
                       max_train_examples=5)
    want = full.train.sample(5, seed=3)
    assert len(few.train) == 5 and few.streamed == stream
    np.testing.assert_array_equal(_streamed(few.train)[0], want.images)
    np.testing.assert_array_equal(few.train.labels, want.labels)
    np.testing.assert_array_equal(few.val.labels, full.val.labels)
    assert len(load_dataset(f"folder:{root}", cache_dir=False, stream=stream, max_train_examples=100).train) == 13


def test_stream_of_tfds_equals_the_loaded_dataset(cache: pathlib.Path) -> None:
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=20):
        loaded = load_dataset("tfds:cifar10", val_fraction=0.25, cache_dir=cache)
        stream = load_dataset("tfds:cifar10", val_fraction=0.25, stream=True)
        streamed = {name: _streamed(getattr(stream, name)) for name in ("train", "val")}
    assert stream.class_names == loaded.class_names and stream.image_size == 32 and stream.test is None
    for name in ("train", "val"):
        np.testing.assert_array_equal(streamed[name][0], getattr(loaded, name).images)
        np.testing.assert_array_equal(streamed[name][1], getattr(loaded, name).labels)


def test_decoded_bytes_estimates_without_decoding(tmp_path: pathlib.Path, cache: pathlib.Path) -> None:
    root = make_folder(tmp_path / "data")  # train and test images, 8 x 8
    assert data.decoded_bytes(f"folder:{root}") == (len(CLASSES) * PER_CLASS + 2 * 2) * 8 * 8 * 3
    assert data.decoded_bytes(f"folder:{make_tar(root, tmp_path / 'd.tar', None)}") is None  # cannot stream
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=20):
        size = data.decoded_bytes("tfds:cifar10")
    assert size in (None, 60_000 * 32 * 32 * 3)  # the registered split sizes, or unknown when not prepared
