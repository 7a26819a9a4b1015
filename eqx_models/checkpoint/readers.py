"""Read the parameters of a Hugging Face checkpoint folder into numpy arrays.

Supported files: safetensors (`model.safetensors`), PyTorch pickles (`pytorch_model.bin`) and Flax
msgpack (`flax_model.msgpack`), each either whole or sharded through a `<file>.index.json`. Neither torch
nor flax is imported, and pickles are read without running any code. bfloat16 arrays use
`ml_dtypes.bfloat16`.

Two layers: `lazy_state_dict` (and `lazy_safetensors`, `lazy_torch_bin`, `lazy_msgpack`) describe
every tensor as a `LazyTensor`, its dtype and shape validated against the bytes the file holds,
nothing read yet; `from_pretrained` checks each shape against the model before reading it. The
`read_*` functions read every tensor into a numpy array (refusing more than a few times the
file's size, see `_lazy.read_all`). See docs/conversion.md, "Security and limits".
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open

from eqx_models.errors import CheckpointError

from ._lazy import LazyTensor, read_all
from ._msgpack import decode_flax_msgpack
from ._torch_pickle import lazy_torch_file

__all__ = [
    "CHECKPOINT_FILES",
    "LazyTensor",
    "find_checkpoint_files",
    "lazy_msgpack",
    "lazy_safetensors",
    "lazy_state_dict",
    "lazy_torch_bin",
    "read_msgpack",
    "read_safetensors",
    "read_state_dict",
    "read_torch_bin",
    "read_weight_map",
]

#: The checkpoint files of a HF folder: (file name, reader kind, is a sharding index), in order of
#: preference. `eqx_models.hub` downloads the first a repository has, with its shards.
CHECKPOINT_FILES = (
    ("model.safetensors", "safetensors", False),
    ("model.safetensors.index.json", "safetensors", True),
    ("pytorch_model.bin", "torch", False),
    ("pytorch_model.bin.index.json", "torch", True),
    ("flax_model.msgpack", "msgpack", False),
    ("flax_model.msgpack.index.json", "msgpack", True),
)

_SAFETENSORS_DTYPES = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "U16": np.uint16,
    "I16": np.int16,
    "U32": np.uint32,
    "I32": np.int32,
    "U64": np.uint64,
    "I64": np.int64,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F32": np.float32,
    "F64": np.float64,
    "C64": np.complex64,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E8M0": ml_dtypes.float8_e8m0fnu,
}
_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's limit
_USIZE = 1 << 64


@dataclass(frozen=True)
class _Plan:
    """What `read_state_dict` will read."""

    files: list[Path]
    kind: str
    source_format: str
    weight_map: dict[str, str] | None = None
    index: Path | None = None


# ----------------------------------------------------------------------------- paths


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    return path


def _existing_folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"{folder}: checkpoint folder does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (pass the folder holding the checkpoint)")
    return folder


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """`json.loads` hook: a key given twice is an error (json keeps the last silently)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


# ----------------------------------------------------------------------------- safetensors
# The layout rules are the safetensors library's (`Metadata::validate`): the tensors' byte ranges,
# sorted, tile the data section exactly, from its first byte to the end of the file. A file must also
# pass the library itself (`safe_open`); we never fall back to a weaker reader when it refuses one.


def _check_tensor_entry(path: Path, name: str, entry) -> tuple[np.dtype, tuple[int, ...], int, int]:
    if type(entry) is not dict or type(entry.get("dtype")) is not str or entry["dtype"] not in _SAFETENSORS_DTYPES:
        dtype = entry.get("dtype") if type(entry) is dict else None
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed entry or unsupported dtype {dtype!r:.40}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if type(shape) is not list or not all(type(d) is int and 0 <= d < _USIZE for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed shape {shape!r:.80}")
    if type(offsets) is not list or len(offsets) != 2 or not all(type(o) is int and 0 <= o < _USIZE for o in offsets):
        raise CheckpointError(f"{path}: tensor {name!r} has malformed data_offsets {offsets!r:.80}")
    dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
    size = 1
    for d in shape:  # stops early: a product of many huge dims is never computed
        size *= d
        if size >= _USIZE:
            raise CheckpointError(f"{path}: tensor {name!r} has an impossibly large shape")
    begin, end = offsets
    if end - begin != size * dtype.itemsize:
        raise CheckpointError(f"{path}: tensor {name!r} has data_offsets {offsets} that do not fit its shape")
    return dtype, tuple(shape), begin, end


def _safetensors_header(path: Path) -> tuple[dict[str, tuple], dict[str, str], int]:
    """Validated ({name: (dtype, shape, begin, end)}, metadata, start of the data section)."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        length = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or length > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise CheckpointError(f"{path}: not a safetensors file, or truncated (bad header length)")
        raw = file.read(length)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as err:
        raise CheckpointError(f"{path}: the safetensors header names {str(err)!r} twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{path}: not a safetensors file, or corrupt (header is not JSON)") from None
    if type(header) is not dict:
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if type(metadata) is not dict or not all(type(v) is str for v in metadata.values()):
        raise CheckpointError(f"{path}: malformed safetensors __metadata__ (must map strings to strings)")
    entries = {name: _check_tensor_entry(path, name, entry) for name, entry in header.items()}
    covered = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != covered:
            problem = "overlaps another tensor" if begin < covered else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor {name!r} {problem} (data_offsets start at {begin}, not {covered})")
        covered = end
    data_size = size - 8 - length
    if covered != data_size:
        problem = "truncated file?" if covered > data_size else "trailing bytes after the last tensor"
        raise CheckpointError(
            f"{path}: the tensors cover {covered} bytes of a {data_size}-byte data section ({problem})"
        )
    return entries, metadata, 8 + length


def _read_range(path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    buffer = np.empty(math.prod(shape) * dtype.itemsize, np.uint8)
    with open(path, "rb") as file:
        file.seek(offset)
        if file.readinto(buffer) != buffer.size:
            raise CheckpointError(f"{path}: truncated data at byte {offset}")
    return buffer.view(dtype).reshape(shape)


def lazy_safetensors(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """The tensors of a `.safetensors` file, validated as the safetensors library does, unread."""
    path = _existing_file(path)
    entries, _, data_start = _safetensors_header(path)
    try:  # the library has the last word (its numpy backend lacks bfloat16, so we read the bytes)
        with safe_open(str(path), framework="numpy") as file:
            names = set(file.keys())
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: rejected by the safetensors library ({err})") from None
    if names != set(entries):
        raise CheckpointError(f"{path}: the safetensors library reads other tensor names than the header's")
    return {
        name: LazyTensor(
            str(path), dtype, shape, lambda o=data_start + begin, d=dtype, s=shape: _read_range(path, o, d, s)
        )
        for name, (dtype, shape, begin, _) in entries.items()
    }


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays of a `.safetensors` file keyed by tensor name."""
    tensors = lazy_safetensors(path)
    return read_all(tensors, str(path), Path(path).stat().st_size)


def _safetensors_source_format(path: Path) -> str:
    """ "flax" for files written by a Flax model (unconverted keys), else "pytorch"."""
    _, metadata, _ = _safetensors_header(path)
    declared = str(metadata.get("format", "pt")).lower()
    if declared in ("tf", "tensorflow", "keras"):
        raise CheckpointError(f"{path}: TensorFlow safetensors checkpoints are not supported")
    return "flax" if declared in ("flax", "jax") else "pytorch"


# ----------------------------------------------------------------------------- other formats


def lazy_msgpack(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """The arrays of a Flax `.msgpack` file (decoded eagerly: msgpack has no lazy reader; the
    arrays take no more memory than the file), keyed by their nested path joined with "."."""
    path = _existing_file(path)
    arrays = decode_flax_msgpack(path.read_bytes(), str(path))
    return {name: LazyTensor.of(array, str(path)) for name, array in arrays.items()}


def read_msgpack(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays of a Flax `.msgpack` file keyed by their nested path joined with "."."""
    path = _existing_file(path)
    return decode_flax_msgpack(path.read_bytes(), str(path))


def lazy_torch_bin(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """The tensors of a `torch.save` file (zip or legacy layout), checked against their
    storages and unread; no torch, no pickled code run."""
    return lazy_torch_file(_existing_file(path))


def read_torch_bin(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays of a `torch.save` file (zip or legacy layout), without torch and without running pickles."""
    tensors = lazy_torch_bin(path)
    return read_all(tensors, str(path), Path(path).stat().st_size)


_READERS = {"safetensors": lazy_safetensors, "torch": lazy_torch_bin, "msgpack": lazy_msgpack}


# ----------------------------------------------------------------------------- folders and shards


def read_weight_map(index: Path) -> dict[str, str]:
    """The `weight_map` (tensor name -> shard file name) of a sharding index, validated: a
    non-empty object whose shard names are plain file names."""
    try:
        content = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as err:
        raise CheckpointError(f"{index}: malformed index json (names {str(err)!r} twice)") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        detail = "nested too deeply" if isinstance(err, RecursionError) else str(err).splitlines()[0][:200]
        raise CheckpointError(f"{index}: malformed index json ({detail})") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: malformed index json (no non-empty 'weight_map' object)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or shard in ("", ".", "..") or "/" in shard or "\\" in shard:
            raise CheckpointError(f"{index}: malformed index json (shard {shard!r:.100} for {name!r:.100})")
    return weight_map


def _sharded_plan(index: Path, kind: str) -> _Plan:
    weight_map = read_weight_map(index)
    files = [index.parent / shard for shard in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index}: missing shard file(s): {', '.join(missing)}")
    return _Plan(files, kind, _source_format(kind, files[0]), weight_map, index)


def _source_format(kind: str, first_file: Path) -> str:
    if kind == "safetensors":
        return _safetensors_source_format(first_file)
    return "flax" if kind == "msgpack" else "pytorch"


def _plan(folder: str | os.PathLike) -> _Plan:
    folder = _existing_folder(folder)
    for name, kind, sharded in CHECKPOINT_FILES:
        path = folder / name
        if path.is_file():
            return _sharded_plan(path, kind) if sharded else _Plan([path], kind, _source_format(kind, path))
    looked_for = ", ".join(name for name, _, _ in CHECKPOINT_FILES)
    raise CheckpointError(f"{folder}: no checkpoint file found (looked for {looked_for})")


def find_checkpoint_files(folder: str | os.PathLike) -> tuple[list[Path], str]:
    """The files `read_state_dict(folder)` would read, and their source format ("pytorch" or "flax")."""
    plan = _plan(folder)
    return list(plan.files), plan.source_format


def _merge_shards(plan: _Plan, shards: list[tuple[Path, dict[str, LazyTensor]]]) -> dict[str, LazyTensor]:
    """One name -> tensor map of all shards. Each shard must hold every weight the index
    assigns to it, and a weight found in a shard the index does not assign it to, or in two
    shards, is ambiguous: an error naming both files, not a silent override."""
    normalise = (lambda name: name.replace("/", ".")) if plan.kind == "msgpack" else (lambda name: name)
    assigned = {normalise(name): shard for name, shard in plan.weight_map.items()}
    listed: dict[str, list[str]] = {}
    for name, shard in assigned.items():
        listed.setdefault(shard, []).append(name)
    index = plan.index.name
    merged: dict[str, LazyTensor] = {}
    origin: dict[str, str] = {}
    for path, tensors in shards:
        missing = [name for name in listed.get(path.name, []) if name not in tensors]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise CheckpointError(f"{path}: lacks {len(missing)} weight(s) that {index} lists: {shown}")
        for name, tensor in tensors.items():
            if name in assigned and assigned[name] != path.name:
                raise CheckpointError(
                    f"{path}: holds {name!r}, which {index} assigns to {assigned[name]}: ambiguous, refused"
                )
            if name in origin:
                raise CheckpointError(
                    f"{plan.index.parent}: {name!r} is in both {origin[name]} and {path.name}, and {index} "
                    "does not say which: ambiguous, refused"
                )
            origin[name] = path.name
            merged[name] = tensor
    return merged


def _lazy(plan: _Plan) -> dict[str, LazyTensor]:
    reader = _READERS[plan.kind]
    if plan.weight_map is None:
        return reader(plan.files[0])
    return _merge_shards(plan, [(path, reader(path)) for path in plan.files])


def lazy_state_dict(folder: str | os.PathLike) -> tuple[dict[str, LazyTensor], str]:
    """Every tensor of the HF checkpoint in `folder`, validated and unread, and the source
    format ("pytorch" or "flax"); see `read_state_dict`."""
    plan = _plan(folder)
    return _lazy(plan), plan.source_format


def read_state_dict(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
    """Read every parameter of the HF checkpoint in `folder`.

    Returns (arrays keyed by name, source format) where the format is "pytorch" or "flax". Files are
    looked for in this order: model.safetensors, model.safetensors.index.json, pytorch_model.bin,
    pytorch_model.bin.index.json, flax_model.msgpack, flax_model.msgpack.index.json; each shard of a
    sharded checkpoint is read once. PyTorch keys are returned unchanged; Flax keys are the nested
    path joined with "." and Flax arrays are untouched (kernels are not transposed). A safetensors
    file written by a Flax model (metadata format "flax") is reported as "flax". A weight in two
    shards is an error.
    """
    plan = _plan(folder)
    file_bytes = sum(path.stat().st_size for path in plan.files)
    return read_all(_lazy(plan), str(folder), file_bytes), plan.source_format
