"""Read the parameters of a Hugging Face checkpoint folder into numpy arrays.

Supported files: safetensors (`model.safetensors`), PyTorch pickles (`pytorch_model.bin`) and Flax
msgpack (`flax_model.msgpack`), each either whole or sharded through a `<file>.index.json`. Neither torch
nor flax is imported, and pickles are read without running any code. bfloat16 arrays use
`ml_dtypes.bfloat16`.
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

from ._msgpack import decode_flax_msgpack
from ._torch_pickle import read_torch_file

__all__ = ["find_checkpoint_files", "read_msgpack", "read_safetensors", "read_state_dict", "read_torch_bin"]

# (file name, reader kind, is a sharding index), in order of preference.
_CANDIDATES = (
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
_MAX_SAFETENSORS_HEADER = 100_000_000


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


# ----------------------------------------------------------------------------- safetensors


def _check_tensor_entry(path: Path, name: str, entry, data_size: int) -> None:
    if not isinstance(entry, dict) or entry.get("dtype") not in _SAFETENSORS_DTYPES:
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed entry or unsupported dtype {dtype!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        raise CheckpointError(f"{path}: tensor {name!r} has malformed data_offsets {offsets!r}")
    begin, end = offsets
    if end > data_size:
        raise CheckpointError(
            f"{path}: tensor {name!r} ends at byte {end} of a {data_size}-byte data section (truncated file?)"
        )
    nbytes = math.prod(shape) * np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]]).itemsize
    if not 0 <= begin <= end or end - begin != nbytes:
        raise CheckpointError(f"{path}: tensor {name!r} has data_offsets {offsets} that do not fit its shape")


def _safetensors_header(path: Path) -> tuple[dict, dict[str, str], int]:
    """Validated (tensor entries, metadata, start of the data section) of a safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        length = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or length > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise CheckpointError(f"{path}: not a safetensors file, or truncated (bad header length)")
        raw = file.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file, or corrupt (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: malformed safetensors __metadata__")
    for name, entry in header.items():
        _check_tensor_entry(path, name, entry, size - 8 - length)
    return header, metadata, 8 + length


def _read_safetensors_raw(path: Path, header: dict, data_start: int) -> dict[str, np.ndarray]:
    """Decode tensors from a validated header with numpy alone."""
    arrays = {}
    with open(path, "rb") as file:
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            buffer = np.empty(end - begin, np.uint8)
            file.seek(data_start + begin)
            if file.readinto(buffer) != end - begin:
                raise CheckpointError(f"{path}: truncated data for tensor {name!r}")
            arrays[name] = buffer.view(_SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return arrays


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays of a `.safetensors` file keyed by tensor name."""
    path = _existing_file(path)
    header, _, data_start = _safetensors_header(path)
    try:
        with safe_open(str(path), framework="numpy") as file:
            return {name: file.get_tensor(name) for name in file.keys()}
    except Exception:
        # Older safetensors releases lack some dtypes (e.g. bfloat16) in their numpy backend.
        return _read_safetensors_raw(path, header, data_start)


def _safetensors_source_format(path: Path) -> str:
    """ "flax" for files written by a Flax model (unconverted keys), else "pytorch"."""
    _, metadata, _ = _safetensors_header(path)
    declared = str(metadata.get("format", "pt")).lower()
    if declared in ("tf", "tensorflow", "keras"):
        raise CheckpointError(f"{path}: TensorFlow safetensors checkpoints are not supported")
    return "flax" if declared in ("flax", "jax") else "pytorch"


# ----------------------------------------------------------------------------- other formats


def read_msgpack(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays of a Flax `.msgpack` file keyed by their nested path joined with "."."""
    path = _existing_file(path)
    return decode_flax_msgpack(path.read_bytes(), str(path))


def read_torch_bin(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays of a `torch.save` file (zip or legacy layout), without torch and without running pickles."""
    return read_torch_file(_existing_file(path))


_READERS = {"safetensors": read_safetensors, "torch": read_torch_bin, "msgpack": read_msgpack}


# ----------------------------------------------------------------------------- folders and shards


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        content = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{index}: malformed index json ({err})") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: malformed index json (no non-empty 'weight_map' object)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or shard in ("", ".", "..") or "/" in shard or "\\" in shard:
            raise CheckpointError(f"{index}: malformed index json (shard {shard!r} for {name!r})")
    return weight_map


def _sharded_plan(index: Path, kind: str) -> _Plan:
    weight_map = _read_weight_map(index)
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
    for name, kind, sharded in _CANDIDATES:
        path = folder / name
        if path.is_file():
            return _sharded_plan(path, kind) if sharded else _Plan([path], kind, _source_format(kind, path))
    looked_for = ", ".join(name for name, _, _ in _CANDIDATES)
    raise CheckpointError(f"{folder}: no checkpoint file found (looked for {looked_for})")


def find_checkpoint_files(folder: str | os.PathLike) -> tuple[list[Path], str]:
    """The files `read_state_dict(folder)` would read, and their source format ("pytorch" or "flax")."""
    plan = _plan(folder)
    return list(plan.files), plan.source_format


def _check_shard(plan: _Plan, shard: Path, arrays: dict[str, np.ndarray]) -> None:
    """Every weight the index assigns to `shard` must be in it (Flax indexes join paths with "/")."""
    listed = [name for name, file in plan.weight_map.items() if file == shard.name]
    if plan.kind == "msgpack":
        listed = [name.replace("/", ".") for name in listed]
    missing = [name for name in listed if name not in arrays]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        index = plan.index.name
        raise CheckpointError(f"{shard}: lacks {len(missing)} weight(s) that {index} lists: {shown}")


def read_state_dict(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
    """Read every parameter of the HF checkpoint in `folder`.

    Returns (arrays keyed by name, source format) where the format is "pytorch" or "flax". Files are
    looked for in this order: model.safetensors, model.safetensors.index.json, pytorch_model.bin,
    pytorch_model.bin.index.json, flax_model.msgpack, flax_model.msgpack.index.json; each shard of a
    sharded checkpoint is read once. PyTorch keys are returned unchanged; Flax keys are the nested
    path joined with "." and Flax arrays are untouched (kernels are not transposed). A safetensors
    file written by a Flax model (metadata format "flax") is reported as "flax".
    """
    plan = _plan(folder)
    reader = _READERS[plan.kind]
    arrays: dict[str, np.ndarray] = {}
    for path in plan.files:
        shard_arrays = reader(path)
        if plan.weight_map is not None:
            _check_shard(plan, path, shard_arrays)
        arrays.update(shard_arrays)
    return arrays, plan.source_format
