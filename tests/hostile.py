"""Builders of hand-made and hostile checkpoint files for the reader tests: a small pickle
assembler (opcode by opcode, so a test can write what no pickler would), torch zip and
legacy containers, raw safetensors files, and a snapshot of every piece of global state a
pickle could try to alter."""

import contextlib
import json
import pickle
import signal
import struct
import sys
import types
import zipfile
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------- pickle assembler
# Each function returns the opcodes that push one value (or do one thing).


def proto(version: int = 2) -> bytes:
    return pickle.PROTO + bytes([version])


def text(value: str) -> bytes:
    data = value.encode("utf-8", "surrogatepass")
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def integer(value: int) -> bytes:
    if 0 <= value < 256:
        return pickle.BININT1 + bytes([value])
    if -(2**31) <= value < 2**31:
        return pickle.BININT + struct.pack("<i", value)
    data = pickle.encode_long(value)
    if len(data) < 256:
        return pickle.LONG1 + bytes([len(data)]) + data
    return pickle.LONG4 + struct.pack("<i", len(data)) + data


def global_(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def stack_global(module: str, name: str) -> bytes:
    return text(module) + text(name) + pickle.STACK_GLOBAL


def tuple_(*parts: bytes) -> bytes:
    return pickle.MARK + b"".join(parts) + pickle.TUPLE


def dict_(*pairs: tuple[bytes, bytes]) -> bytes:
    items = b"".join(key + value for key, value in pairs)
    return pickle.EMPTY_DICT + (pickle.MARK + items + pickle.SETITEMS if pairs else b"")


def put(index: int) -> bytes:
    return pickle.LONG_BINPUT + struct.pack("<I", index)


def get(index: int) -> bytes:
    return pickle.LONG_BINGET + struct.pack("<I", index)


def ordered_dict() -> bytes:
    return global_("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE


def storage(key: str, numel: int, kind: str = "FloatStorage") -> bytes:
    """A persistent id as torch writes it, turned into a storage by BINPERSID."""
    return tuple_(text("storage"), global_("torch", kind), text(key), text("cpu"), integer(numel)) + pickle.BINPERSID


def tensor(key: str, numel: int, shape, stride, offset: int = 0, kind: str = "FloatStorage") -> bytes:
    """`torch._utils._rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict())`."""
    args = tuple_(
        storage(key, numel, kind),
        integer(offset),
        tuple_(*map(integer, shape)),
        tuple_(*map(integer, stride)),
        pickle.NEWFALSE,
        ordered_dict(),
    )
    return global_("torch._utils", "_rebuild_tensor_v2") + args + pickle.REDUCE


def nested_dicts(depth: int, leaf: bytes = pickle.NONE) -> bytes:
    """`{"d": {"d": ... {"d": leaf}}}`, `depth` dicts deep, without recursion in the pickle."""
    return pickle.EMPTY_DICT + (text("d") + pickle.EMPTY_DICT) * (depth - 1) + text("d") + leaf + pickle.SETITEM * depth


def nested_tuples(depth: int) -> bytes:
    """`((((),),),)`, `depth` tuples deep."""
    return pickle.EMPTY_TUPLE + pickle.TUPLE1 * depth


def state_pickle(entries: dict[str, bytes]) -> bytes:
    """A whole pickle of `{name: value}` (values given as opcodes)."""
    return proto(2) + dict_(*[(text(name), value) for name, value in entries.items()]) + pickle.STOP


# --------------------------------------------------------------------------- containers


def torch_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    """A `torch.save` zip archive around a hand-made `data.pkl`."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", "3\n")
    return path


def torch_legacy(path: Path, obj_pickle: bytes, storages: dict[str, bytes], itemsize: int = 4) -> Path:
    """The legacy `torch.save` layout around a hand-made object pickle."""
    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    parts = [magic, pickle.dumps(1001, protocol=2), pickle.dumps({"little_endian": True}, protocol=2)]
    parts += [obj_pickle, pickle.dumps(sorted(storages), protocol=2)]
    for key in sorted(storages):
        parts.append(struct.pack("<q", len(storages[key]) // itemsize) + storages[key])
    path.write_bytes(b"".join(parts))
    return path


def deflated_member_zip(path: Path, member: str, chunk: bytes, repeats: int, others: dict[str, bytes]) -> Path:
    """A zip whose `member` is `chunk * repeats`, deflated (fast level) as it is streamed, never
    held whole; the `others` are stored."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, data in others.items():
            archive.writestr(name, data, compress_type=zipfile.ZIP_STORED)
        with archive.open(member, "w", force_zip64=True) as out:
            for _ in range(repeats):
                out.write(chunk)
    return path


def safetensors_bytes(header: dict | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


# --------------------------------------------------------------------------- global state


def reader_state() -> dict:
    """Everything a pickle could try to alter in the reader modules: every module-level
    function's defaults, keyword defaults and attributes, every allowed global's fields, and
    the module namespaces themselves."""
    from eqx_models.checkpoint import _msgpack, _torch_pickle, keymap, readers

    state = {}
    for module in (_torch_pickle, _msgpack, readers, keymap, sys.modules.get("eqx_models.checkpoint._lazy")):
        if module is None:
            continue
        state[module.__name__] = {name: id(value) for name, value in vars(module).items()}
        for name, value in vars(module).items():
            if isinstance(value, types.FunctionType):
                state[f"{module.__name__}.{name}"] = (value.__defaults__, value.__kwdefaults__, dict(value.__dict__))
    for (module, name), value in _torch_pickle._ALLOWED.items():
        if isinstance(value, types.FunctionType):
            fields = (value.__defaults__, value.__kwdefaults__, dict(value.__dict__))
        else:
            fields = {slot: repr(getattr(value, slot)) for slot in getattr(type(value), "__slots__", ())}
            fields.update({k: repr(v) for k, v in getattr(value, "__dict__", {}).items()})
        state[f"allowed {module}.{name}"] = (type(value), fields)
    return state


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fails (TimeoutError) when the block runs longer than `seconds` (main thread only)."""

    def expire(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def float_bytes(values) -> bytes:
    return np.asarray(values, np.float32).tobytes()
