"""Read `torch.save` checkpoints with neither torch nor the execution of pickled code.

Two layouts exist:

* zip (the default since torch 1.6): `<root>/data.pkl` is the pickled object, every tensor storage is a
  record `<root>/data/<key>`, and an optional `<root>/byteorder` record says "little" or "big".
* legacy (`_use_new_zipfile_serialization=False`): pickles written back to back (a magic number, the
  protocol version, a sys-info dict, the object itself, the sorted list of storage keys), then for
  each key a little-endian int64 element count followed by the raw storage bytes.

In both, a tensor is pickled as a call to `torch._utils._rebuild_tensor_v2` (or `_v3` for newer dtypes)
whose first argument is a persistent id `("storage", torch.<X>Storage, key, location, numel, ...)`.
`_Unpickler` maps the few globals such pickles need to inert stand-ins and refuses every other global
when it is looked up, i.e. before the pickle can call it. Tensors are first recorded as `_TensorRef`s
and turned into numpy arrays once the storage bytes are at hand.
"""

import _compat_pickle
import collections
import io
import pickle
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

from eqx_models.errors import CheckpointError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}

# torch dtypes that may appear as the `dtype` argument of `_rebuild_tensor_v3`.
_TORCH_DTYPES = {
    "float64": np.float64,
    "double": np.float64,
    "float32": np.float32,
    "float": np.float32,
    "float16": np.float16,
    "half": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64,
    "long": np.int64,
    "int32": np.int32,
    "int": np.int32,
    "int16": np.int16,
    "short": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "bool": np.bool_,
    "complex64": np.complex64,
    "complex128": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "float8_e8m0fnu": ml_dtypes.float8_e8m0fnu,
}


class _BadPickle(Exception):
    """Raised while unpickling; re-raised as a CheckpointError naming the file."""


class _Inert:
    """Base of the stand-ins: a pickle cannot alter them through BUILD."""

    __slots__ = ()

    def __setstate__(self, state):
        raise _BadPickle(f"the pickle tries to set the state of a {type(self).__name__}")


class _StorageType(_Inert):
    """Stand-in for `torch.<X>Storage` and `torch.UntypedStorage` (only its dtype matters)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype):
        self.name, self.dtype = name, np.dtype(dtype)


class _DType(_Inert):
    """Stand-in for a `torch.<dtype>` object."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype):
        self.name, self.dtype = name, np.dtype(dtype)


class _TypeMarker(_Inert):
    """Stand-in for `torch.Tensor` / `torch.nn.Parameter` passed to `_rebuild_from_type_v2`."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _StorageRef(_Inert):
    """A (view of a) storage: `numel` elements of `dtype` from element `offset` of record `key`."""

    __slots__ = ("key", "dtype", "offset", "numel")

    def __init__(self, key: str, dtype: np.dtype, offset: int, numel: int):
        self.key, self.dtype, self.offset, self.numel = key, dtype, offset, numel


class _TensorRef(_Inert):
    """A tensor waiting for its storage bytes."""

    __slots__ = ("storage", "dtype", "offset", "shape", "stride", "flags")

    def __init__(self, storage, dtype, offset, shape, stride, flags):
        self.storage, self.dtype, self.offset = storage, dtype, offset
        self.shape, self.stride, self.flags = shape, stride, flags


def _int_tuple(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise _BadPickle(f"tensor {what} must be a sequence of non-negative ints, got {value!r:.80}")
    return tuple(value)


def _tensor_ref(storage, dtype, offset, size, stride, metadata=None) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise _BadPickle(f"a tensor is rebuilt from a {type(storage).__name__}, not a storage")
    if type(offset) is not int or offset < 0:
        raise _BadPickle(f"invalid tensor storage offset {offset!r:.80}")
    shape, strides = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise _BadPickle(f"tensor size {shape} and stride {strides} differ in length")
    flags = dict(metadata) if isinstance(metadata, dict) else {}
    return _TensorRef(storage, dtype, offset, shape, strides, flags)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor_ref(storage, getattr(storage, "dtype", None), storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _tensor_ref(storage, getattr(storage, "dtype", None), storage_offset, size, stride, metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not isinstance(dtype, _DType):
        raise _BadPickle(f"_rebuild_tensor_v3 got {dtype!r:.80} instead of a torch dtype")
    return _tensor_ref(storage, dtype.dtype, storage_offset, size, stride, metadata)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    if not isinstance(data, _TensorRef):
        raise _BadPickle(f"a parameter is rebuilt from a {type(data).__name__}, not a tensor")
    return data


_REBUILDERS = {
    "_rebuild_tensor": _rebuild_tensor,
    "_rebuild_tensor_v2": _rebuild_tensor_v2,
    "_rebuild_tensor_v3": _rebuild_tensor_v3,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter,
}


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in _REBUILDERS.values() or not isinstance(new_type, _TypeMarker):
        raise _BadPickle("_rebuild_from_type_v2 is only supported for plain tensors and parameters")
    return func(*args)


def _allowed_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {("collections", "OrderedDict"): collections.OrderedDict}
    allowed.update({("torch._utils", name): fn for name, fn in _REBUILDERS.items()})
    allowed[("torch._tensor", "_rebuild_from_type_v2")] = _rebuild_from_type_v2
    tensor_types = [("torch", "Tensor"), ("torch._tensor", "Tensor"), ("torch.nn.parameter", "Parameter")]
    allowed.update({(module, name): _TypeMarker(name) for module, name in tensor_types})
    allowed.update({("torch", n): _StorageType(n, dt) for n, dt in _STORAGE_DTYPES.items()})
    for module in ("torch", "torch.storage"):
        allowed[(module, "UntypedStorage")] = _StorageType("UntypedStorage", np.uint8)
    allowed.update({("torch", n): _DType(n, dt) for n, dt in _TORCH_DTYPES.items()})
    return allowed


_ALLOWED = _allowed_globals()


def _text(value):
    """Decode the bytes that Python 2 pickles hold where Python 3 ones hold str."""
    return value.decode("ascii") if isinstance(value, bytes) else value


def _global_name(module: str, name: str) -> str:
    """`'module.name'`, plus its Python 3 name when the pickle uses a Python 2 one (protocol < 3)."""
    py3 = _compat_pickle.NAME_MAPPING.get((module, name))
    py3 = py3 or (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
    shown = f"'{module}.{name}'"
    return shown if py3 == (module, name) else f"{shown} (Python 3: '{py3[0]}.{py3[1]}')"


class _Unpickler(pickle.Unpickler):
    """Unpickler that resolves only `_ALLOWED` globals and records the storages it meets."""

    def __init__(self, file, label: str):
        super().__init__(file, encoding="utf-8")
        self.label = label
        self.storages: dict[str, tuple[np.dtype, int]] = {}

    def find_class(self, module, name):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise CheckpointError(
                f"{self.label}: refused to unpickle the global {_global_name(module, name)}: only tensors, "
                "storages and OrderedDict are allowed (the file is not a plain state dict, or is malicious)"
            )
        return found

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or _text(pid[0]) != "storage":
            raise _BadPickle(f"unexpected persistent id {pid!r:.100}")
        storage_type, key, _location, numel = pid[1:5]
        key = _text(key)
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise _BadPickle(f"malformed storage reference {pid!r:.100}")
        if type(numel) is not int or numel < 0:
            raise _BadPickle(f"storage '{key}' has an invalid size {numel!r:.80}")
        if self.storages.setdefault(key, (storage_type.dtype, numel)) != (storage_type.dtype, numel):
            raise _BadPickle(f"storage '{key}' is referenced with two different dtypes or sizes")
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return _StorageRef(key, storage_type.dtype, 0, numel)
        return _view_ref(key, storage_type.dtype, view, numel)


def _view_ref(key: str, dtype: np.dtype, view, numel: int) -> _StorageRef:
    """Storage view of the legacy format: `(view_key, offset, size)` in elements of the root."""
    ok = isinstance(view, tuple) and len(view) == 3 and all(type(v) is int for v in view[1:])
    if not ok or view[1] < 0 or view[2] < 0 or view[1] + view[2] > numel:
        raise _BadPickle(f"malformed storage view {view!r:.100} of storage '{key}'")
    return _StorageRef(key, dtype, view[1], view[2])


def _unpickle(unpickler: _Unpickler):
    """Run `unpickler.load()`, turning every failure into a CheckpointError naming the file."""
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except _BadPickle as err:
        raise CheckpointError(f"{unpickler.label}: {err}") from None
    except Exception as err:
        raise CheckpointError(
            f"{unpickler.label}: malformed or truncated pickle ({type(err).__name__}: {err})"
        ) from None


def _materialize(ref: _TensorRef, raw: bytes) -> np.ndarray:
    """Copy the tensor described by `ref` out of the bytes of its root storage."""
    dtype, storage = np.dtype(ref.dtype), ref.storage
    if dtype.hasobject or dtype.fields is not None:
        raise _BadPickle(f"unsupported tensor dtype {dtype}")
    if 0 in ref.shape:
        return np.zeros(ref.shape, dtype)
    start = storage.offset * storage.dtype.itemsize
    stop = start + storage.numel * storage.dtype.itemsize
    if stop > len(raw):
        raise _BadPickle(f"storage '{storage.key}' holds {len(raw)} bytes, expected at least {stop}")
    count = (stop - start) // dtype.itemsize
    typed = np.frombuffer(raw, np.uint8, count=count * dtype.itemsize, offset=start).view(dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
    if last >= count:
        raise _BadPickle(
            f"a tensor of size {ref.shape}, stride {ref.stride} and offset {ref.offset} does not fit "
            f"storage '{storage.key}' of {count} elements"
        )
    strides = tuple(s * dtype.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(typed[ref.offset :], ref.shape, strides, writeable=False)
    array = np.array(view, order="C", copy=True)
    if ref.flags.get("conj"):
        array = np.conj(array)
    if ref.flags.get("neg"):
        array = np.negative(array)
    return array


def _collect(obj, raw_of: Callable[[str], bytes], label: str) -> dict[str, np.ndarray]:
    """Flatten the unpickled (nested) dict, turning tensor refs into arrays; other leaves are skipped."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{label}: expected a dict of tensors, found a {type(obj).__name__}")
    out: dict[str, np.ndarray] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            name = prefix + (key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key))
            if isinstance(value, dict):
                walk(value, name + ".")
            elif isinstance(value, _TensorRef):
                out[name] = _materialize(value, raw_of(value.storage.key))

    try:
        walk(obj, "")
    except _BadPickle as err:
        raise CheckpointError(f"{label}: {err}") from None
    except RecursionError:
        raise CheckpointError(f"{label}: the pickled dict is nested too deeply or contains itself") from None
    return out


def _zip_root(archive: zipfile.ZipFile, label: str) -> str:
    names = archive.namelist()
    roots = [n[: -len("data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(roots) != 1:
        raise CheckpointError(f"{label}: zip archive without a single '<name>/data.pkl' record")
    return roots[0]


def _read_zip(path: Path) -> dict[str, np.ndarray]:
    label = str(path)
    with zipfile.ZipFile(path) as archive:
        root = _zip_root(archive, label)
        names = set(archive.namelist())
        if root + "byteorder" in names and archive.read(root + "byteorder").strip() != b"little":
            raise CheckpointError(f"{label}: big-endian checkpoints are not supported")
        obj = _unpickle(_Unpickler(io.BytesIO(archive.read(root + "data.pkl")), label))
        cache: dict[str, bytes] = {}

        def raw_of(key: str) -> bytes:
            if key not in cache:
                if root + "data/" + key not in names:
                    raise CheckpointError(f"{label}: storage record 'data/{key}' is missing")
                cache[key] = archive.read(root + "data/" + key)
            return cache[key]

        return _collect(obj, raw_of, label)


def _read_legacy_storages(file, unpickler: _Unpickler, keys, label: str) -> dict[str, bytes]:
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointError(f"{label}: malformed list of storage keys")
    raw: dict[str, bytes] = {}
    for key in keys:
        if key not in unpickler.storages:
            raise CheckpointError(f"{label}: storage '{key}' is listed but never used")
        dtype, numel = unpickler.storages[key]
        head = file.read(8)
        count = int.from_bytes(head, "little", signed=True)
        if len(head) < 8 or count != numel:
            raise CheckpointError(f"{label}: storage '{key}' is truncated or has a wrong size header")
        raw[key] = file.read(numel * dtype.itemsize)
        if len(raw[key]) < numel * dtype.itemsize:
            raise CheckpointError(f"{label}: truncated file (storage '{key}' is incomplete)")
    return raw


def _read_legacy(path: Path) -> dict[str, np.ndarray]:
    label = str(path)
    with open(path, "rb") as file:
        header = []
        for _ in range(3):
            try:
                header.append(_unpickle(_Unpickler(file, label)))
            except CheckpointError as err:
                detail = str(err).removeprefix(f"{label}: ")
                raise CheckpointError(
                    f"{label}: not a PyTorch checkpoint (neither zip nor legacy layout): {detail}"
                ) from None
        if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL:
            raise CheckpointError(f"{label}: not a PyTorch checkpoint (bad legacy magic number or protocol)")
        unpickler = _Unpickler(file, label)
        obj = _unpickle(unpickler)
        keys = _unpickle(_Unpickler(file, label))
        raw = _read_legacy_storages(file, unpickler, keys, label)

    def raw_of(key: str) -> bytes:
        if key not in raw:
            raise CheckpointError(f"{label}: storage '{key}' has no data")
        return raw[key]

    return _collect(obj, raw_of, label)


def read_torch_file(path: Path) -> dict[str, np.ndarray]:
    """Arrays of a `torch.save` file (zip or legacy layout), keyed by their (dotted) names."""
    with open(path, "rb") as file:
        magic = file.read(4)
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as err:
        raise CheckpointError(f"{path}: corrupt zip archive ({type(err).__name__}: {err})") from None
    if magic.startswith(b"PK"):
        raise CheckpointError(f"{path}: truncated or corrupt zip archive")
    if tarfile.is_tarfile(path):
        raise CheckpointError(f"{path}: the tar layout of torch < 0.4 is not supported")
    return _read_legacy(path)
