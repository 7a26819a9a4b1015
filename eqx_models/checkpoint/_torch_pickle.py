"""Read `torch.save` checkpoints with neither torch nor the execution of pickled code.

Two layouts exist:

* zip (the default since torch 1.6): `<root>/data.pkl` is the pickled object, every tensor storage is a
  record `<root>/data/<key>`, and an optional `<root>/byteorder` record says "little" or "big".
  `torch.save` stores every member uncompressed.
* legacy (`_use_new_zipfile_serialization=False`): pickles written back to back (a magic number, the
  protocol version, a sys-info dict, the object itself, the sorted list of storage keys), then for
  each key a little-endian int64 element count followed by the raw storage bytes.

In both, a tensor is pickled as a call to `torch._utils._rebuild_tensor_v2` (or `_v3` for newer dtypes)
whose first argument is a persistent id `("storage", torch.<X>Storage, key, location, numel, ...)`.

The pickle is not handed to `pickle.Unpickler`: `_Machine` interprets it opcode by opcode (decoded by
`pickletools.genops`) and knows only the opcodes and globals a state dict needs. Two properties of
`pickle.Unpickler` make it unfit for hostile files: its BUILD sets the state or attributes of
whatever object is on the stack, even an allowed global (a BUILD set our `_rebuild_tensor_v2`'s
`__defaults__` and negated the weights of every later load in the process), and its memo is an
array sized by the largest index the pickle names (a 9-byte pickle made it allocate 1 GB). Here the
memo is a dict, BUILD only applies to the dicts that REDUCE made from `OrderedDict` (and drops their
state, which is `_metadata`), the allowed globals are inert stand-ins no opcode can mutate, dict keys
are plain hashables (str, bytes, small int...), and a pickle may not exceed `_MAX_PICKLE_BYTES`.
Each opcode then costs constant time and memory, or time and memory proportional to the bytes it
consumes.

Tensors come out as `LazyTensor`s, each checked against the size of its storage record before
anything is read; a storage record is read (once, CRC-checked) only when one of its tensors is.
"""

import _compat_pickle
import collections
import io
import math
import mmap
import pickletools
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import no_type_check

import ml_dtypes
import numpy as np

from eqx_models.errors import CheckpointError

from ._lazy import MAX_NESTING, LazyTensor, NameBudget

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
#: The longest pickle read: a state dict's takes 100-150 bytes per tensor (this allows over 100k
#: tensors), while each opcode may cost up to ~70 bytes of memory and a few microseconds.
_MAX_PICKLE_BYTES = 16 << 20
#: A compressed zip member may inflate to at most this many times its size (torch.save
#: compresses nothing; deflate reaches about 1000x on repeated bytes).
_MAX_INFLATION = 16
_INFLATION_SLACK = 1 << 16
_MAX_PROTOCOL = 5
_LIMIT = 1 << 63  # sizes, strides, offsets and dict keys that are ints must be below this

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


def _show(value) -> str:
    """A short description of an untrusted value (its repr could be huge, nested or fail)."""
    if type(value) is int and value.bit_length() > 64:
        return f"an int of {value.bit_length()} bits"
    if type(value) in (int, float, bool) or value is None:
        return repr(value)
    if type(value) in (str, bytes):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    if type(value) in (tuple, list, dict):
        return f"a {type(value).__name__} of {len(value)} items"
    if type(value) in (_StorageType, _DType, _TypeMarker, _Callable):
        return f"the global {value.name}"
    return f"a {type(value).__name__.strip('_')}"


# ----------------------------------------------------------------------------- stand-ins for the allowed globals
# Instances with __slots__ and no mutating method: no opcode of `_Machine` can alter them.


class _StorageType:
    """Stand-in for `torch.<X>Storage` and `torch.UntypedStorage` (only its dtype matters)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype):
        self.name, self.dtype = name, np.dtype(dtype)


class _DType:
    """Stand-in for a `torch.<dtype>` object."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype):
        self.name, self.dtype = name, np.dtype(dtype)


class _TypeMarker:
    """Stand-in for `torch.Tensor` / `torch.nn.Parameter` passed to `_rebuild_from_type_v2`."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _Callable:
    """An allowed global that REDUCE may call: a torch rebuild helper or `OrderedDict`."""

    __slots__ = ("name", "arity")

    def __init__(self, name: str, arity: tuple[int, int]):
        self.name, self.arity = name, arity


class _StorageRef:
    """A (view of a) storage: `numel` elements of `dtype` from element `offset` of record `key`."""

    __slots__ = ("key", "dtype", "offset", "numel")

    def __init__(self, key: str, dtype: np.dtype, offset: int, numel: int):
        self.key, self.dtype, self.offset, self.numel = key, dtype, offset, numel


class _TensorRef:
    """A tensor waiting for its storage bytes."""

    __slots__ = ("storage", "dtype", "offset", "shape", "stride", "neg", "conj")

    def __init__(self, storage, dtype, offset, shape, stride, neg, conj):
        self.storage, self.dtype, self.offset = storage, np.dtype(dtype), offset
        self.shape, self.stride, self.neg, self.conj = shape, stride, neg, conj


# ----------------------------------------------------------------------------- the callables


def _int_tuple(value, what: str) -> tuple[int, ...]:
    ok = type(value) in (tuple, list) and len(value) <= 64
    if not ok or not all(type(v) is int and 0 <= v < _LIMIT for v in value):
        raise _BadPickle(f"tensor {what} must be at most 64 non-negative ints below 2**63, got {_show(value)}")
    return tuple(value)


def _tensor_ref(storage, dtype, offset, size, stride, metadata=None) -> _TensorRef:
    if type(storage) is not _StorageRef:
        raise _BadPickle(f"a tensor is rebuilt from {_show(storage)}, not a storage")
    if type(offset) is not int or not 0 <= offset < _LIMIT:
        raise _BadPickle(f"invalid tensor storage offset {_show(offset)}")
    shape, strides = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise _BadPickle(f"tensor size {shape} and stride {strides} differ in length")
    flags = metadata if type(metadata) is dict else {}
    neg, conj = flags.get("neg") is True, flags.get("conj") is True
    dtype = np.dtype(dtype)
    if neg and dtype.kind not in "iufcV" or conj and dtype.kind != "c":
        raise _BadPickle(f"a {dtype} tensor cannot be a negated or conjugated view")
    return _TensorRef(storage, dtype, offset, shape, strides, neg, conj)


def _rebuild_tensor(args: tuple):
    storage, offset, size, stride = args
    return _tensor_ref(storage, getattr(storage, "dtype", None), offset, size, stride)


def _rebuild_tensor_v2(args: tuple):
    # (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
    metadata = args[6] if len(args) > 6 else None
    return _tensor_ref(args[0], getattr(args[0], "dtype", None), args[1], args[2], args[3], metadata)


def _rebuild_tensor_v3(args: tuple):
    # (storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype[, metadata])
    dtype = args[6]
    if type(dtype) is not _DType:
        raise _BadPickle(f"_rebuild_tensor_v3 got {_show(dtype)} instead of a torch dtype")
    metadata = args[7] if len(args) > 7 else None
    return _tensor_ref(args[0], dtype.dtype, args[1], args[2], args[3], metadata)


def _rebuild_parameter(args: tuple):
    # (data, requires_grad, backward_hooks[, state])
    if type(args[0]) is not _TensorRef:
        raise _BadPickle(f"a parameter is rebuilt from {_show(args[0])}, not a tensor")
    return args[0]


_REBUILDERS: dict[str, tuple[Callable, tuple[int, int]]] = {
    "_rebuild_tensor": (_rebuild_tensor, (4, 4)),
    "_rebuild_tensor_v2": (_rebuild_tensor_v2, (6, 7)),
    "_rebuild_tensor_v3": (_rebuild_tensor_v3, (7, 8)),
    "_rebuild_parameter": (_rebuild_parameter, (3, 3)),
    "_rebuild_parameter_with_state": (_rebuild_parameter, (4, 4)),
}
_ORDERED_DICT = _Callable("OrderedDict", (0, 1))
_FROM_TYPE = _Callable("_rebuild_from_type_v2", (4, 4))
_CALLABLES = {name: _Callable(name, arity) for name, (_, arity) in _REBUILDERS.items()}


def _allowed_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {("collections", "OrderedDict"): _ORDERED_DICT}
    allowed.update({("torch._utils", name): fn for name, fn in _CALLABLES.items()})
    allowed[("torch._tensor", "_rebuild_from_type_v2")] = _FROM_TYPE
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
    return value.decode("ascii", errors="replace") if type(value) is bytes else value


def _global_name(module: str, name: str) -> str:
    """`'module.name'`, plus its Python 3 name when the pickle uses a Python 2 one (protocol < 3)."""
    py3 = _compat_pickle.NAME_MAPPING.get((module, name))
    py3 = py3 or (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
    shown = f"'{module}.{name}'"
    return shown if py3 == (module, name) else f"{shown} (Python 3: '{py3[0]}.{py3[1]}')"


def _check_key(key) -> None:
    """Dict keys must be cheap to hash: a tuple key is hashed in full at every insertion."""
    if type(key) is int and -_LIMIT <= key < _LIMIT or type(key) in (str, bytes, float, bool) or key is None:
        return
    raise _BadPickle(f"unsupported dict key {_show(key)} (state dict keys are strings)")


# ----------------------------------------------------------------------------- the interpreter


_PY2_STRINGS = {"STRING", "BINSTRING", "SHORT_BINSTRING"}
_CONSTANTS = {
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
}  # fmt: skip


@no_type_check  # its closures run once per opcode: runtime type checking (tests) would dominate
class _Machine:
    """Runs one pickle (see the module docstring) and records the storages it references."""

    def __init__(self, label: str):
        self.label = label
        self.storages: dict[str, tuple[np.dtype, int]] = {}
        self._buildable: dict[int, dict] = {}  # the dicts REDUCE made from OrderedDict, by id

    def load(self, source: io.BytesIO | mmap.mmap, limit: int = _MAX_PICKLE_BYTES):
        """The object pickled at the current position of `source` (left just after its STOP)."""
        try:
            return self._run(source, limit)
        except CheckpointError:
            raise
        except _BadPickle as err:
            raise CheckpointError(f"{self.label}: {err}") from None
        except Exception as err:  # genops' ValueError on truncated or unknown opcodes, arity TypeErrors...
            raise CheckpointError(
                f"{self.label}: malformed or truncated pickle ({type(err).__name__}: {_first_line(err)})"
            ) from None

    def _run(self, source: io.BytesIO | mmap.mmap, limit: int):
        end = source.tell() + limit
        stack: list = []
        marks: list[int] = []  # stack lengths at each MARK
        memo: dict[int, object] = {}

        def pop_mark() -> list:
            if not marks:
                raise _BadPickle("unbalanced MARK in pickle")
            at = marks.pop()
            items = stack[at:]
            del stack[at:]
            return items

        def target(kind: type):
            if len(stack) <= (marks[-1] if marks else 0) or type(stack[-1]) is not kind:
                raise _BadPickle(
                    f"pickle adds items to {_show(stack[-1]) if stack else 'nothing'}, not a {kind.__name__}"
                )
            return stack[-1]

        def top():
            if len(stack) <= (marks[-1] if marks else 0):
                raise _BadPickle("pickle reads an empty stack")
            return stack[-1]

        def pop():
            top()
            return stack.pop()

        def memo_get(arg):
            if arg not in memo:
                raise _BadPickle(f"pickle reads memo entry {_show(arg)}, which it never wrote")
            stack.append(memo[arg])

        def memo_put(arg):
            memo[arg] = top()

        def fixed_tuple(n: int):
            if len(stack) - (marks[-1] if marks else 0) < n:
                raise _BadPickle(f"TUPLE{n} on a stack of fewer than {n} items")
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)

        def setitem(_):
            value, key = pop(), pop()
            self._setitems(target(dict), [key, value])

        def setitems(_):
            items = pop_mark()
            self._setitems(target(dict), items)

        def append(_):
            value = pop()
            target(list).append(value)

        def appends(_):
            items = pop_mark()
            target(list).extend(items)

        def reduce(_):
            args, func = pop(), pop()
            stack.append(self._call(func, args))

        def build(_):
            pop()  # the state: an OrderedDict's is its `_metadata` attribute, not needed
            if id(top()) not in self._buildable:
                raise _BadPickle(
                    f"pickle sets the state of {_show(top())}: only the OrderedDicts it creates may have one"
                )

        def stack_global(_):
            attr, module = pop(), pop()
            if type(module) is not str or type(attr) is not str:
                raise _BadPickle("STACK_GLOBAL of a non-string name")
            stack.append(self._find_global(module, attr))

        def proto(arg):
            if arg > _MAX_PROTOCOL:
                raise _BadPickle(f"unsupported pickle protocol {arg}")

        handlers = {
            **dict.fromkeys(_CONSTANTS, stack.append),
            **dict.fromkeys(("BINPUT", "LONG_BINPUT", "PUT"), memo_put),
            **dict.fromkeys(("BINGET", "LONG_BINGET", "GET"), memo_get),
            "MEMOIZE": lambda _: memo_put(len(memo)),
            "MARK": lambda _: marks.append(len(stack)),
            "NONE": lambda _: stack.append(None),
            "NEWTRUE": lambda _: stack.append(True),
            "NEWFALSE": lambda _: stack.append(False),
            "EMPTY_TUPLE": lambda _: stack.append(()),
            "EMPTY_DICT": lambda _: stack.append({}),
            "EMPTY_LIST": lambda _: stack.append([]),
            "TUPLE": lambda _: stack.append(tuple(pop_mark())),
            "TUPLE1": lambda _: fixed_tuple(1),
            "TUPLE2": lambda _: fixed_tuple(2),
            "TUPLE3": lambda _: fixed_tuple(3),
            "LIST": lambda _: stack.append(pop_mark()),
            "DICT": lambda _: stack.append(self._dict(pop_mark())),
            "SETITEM": setitem,
            "SETITEMS": setitems,
            "APPEND": append,
            "APPENDS": appends,
            "REDUCE": reduce,
            "BUILD": build,
            "GLOBAL": lambda arg: stack.append(self._find_global(*arg.partition(" ")[::2])),
            "STACK_GLOBAL": stack_global,
            "BINPERSID": lambda _: stack.append(self._persistent_load(pop())),
            # A Python 2 `str`: genops decodes it as latin-1, pickle (encoding="utf-8") as utf-8.
            **dict.fromkeys(_PY2_STRINGS, lambda arg: stack.append(arg.encode("latin-1").decode("utf-8"))),
            "POP": lambda _: pop() if len(stack) > (marks[-1] if marks else 0) else pop_mark(),
            "POP_MARK": lambda _: pop_mark(),
            "DUP": lambda _: stack.append(top()),
            "PROTO": proto,
            "FRAME": lambda _: None,
        }
        for opcode, arg, pos in pickletools.genops(source):
            if pos >= end:
                raise _BadPickle(f"pickle longer than {limit} bytes: refused")
            handler = handlers.get(opcode.name)
            if handler is not None:
                handler(arg)
            elif opcode.name == "STOP":
                return pop()
            else:  # sets, buffers, extension registry, INST/OBJ/NEWOBJ object creation, text PERSID
                raise _BadPickle(f"unsupported pickle opcode {opcode.name} (a state dict never needs it)")
        raise _BadPickle("pickle ends without STOP")

    def _find_global(self, module: str, name: str):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise CheckpointError(
                f"{self.label}: refused to unpickle the global {_global_name(module, name)}: only tensors, "
                "storages and OrderedDict are allowed (the file is not a plain state dict, or is malicious)"
            )
        return found

    def _call(self, func, args):
        if type(func) is not _Callable:
            raise _BadPickle(f"pickle calls {_show(func)}, which is not callable")
        if type(args) is not tuple or not func.arity[0] <= len(args) <= func.arity[1]:
            raise _BadPickle(f"{func.name} called with {_show(args)}")
        if func is _ORDERED_DICT:
            made = self._dict(list(_pairs(args[0])) if args else [])
            self._buildable[id(made)] = made
            return made
        if func is _FROM_TYPE:  # (func, new_type, args, state): a Tensor/Parameter subclass
            inner, new_type, inner_args, _ = args
            if type(inner) is not _Callable or inner.name not in _REBUILDERS or type(new_type) is not _TypeMarker:
                raise _BadPickle("_rebuild_from_type_v2 is only supported for plain tensors and parameters")
            return self._call(inner, inner_args)
        return _REBUILDERS[func.name][0](args)

    def _dict(self, items: list) -> dict:
        made: dict = {}
        self._setitems(made, items)
        return made

    @staticmethod
    def _setitems(target: dict, items: list) -> None:
        if len(items) % 2:
            raise _BadPickle("odd number of items for a dict")
        for i in range(0, len(items), 2):
            key = items[i]
            _check_key(key)
            if key in target:
                raise _BadPickle(f"dict key {_show(key)} is set twice")
            target[key] = items[i + 1]

    def _persistent_load(self, pid):
        if type(pid) is not tuple or len(pid) not in (5, 6) or _text(pid[0]) != "storage":
            raise _BadPickle(f"unexpected persistent id {_show(pid)}")
        storage_type, key, _location, numel = pid[1:5]
        key = _text(key)
        if type(storage_type) is not _StorageType or type(key) is not str:
            raise _BadPickle(f"malformed storage reference {_show(pid)}")
        if type(numel) is not int or not 0 <= numel < _LIMIT:
            raise _BadPickle(f"storage '{key}' has an invalid size {_show(numel)}")
        if self.storages.setdefault(key, (storage_type.dtype, numel)) != (storage_type.dtype, numel):
            raise _BadPickle(f"storage '{key}' is referenced with two different dtypes or sizes")
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return _StorageRef(key, storage_type.dtype, 0, numel)
        return _view_ref(key, storage_type.dtype, view, numel)


def _pairs(items):
    """The (key, value) pairs passed to `OrderedDict(...)`, flattened."""
    if type(items) is dict:
        pairs = items.items()
    elif type(items) in (list, tuple) and all(type(p) in (list, tuple) and len(p) == 2 for p in items):
        pairs = items
    else:
        raise _BadPickle(f"OrderedDict built from {_show(items)}")
    for key, value in pairs:
        yield key
        yield value


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0][:200] if str(err) else ""


def _view_ref(key: str, dtype: np.dtype, view, numel: int) -> _StorageRef:
    """Storage view of the legacy format: `(view_key, offset, size)` in elements of the root."""
    ok = type(view) is tuple and len(view) == 3 and all(type(v) is int for v in view[1:])
    if not ok or view[1] < 0 or view[2] < 0 or view[1] + view[2] > numel:
        raise _BadPickle(f"malformed storage view {_show(view)} of storage '{key}'")
    return _StorageRef(key, dtype, view[1], view[2])


# ----------------------------------------------------------------------------- from the unpickled object to tensors


def _collect(obj, label: str, budget: NameBudget) -> dict[str, _TensorRef]:
    """The tensors of the unpickled (nested) dict under their dotted names; other leaves are skipped.

    Every dict is visited once: one reached twice (shared through the memo, or containing
    itself) is an error, as its tensors would have two names."""
    if type(obj) is not dict:
        raise CheckpointError(f"{label}: expected a dict of tensors, found {_show(obj)}")
    out: dict[str, _TensorRef] = {}
    seen: dict[int, str] = {id(obj): "the top-level dict"}
    pending = [(iter(obj.items()), "")]
    while pending:
        items, prefix = pending[-1]
        entry = next(items, None)
        if entry is None:
            pending.pop()
            continue
        key, value = entry
        name = budget.spend(prefix + (key.decode("utf-8", "replace") if type(key) is bytes else str(key)))
        if type(value) is dict:
            if id(value) in seen:
                raise CheckpointError(
                    f"{label}: the dict under {name!r} is also reached as {seen[id(value)]!r} "
                    "(a state dict never shares sub-dicts)"
                )
            if len(pending) >= MAX_NESTING:
                raise CheckpointError(f"{label}: dicts nested more than {MAX_NESTING} levels deep")
            seen[id(value)] = name
            pending.append((iter(value.items()), name + "."))
        elif type(value) is _TensorRef:
            if name in out:
                raise CheckpointError(f"{label}: two entries are both named {name!r}")
            out[name] = value
    return out


class _StorageCache:
    """Storage bytes, each record read once while some unread tensor still needs it."""

    def __init__(self, load: Callable[[str], bytes], uses: collections.Counter):
        self._load, self._uses, self._held = load, uses, {}

    def take(self, key: str) -> bytes:
        data = self._held.pop(key, None)
        if data is None:
            data = self._load(key)
        self._uses[key] -= 1
        if self._uses[key] > 0:
            self._held[key] = data
        return data


def _check_fits(ref: _TensorRef, name: str, record_bytes: int | None, root_numel: int, label: str) -> None:
    """Every element of the tensor must lie inside its storage view, and the view inside its record."""
    storage = ref.storage
    where = f"{label}: tensor {name!r}"
    if ref.dtype.hasobject or ref.dtype.fields is not None:
        raise CheckpointError(f"{where} has the unsupported dtype {ref.dtype}")
    if record_bytes is None:
        raise CheckpointError(f"{where}: its storage record 'data/{storage.key}' is missing")
    needed = root_numel * storage.dtype.itemsize
    if record_bytes != needed:  # as torch.load, which refuses any other size
        raise CheckpointError(
            f"{where}: storage '{storage.key}' holds {record_bytes} bytes, expected {needed} "
            f"({root_numel} elements of {storage.dtype})"
        )
    if 0 in ref.shape:  # no bytes to read, but NumPy still refuses a shape whose other sizes overflow
        if math.prod(max(n, 1) for n in ref.shape) * ref.dtype.itemsize >= _LIMIT:
            raise CheckpointError(f"{where} of size {ref.shape} is empty but too large for an array")
        return
    count = storage.numel * storage.dtype.itemsize // ref.dtype.itemsize
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
    if last >= count:
        raise CheckpointError(
            f"{where} of size {ref.shape}, stride {ref.stride} and offset {ref.offset} does not fit "
            f"storage '{storage.key}' of {count} elements"
        )


def _materialize(ref: _TensorRef, raw: bytes) -> np.ndarray:
    """Copy the tensor described by (checked) `ref` out of the bytes of its root storage."""
    dtype, storage = ref.dtype, ref.storage
    if 0 in ref.shape:
        return np.zeros(ref.shape, dtype)
    start = storage.offset * storage.dtype.itemsize
    count = storage.numel * storage.dtype.itemsize // dtype.itemsize
    typed = np.frombuffer(raw, np.uint8, count=count * dtype.itemsize, offset=start).view(dtype)
    strides = tuple(s * dtype.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(typed[ref.offset :], ref.shape, strides, writeable=False)
    array = np.array(view, order="C", copy=True)
    if ref.conj:
        array = np.conj(array)
    if ref.neg:
        array = np.negative(array)
    return array


def _lazy_tensors(
    refs: dict[str, _TensorRef],
    storages: dict[str, tuple[np.dtype, int]],
    record_bytes: Callable[[str], int | None],
    load: Callable[[str], bytes],
    label: str,
) -> dict[str, LazyTensor]:
    uses = collections.Counter(ref.storage.key for ref in refs.values())
    cache = _StorageCache(load, uses)
    out = {}
    for name, ref in refs.items():
        key = ref.storage.key
        _check_fits(ref, name, record_bytes(key), storages[key][1], label)
        out[name] = LazyTensor(
            label, ref.dtype, ref.shape, lambda ref=ref: _materialize(ref, cache.take(ref.storage.key))
        )
    return out


# ----------------------------------------------------------------------------- zip layout


class _Zip:
    """The members of a zip archive, located once; each read is CRC-checked and bounded."""

    def __init__(self, path: Path, label: str):
        self.path, self.label = path, label
        with zipfile.ZipFile(path) as archive:
            infos, start_dir = archive.infolist(), archive.start_dir
        self.members: dict[str, tuple[zipfile.ZipInfo, int]] = {}
        end = 0
        with open(path, "rb") as file:
            for info in sorted(infos, key=lambda i: i.header_offset):
                if info.filename in self.members:
                    raise CheckpointError(f"{label}: zip archive has two members named {info.filename!r}")
                if info.flag_bits & 0x1:
                    raise CheckpointError(f"{label}: zip member {info.filename!r} is encrypted")
                self._check_sizes(info)
                if info.header_offset < max(end, 0):
                    raise CheckpointError(f"{label}: zip members overlap (at {info.filename!r}): refused")
                data_start = self._local_header(file, info)
                end = data_start + info.compress_size
                self.members[info.filename] = (info, data_start)
        if end > start_dir:
            raise CheckpointError(f"{label}: zip members overlap the central directory: refused")

    def _check_sizes(self, info: zipfile.ZipInfo) -> None:
        name = info.filename
        if info.compress_type == zipfile.ZIP_STORED:
            if info.file_size != info.compress_size:
                raise CheckpointError(f"{self.label}: corrupt zip archive (stored member {name!r} changes size)")
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            if info.file_size > _MAX_INFLATION * info.compress_size + _INFLATION_SLACK:
                raise CheckpointError(
                    f"{self.label}: zip member {name!r} would inflate from {info.compress_size} to "
                    f"{info.file_size} bytes, more than {_MAX_INFLATION} times: refused "
                    "(torch.save stores members uncompressed)"
                )
        else:
            raise CheckpointError(
                f"{self.label}: zip member {name!r} uses an unsupported compression ({info.compress_type})"
            )

    def _local_header(self, file, info: zipfile.ZipInfo) -> int:
        """Where the member's data starts, after the local header (whose name must agree)."""
        file.seek(info.header_offset)
        header = file.read(30)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.label}: corrupt zip archive (bad local header of {info.filename!r})")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
        if file.read(name_length) != info.orig_filename.encode(encoding):
            raise CheckpointError(f"{self.label}: corrupt zip archive (local and central names differ)")
        return info.header_offset + 30 + name_length + extra_length

    def size(self, name: str) -> int | None:
        member = self.members.get(name)
        return None if member is None else member[0].file_size

    def read(self, name: str, limit: int | None = None) -> bytes:
        info, start = self.members[name]
        if limit is not None and info.file_size > limit:
            raise CheckpointError(f"{self.label}: zip member {name!r} has {info.file_size} bytes, more than {limit}")
        with open(self.path, "rb") as file:
            file.seek(start)
            data = file.read(info.compress_size)
        if len(data) != info.compress_size:
            raise CheckpointError(f"{self.label}: truncated zip archive (member {name!r})")
        if info.compress_type == zipfile.ZIP_DEFLATED:  # never more than declared (+1 to detect excess)
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            data = inflater.decompress(data, info.file_size + 1)
            if len(data) != info.file_size or not inflater.eof:
                raise CheckpointError(f"{self.label}: corrupt zip archive (member {name!r} does not inflate)")
        if zlib.crc32(data) != info.CRC:
            raise CheckpointError(f"{self.label}: corrupt zip archive (bad CRC-32 for {name!r})")
        return data


def _zip_root(names, label: str) -> str:
    roots = [n[: -len("data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(roots) != 1:
        raise CheckpointError(f"{label}: zip archive without a single '<name>/data.pkl' record")
    return roots[0]


def _read_zip(path: Path) -> dict[str, LazyTensor]:
    label = str(path)
    archive = _Zip(path, label)
    root = _zip_root(archive.members, label)
    if archive.size(root + "byteorder") is not None and archive.read(root + "byteorder", 64).strip() != b"little":
        raise CheckpointError(f"{label}: big-endian checkpoints are not supported")
    data = archive.read(root + "data.pkl", _MAX_PICKLE_BYTES)
    machine = _Machine(label)
    refs = _collect(machine.load(io.BytesIO(data)), label, NameBudget(label, path.stat().st_size))

    def record(key: str) -> str:
        return root + "data/" + key

    return _lazy_tensors(
        refs, machine.storages, lambda key: archive.size(record(key)), lambda key: archive.read(record(key)), label
    )


# ----------------------------------------------------------------------------- legacy layout


def _legacy_storages(
    file, position: int, storages: dict[str, tuple[np.dtype, int]], keys, size: int, label: str
) -> dict[str, tuple[int, int]]:
    """(offset in the file, byte count) of each storage, which follow the pickles from
    `position` on, checked against the file's size without reading them."""
    if type(keys) is not list or not all(type(k) is str for k in keys):
        raise CheckpointError(f"{label}: malformed list of storage keys")
    located: dict[str, tuple[int, int]] = {}
    for key in keys:
        if key not in storages or key in located:
            raise CheckpointError(f"{label}: storage '{key}' is listed twice, or listed but never used")
        dtype, numel = storages[key]
        file.seek(position)
        count = file.read(8)
        if len(count) < 8:
            raise CheckpointError(f"{label}: truncated file (storage '{key}' is missing)")
        if int.from_bytes(count, "little", signed=True) != numel:
            raise CheckpointError(f"{label}: storage '{key}' has a wrong size header")
        nbytes = numel * dtype.itemsize
        if position + 8 + nbytes > size:
            raise CheckpointError(f"{label}: truncated file (storage '{key}' is incomplete)")
        located[key] = (position + 8, nbytes)
        position += 8 + nbytes
    return located


def _read_legacy(path: Path) -> dict[str, LazyTensor]:
    label = str(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{label}: not a PyTorch checkpoint (empty file)")
    # A memory map reads no more than the file holds, whatever length a pickle opcode claims.
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as source:
        header = []
        for _ in range(3):
            try:
                header.append(_Machine(label).load(source))
            except CheckpointError as err:
                detail = str(err).removeprefix(f"{label}: ")
                raise CheckpointError(
                    f"{label}: not a PyTorch checkpoint (neither zip nor legacy layout): {detail}"
                ) from None
        if type(header[0]) is not int or header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL:
            raise CheckpointError(f"{label}: not a PyTorch checkpoint (bad legacy magic number or protocol)")
        machine = _Machine(label)
        obj = machine.load(source)
        keys = _Machine(label).load(source)
        located = _legacy_storages(source, source.tell(), machine.storages, keys, size, label)
    refs = _collect(obj, label, NameBudget(label, size))
    for name, ref in refs.items():
        if ref.storage.key not in located:
            raise CheckpointError(f"{label}: tensor {name!r}: storage '{ref.storage.key}' has no data")

    def load(key: str) -> bytes:
        offset, nbytes = located[key]
        with open(path, "rb") as file:
            file.seek(offset)
            data = file.read(nbytes)
        if len(data) != nbytes:
            raise CheckpointError(f"{label}: truncated file (storage '{key}' is incomplete)")
        return data

    return _lazy_tensors(refs, machine.storages, lambda key: located[key][1], load, label)


# ----------------------------------------------------------------------------- entry point


def lazy_torch_file(path: Path) -> dict[str, LazyTensor]:
    """The tensors of a `torch.save` file (zip or legacy layout), keyed by their (dotted) names,
    validated against their storages and not yet read."""
    with open(path, "rb") as file:
        magic = file.read(4)
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt zip archive ({type(err).__name__}: {_first_line(err)})") from None
    if magic.startswith(b"PK"):
        raise CheckpointError(f"{path}: truncated or corrupt zip archive")
    if tarfile.is_tarfile(path):
        raise CheckpointError(f"{path}: the tar layout of torch < 0.4 is not supported")
    return _read_legacy(path)
