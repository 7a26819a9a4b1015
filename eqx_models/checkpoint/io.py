"""Loading HF checkpoints and our own folders into Equinox trees, and writing both back.

Loading never allocates random weights first: the tree's skeleton comes from
`eqx.filter_eval_shape` and only freshly added heads are initialised, inside a jit
that computes nothing else.
"""

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from .. import nn
from ..errors import CheckpointError
from ..models import Model, class_by_name, resolve_class
from .keymap import KeyMap, LoadReport, _progress, array_leaves, fill_tree, from_flax_names, tree_to_state

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_OWN_MAP = KeyMap(rules=(("", ""),))  # our own folders store tree paths, layers stacked
#: Files beside the weights that a converted folder keeps: the tokenizer (fast and slow
#: formats) and the generation defaults. Neither format's loader reads them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def resolve_dtype(dtype: Any) -> Any:
    if dtype is None:
        return jnp.float32
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return config


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    architecture: str | None = None,
    key: jax.Array | None = None,
    **options: Any,
) -> Model:
    """Loads a HF checkpoint folder (safetensors, sharded or not; `pytorch_model.bin`;
    `flax_model.msgpack`) or an eqx_models folder, in inference mode.

    **Arguments:**

    - `dtype`: parameter dtype, `float32`, `bfloat16` or `float16`. Default: float32 for
      HF folders (as `transformers`), the saved dtype for our own folders.
    - `architecture`: a class name overriding `config.json`'s `architectures`
      (e.g. load a causal-LM checkpoint as the base model).
    - `key`: initialises heads absent from the checkpoint (default `PRNGKey(0)`).
    - `options`: run options (`nn.RunOptions`) such as `scan_layers=False` or `remat=True`.
    """
    model, _ = load_with_report(path, dtype=dtype, architecture=architecture, key=key, **options)
    return model


def load_with_report(
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    architecture: str | None = None,
    key: jax.Array | None = None,
    progress: bool = False,
    **options: Any,
) -> tuple[Model, LoadReport]:
    """`from_pretrained`, also returning what was ignored or freshly initialised."""
    folder = Path(path)
    hf_config = read_config(folder)
    own = hf_config.pop("eqx_models", None)
    if own is not None:
        if architecture is None:
            architecture = own.get("architecture")
        options = {**{k: own[k] for k in ("scan_layers", "remat") if k in own}, **options}
        dtype = own.get("dtype") if dtype is None else dtype
    family, cls = resolve_class(hf_config, architecture)
    config = family.config.from_hf_config(hf_config)
    dtype = resolve_dtype(dtype)
    skeleton = eqx.filter_eval_shape(cls, config, dtype=dtype, key=jax.random.key(0))
    if own is not None:
        state, key_map = _read_own_weights(folder), _OWN_MAP
    else:
        from .readers import read_state_dict

        state, source_format = read_state_dict(folder)
        if source_format == "flax":
            state = from_flax_names(state)
        key_map = cls.key_map(config)
    head_paths = _head_paths(key_map)
    values, missing, report = fill_tree(skeleton, state, key_map, may_initialise=head_paths, progress=progress)
    if missing:
        fresh = _initialise(cls, config, dtype, missing, key if key is not None else jax.random.key(0))
        values = [fresh.pop(0) if v is None else v for v in values]
    model = nn.with_run_options(_replace_array_leaves(skeleton, values), **options)
    return eqx.nn.inference_mode(model), report


def _head_paths(key_map: KeyMap) -> tuple[str, ...]:
    """Tree paths outside the base model: heads a base checkpoint does not have."""
    if not key_map.is_head:
        return ()
    base = key_map.prefix + "."
    return tuple(tree for _, tree in key_map.rules if not tree.startswith(base) and tree)


def _initialise(cls: type, config: Any, dtype: Any, paths: list[str], key: jax.Array) -> list[Any]:
    """Fresh values for the leaves at `paths`; XLA drops the rest of the init."""

    @jax.jit
    def init(key):
        model = cls(config, dtype=dtype, key=key)
        leaves = dict(array_leaves(model))
        return [leaves[p] for p in paths]

    return [np.asarray(v) for v in init(key)]


def _replace_array_leaves(skeleton: Any, values: list[Any]) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(skeleton)
    it = iter(values)
    filled = [jnp.asarray(next(it)) if isinstance(leaf, jax.ShapeDtypeStruct) else leaf for leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, filled)


def _read_own_weights(folder: Path) -> dict[str, np.ndarray]:
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_NAME}")
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {path}: {err}") from None


def model_dtype(model: Model) -> str:
    for _, leaf in array_leaves(model):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.dtype(leaf.dtype).name
    return "float32"


def _usual_permissions(folder: Path) -> None:
    """`mkdtemp` makes a private (0700) folder, and some writers make private files: give
    the finished folder the permissions `mkdir` and `open` would have (0777 and 0666 less
    the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_folder(destination: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary folder beside `destination` and renames it into place on
    success; on failure nothing is left behind and an existing `destination` is kept."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _usual_permissions(tmp)
    if destination.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
        old.rmdir()
        destination.rename(old)
        tmp.rename(destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(destination)


def tokenizer_files(folder: str | os.PathLike) -> list[Path]:
    """The `TOKENIZER_FILES` present in `folder`, to pass as `extra_files` when converting."""
    return [Path(folder) / name for name in TOKENIZER_FILES if (Path(folder) / name).is_file()]


def _copy_extra_files(folder: Path, files: Iterable[str | os.PathLike]) -> None:
    """Copies each file into `folder` under its own name; never over the weights or config."""
    for source in map(Path, files):
        if source.name in (CONFIG_NAME, WEIGHTS_NAME):
            raise CheckpointError(f"extra file {source} would overwrite the {source.name} being written")
        if not source.is_file():
            raise CheckpointError(f"extra file {source} does not exist or is not a file")
        shutil.copyfile(source, folder / source.name)


def _write_config(folder: Path, config: dict[str, Any]) -> None:
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _hf_config(model: Model) -> dict[str, Any]:
    """The HF `config.json` of `model`: its config, class and parameter dtype (under both
    the current `dtype` key and the older `torch_dtype`)."""
    hf = model.config.to_hf_config()
    hf["architectures"] = [type(model).__name__]
    hf["dtype"] = hf["torch_dtype"] = model_dtype(model)
    return hf


def save_pretrained(
    model: Model, path: str | os.PathLike, *, progress: bool = False, extra_files: Iterable[str | os.PathLike] = ()
) -> None:
    """Writes our own folder: `config.json` (HF fields plus `eqx_models` metadata) and
    `model.safetensors` keyed by tree path, layers stacked. Atomic.

    `extra_files` are copied in as they are, inside the same atomic write (the converter
    passes the source folder's `tokenizer_files`)."""
    cls = type(model)
    class_by_name(cls.__name__)  # fails clearly for an unregistered model
    hf = _hf_config(model)
    hf["eqx_models"] = {
        "format_version": FORMAT_VERSION,
        "architecture": cls.__name__,
        "dtype": model_dtype(model),
        "layout": "stacked",
        **nn.run_options(model).as_dict(),
    }
    arrays = {path: np.asarray(leaf) for path, leaf in _progress(list(array_leaves(model)), progress, "saving")}
    with atomic_folder(path) as tmp:
        save_file(arrays, tmp / WEIGHTS_NAME, metadata={"format": "eqx_models"})
        _write_config(tmp, hf)
        _copy_extra_files(tmp, extra_files)


def export_hf(
    model: Model, path: str | os.PathLike, *, progress: bool = False, extra_files: Iterable[str | os.PathLike] = ()
) -> None:
    """Writes a HF folder (`config.json` + `model.safetensors`, PyTorch names) that
    `transformers` loads with identical weights. Atomic; `extra_files` as in
    `save_pretrained`."""
    cls, config = type(model), model.config
    state = tree_to_state(model, cls.key_map(config), progress=progress)
    hf = _hf_config(model)
    with atomic_folder(path) as tmp:
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        _write_config(tmp, hf)
        _copy_extra_files(tmp, extra_files)
