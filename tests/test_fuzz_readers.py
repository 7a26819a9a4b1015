"""Property tests of the checkpoint readers on generated and mutated files (issue 13).

Every input must end in `CheckpointError` or in a correct load (equal to what torch,
safetensors or flax read from the same bytes, whenever they read it too), within a time
bound per input, without changing any global state of the readers and without running
any pickled payload. A last test reads a corpus of such files, plus the known worst cases,
in a fresh process and bounds its peak memory.

The default number of examples keeps this file well under a minute; the `slow` variants
run twenty times more (`pytest -m slow tests/test_fuzz_readers.py`).
"""

import collections
import json
import pickle
import random
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import hostile
import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqx_models.checkpoint import readers
from eqx_models.checkpoint.keymap import KeyMap, fill_tree
from eqx_models.checkpoint.readers import LazyTensor
from eqx_models.errors import CheckpointError

SCALES = [1, pytest.param(20, marks=pytest.mark.slow)]
DEADLINE_MS = 2000  # per input; the inputs are a few kB, so this is generous


class Tally:
    """Counts inputs and outcomes, printed at the end of each test (run with `-s` to see)."""

    def __init__(self, name: str):
        self.name, self.counts, self.started = name, collections.Counter(), time.perf_counter()

    def __call__(self, outcome: str) -> None:
        self.counts[outcome] += 1

    def report(self) -> None:
        total, elapsed = sum(self.counts.values()), time.perf_counter() - self.started
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        print(f"\nfuzz {self.name}: {total} inputs in {elapsed:.1f} s: {outcomes}")


def fuzz(strategy, check, examples: int) -> None:
    """Runs `check` on `examples` values of `strategy` (hypothesis, no example database)."""
    run = settings(
        max_examples=examples,
        deadline=DEADLINE_MS,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )(given(strategy)(check))
    run()


@pytest.fixture
def unchanged_state():
    """Fails the test if any global state of the reader modules changed."""
    before = hostile.reader_state()
    yield lambda: hostile.reader_state() == before
    assert hostile.reader_state() == before


def mutate(data: bytes, rng: random.Random) -> bytes:
    """A few random byte flips, insertions, deletions or a truncation."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        at = rng.randrange(len(data) + 1)
        if choice < 0.5 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif choice < 0.7:
            data[at:at] = rng.randbytes(rng.randint(1, 8))
        elif choice < 0.9:
            del data[at : at + rng.randint(1, 8)]
        else:
            del data[at:]
    return bytes(data)


# --------------------------------------------------------------------------- torch pickles

ALLOWED_GLOBALS = [
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"), ("torch._tensor", "_rebuild_from_type_v2"), ("collections", "OrderedDict"),
    ("torch", "FloatStorage"), ("torch", "HalfStorage"), ("torch", "BFloat16Storage"), ("torch", "UntypedStorage"),
    ("torch", "float16"), ("torch", "Tensor"), ("torch.nn.parameter", "Parameter"),
]  # fmt: skip
REFUSED_GLOBALS = [
    ("posix", "system"), ("os", "system"), ("builtins", "eval"), ("__builtin__", "eval"), ("builtins", "getattr"),
    ("subprocess", "Popen"), ("torch", "load"), ("collections", "defaultdict"), ("copyreg", "_reconstructor"),
    ("numpy.core.multiarray", "_reconstruct"), ("torch._utils", "_rebuild_device_tensor_from_numpy"),
]  # fmt: skip
SIMPLE_OPS = [
    pickle.NONE, pickle.NEWTRUE, pickle.NEWFALSE, pickle.EMPTY_DICT, pickle.EMPTY_LIST, pickle.EMPTY_TUPLE,
    pickle.MARK, pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3, pickle.LIST, pickle.DICT, pickle.SETITEM,
    pickle.SETITEMS, pickle.APPEND, pickle.APPENDS, pickle.REDUCE, pickle.BUILD, pickle.BINPERSID, pickle.DUP,
    pickle.POP, pickle.POP_MARK, pickle.MEMOIZE, pickle.STACK_GLOBAL, pickle.NEWOBJ, pickle.EMPTY_SET,
    pickle.ADDITEMS, pickle.STOP, pickle.FRAME + struct.pack("<Q", 4),
]  # fmt: skip
STORAGE_KEYS = ["0", "1", "2"]

small = st.integers(0, 6)
huge = st.sampled_from([2**31, 2**62, 2**63 - 1, 2**63, 2**64 + 3, 2**200])
sizes = st.one_of(small, small, small, huge)


@st.composite
def tensor_record(draw) -> bytes:
    """A tensor as torch pickles it, with sizes, strides, offsets and storages that may or may
    not fit, under any of the rebuild functions."""
    ndim = draw(st.integers(0, 3))
    shape = [draw(sizes) for _ in range(ndim)]
    stride = [draw(sizes) for _ in range(draw(st.sampled_from([ndim, ndim, max(ndim - 1, 0)])))]
    key, numel = draw(st.sampled_from(STORAGE_KEYS)), draw(st.one_of(st.just(16), st.integers(0, 16), huge))
    kind = draw(st.sampled_from(["FloatStorage", "FloatStorage", "HalfStorage", "BFloat16Storage", "UntypedStorage"]))
    args = [
        hostile.storage(key, numel, kind),
        hostile.integer(draw(sizes)),
        hostile.tuple_(*map(hostile.integer, shape)),
        hostile.tuple_(*map(hostile.integer, stride)),
        pickle.NEWFALSE,
        hostile.ordered_dict(),
    ]
    flavour = draw(st.sampled_from(["v2", "v2", "v2_metadata", "v3", "parameter", "v1"]))
    if flavour == "v1":
        return hostile.global_("torch._utils", "_rebuild_tensor") + hostile.tuple_(*args[:4]) + pickle.REDUCE
    if flavour == "v2_metadata":
        flags = draw(st.sampled_from(["neg", "conj", "other"]))
        args.append(hostile.dict_((hostile.text(flags), pickle.NEWTRUE)))
    if flavour == "v3":
        args.insert(6, hostile.global_("torch", draw(st.sampled_from(["float16", "float32", "bool", "int64"]))))
    record = hostile.global_("torch._utils", "_rebuild_tensor_v2" if flavour != "v3" else "_rebuild_tensor_v3")
    record += hostile.tuple_(*args) + pickle.REDUCE
    if flavour == "parameter":
        parameter = hostile.global_("torch._utils", "_rebuild_parameter")
        record = parameter + hostile.tuple_(record, pickle.NEWFALSE, hostile.ordered_dict()) + pickle.REDUCE
    return record


@st.composite
def fitting_tensor_record(draw) -> bytes:
    """A tensor that fits its storage: a contiguous or permuted view of up to 16 elements at
    an offset in a storage of 64 bytes (the size `torch_file` gives storages in clean mode)."""
    shape = draw(st.lists(st.integers(1, 4), max_size=2).filter(lambda s: int(np.prod(s)) <= 16))
    stride = [int(np.prod(shape[i + 1 :])) for i in range(len(shape))]
    if len(shape) == 2 and draw(st.booleans()):  # a transposed view
        shape, stride = shape[::-1], stride[::-1]
    offset = draw(st.integers(0, 16 - int(np.prod(shape))))
    kind, numel = draw(st.sampled_from([("FloatStorage", 16), ("HalfStorage", 32), ("BFloat16Storage", 32)]))
    return hostile.tensor(draw(st.sampled_from(STORAGE_KEYS)), numel, shape, stride, offset, kind)


def any_op(sentinel: Path):
    """One opcode (with its argument) or a short run of opcodes."""
    payload = f"touch {sentinel}"
    return st.one_of(
        st.sampled_from(SIMPLE_OPS),
        st.integers(-(2**40), 2**40).map(hostile.integer),
        huge.map(hostile.integer),
        st.text(max_size=12).map(hostile.text),
        st.binary(max_size=12).map(lambda b: pickle.SHORT_BINBYTES + bytes([len(b)]) + b),
        st.integers(0, 12).map(hostile.put),
        st.integers(0, 12).map(hostile.get),
        st.sampled_from([hostile.put(2**32 - 1), hostile.put(2**26), pickle.BINPUT + b"\xff"]),
        st.sampled_from(ALLOWED_GLOBALS + REFUSED_GLOBALS).map(lambda g: hostile.global_(*g)),
        st.sampled_from(ALLOWED_GLOBALS + REFUSED_GLOBALS).map(lambda g: hostile.stack_global(*g)),
        st.sampled_from(REFUSED_GLOBALS).map(lambda g: hostile.global_(*g) + hostile.tuple_(hostile.text(payload))),
        tensor_record(),
        st.sampled_from(STORAGE_KEYS).map(lambda k: hostile.storage(k, 2)),
        st.sampled_from([10, 63, 64, 65, 3000]).map(hostile.nested_dicts),
        st.sampled_from([10, 3000, 100_000]).map(hostile.nested_tuples),
        st.binary(min_size=1, max_size=3),
    )


@st.composite
def torch_file(draw, sentinel: Path):
    """(layout, pickle, storages): a state-dict-shaped pickle with tensors, nesting, memo sharing
    and random opcodes spliced in, around storages of random sizes."""
    clean = draw(st.integers(0, 2)) == 0  # only tensors that fit, and all storages: mostly read
    ops = any_op(sentinel)
    values = (
        fitting_tensor_record()
        if clean
        else st.one_of(tensor_record(), fitting_tensor_record(), st.lists(ops, min_size=1, max_size=6).map(b"".join))
    )
    entries = []
    for i in range(draw(st.integers(0, 4))):
        value = draw(values)
        if draw(st.booleans()):  # nesting, sometimes shared through the memo
            value = hostile.dict_((hostile.text("inner"), value)) + hostile.put(100 + i)
        entries.append((hostile.text(draw(st.sampled_from(["w", "b", "a.b", f"k{i}", ""]))), value))
    if entries and draw(st.booleans()):
        entries.append((hostile.text("again"), hostile.get(100)))
    body = hostile.dict_(*entries)
    if draw(st.booleans()):
        body = hostile.ordered_dict() + pickle.MARK + b"".join(k + v for k, v in entries) + pickle.SETITEMS
        if draw(st.booleans()):
            body += hostile.dict_((hostile.text("_metadata"), hostile.dict_())) + pickle.BUILD
    splice = draw(st.lists(ops, max_size=6))
    at = draw(st.integers(0, len(body)))
    if splice and not clean and draw(st.booleans()):
        body = body[:at] + b"".join(splice) + body[at:]
    data = hostile.proto(draw(st.sampled_from([2, 2, 4, 5, 6]))) + body + pickle.STOP
    storage_bytes = st.one_of(st.binary(min_size=64, max_size=64), st.binary(max_size=40))  # 64: 16 floats
    if clean:
        storages = {key: draw(st.binary(min_size=64, max_size=64)) for key in STORAGE_KEYS}
    else:
        storages = {key: draw(storage_bytes) for key in STORAGE_KEYS if draw(st.integers(0, 3))}
    layout = draw(st.sampled_from(["zip", "zip", "legacy"]))
    return layout, data, storages


def write_torch(path: Path, layout: str, data: bytes, storages: dict[str, bytes]) -> Path:
    if layout == "zip":
        return hostile.torch_zip(path, data, storages)
    sized = {key: value[: len(value) // 4 * 4] for key, value in storages.items()}
    return hostile.torch_legacy(path, data, sized)


def torch_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """What torch reads (its own restricted unpickler), flattened as we flatten, or None."""
    try:
        obj = torch.load(path, weights_only=True)
    except Exception:
        return None
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, torch.Tensor):
                out[f"{prefix}{key}"] = value.detach().resolve_neg().resolve_conj()

    if not isinstance(obj, dict):
        return None
    walk(obj, "")
    return out


def same_arrays(ours: dict[str, np.ndarray], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        assert ours[name].shape == expected.shape, name
        np.testing.assert_array_equal(ours[name].astype(expected.dtype), expected, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("scale", SCALES)
def test_fuzz_torch_pickles(tmp_path, unchanged_state, scale):
    sentinel = tmp_path / "pwned"
    tally = Tally("torch pickles (zip and legacy)")

    def check(case):
        layout, data, storages = case
        path = write_torch(tmp_path / "fuzz.bin", layout, data, storages)
        try:
            ours = readers.read_torch_bin(path)
        except CheckpointError:
            tally("refused")
        else:
            theirs = torch_arrays(path)
            if theirs is not None:
                same_arrays(ours, theirs)
            tally("read, equal to torch.load" if theirs is not None else "read (torch.load refuses)")
        assert not sentinel.exists()
        assert unchanged_state()

    fuzz(torch_file(sentinel), check, 150 * scale)
    tally.report()
    assert tally.counts["refused"] and sum(v for k, v in tally.counts.items() if k.startswith("read"))


def test_an_empty_tensor_whose_other_sizes_overflow_is_refused(tmp_path):
    """Found by `test_fuzz_torch_pickles`: size (0, 2**62) passed the checks (no bytes to read)
    and then NumPy refused the shape with a ValueError."""
    data = (
        b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\n"
        b"FloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x10tQK\x00(K\x00\x8a\x08\x00\x00\x00\x00\x00\x00"
        b"\x00@t(K\x00K\x00t\x89ccollections\nOrderedDict\n)RtRu."
    )
    path = hostile.torch_zip(tmp_path / "empty.bin", data, {"0": bytes(64)})
    with pytest.raises(CheckpointError, match=r"size \(0, 4611686018427387904\) is empty but too large"):
        readers.read_torch_bin(path)


@st.composite
def mutated_torch_save(draw):
    """A real `torch.save` file (zip or legacy), then randomly corrupted or recompressed."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    layout = draw(st.sampled_from(["zip", "legacy"]))
    how = draw(st.sampled_from(["mutate", "mutate", "deflate", "bomb"] if layout == "zip" else ["mutate"]))
    return layout, how, rng


def _real_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    base = torch.randn(4, 3)
    return {"w": base, "t": base.t(), "h": torch.randn(5).half(), "nested": {"b": torch.arange(3)}}


@pytest.mark.parametrize("scale", SCALES)
def test_fuzz_mutated_torch_archives(tmp_path, unchanged_state, scale):
    originals = {}
    for layout in ("zip", "legacy"):
        path = tmp_path / f"original-{layout}.bin"
        torch.save(_real_state(), path, _use_new_zipfile_serialization=layout == "zip")
        originals[layout] = path.read_bytes()
    tally = Tally("mutated torch.save archives (flips, truncation, deflate, zip bombs)")

    def check(case):
        layout, how, rng = case
        path = tmp_path / "fuzz.bin"
        if how == "mutate":
            path.write_bytes(mutate(originals[layout], rng))
        else:  # the same members, deflated; a "bomb" also gets a highly compressible storage
            with zipfile.ZipFile(tmp_path / "original-zip.bin") as src:
                members = {name: src.read(name) for name in src.namelist()}
            if how == "bomb":
                data = next(name for name in members if name.endswith("/data/0"))
                members[data] = bytes(rng.choice([16, 4096, 1 << 20]))
            with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
                for name, value in members.items():
                    out.writestr(name, value)
        try:
            ours = readers.read_torch_bin(path)
        except CheckpointError:
            tally("refused")
        else:
            theirs = torch_arrays(path)
            if theirs is not None:
                same_arrays(ours, theirs)
            tally("read, equal to torch.load" if theirs is not None else "read (torch.load refuses)")

    fuzz(mutated_torch_save(), check, 100 * scale)
    tally.report()


# --------------------------------------------------------------------------- safetensors

ST_DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "I8", "F8_E4M3", "C64"]
ST_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1, "F64": 8, "I8": 1, "F8_E4M3": 1, "C64": 8}


@st.composite
def safetensors_file(draw) -> tuple[bytes, bool]:
    """(file bytes, header written by json.dumps): tensors laid out as the library writes them,
    then perturbed: offsets shifted or swapped, a duplicate name, wrong dtypes or shapes, data
    too short or too long, metadata of the wrong type, or random bytes flipped."""
    names = draw(st.lists(st.sampled_from(["a", "b", "c", "w.x", "é", "__metadata__x"]), unique=True, max_size=4))
    header, offset = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(ST_DTYPES))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        nbytes = int(np.prod(shape, dtype=np.int64)) * ST_ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    data = draw(st.binary(min_size=offset, max_size=offset))
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.sampled_from([{"format": "pt"}, {"format": 1}, None, [], {"a": {}}]))
    perturbation = draw(st.sampled_from(["none", "none", "offsets", "entry", "data", "duplicate", "bytes"]))
    if perturbation == "offsets" and names:
        entry = header[draw(st.sampled_from(names))]
        entry["data_offsets"] = [o + draw(st.integers(-8, 8)) for o in entry["data_offsets"]]
    elif perturbation == "entry" and names:
        entry = header[draw(st.sampled_from(names))]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        entry[field] = draw(
            st.sampled_from(["F4", "X", 3, None, [2**64], [-1], [2**40, 2**40], [1.5], "F32", [0, 0, 0], {}])
        )
    elif perturbation == "data":
        data = data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data + draw(st.binary(max_size=9))
    raw = json.dumps(header).encode()
    if perturbation == "duplicate" and names:
        first = json.dumps({names[0]: header[names[0]]})[1:-1]
        raw = raw[:-1] + b", " + first.encode() + b"}"
    if draw(st.booleans()):
        raw += b" " * draw(st.integers(0, 7))  # alignment padding, as the library writes
    file = len(raw).to_bytes(8, "little") + raw + data
    if perturbation == "bytes":
        file = mutate(file, random.Random(draw(st.integers(0, 2**32))))
    return file, perturbation != "bytes"


def library_view(path: Path) -> dict[str, np.ndarray] | None:
    """The library's reading of the file (bytes per tensor), or None when it refuses."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as file:
            names = list(file.keys())
        return dict.fromkeys(names)
    except Exception:
        return None


def library_bytes(raw: bytes, name: str) -> bytes:
    """A tensor's bytes as the library's own header parser places them (Rust side, via
    `safetensors.deserialize`)."""
    from safetensors import deserialize

    for tensor_name, info in deserialize(raw):
        if tensor_name == name:
            return bytes(info["data"])
    raise KeyError(name)


def header_is_plain(raw: bytes) -> bool:
    """No duplicate names and only dtypes we read (then we must accept what the library does)."""
    length = int.from_bytes(raw[:8], "little")
    seen = []
    try:
        header = json.loads(raw[8 : 8 + length], object_pairs_hook=lambda pairs: seen.extend(pairs) or dict(pairs))
    except ValueError:
        return False
    keys = [k for k, _ in seen]
    entries = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else {}
    top_names = [k for k in keys if k in entries]
    return len(top_names) == len(set(top_names)) and all(
        isinstance(v, dict) and v.get("dtype") in ST_ITEMSIZE for v in entries.values()
    )


@pytest.mark.slow
@pytest.mark.parametrize("scale", SCALES)
def test_fuzz_safetensors_agrees_with_the_library(tmp_path, unchanged_state, scale):
    """Differential: we accept a file only if the safetensors library does, read the same bytes
    for every tensor, and accept every file the library accepts when its names are unique and
    its dtypes ours."""
    tally = Tally("safetensors headers (generated and mutated)")

    def check(case):
        raw, _ = case
        path = tmp_path / "fuzz.safetensors"
        path.write_bytes(raw)
        library = library_view(path)
        try:
            ours = readers.read_safetensors(path)
        except CheckpointError:
            assert library is None or not header_is_plain(raw), "the library reads it, we refuse"
            tally("refused" + (" (library too)" if library is None else " (duplicate or foreign dtype)"))
            return
        assert library is not None and sorted(library) == sorted(ours), "we read what the library refuses"
        for name, array in ours.items():
            assert array.tobytes() == library_bytes(raw, name), name
        tally("read, same bytes as the library")

    fuzz(safetensors_file(), check, 200 * scale)
    tally.report()
    assert tally.counts["refused (library too)"] and tally.counts["read, same bytes as the library"]


# --------------------------------------------------------------------------- flax msgpack


def flax_leaf(draw):
    import msgpack

    kind = draw(st.sampled_from(["array", "array", "bad_array", "scalar", "complex", "plain", "chunked", "bad_ext"]))
    dtype = draw(st.sampled_from(["float32", "int8", "bfloat16", "bool", "float16", "object", "V3", "<U2"]))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    try:
        itemsize = np.dtype(getattr(ml_dtypes, dtype, dtype)).itemsize
    except TypeError:
        itemsize = 4
    nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
    if kind == "array":
        return msgpack.ExtType(1, msgpack.packb([shape, dtype, draw(st.binary(min_size=nbytes, max_size=nbytes))]))
    if kind == "bad_array":
        payload = [draw(st.sampled_from([shape, [2**63], [-1], "x", [2**40] * 3])), dtype, draw(st.binary(max_size=16))]
        return msgpack.ExtType(1, msgpack.packb(payload[: draw(st.integers(1, 3))]))
    if kind == "scalar":
        return msgpack.ExtType(3, msgpack.packb([[], "float32", draw(st.binary(min_size=4, max_size=4))]))
    if kind == "complex":
        return msgpack.ExtType(2, msgpack.packb(draw(st.sampled_from([[1.0, 2.0], [1], "x"]))))
    if kind == "chunked":
        chunk = msgpack.ExtType(1, msgpack.packb([[2], "float32", bytes(8)]))
        count = draw(st.integers(0, 3))
        declared = draw(st.sampled_from([2 * count, 2 * count + 1]))
        return {
            "__msgpack_chunked_array__": True,
            "shape": {"0": declared},
            "chunks": {str(i): chunk for i in range(count)},
        }
    if kind == "bad_ext":
        return msgpack.ExtType(draw(st.integers(0, 127)), draw(st.binary(max_size=8)))
    return draw(st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=5)))


@st.composite
def flax_tree(draw, depth: int = 0):
    keys = st.one_of(st.sampled_from(["kernel", "bias", "embedding", "scale", "layer_0", "a.b"]), st.integers(0, 3))
    size = draw(st.integers(0 if depth else 1, 3))
    tree = {}
    for _ in range(size):
        key = draw(keys)
        tree[key] = draw(flax_tree(depth + 1)) if depth < 3 and draw(st.booleans()) else flax_leaf(draw)
    return tree


@st.composite
def msgpack_file(draw) -> bytes:
    import msgpack

    data = msgpack.packb(draw(flax_tree()))
    if draw(st.integers(0, 3)) == 0:
        data = mutate(data, random.Random(draw(st.integers(0, 2**32))))
    return data


def flax_arrays(path: Path) -> dict[str, np.ndarray] | None:
    from flax.serialization import msgpack_restore
    from flax.traverse_util import flatten_dict

    try:
        tree = msgpack_restore(path.read_bytes())
        if not isinstance(tree, dict):
            return None
        flat = flatten_dict(tree, sep=".")
    except Exception:
        return None
    return {k: np.asarray(v) for k, v in flat.items() if isinstance(v, (np.ndarray, np.generic, jax.Array))}


@pytest.mark.parametrize("scale", SCALES)
def test_fuzz_flax_msgpack(tmp_path, unchanged_state, scale):
    tally = Tally("flax msgpack blobs (generated and mutated)")

    def check(data):
        path = tmp_path / "fuzz.msgpack"
        path.write_bytes(data)
        try:
            ours = readers.read_msgpack(path)
        except CheckpointError:
            tally("refused")
            return
        theirs = flax_arrays(path)
        if theirs is not None:
            assert sorted(ours) == sorted(theirs)
            for name, value in theirs.items():
                assert ours[name].dtype == value.dtype and ours[name].shape == value.shape, name
                assert ours[name].tobytes() == value.tobytes(), name
        tally("read, equal to flax" if theirs is not None else "read (flax refuses)")

    fuzz(msgpack_file(), check, 120 * scale)
    tally.report()
    assert tally.counts["refused"] and tally.counts["read, equal to flax"]


# --------------------------------------------------------------------------- sharded folders


@st.composite
def sharded_folder(draw):
    """Two shards and an index, consistent, then damaged a few times: an extra copy of a name in
    the other shard, a name assigned to the wrong, a missing or a hostile file, a name unlisted or
    dropped from its shard, listed twice, or random bytes. Each shard's values tell which shard
    they came from."""
    names = ["a", "b", "c", "d"]
    owner = {name: draw(st.sampled_from(["s1.safetensors", "s2.safetensors"])) for name in names}
    shards = {shard: [n for n in names if owner[n] == shard] for shard in ("s1.safetensors", "s2.safetensors")}
    weight_map = dict(owner)  # consistent so far: every name in one shard, as the index says
    targets = st.sampled_from(["s1.safetensors", "s2.safetensors", "missing.safetensors", "../s1.safetensors", "", 3])
    for _ in range(draw(st.integers(0, 3))):  # then some damage
        name, damage = draw(st.sampled_from(names)), draw(st.sampled_from(["copy", "remap", "unlist", "drop"]))
        if damage == "copy":  # an extra copy in the other shard
            other = "s2.safetensors" if owner[name] == "s1.safetensors" else "s1.safetensors"
            shards[other] = sorted(set(shards[other]) | {name})
        elif damage == "remap":
            weight_map[name] = draw(targets)
        elif damage == "unlist":
            weight_map.pop(name, None)
        else:
            shards[owner[name]] = [n for n in shards[owner[name]] if n != name]
    raw = json.dumps({"metadata": {}, "weight_map": weight_map})
    if weight_map and draw(st.integers(0, 4)) == 0:  # a name listed twice
        first = next(iter(weight_map))
        raw = raw[:-2] + f', "{first}": "s2.safetensors"' + "}}"
    if draw(st.integers(0, 6)) == 0:
        raw = mutate(raw.encode(), random.Random(draw(st.integers(0, 2**32)))).decode("utf-8", "replace")
    return shards, raw


@pytest.mark.parametrize("scale", SCALES)
def test_fuzz_sharded_index(tmp_path, unchanged_state, scale):
    from safetensors.numpy import save_file

    tally = Tally("sharded folders and index files")

    def check(case):
        shards, raw = case
        folder = tmp_path / "folder"
        if folder.exists():
            for file in folder.iterdir():
                file.unlink()
        folder.mkdir(exist_ok=True)
        for shard, names in shards.items():
            value = float(shard[1])  # every tensor of s1 holds 1.0, of s2 2.0
            save_file({n: np.full(2, value, np.float32) for n in names}, folder / shard, metadata={"format": "pt"})
        (folder / "model.safetensors.index.json").write_text(raw)
        try:
            arrays, _ = readers.read_state_dict(folder)
        except CheckpointError:
            tally("refused")
            return
        weight_map = json.loads(raw)["weight_map"]
        holders = collections.defaultdict(list)  # among the shards the index names: the checkpoint
        for shard, names in shards.items():
            for name in names if shard in weight_map.values() else []:
                holders[name].append(shard)
        for name, array in arrays.items():
            assert len(holders[name]) == 1, f"{name} is in {holders[name]}, yet read"
            assert weight_map.get(name, holders[name][0]) == holders[name][0], name
            assert array[0] == float(holders[name][0][1])
        for name, shard in weight_map.items():
            assert name in arrays and shard in holders[name]
        tally("read, unambiguous")

    fuzz(sharded_folder(), check, 80 * scale)
    tally.report()
    assert tally.counts["refused"] and tally.counts["read, unambiguous"]


# --------------------------------------------------------------------------- fill_tree on lazy tensors


class Recorder:
    """Lazy tensors that count their reads; `forbidden` ones must never be read."""

    def __init__(self):
        self.reads = collections.Counter()

    def tensor(self, name: str, shape: tuple[int, ...], forbidden: bool) -> LazyTensor:
        def read():
            assert not forbidden, f"{name} {shape} was read although the model cannot use it"
            self.reads[name] += 1
            return np.full(shape, 1.0, np.float32)

        return LazyTensor("<fuzz>", np.float32, shape, read)


@st.composite
def skeleton_and_state(draw):
    leaves = draw(st.dictionaries(st.sampled_from(["p", "q", "r", "s"]), st.lists(st.integers(1, 3), max_size=2)))
    stacked = draw(st.integers(1, 3))
    checkpoint_layers = draw(st.sampled_from([stacked, stacked, stacked - 1, stacked + 1, 10**6]))
    declared = {}
    for name, shape in leaves.items():
        declared[name] = draw(st.sampled_from([tuple(shape), tuple(shape), (16384, 16384), (2**40,), (*shape, 1)]))
    for i in range(min(checkpoint_layers, 5)):
        declared[f"h.{i}.w"] = draw(st.sampled_from([(2,), (2,), (3,), (2**40, 2**40)]))
    if draw(st.booleans()):
        declared["unexpected"] = draw(st.sampled_from([(2,), (2**40, 2**40)]))
    for name in draw(st.lists(st.sampled_from(sorted(declared)), unique=True, max_size=2)) if declared else []:
        del declared[name]
    return leaves, stacked, declared


@pytest.mark.parametrize("scale", SCALES)
def test_fuzz_fill_tree_checks_shapes_before_reading(unchanged_state, scale):
    """Nothing is read unless it fills a leaf of exactly its shape, and nothing twice: a
    hostile shape or layer count ends in CheckpointError without a read."""
    tally = Tally("fill_tree on lazy tensors with hostile shapes and layer counts")
    key_map = KeyMap(rules=(("h.{i}.", "h."), ("", "")))

    def check(case):
        leaves, stacked, declared = case
        skeleton = {name: jax.ShapeDtypeStruct(tuple(shape), np.float32) for name, shape in leaves.items()}
        skeleton["h"] = {"w": jax.ShapeDtypeStruct((stacked, 2), np.float32)}
        recorder = Recorder()
        fits = {name: shape == tuple(leaves[name]) for name, shape in declared.items() if name in leaves}
        fits.update(
            {n: s == (2,) and int(n.split(".")[1]) < stacked for n, s in declared.items() if n.startswith("h.")}
        )
        state = {name: recorder.tensor(name, shape, not fits.get(name, False)) for name, shape in declared.items()}
        try:
            values, _, _ = fill_tree(skeleton, state, key_map)
        except CheckpointError:
            tally("refused")
        else:
            assert all(v is not None for v in values)
            tally("filled")
        assert all(count == 1 for count in recorder.reads.values())

    fuzz(skeleton_and_state(), check, 120 * scale)
    tally.report()
    assert tally.counts["refused"] and tally.counts["filled"]


# --------------------------------------------------------------------------- peak memory in a fresh process

_MEMORY_SCRIPT = """
import json, sys, time, warnings
import eqx_models
from eqx_models.checkpoint import readers
from eqx_models.errors import CheckpointError

def status(field):  # in kB
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) for line in file if line.startswith(field + ":"))

warnings.simplefilter("ignore")
with open(sys.argv[1]) as file:
    cases, warm = json.load(file)
read = {"bin": readers.read_torch_bin, "safetensors": readers.read_safetensors, "msgpack": readers.read_msgpack,
        "folder": eqx_models.from_pretrained}
for kind, path in warm:  # imports, compilation and allocator caches settle here
    read[kind](path)
baseline = status("VmRSS")
results = []
for kind, path in cases:
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as file:  # resets the peak (VmHWM) to the current RSS
        file.write("5")
    started = time.perf_counter()
    try:
        read[kind](path)
        outcome = "read"
    except CheckpointError:
        outcome = "refused"
    except Exception as err:
        outcome = f"{type(err).__name__}: {err}"
    results.append([path, outcome, time.perf_counter() - started, status("VmHWM") - before])
print(json.dumps({"baseline_kb": baseline, "final_kb": status("VmRSS"), "results": results}))
"""
MEMORY_BOUND_MB = 64
TIME_BOUND_S = 2.0


def _worst_cases(root: Path, hf_folder: Path) -> list[tuple[str, str]]:
    """The issue's hostile files, as files and inside a model folder."""
    import shutil

    cases = []
    view = torch.zeros(4).as_strided((16384, 16384), (0, 0))
    for layout in ("zip", "legacy"):
        path = root / f"stride0-{layout}.bin"
        torch.save({"w": view}, path, _use_new_zipfile_serialization=layout == "zip")
        cases.append(("bin", str(path)))
    for name, key in (("stride0-as-weight", "transformer.wte.weight"), ("stride0-unexpected", "extra")):
        folder = root / name
        shutil.copytree(hf_folder, folder)
        (folder / "model.safetensors").unlink()
        state = torch.load(root.parent / "benign-state.bin", weights_only=True)
        state[key] = view
        torch.save(state, folder / "pytorch_model.bin")
        cases.append(("folder", str(folder)))
    level = {"w": torch.ones(2)}
    for _ in range(40):
        level = {"a": level, "b": level}
    torch.save({"root": level}, root / "shared40.bin")
    cases.append(("bin", str(root / "shared40.bin")))
    memo = hostile.proto(2) + pickle.NONE + hostile.put(2**30) + pickle.STOP
    cases.append(("bin", str(hostile.torch_zip(root / "memo.bin", memo, {}))))
    bomb = hostile.deflated_member_zip(root / "pkl-bomb.bin", "archive/data.pkl", b"}" * (1 << 20), 200, {})
    cases.append(("bin", str(bomb)))
    numel = 1 << 26
    data = hostile.state_pickle({"w": hostile.tensor("0", numel, (numel,), (1,))})
    others = {"archive/data.pkl": data, "archive/byteorder": b"little"}
    storage_bomb = hostile.deflated_member_zip(root / "storage-bomb.bin", "archive/data/0", bytes(1 << 20), 256, others)
    cases.append(("bin", str(storage_bomb)))
    huge = hostile.state_pickle({"w": hostile.tensor("0", 4, (2**62,), (0,))})
    cases.append(("bin", str(hostile.torch_zip(root / "huge.bin", huge, {"0": bytes(16)}))))
    deep = root / "deep-config"
    shutil.copytree(hf_folder, deep)
    config = json.loads((deep / "config.json").read_text())
    # the most layers a config accepts (MAX_LAYERS; 10**6 is refused by the config itself)
    config.update(num_layers=10_000, attention_types=[[["global", "local"], 5_000]])
    (deep / "config.json").write_text(json.dumps(config))
    cases.append(("folder", str(deep)))
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("scale", SCALES)
def test_peak_memory_and_time_are_bounded_in_a_fresh_process(tmp_path, scale):
    """A corpus of generated hostile files and the issue's worst cases (the 16384x16384 stride-0
    view, the depth-40 shared memo, a memo index of 2**30, deflate bombs of 200 MiB of opcodes and
    of a 256 MiB storage, a 10,000-layer config against a 2-layer checkpoint) read in one fresh
    process: each input ends in
    CheckpointError or a load within TIME_BOUND_S, and no input raises the process's peak RSS
    (reset before each one through /proc/self/clear_refs) by MEMORY_BOUND_MB or more."""
    import transformers
    from oracle import randomise

    hf_folder = tmp_path / "hf"
    config = transformers.GPTNeoConfig(
        vocab_size=61, hidden_size=16, num_heads=2, max_position_embeddings=32, window_size=3, num_layers=2,
        attention_types=[[["global", "local"], 1]],
    )  # fmt: skip
    torch.manual_seed(0)
    model = randomise(transformers.GPTNeoForCausalLM(config))
    model.save_pretrained(hf_folder)
    torch.save(model.state_dict(), tmp_path / "benign-state.bin")
    warm_bin = tmp_path / "warm.bin"
    torch.save(_real_state(), warm_bin)
    warm = [["folder", str(hf_folder)], ["bin", str(warm_bin)], ["safetensors", str(hf_folder / "model.safetensors")]]

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    cases = _worst_cases(corpus, hf_folder)
    worst_count = len(cases)
    written = collections.Counter()

    def keep(kind: str, data: bytes) -> None:
        path = corpus / f"{kind}-{written[kind]}.{kind}"
        path.write_bytes(data)
        written[kind] += 1
        cases.append((kind, str(path)))

    def collect_torch(case):
        layout, data, storages = case
        keep("bin", write_torch(tmp_path / "scratch.bin", layout, data, storages).read_bytes())

    fuzz(torch_file(tmp_path / "pwned"), collect_torch, 50 * scale)
    fuzz(safetensors_file(), lambda case: keep("safetensors", case[0]), 50 * scale)
    fuzz(msgpack_file(), lambda data: keep("msgpack", data), 50 * scale)

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "cases.json").write_text(json.dumps([cases, warm]))
    args = [sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path / "cases.json")]
    result = subprocess.run(args, capture_output=True, text=True, cwd=repo, timeout=600 * scale)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    results = report["results"]
    outcomes = collections.Counter(outcome for _, outcome, _, _ in results)
    slowest, hungriest = max(results, key=lambda r: r[2]), max(results, key=lambda r: r[3])
    print(
        f"\nmemory bound: {len(results)} inputs ({dict(outcomes)}) after a {report['baseline_kb'] / 1024:.0f} MB "
        f"warm-up; largest peak-RSS growth of one input {hungriest[3] / 1024:.1f} MB ({Path(hungriest[0]).name}; "
        f"bound {MEMORY_BOUND_MB} MB), slowest {slowest[2]:.2f} s ({Path(slowest[0]).name}; bound {TIME_BOUND_S} s), "
        f"RSS after all {report['final_kb'] / 1024:.0f} MB"
    )
    assert set(outcomes) <= {"read", "refused"}, outcomes
    assert hungriest[3] / 1024 < MEMORY_BOUND_MB
    assert slowest[2] < TIME_BOUND_S
    assert (report["final_kb"] - report["baseline_kb"]) / 1024 < MEMORY_BOUND_MB  # nothing accumulates
    worst = {Path(path).name: outcome for path, outcome, _, _ in results[:worst_count]}
    assert set(worst.values()) == {"refused"}, worst
