"""Read PyTorch checkpoint files (state dicts) into NumPy arrays without importing torch.

``torch.save`` writes one of two formats; both keep the object graph in a pickle, where each tensor is a
call ``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks)``
(dtypes that have no ``torch.*Storage`` class, e.g. uint16 or float8, use ``_rebuild_tensor_v3`` with an
untyped byte storage and an explicit dtype global). Storages are pickle persistent ids whose bytes lie
outside the pickle:

* **zip format** (the default since torch 1.6): an uncompressed zip whose entries share one top-level folder
  ``<name>/``: ``data.pkl`` (the pickle), ``data/<key>`` (the raw bytes of storage ``key``), ``byteorder``
  ("little" or "big"; absent in old files, which are little-endian), ``version`` and bookkeeping entries.
  Persistent ids are ``('storage', storage_type, key, location, numel)``.
* **legacy format** (torch < 1.6, or ``_use_new_zipfile_serialization=False``): pickles back to back — a magic
  number, the protocol version 1001, a sys-info dict, the object with persistent ids
  ``('storage', storage_type, root_key, location, numel, view_metadata)``, then the list of storage keys — and
  after them every listed storage in that order: an 8-byte little-endian element count and the elements,
  always little-endian.

The pickles are read by a restricted unpickler that maps the few globals a state dict needs to inert
placeholders (like ``torch.load(..., weights_only=True)``); any other global raises `UnsafeCheckpointError`
before anything is called. Tensors are then cut out of the storage bytes with their offset, shape and strides
and returned as C-contiguous, native-byte-order NumPy copies.
"""

from __future__ import annotations

import _compat_pickle
import collections
import functools
import io
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from effnet_jax.errors import CheckpointReadError, UserError

__all__ = ["CheckpointReadError", "UnsafeCheckpointError", "read_torch_state_dict"]


class UnsafeCheckpointError(UserError, ValueError):
    """The checkpoint's pickle names a global that a plain state dict never needs (it is not executed)."""


# torch dtype names this reader can return. All are NumPy dtype names too, except those in _ML_DTYPES, which
# come from ml_dtypes (installed with jax, imported only when a checkpoint holds such a tensor).
_DTYPE_NAMES = frozenset({
    "float64", "float32", "float16", "bfloat16", "complex128", "complex64",
    "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool",
    "float8_e5m2", "float8_e4m3fn", "float8_e5m2fnuz", "float8_e4m3fnuz", "float8_e8m0fnu",
})
_ML_DTYPES = frozenset({"bfloat16", "float8_e5m2", "float8_e4m3fn", "float8_e5m2fnuz", "float8_e4m3fnuz",
                        "float8_e8m0fnu"})

# Element dtype of each typed storage class in persistent ids; UntypedStorage holds bytes.
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "ComplexDoubleStorage": "complex128", "ComplexFloatStorage": "complex64",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


@functools.cache
def _numpy_dtype(name: str) -> np.dtype:
    if name in _ML_DTYPES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


# --- Placeholders the restricted unpickler builds instead of torch objects ---------------------------------


class _Placeholder:
    def __setstate__(self, state: object) -> None:
        # Reached only by a BUILD opcode aimed at a placeholder; torch never writes one.
        raise ValueError(f"unexpected state for {type(self).__name__}")


@dataclass(frozen=True)
class _StorageType(_Placeholder):
    """A ``torch.*Storage`` class named in a persistent id."""

    dtype: str


@dataclass(frozen=True)
class _DType(_Placeholder):
    """A ``torch.<dtype>`` global (the explicit dtype argument of ``_rebuild_tensor_v3``)."""

    name: str


@dataclass(frozen=True)
class _Storage(_Placeholder):
    """Elements ``[start, start + numel)`` of the stored storage ``key`` (start > 0 only for legacy views)."""

    key: str
    dtype: str
    start: int
    numel: int

    @property
    def end_byte(self) -> int:
        return (self.start + self.numel) * _numpy_dtype(self.dtype).itemsize


@dataclass(frozen=True)
class _Tensor(_Placeholder):
    """A validated strided view of a storage: element ``offset + sum(i * stride)`` in units of ``dtype``."""

    storage: _Storage
    dtype: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _checked_int(value: object, what: str) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value!r}")
    return value


def _checked_ints(values: object, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)):
        raise ValueError(f"tensor {what} must be a tuple, got {values!r}")
    return tuple(_checked_int(v, f"tensor {what} entry") for v in values)


def _tensor(storage: object, offset: object, size: object, stride: object, dtype: str | None = None) -> _Tensor:
    """Validate a rebuild call's arguments; every element it addresses must lie inside the storage."""
    if not isinstance(storage, _Storage):
        raise ValueError(f"tensor data is not a storage reference: {storage!r}")
    dtype = storage.dtype if dtype is None else dtype
    offset = _checked_int(offset, "tensor storage offset")
    shape, strides = _checked_ints(size, "size"), _checked_ints(stride, "stride")
    if len(shape) != len(strides):
        raise ValueError(f"tensor size {shape} and stride {strides} differ in length")
    # v3 tensors reinterpret a byte storage as `dtype`; v2 tensors have the storage's own dtype.
    available = storage.numel * _numpy_dtype(storage.dtype).itemsize // _numpy_dtype(dtype).itemsize
    if all(shape):  # an empty tensor addresses nothing
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
        if last >= available:
            raise ValueError(f"tensor of size {shape}, stride {strides} and offset {offset} reaches element "
                             f"{last} of a storage of {available} elements")
    return _Tensor(storage, dtype, offset, shape, strides)


# Stand-ins for torch._utils' rebuild functions; requires_grad, hooks, metadata and state do not matter here.
def _rebuild_tensor(storage: object, storage_offset: object, size: object, stride: object) -> _Tensor:
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage: object, storage_offset: object, size: object, stride: object,
                       requires_grad: object, backward_hooks: object, metadata: object = None) -> _Tensor:
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage: object, storage_offset: object, size: object, stride: object,
                       requires_grad: object, backward_hooks: object, dtype: object,
                       metadata: object = None) -> _Tensor:
    if not isinstance(dtype, _DType):
        raise ValueError(f"tensor dtype must be a torch dtype, got {dtype!r}")
    return _tensor(storage, storage_offset, size, stride, dtype.name)


def _rebuild_parameter(data: object, requires_grad: object, backward_hooks: object,
                       state: object = None) -> _Tensor:
    if not isinstance(data, _Tensor):
        raise ValueError(f"parameter data is not a tensor: {data!r}")
    return data


_ALLOWED_GLOBALS: dict[str, object] = {
    "collections.OrderedDict": collections.OrderedDict,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch.storage.UntypedStorage": _StorageType("uint8"),
    **{f"torch.{cls}": _StorageType(dtype) for cls, dtype in _STORAGE_DTYPES.items()},
    **{f"torch.{name}": _DType(name) for name in _DTYPE_NAMES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, where: str, load_storage: Callable[[tuple], _Storage] | None):
        super().__init__(file, encoding="utf-8")
        self._where = where
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 0-2 pickles written by Python 3 use Python 2 names (e.g. '__builtin__.eval'); report and
        # match the Python 3 name, as pickle.Unpickler.find_class does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return _ALLOWED_GLOBALS[f"{module}.{name}"]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._where}: refusing to load global '{module}.{name}' (only tensor state dicts can be read; "
                "nothing was executed)") from None

    def persistent_load(self, pid: Any) -> _Storage:
        if self._load_storage is None:
            raise ValueError(f"unexpected persistent id {pid!r}")
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise ValueError(f"unknown persistent id {pid!r}")
        return self._load_storage(pid)


def _corrupt(where: str, what: str) -> CheckpointReadError:
    return CheckpointReadError(f"{where}: truncated or corrupt PyTorch checkpoint ({what})")


def _unpickle(file: BinaryIO, where: str, what: str,
              load_storage: Callable[[tuple], _Storage] | None = None) -> Any:
    try:
        return _RestrictedUnpickler(file, where, load_storage).load()
    except (UnsafeCheckpointError, CheckpointReadError):
        raise
    except Exception as exc:  # the bytes are untrusted: any failure to parse them means a bad file
        raise _corrupt(where, f"cannot unpickle {what}: {type(exc).__name__}: {exc}") from exc


def _storage(storage_type: object, key: object, numel: object) -> _Storage:
    if not isinstance(storage_type, _StorageType):
        raise ValueError(f"persistent id names no storage type: {storage_type!r}")
    if type(key) is not str:
        raise ValueError(f"storage key must be a str, got {key!r}")
    return _Storage(key, storage_type.dtype, 0, _checked_int(numel, "storage size"))


def _state_dict_tensors(obj: object, where: str) -> dict[str, _Tensor]:
    """The tensors of a state dict, also when it is wrapped as ``{'state_dict': ...}`` or ``{'model': ...}``."""
    if not isinstance(obj, dict):
        raise CheckpointReadError(f"{where}: expected a state dict (a mapping of names to tensors), "
                                  f"found {'a tensor' if isinstance(obj, _Tensor) else type(obj).__name__}")
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, _Tensor)}


def _needed_bytes(tensors: Iterable[_Tensor]) -> dict[str, int]:
    """For each stored storage that a non-empty tensor uses: how many of its bytes must exist."""
    needed: dict[str, int] = {}
    for t in tensors:
        if all(t.shape):
            needed[t.storage.key] = max(needed.get(t.storage.key, 0), t.storage.end_byte)
    return needed


def _to_array(t: _Tensor, raw: bytes, swap: bool) -> np.ndarray:
    dtype = _numpy_dtype(t.dtype)
    if not all(t.shape):
        return np.zeros(t.shape, dtype)
    # A strided view of `raw` (`_tensor` checked that it stays inside its storage; numpy checks it stays inside
    # `raw`), copied into C order. (as_strided would not do: it cannot rebuild ml_dtypes dtypes.)
    view = np.ndarray(t.shape, dtype, buffer=raw,
                      offset=(t.storage.start * _numpy_dtype(t.storage.dtype).itemsize + t.offset * dtype.itemsize),
                      strides=[s * dtype.itemsize for s in t.stride])
    array = view.copy()
    if swap:
        array.byteswap(inplace=True)
    return array


def _arrays(tensors: dict[str, _Tensor], raw: dict[str, bytes], byteorder: str, where: str) -> dict[str, np.ndarray]:
    """Cut every tensor out of the bytes of its storage (empty tensors need none)."""
    swap = byteorder != sys.byteorder
    try:
        return {name: _to_array(t, raw.get(t.storage.key, b""), swap) for name, t in tensors.items()}
    except ValueError as exc:  # e.g. a shape too big for any array
        raise _corrupt(where, str(exc)) from exc


def _read_zip(file: BinaryIO, where: str) -> dict[str, np.ndarray]:
    def read(zf: zipfile.ZipFile, name: str) -> bytes:
        try:
            return zf.read(name)
        except KeyError:
            raise _corrupt(where, f"no entry '{name}' in the archive") from None
        except Exception as exc:  # bad CRC, truncated entry, unsupported compression, bad offsets...
            raise _corrupt(where, f"cannot read entry '{name}': {type(exc).__name__}: {exc}") from exc

    try:
        zf = zipfile.ZipFile(file)
    except Exception as exc:
        raise _corrupt(where, f"not a readable zip archive: {type(exc).__name__}: {exc}") from exc
    with zf:
        names = zf.namelist()
        # Like torch, take the archive's folder from its first entry.
        prefix = names[0].split("/", 1)[0] if names else ""
        byteorder = "little"
        if f"{prefix}/byteorder" in names:
            byteorder = read(zf, f"{prefix}/byteorder").decode("ascii", "replace")
            if byteorder not in ("little", "big"):
                raise _corrupt(where, f"unknown byte order {byteorder!r}")

        def load_storage(pid: tuple) -> _Storage:
            if len(pid) != 5:
                raise ValueError(f"malformed persistent id {pid!r}")
            _, storage_type, key, _location, numel = pid
            return _storage(storage_type, key, numel)

        pkl = io.BytesIO(read(zf, f"{prefix}/data.pkl"))
        tensors = _state_dict_tensors(_unpickle(pkl, where, "data.pkl", load_storage), where)
        raw: dict[str, bytes] = {}
        for key, nbytes in _needed_bytes(tensors.values()).items():
            raw[key] = read(zf, f"{prefix}/data/{key}")
            if len(raw[key]) < nbytes:
                raise _corrupt(where, f"storage 'data/{key}' has {len(raw[key])} bytes, needs {nbytes}")
    return _arrays(tensors, raw, byteorder, where)


def _read_legacy(file: BinaryIO, where: str) -> dict[str, np.ndarray]:
    if _unpickle(file, where, "the magic number") != _LEGACY_MAGIC:
        raise CheckpointReadError(f"{where}: not a PyTorch checkpoint (bad magic number)")
    protocol = _unpickle(file, where, "the protocol version")
    if protocol != _LEGACY_PROTOCOL:
        raise CheckpointReadError(f"{where}: unsupported legacy PyTorch checkpoint protocol {protocol!r}")
    _unpickle(file, where, "the sys info")  # native sizes and byte order of the writer; the data is little-endian

    roots: dict[str, _Storage] = {}

    def load_storage(pid: tuple) -> _Storage:
        if len(pid) != 6:
            raise ValueError(f"malformed persistent id {pid!r}")
        _, storage_type, key, _location, numel, view_metadata = pid
        root = _storage(storage_type, key, numel)
        if roots.setdefault(key, root) != root:
            raise ValueError(f"storage {key!r} is described twice, differently")
        if view_metadata is None:
            return root
        # Storage views of torch < 0.4: elements [offset, offset + size) of the root storage.
        _view_key, offset, size = view_metadata
        view = _Storage(key, root.dtype, _checked_int(offset, "view offset"), _checked_int(size, "view size"))
        if view.start + view.numel > root.numel:
            raise ValueError(f"storage view {view_metadata!r} exceeds its storage of {root.numel} elements")
        return view

    tensors = _state_dict_tensors(_unpickle(file, where, "the state dict", load_storage), where)
    keys = _unpickle(file, where, "the storage keys")
    if not isinstance(keys, list) or not all(type(k) is str for k in keys) or not roots.keys() <= set(keys):
        raise _corrupt(where, "storage key list does not match the storages")

    needed = _needed_bytes(tensors.values())
    raw: dict[str, bytes] = {}
    size = os.fstat(file.fileno()).st_size
    # The storages follow in key order; read those the tensors use and skip the rest.
    for key in keys:
        if len(raw) == len(needed):
            break
        if key not in roots:
            raise _corrupt(where, f"unknown storage {key!r} in the storage key list")
        header = file.read(8)
        if len(header) < 8:
            raise _corrupt(where, f"file ends before storage {key!r}")
        (numel,) = struct.unpack("<q", header)
        if numel != roots[key].numel:
            raise _corrupt(where, f"storage {key!r} holds {numel} elements, expected {roots[key].numel}")
        nbytes, remaining = roots[key].end_byte, size - file.tell()
        if nbytes > remaining:
            raise _corrupt(where, f"storage {key!r} has {remaining} bytes, needs {nbytes}")
        if key in needed:
            raw[key] = file.read(nbytes)
        else:
            file.seek(nbytes, os.SEEK_CUR)
    return _arrays(tensors, raw, "little", where)


def read_torch_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read the tensors of a PyTorch state-dict checkpoint, without torch.

    Reads both ``torch.save`` formats (zip and legacy). The checkpoint must be a mapping of names to tensors,
    possibly wrapped as ``{'state_dict': ...}`` or ``{'model': ...}``; entries that are not tensors are left
    out. Returns ``{name: array}`` in the file's order, each a C-contiguous native-byte-order copy with the
    tensor's shape and dtype (bfloat16 and float8 tensors as ``ml_dtypes`` arrays).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the pickle names a global a state dict does not need (e.g. a pickled
            ``nn.Module`` or ``os.system``); nothing from the file is executed.
        CheckpointReadError: the file is truncated, corrupt, or not a state-dict checkpoint.
    """
    where = os.fspath(path)
    with open(path, "rb") as file:
        head = file.read(4)
        file.seek(0)
        if head[:2] == b"PK":
            return _read_zip(file, where)
        if head[:1] == b"\x80":  # the protocol opcode of the legacy format's first pickle
            return _read_legacy(file, where)
    if not head:
        raise CheckpointReadError(f"{where}: empty file, not a PyTorch checkpoint")
    raise CheckpointReadError(f"{where}: not a PyTorch checkpoint (unrecognized header {head!r})")
