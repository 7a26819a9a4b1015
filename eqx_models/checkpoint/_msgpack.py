"""Decode the msgpack files of `flax.serialization` without flax.

Layout: a msgpack map of (nested) maps with string keys. Leaves use msgpack extension types:

* code 1, ndarray: the payload is itself a msgpack array `[shape, dtype name, C-order bytes]`;
* code 2, native complex: payload `[real, imag]`;
* code 3, numpy scalar: encoded like an ndarray of shape `()`.

Arrays larger than `flax.serialization.MAX_CHUNK_SIZE` bytes are written as a map
`{"__msgpack_chunked_array__": True, "shape": {"0": d0, ...}, "chunks": {"0": flat0, ...}}`.
"""

import math

import ml_dtypes
import msgpack
import numpy as np

from eqx_models.errors import CheckpointError

_NDARRAY, _COMPLEX, _SCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"
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
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "biufc":
        raise _BadMsgpack(f"unsupported array dtype {name!r}")
    return dtype


def _ndarray(payload: bytes) -> np.ndarray:
    parts = msgpack.unpackb(payload, raw=True)
    if not isinstance(parts, list) or len(parts) != 3:
        raise _BadMsgpack("malformed array record")
    shape, name, buffer = parts
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _BadMsgpack(f"malformed array shape {shape!r:.80}")
    if not isinstance(name, bytes) or not isinstance(buffer, bytes):
        raise _BadMsgpack("malformed array record")
    dtype = _dtype(name.decode("ascii", errors="replace"))
    if len(buffer) != math.prod(shape) * dtype.itemsize:
        raise _BadMsgpack(f"array of shape {tuple(shape)} and dtype {dtype} has {len(buffer)} bytes")
    return np.frombuffer(buffer, dtype).reshape(shape).copy()


def _ext_hook(code: int, payload: bytes):
    if code == _NDARRAY:
        return _ndarray(payload)
    if code == _SCALAR:
        return _ndarray(payload)[()]
    if code == _COMPLEX:
        real, imag = msgpack.unpackb(payload)
        return complex(real, imag)
    raise _BadMsgpack(f"unknown msgpack extension type {code}")


def _ordered(node, what: str) -> list:
    """Values of a `{"0": a, "1": b, ...}` map, as flax writes tuples."""
    if not isinstance(node, dict) or set(node) != {str(i) for i in range(len(node))}:
        raise _BadMsgpack(f"malformed chunked array {what}")
    return [node[str(i)] for i in range(len(node))]


def _unchunk(node: dict) -> np.ndarray:
    shape = _ordered(node.get("shape"), "shape")
    chunks = _ordered(node.get("chunks"), "chunks")
    if not all(type(d) is int and d >= 0 for d in shape) or not chunks:
        raise _BadMsgpack("malformed chunked array")
    if not all(isinstance(c, np.ndarray) and c.ndim == 1 for c in chunks):
        raise _BadMsgpack("chunks of a chunked array must be flat arrays")
    flat = np.concatenate(chunks)
    if flat.size != math.prod(shape):
        raise _BadMsgpack(f"chunked array of shape {tuple(shape)} has {flat.size} elements")
    return flat.reshape(shape)


def _flatten(node: dict, prefix: str, out: dict[str, np.ndarray]) -> None:
    for key, value in node.items():
        name = prefix + (key.decode("utf-8", errors="replace") if isinstance(key, bytes) else str(key))
        if isinstance(value, dict) and _CHUNKED in value:
            value = _unchunk(value)
        if isinstance(value, dict):
            _flatten(value, name + ".", out)
        elif isinstance(value, (np.ndarray, np.generic)):
            if name in out:
                raise _BadMsgpack(f"two entries flatten to the same name {name!r}")
            out[name] = np.asarray(value)


def decode_flax_msgpack(data: bytes, label: str) -> dict[str, np.ndarray]:
    """Arrays of a flax msgpack blob keyed by their "."-joined paths; non-array leaves are skipped."""
    try:
        tree = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
        if not isinstance(tree, dict) or _CHUNKED in tree:
            raise _BadMsgpack(f"expected a map of parameters, found a {type(tree).__name__}")
        out: dict[str, np.ndarray] = {}
        _flatten(tree, "", out)
        return out
    except _BadMsgpack as err:
        raise CheckpointError(f"{label}: {err}") from None
    except Exception as err:
        raise CheckpointError(
            f"{label}: not a valid Flax msgpack file, truncated or corrupt ({type(err).__name__}: {err})"
        ) from None
