"""Decode and encode the msgpack files of `flax.serialization` without flax.

Layout: a msgpack map of (nested) maps with string keys. Leaves use msgpack extension types:

* code 1, ndarray: the payload is itself a msgpack array `[shape, dtype name, C-order bytes]`;
* code 2, native complex: payload `[real, imag]`;
* code 3, numpy scalar: encoded like an ndarray of shape `()`.

Arrays larger than `flax.serialization.MAX_CHUNK_SIZE` bytes are written as a map
`{"__msgpack_chunked_array__": True, "shape": {"0": d0, ...}, "chunks": {"0": flat0, ...}}`.
"""

import math
from collections.abc import Mapping
from typing import Any

import jax
import ml_dtypes
import msgpack
import numpy as np

from eqx_models.errors import CheckpointError

from ._lazy import MAX_NESTING, NameBudget

_NDARRAY, _COMPLEX, _SCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"
MAX_CHUNK_SIZE = 2**30  # flax.serialization's: larger arrays are written in chunks of this many bytes
_ML_DTYPES = {
    name
    for name in dir(ml_dtypes)
    if isinstance(getattr(ml_dtypes, name), type) and issubclass(getattr(ml_dtypes, name), np.generic)
}


class _BadMsgpack(Exception):
    """Raised while decoding; re-raised as a CheckpointError naming the file."""


def _dtype(name: str) -> np.dtype:
    if name in _ML_DTYPES:
        return np.dtype(getattr(ml_dtypes, name))
    try:
        dtype = np.dtype(name)
    except Exception:  # numpy parses a small language of dtype strings, and fails in several ways
        dtype = None
    if dtype is None or dtype.kind not in "biufc":
        raise _BadMsgpack(f"unsupported array dtype {name!r}")
    return dtype


def _shape(value, what: str) -> tuple[int, ...]:
    """A shape of at most 64 dims below 2**63 (so its product is cheap to compute)."""
    if type(value) is not list or len(value) > 64 or not all(type(d) is int and 0 <= d < 1 << 63 for d in value):
        raise _BadMsgpack(f"malformed {what} (expected at most 64 non-negative ints)")
    return tuple(value)


def _ndarray(payload: bytes) -> np.ndarray:
    parts = msgpack.unpackb(payload, raw=True)
    if type(parts) is not list or len(parts) != 3:
        raise _BadMsgpack("malformed array record")
    shape, name, buffer = parts
    shape = _shape(shape, "array shape")
    if type(name) is not bytes or type(buffer) is not bytes:
        raise _BadMsgpack("malformed array record")
    dtype = _dtype(name.decode("ascii", errors="replace"))
    if len(buffer) != math.prod(shape) * dtype.itemsize:
        raise _BadMsgpack(f"array of shape {shape} and dtype {dtype} has {len(buffer)} bytes")
    return np.frombuffer(buffer, dtype).reshape(shape).copy()


def _ext_hook(code: int, payload: bytes):
    if code == _NDARRAY:
        return _ndarray(payload)
    if code == _SCALAR:
        return _ndarray(payload)[()]
    if code == _COMPLEX:
        parts = msgpack.unpackb(payload)
        if type(parts) is not list or len(parts) != 2 or not all(type(p) in (int, float) for p in parts):
            raise _BadMsgpack("malformed complex number")
        return complex(*parts)
    raise _BadMsgpack(f"unknown msgpack extension type {code}")


def _ordered(node, what: str) -> list:
    """Values of a `{"0": a, "1": b, ...}` map, as flax writes tuples."""
    if type(node) is not dict or set(node) != {str(i) for i in range(len(node))}:
        raise _BadMsgpack(f"malformed chunked array {what}")
    return [node[str(i)] for i in range(len(node))]


def _unchunk(node: dict) -> np.ndarray:
    """Chunks are concatenated: the array has exactly the bytes the file holds."""
    shape = _shape(_ordered(node.get("shape"), "shape"), "chunked array shape")
    chunks = _ordered(node.get("chunks"), "chunks")
    if not chunks or not all(type(c) is np.ndarray and c.ndim == 1 for c in chunks):
        raise _BadMsgpack("chunks of a chunked array must be flat arrays")
    if len({c.dtype for c in chunks}) != 1:
        raise _BadMsgpack("chunks of a chunked array differ in dtype")
    if sum(c.size for c in chunks) != math.prod(shape):
        raise _BadMsgpack(f"chunked array of shape {shape} has {sum(c.size for c in chunks)} elements")
    return np.concatenate(chunks).reshape(shape)


def _flatten(tree: dict, budget: NameBudget) -> dict[str, np.ndarray]:
    """The arrays of nested maps under their "."-joined paths (iteratively: no recursion
    limit, and each map is visited once: msgpack cannot share one)."""
    out: dict[str, np.ndarray] = {}
    pending = [(iter(tree.items()), "")]
    while pending:
        items, prefix = pending[-1]
        entry = next(items, None)
        if entry is None:
            pending.pop()
            continue
        key, value = entry
        name = budget.spend(prefix + (key.decode("utf-8", errors="replace") if type(key) is bytes else str(key)))
        if type(value) is dict and _CHUNKED in value:
            value = _unchunk(value)
        if type(value) is dict:
            if len(pending) >= MAX_NESTING:
                raise _BadMsgpack(f"maps nested more than {MAX_NESTING} levels deep")
            pending.append((iter(value.items()), name + "."))
        elif isinstance(value, (np.ndarray, np.generic)):
            if name in out:
                raise _BadMsgpack(f"two entries flatten to the same name {name!r}")
            out[name] = np.asarray(value)
    return out


def decode_flax_msgpack(data: bytes, label: str) -> dict[str, np.ndarray]:
    """Arrays of a flax msgpack blob keyed by their "."-joined paths; non-array leaves are skipped.

    Decoding is eager (msgpack has no lazy reader) but cannot amplify: msgpack bounds every
    length by the input's, each array is a copy of bytes of the input, and chunked arrays
    are concatenations of such arrays."""
    try:
        tree = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
        if type(tree) is not dict or _CHUNKED in tree:
            raise _BadMsgpack(f"expected a map of parameters, found a {type(tree).__name__}")
        return _flatten(tree, NameBudget(label, len(data)))
    except (_BadMsgpack, msgpack.StackError) as err:
        detail = str(err) or "maps or arrays nested too deeply"
        raise CheckpointError(f"{label}: {detail}") from None
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(
            f"{label}: not a valid Flax msgpack file, truncated or corrupt ({type(err).__name__}: {err})"
        ) from None


def _array_record(array: np.ndarray) -> msgpack.ExtType:
    """An array as flax writes it: extension 1 around `[shape, dtype name, C-order bytes]`."""
    record = msgpack.packb((array.shape, array.dtype.name, array.tobytes("C")), use_bin_type=True)
    return msgpack.ExtType(_NDARRAY, record)


def _encodable(node: Any, path: str) -> Any:
    """`node` with arrays as numpy (chunked above `MAX_CHUNK_SIZE`), maps as dicts."""
    if isinstance(node, Mapping):
        out = {}
        for key, value in node.items():
            if not isinstance(key, str):
                raise CheckpointError(f"Flax params keys must be strings, got {key!r} under {path or 'the top'}")
            out[key] = _encodable(value, f"{path}/{key}" if path else key)
        return out
    if not isinstance(node, np.ndarray | np.generic | jax.Array):
        raise CheckpointError(f"Flax params hold a {type(node).__name__} at {path}, not an array")
    array = np.asarray(node)
    if array.dtype.kind not in "biufc" and array.dtype.name not in _ML_DTYPES:
        raise CheckpointError(f"cannot write the {array.dtype} array at {path} to msgpack")
    if array.nbytes <= MAX_CHUNK_SIZE:
        return array
    step = max(1, MAX_CHUNK_SIZE // array.dtype.itemsize)
    flat = array.reshape(-1)
    return {
        _CHUNKED: True,
        "shape": {str(i): d for i, d in enumerate(array.shape)},
        "chunks": {str(i): flat[at : at + step] for i, at in enumerate(range(0, flat.size, step))},
    }


def _pack_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return _array_record(value)
    raise TypeError(f"cannot encode {type(value).__name__}")  # pragma: no cover (never reached: see _encodable)


def encode_flax_msgpack(params: Mapping[str, Any]) -> bytes:
    """Nested params (string keys, array leaves: numpy, JAX or anything `np.asarray` reads)
    as `flax.serialization.to_bytes` writes them, so HF's Flax `from_pretrained` and
    `decode_flax_msgpack` read them back; bfloat16 arrays keep their dtype name."""
    return msgpack.packb(_encodable(params, ""), default=_pack_default, strict_types=True)
