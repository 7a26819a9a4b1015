"""Saving and resuming a training run: the whole `TrainState` (model, optimizer state, step,
PRNG key) plus the data position and free-form metadata, written atomically.

A checkpoint is a folder holding

- `state.eqx`: `eqx.tree_serialise_leaves` of the `TrainState`, with a typed PRNG key
  stored as its raw `key_data`;
- `trainer.json`: the format version, step, data position, the key's implementation, the
  caller's `extra` metadata and a manifest (path, shape, dtype) of every stored leaf, so a
  checkpoint that does not fit the skeleton fails with a message naming the leaf.

`CheckpointManager` keeps the last few `root/step_XXXXXXXX` folders of a run.
"""

import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ..errors import CheckpointError
from ..files import atomic_folder, remove_folder, remove_stale_temporaries
from .step import TrainState

FORMAT_VERSION = 1
STATE_NAME = "state.eqx"
META_NAME = "trainer.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


# --------------------------------------------------------------------------- keys


def _is_typed_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl_name(key: Any) -> str:
    """The implementation name (`threefry2x32`, `rbg`, ...) of a typed key, concrete or
    abstract; for a raw `uint32` key, the default implementation."""
    if not _is_typed_key(key):
        return str(jax.config.jax_default_prng_impl)
    if isinstance(key, jax.ShapeDtypeStruct):
        names: list[str] = []

        def record(k: Any) -> None:
            names.append(str(jax.random.key_impl(k)))

        jax.eval_shape(record, key)
        return names[0]
    return str(jax.random.key_impl(key))


def _key_as_data(key: Any) -> Any:
    """A typed key (or its shape) as raw `uint32` data (or its shape); raw keys unchanged."""
    if not _is_typed_key(key):
        return key
    if isinstance(key, jax.ShapeDtypeStruct):
        return jax.eval_shape(jax.random.key_data, key)
    return jax.random.key_data(key)


# --------------------------------------------------------------------------- manifest


def _is_leaf_array(x: Any) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct | jax.Array | np.ndarray | np.generic)


def _manifest(tree: Any) -> list[dict[str, Any]]:
    """`[{"path", "shape", "dtype"}]` of the array leaves of `tree` (arrays or shapes);
    other leaves get `shape=None` and their type name."""
    entries = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path)
        if _is_leaf_array(leaf):
            entries.append({"path": name, "shape": list(leaf.shape), "dtype": jnp.dtype(leaf.dtype).name})
        else:
            entries.append({"path": name, "shape": None, "dtype": type(leaf).__name__})
    return entries


def _describe_entry(entry: dict[str, Any]) -> str:
    if entry["shape"] is None:
        return f"a {entry['dtype']}"
    return f"shape {tuple(entry['shape'])} {entry['dtype']}"


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


def _check_manifest(saved: Any, expected: list[dict[str, Any]], where: Path) -> None:
    if not isinstance(saved, list) or not all(isinstance(e, dict) and "path" in e for e in saved):
        raise CheckpointError(f"{where} has no valid leaf manifest ('leaves')")
    saved_paths = [e["path"] for e in saved]
    expected_paths = [e["path"] for e in expected]
    if saved_paths != expected_paths:
        missing = [p for p in expected_paths if p not in set(saved_paths)]
        unexpected = [p for p in saved_paths if p not in set(expected_paths)]
        details = []
        if missing:
            details.append(f"missing from the checkpoint: {_few(missing)}")
        if unexpected:
            details.append(f"not in `like`: {_few(unexpected)}")
        if not details:
            details.append("the same leaves in a different order")
        raise CheckpointError(
            f"{where.parent / STATE_NAME} has a different structure from `like` "
            f"({len(saved_paths)} leaves saved, {len(expected_paths)} expected; {'; '.join(details)})"
        )
    for got, want in zip(saved, expected, strict=True):
        if got.get("shape") != want["shape"] or got.get("dtype") != want["dtype"]:
            raise CheckpointError(
                f"{where.parent / STATE_NAME} does not fit `like`: leaf {want['path']} has "
                f"{_describe_entry(got)} in the checkpoint but {_describe_entry(want)} in `like`"
            )


# --------------------------------------------------------------------------- multi-process


def _is_global(x: Any) -> bool:
    """An array with shards on other processes' devices."""
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def gather_to_host(tree: Any) -> Any:
    """`tree` with every array that spans several processes replaced by its whole value as a
    NumPy array, on every process (typed PRNG keys come back as typed single-device keys).
    Fully replicated arrays are read locally; sharded ones are all-gathered, so in a
    multi-process job every process must call this, with the same tree. Other leaves,
    including process-local arrays, are kept."""
    leaves, treedef = jax.tree.flatten(tree)
    impls = [str(jax.random.key_impl(x)) if _is_global(x) and _is_typed_key(x) else None for x in leaves]
    leaves = [jax.random.key_data(x) if impl is not None else x for x, impl in zip(leaves, impls, strict=True)]
    spread = [i for i, x in enumerate(leaves) if _is_global(x) and not x.is_fully_replicated]
    gathered = multihost_utils.process_allgather([leaves[i] for i in spread], tiled=True) if spread else []
    host = [np.asarray(x.addressable_data(0)) if _is_global(x) else x for x in leaves]
    for i, value in zip(spread, gathered, strict=True):
        host[i] = np.asarray(value)
    host = [
        x if impl is None else jax.random.wrap_key_data(jnp.asarray(x), impl=impl)
        for x, impl in zip(host, impls, strict=True)
    ]
    return jax.tree.unflatten(treedef, host)


def barrier(name: str) -> None:
    """Waits for every process of a multi-process job (a no-op in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------- save / load


def _to_json(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{what} must be JSON-serialisable: {err}") from None


def save_train_state(
    folder: str | os.PathLike,
    state: TrainState,
    *,
    data_position: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes `state` (model, optimizer state, step, key) to `folder`, atomically.

    The folder is built beside `folder` under a temporary name and renamed into place when
    complete (`eqx_models.files.atomic_folder`). `folder` must be new or empty, or with
    `overwrite=True` a folder eqx_models wrote, which is replaced only then; a failure
    (an exception, Ctrl-C, SIGTERM) leaves it untouched and no temporary folder behind,
    and the temporary folders of a killed process are removed by the next save.

    Call it between steps: the train step donates its input, so save the state a step
    returned before passing it to the next step.

    In a multi-process job every process calls it with its (global) state: the state is
    gathered to the host (`gather_to_host`), process 0 writes, and every process returns
    once the checkpoint is complete.

    **Arguments:**

    - `data_position`: where the data stream resumes (e.g. `PackedBatches.position`).
    - `extra`: JSON-serialisable metadata (config, metrics...), returned by
      `load_train_state`.

    **Returns:** the checkpoint folder.
    """
    folder = Path(folder)
    if not isinstance(state, TrainState):
        raise CheckpointError(f"save_train_state expects a TrainState, got {type(state).__name__}")
    stored = eqx.tree_at(lambda s: s.key, state, _key_as_data(state.key))
    if jax.process_count() > 1:
        stored = gather_to_host(stored)
    meta = {
        "format_version": FORMAT_VERSION,
        "step": int(state.step),
        "data_position": _to_json(data_position, "data_position"),
        "key": {"typed": _is_typed_key(state.key), "impl": _key_impl_name(state.key)},
        "extra": _to_json(extra if extra is not None else {}, "extra"),
        "leaves": _manifest(stored),
    }
    if jax.process_index() == 0:
        with atomic_folder(folder, overwrite=overwrite) as tmp:
            eqx.tree_serialise_leaves(tmp / STATE_NAME, stored)
            (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    barrier("eqx_models.save_train_state")  # nobody reads a half-written checkpoint
    return folder


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked `trainer.json` of a checkpoint folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no checkpoint folder at {folder}")
    path = folder / META_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a training checkpoint: it has no {META_NAME}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version!r}; this version of eqx_models reads {FORMAT_VERSION}"
        )
    for field in ("step", "key", "leaves"):
        if field not in meta:
            raise CheckpointError(f"{path} has no {field!r} field")
    if not isinstance(meta["key"], dict) or "impl" not in meta["key"]:
        raise CheckpointError(f"{path}: 'key' must be an object with an 'impl' name, got {meta['key']!r}")
    return meta


def _place_like(value: Any, like: Any) -> Any:
    """`value` on the devices of `like` when `like` is an array with a sharding. A sharding
    spanning several processes gets a global array, each process placing its own shards
    (every process holds the whole value)."""
    try:
        sharding = getattr(like, "sharding", None)
    except Exception:  # a deleted (donated) array may not report one
        sharding = None
    if isinstance(value, jax.Array) and sharding is not None:
        from .sharding import put_global

        return put_global(value, sharding)
    return value


def load_train_state(folder: str | os.PathLike, like: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """Reads a checkpoint written by `save_train_state` into the structure of `like`.

    `like` is a `TrainState` of the same model and optimizer: a fresh `init_state(...)` or,
    without allocating, `eqx.filter_eval_shape(init_state, model, optimizer, key=key)`.
    Only its structure, shapes and dtypes are used (and the devices of its arrays), so its
    arrays may even have been donated already. The key comes back typed if `like.key` is
    typed, as raw `uint32` data otherwise.

    **Returns:** `(state, meta)`; `meta` holds `step`, `data_position`, `extra`, `key`
    (`typed`, `impl`) and `format_version`.

    **Raises:** `CheckpointError` naming the file and the problem: missing folder or file,
    wrong format version, a structure or a leaf shape/dtype that does not fit `like`, or a
    truncated or corrupt `state.eqx`.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    state_path = folder / STATE_NAME
    if not state_path.is_file():
        raise CheckpointError(f"{folder} is not a complete training checkpoint: it has no {STATE_NAME}")
    if not isinstance(like, TrainState):
        raise CheckpointError(f"`like` must be a TrainState skeleton, got {type(like).__name__}")
    skeleton = eqx.tree_at(lambda s: s.key, like, _key_as_data(like.key))
    # Shapes only: `like` may hold donated (deleted) arrays, whose shapes are still known.
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if _is_leaf_array(x) else x, skeleton)
    _check_manifest(meta["leaves"], _manifest(shapes), folder / META_NAME)
    try:
        loaded = eqx.tree_deserialise_leaves(state_path, shapes)
    except Exception as err:  # numpy/equinox raise many types for truncated or foreign files
        raise CheckpointError(f"cannot read {state_path}: {type(err).__name__}: {err}") from None
    _check_manifest(_manifest(loaded), _manifest(shapes), folder / META_NAME)
    loaded = jax.tree.map(_place_like, loaded, skeleton)
    if _is_typed_key(like.key):
        try:
            key = jax.random.wrap_key_data(loaded.key, impl=meta["key"]["impl"])
        except Exception as err:
            raise CheckpointError(
                f"{folder / META_NAME}: cannot rebuild the PRNG key with impl {meta['key']['impl']!r}: {err}"
            ) from None
        if str(jax.random.key_impl(key)) != _key_impl_name(like.key):
            raise CheckpointError(
                f"{folder / META_NAME}: the checkpoint's PRNG key is {meta['key']['impl']!r} "
                f"but `like.key` is {_key_impl_name(like.key)!r}"
            )
        loaded = eqx.tree_at(lambda s: s.key, loaded, key)
    if int(loaded.step) != meta["step"]:
        raise CheckpointError(
            f"{folder}: {STATE_NAME} is at step {int(loaded.step)} but {META_NAME} says {meta['step']}"
        )
    info = {k: meta.get(k) for k in ("format_version", "step", "data_position", "key")}
    info["extra"] = meta.get("extra", {})
    return loaded, info


# --------------------------------------------------------------------------- manager


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    """`(step, folder)` of the complete checkpoints in `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / META_NAME).is_file() and (child / STATE_NAME).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The `root/step_XXXXXXXX` folder with the highest step, or `None` when there is none.
    Temporary folders of an interrupted save are ignored."""
    folders = _step_folders(Path(root))
    return folders[-1][1] if folders else None


class CheckpointManager:
    """Checkpoints of one run under `root`, as `root/step_{step:08d}`, keeping the newest
    `keep` (`keep=None` keeps all).

    ```python
    manager = CheckpointManager("runs/neo", keep=3)
    if (path := manager.latest()) is not None:
        state, meta = load_train_state(path, like)
        batches.restore(meta["data_position"])
    ...
    manager.save(int(state.step), state, batches.position)
    ```
    """

    def __init__(self, root: str | os.PathLike, keep: int | None = 3):
        if keep is not None and keep < 1:
            raise CheckpointError(f"keep must be at least 1 (or None to keep all), got {keep}")
        self.root = Path(root)
        self.keep = keep

    def __repr__(self) -> str:
        return f"CheckpointManager(root={str(self.root)!r}, keep={self.keep})"

    def path(self, step: int) -> Path:
        return self.root / f"step_{int(step):08d}"

    def save(
        self,
        step: int,
        state: TrainState,
        data_position: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Writes `root/step_{step:08d}` atomically (replacing a checkpoint of ours at that
        step), then deletes the oldest beyond `keep`."""
        if int(step) < 0:
            raise CheckpointError(f"step must be non-negative, got {step}")
        path = save_train_state(self.path(step), state, data_position=data_position, extra=extra, overwrite=True)
        if jax.process_index() == 0:
            self._prune(protect=path)
        return path

    def _prune(self, protect: Path) -> None:
        if self.keep is None:
            return
        folders = [folder for _, folder in _step_folders(self.root)]
        for folder in folders[: max(len(folders) - self.keep, 0)]:
            if folder != protect:
                remove_folder(folder)  # never half a checkpoint under its own name

    def steps(self) -> list[int]:
        """The steps of the checkpoints present, oldest first."""
        return [step for step, _ in _step_folders(self.root)]

    def latest(self) -> Path | None:
        """The newest checkpoint folder, or `None`."""
        return latest_checkpoint(self.root)

    def restore_latest(
        self, like: TrainState, *, on_skip: Callable[[Path, CheckpointError], None] | None = None
    ) -> tuple[TrainState, dict[str, Any]] | None:
        """`load_train_state` of the newest checkpoint that loads, or `None` when there is
        none. A checkpoint that fails to load (truncated, corrupt) is skipped for the next
        older one, reporting it to `on_skip(path, error)` (default: a warning); it is left
        in place (a later save at its step replaces it). When none loads, the
        `CheckpointError` names each one and why.

        Temporary folders of saves killed before they finished are removed first."""
        if jax.process_index() == 0:
            remove_stale_temporaries(self.root)
        failures = []
        for _, path in reversed(_step_folders(self.root)):
            try:
                return load_train_state(path, like)
            except CheckpointError as err:
                failures.append(f"{path.name}: {err}")
                (on_skip or _warn_skipped)(path, err)
        if failures:
            raise CheckpointError(f"no checkpoint in {self.root} could be loaded ({'; '.join(failures)})")
        return None


def _warn_skipped(path: Path, error: CheckpointError) -> None:
    warnings.warn(f"skipped the checkpoint {path}, which cannot be loaded: {error}", stacklevel=3)


__all__: list[str] = [
    "FORMAT_VERSION",
    "CheckpointManager",
    "barrier",
    "gather_to_host",
    "latest_checkpoint",
    "load_train_state",
    "read_meta",
    "save_train_state",
]
