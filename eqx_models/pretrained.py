"""Loading HF checkpoints and our own folders into Equinox trees, and writing both back.

Loading never allocates random weights first: the tree's skeleton comes from
`eqx.filter_eval_shape` and only freshly added heads are initialised, inside a jit
that computes nothing else.
"""

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from . import hub, nn
from .checkpoint.keymap import KeyMap, LoadReport, array_leaves, fill_tree, progress_bar, tree_to_state
from .checkpoint.layout import flax_to_state
from .errors import CheckpointError, InputError
from .files import atomic_folder, check_destination, copy_file_into, give_usual_permissions
from .hub import TOKENIZER_FILES
from .models import Model, class_by_name, resolve_class
from .quantize import apply_recorded, check_scheme, quantization_of
from .quantize import quantize as quantize_model

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_OWN_MAP = KeyMap(rules=(("", ""),))  # our own folders store tree paths, layers stacked


def resolve_dtype(dtype: Any) -> Any:
    if dtype is None:
        return jnp.float32
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def read_config(folder: str | os.PathLike, *, name: str = CONFIG_NAME) -> dict[str, Any]:
    """`folder`'s `config.json` (or another JSON file `name`) as a dict. Whatever the file holds, a failure is a
    `CheckpointError` naming it: not UTF-8, not JSON, not an object, a key given twice,
    nesting deeper than a config has, an integer too long to parse, a file far larger than
    a config, an `eqx_models` entry of the wrong shape."""
    from .validation import show_value

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {name}")
    limit = 64 * 2**20  # HF configs are kilobytes; a label map of 100k classes is about 4 MB
    try:
        with open(path, "rb") as file:
            data = file.read(limit + 1)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    if len(data) > limit:
        raise CheckpointError(f"{path} is larger than {limit // 2**20} MiB: not a model config")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise CheckpointError(
            f"{path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) < len(keys):
            twice = sorted({key for key in keys if keys.count(key) > 1})
            raise CheckpointError(f"{path} gives the key(s) {twice} more than once")
        return dict(pairs)

    try:
        config = json.loads(text, object_pairs_hook=unique)
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"{path} nests too deeply to be a model config") from None
    except ValueError as err:  # JSONDecodeError, and integers of more than 4300 digits
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(config).__name__}")
    levels, depth = [config], 0
    while levels:  # a config nests a few levels; deeper values would be recursed into later
        depth += 1
        if depth > 32:
            raise CheckpointError(f"{path} nests more than 32 levels deep: not a model config")
        levels = [v for level in levels for v in (level.values() if isinstance(level, dict) else level)]
        levels = [v for v in levels if isinstance(v, dict | list)]
    own = config.get("eqx_models")
    if own is not None:
        shapes = {"architecture": str, "dtype": str, "layout": str, "format_version": int}
        wrong = [k for k, kind in shapes.items() if isinstance(own, dict) and k in own and not isinstance(own[k], kind)]
        if not isinstance(own, dict) or wrong:
            raise CheckpointError(
                f"{path}: the eqx_models entry must be an object with string architecture, dtype and layout, "
                f"got {show_value(own)}"
            )
    return config


def end_token_ids(config_eos: Any, folder: str | os.PathLike) -> set[int]:
    """The model config's end tokens and those of the folder's `generation_config.json`,
    which transformers' `generate` stops at (instruction-tuned checkpoints list their
    end-of-turn token there)."""
    ids = set() if config_eos is None else {int(e) for e in np.atleast_1d(config_eos)}
    if (Path(folder) / "generation_config.json").is_file():
        extra = read_config(folder, name="generation_config.json").get("eos_token_id")
        if isinstance(extra, int) or (isinstance(extra, list) and all(isinstance(e, int) for e in extra)):
            ids |= set(np.atleast_1d(extra).tolist())
    return ids


def from_pretrained(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: Any = None,
    architecture: str | None = None,
    key: jax.Array | None = None,
    strict: bool = False,
    quantize: str | None = None,
    quantize_embeddings: bool = True,
    **options: Any,
) -> Model:
    """Loads a HF checkpoint folder (safetensors, sharded or not; `pytorch_model.bin`;
    `flax_model.msgpack`) or an eqx_models folder, in inference mode.

    **Arguments:**

    - `path_or_repo_id`: a local folder, or a hub id (`"EleutherAI/gpt-neo-125m"`) whose
      config, weights and tokenizer files are downloaded into huggingface_hub's cache
      (`eqx_models.hub.folder`: `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_OFFLINE`, `HF_TOKEN`).
    - `revision`: a branch, tag or commit of a hub id (default `main`).
    - `dtype`: parameter dtype, `float32`, `bfloat16` or `float16`. Default: float32 for
      HF folders (as `transformers`), the saved dtype for our own folders.
    - `architecture`: a class name overriding `config.json`'s `architectures`
      (e.g. load a causal-LM checkpoint as the base model).
    - `key`: initialises heads absent from the checkpoint (default `PRNGKey(0)`).
    - `strict`: weights holding NaN or Inf are an error (`CheckpointError`) instead of a
      `NonFiniteWeightsWarning` naming them.
    - `quantize`: `"int8"` stores the weights as int8 with one scale per output channel,
      `"bfloat16"` rounds them to bfloat16 (`eqx_models.quantize`); `quantize_embeddings=False`
      keeps the embedding tables (and a tied LM head) in `dtype`. Our folders saved
      quantised load quantised as they were.
    - `options`: run options (`nn.RunOptions`) such as `scan_layers=False` or `remat=True`.
    """
    model, _ = load_with_report(
        path_or_repo_id,
        revision=revision,
        dtype=dtype,
        architecture=architecture,
        key=key,
        strict=strict,
        quantize=quantize,
        quantize_embeddings=quantize_embeddings,
        **options,
    )
    return model


def load_with_report(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: Any = None,
    architecture: str | None = None,
    key: jax.Array | None = None,
    progress: bool = False,
    strict: bool = False,
    quantize: str | None = None,
    quantize_embeddings: bool = True,
    **options: Any,
) -> tuple[Model, LoadReport]:
    """`from_pretrained`, also returning what was ignored, freshly initialised or non-finite.

    Reading is bounded by the file's and the model's size whatever the bytes: tensors are
    described first, each shape is checked against the model before it is read, and keys
    the model does not use are never read."""
    if quantize is not None:
        check_scheme(quantize)  # before any download or read
    folder = hub.folder(path_or_repo_id, revision=revision)
    hf_config = read_config(folder)
    own = hf_config.pop("eqx_models", None)
    if own is not None:
        if architecture is None:
            architecture = own.get("architecture")
        options = {**{k: own[k] for k in ("scan_layers", "remat") if k in own}, **options}
        dtype = own.get("dtype") if dtype is None else dtype

    def state_of(cls: type[Model], config: Any, skeleton: Any) -> tuple[Mapping[str, Any], KeyMap, str]:
        if own is not None:
            return _read_own_weights(folder), _OWN_MAP, "eqx_models"
        from .checkpoint.readers import lazy_state_dict

        state, source_format = lazy_state_dict(folder)
        return state, cls.key_map(config), source_format

    return load_state(
        hf_config,
        state_of,
        label=str(folder),
        dtype=dtype,
        architecture=architecture,
        key=key,
        progress=progress,
        strict=strict,
        stored_quantization=None if own is None else own.get("quantization"),
        quantize=quantize,
        quantize_embeddings=quantize_embeddings,
        **options,
    )


#: Given the class, its config and the model's skeleton: the state (HF names; arrays or
#: `LazyTensor`s), the key map it is named by, and its layout: "pytorch" (PyTorch's names),
#: "flax" (`.`-joined Flax paths) or "eqx_models" (our tree paths).
StateSource = Callable[[type[Model], Any, Any], tuple[Mapping[str, Any], KeyMap, str]]


def load_state(
    hf_config: dict[str, Any],
    state_of: StateSource,
    *,
    label: str,
    dtype: Any = None,
    architecture: str | None = None,
    key: jax.Array | None = None,
    progress: bool = False,
    strict: bool = False,
    stored_quantization: Any = None,
    quantize: str | None = None,
    quantize_embeddings: bool = True,
    **options: Any,
) -> tuple[Model, LoadReport]:
    """What every load shares once it has a config dict and a state: the class and config
    (`resolve_class`), the skeleton, the strict fill (`keymap.fill_tree`: missing and
    unexpected keys, shapes, base/head prefixes), non-finite weights (a warning, or an error
    when `strict`), fresh heads, run options and inference mode. `label` names the source
    in messages (a folder, or "state dict"). `stored_quantization` is the `quantization`
    entry of our folder whose int8 state this is (the skeleton is quantised the same way);
    `quantize` (a scheme, with `quantize_embeddings`) quantises the loaded model."""
    if quantize is not None:
        check_scheme(quantize)
    family, cls = resolve_class(hf_config, architecture)
    config = family.config.from_hf_config(hf_config)
    dtype = resolve_dtype(dtype)

    def build(key: jax.Array) -> Model:
        model = cls(config, dtype=dtype, key=key)
        return model if stored_quantization is None else apply_recorded(model, stored_quantization, label=label)

    skeleton = eqx.filter_eval_shape(build, jax.random.key(0))
    state, key_map, layout = state_of(cls, config, skeleton)
    initialisable = _head_paths(key_map)
    if layout == "flax":  # named by HF's Flax class, which may lack parameters PyTorch's has
        state = flax_to_state(state, skeleton, key_map)
        initialisable += key_map.not_in_flax
    values, missing, report = fill_tree(skeleton, state, key_map, may_initialise=initialisable, progress=progress)
    if report.nonfinite:
        import warnings

        from .checkpoint.keymap import NonFiniteWeightsWarning, describe_names

        message = f"{label}: {len(report.nonfinite)} tensor(s) hold NaN or Inf: {describe_names(report.nonfinite)}"
        if strict:
            raise CheckpointError(message + " (strict loading)")
        warnings.warn(message, NonFiniteWeightsWarning, stacklevel=3)
    if missing:
        fresh = _initialise(build, missing, key if key is not None else jax.random.key(0))
        values = [fresh.pop(0) if v is None else v for v in values]
    model = nn.with_run_options(_replace_array_leaves(skeleton, values), **options)
    if quantize is not None:
        model = quantize_model(model, quantize, embeddings=quantize_embeddings)
    return eqx.nn.inference_mode(model), report


def _head_paths(key_map: KeyMap) -> tuple[str, ...]:
    """Tree paths outside the base model: heads a base checkpoint does not have."""
    if not key_map.is_head:
        return ()
    base = key_map.prefix + "."
    return tuple(tree for _, tree in key_map.rules if not tree.startswith(base) and tree)


def _initialise(build: Callable[[jax.Array], Model], paths: list[str], key: jax.Array) -> list[Any]:
    """Fresh values for the leaves at `paths` of the model `build(key)` makes; XLA drops the
    rest of the init."""

    @jax.jit
    def init(key):
        model = build(key)
        leaves = dict(array_leaves(model))
        return [leaves[p] for p in paths]

    return [np.asarray(v) for v in init(key)]


def _replace_array_leaves(skeleton: Any, values: list[Any]) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(skeleton)
    it = iter(values)
    filled = [jnp.asarray(next(it)) if isinstance(leaf, jax.ShapeDtypeStruct) else leaf for leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, filled)


def _read_own_weights(folder: Path) -> dict[str, Any]:
    """The (unread, validated) tensors of our folder's safetensors file."""
    from .checkpoint.readers import lazy_safetensors

    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_NAME}")
    return lazy_safetensors(path)


def model_dtype(model: Model) -> str:
    """The name of the float dtype `model` computes in (`Model.dtype`)."""
    return jnp.dtype(model.dtype).name


def tokenizer_files(folder: str | os.PathLike) -> list[Path]:
    """The `TOKENIZER_FILES` present in `folder`, to pass as `extra_files` when converting.
    Links are listed too: the copy refuses one that leads out of the folder, with a message,
    rather than leaving the file out unnoticed."""
    folder = Path(folder)
    return [
        folder / name for name in TOKENIZER_FILES if os.path.lexists(folder / name) and not (folder / name).is_dir()
    ]


def _copy_extra_files(folder: Path, files: Iterable[str | os.PathLike]) -> None:
    """Copies each file into `folder` under its own name (`files.copy_file_into`: regular
    files only, no link out of their folder, never more readable than the source); never
    over the weights or config."""
    for source in map(Path, files):
        if source.name in (CONFIG_NAME, WEIGHTS_NAME):
            raise CheckpointError(f"extra file {source} would overwrite the {source.name} being written")
        copy_file_into(source, folder)


def _write_config(folder: Path, config: dict[str, Any]) -> None:
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_weights(folder: Path, arrays: dict[str, np.ndarray], fmt: str) -> None:
    save_file(arrays, folder / WEIGHTS_NAME, metadata={"format": fmt})
    give_usual_permissions(folder / WEIGHTS_NAME)  # safetensors writes private (0600) files


def _hf_config(model: Model) -> dict[str, Any]:
    """The HF `config.json` of `model`: its config, class and parameter dtype (under both
    the current `dtype` key and the older `torch_dtype`)."""
    hf = model.config.to_hf_config()
    hf["architectures"] = [type(model).__name__]
    hf["dtype"] = hf["torch_dtype"] = model_dtype(model)
    return hf


def save_pretrained(
    model: Model,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = False,
    extra_files: Iterable[str | os.PathLike] = (),
) -> None:
    """Writes our own folder: `config.json` (HF fields plus `eqx_models` metadata) and
    `model.safetensors` keyed by tree path, layers stacked.

    The write is atomic (`eqx_models.files.atomic_folder`): `path` must be new or empty,
    or with `overwrite=True` a folder eqx_models wrote (its `.eqx_models.json` marker lists
    what we wrote, and nothing was added); anything else raises `InputError` and is left
    as it is. A failure leaves `path` as it was and no temporary folder.

    `extra_files` are copied in as they are, inside the same atomic write (the converter
    passes the source folder's `tokenizer_files`): regular files only, never through a link
    out of their folder, never more readable than the source."""
    check_destination(path, overwrite=overwrite)  # before any work
    model = nn.stack_layers(model)  # our folders store the layers stacked
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
    quantization = quantization_of(model)
    if quantization is not None:  # the quantised values and scales are stored as they are
        hf["eqx_models"]["quantization"] = quantization
    arrays = {path: np.asarray(leaf) for path, leaf in progress_bar(list(array_leaves(model)), progress, "saving")}
    with atomic_folder(path, overwrite=overwrite) as tmp:
        _write_weights(tmp, arrays, "eqx_models")
        _write_config(tmp, hf)
        _copy_extra_files(tmp, extra_files)


def export_hf(
    model: Model,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = False,
    extra_files: Iterable[str | os.PathLike] = (),
) -> None:
    """Writes a HF folder (`config.json` + `model.safetensors`, PyTorch names) that
    `transformers` loads with identical weights. Atomic, and `overwrite`, `extra_files` as
    in `save_pretrained`; the folder carries the same marker, so it can be replaced with
    `overwrite=True` too. A quantised model is refused: HF folders hold float weights
    (`eqx_models.dequantize` makes a float model of it, with the rounded values)."""
    check_destination(path, overwrite=overwrite)  # before any work
    if quantization_of(model) is not None:
        raise InputError(
            f"export_hf writes float weights and this model is quantised ({quantization_of(model)['scheme']}): "
            "export the float model, or "
            "eqx_models.dequantize(model) to export the rounded weights in float"
        )
    model = nn.stack_layers(model)  # HF's names index the stacked layers
    cls, config = type(model), model.config
    state = tree_to_state(model, cls.key_map(config), progress=progress)
    hf = _hf_config(model)
    with atomic_folder(path, overwrite=overwrite) as tmp:
        _write_weights(tmp, state, "pt")
        _write_config(tmp, hf)
        _copy_extra_files(tmp, extra_files)
