"""LoRA adapters as a tree transformation of any registered model, in HF PEFT's format.

`add_lora` wraps the `Linear` layers whose HF module names match `target_modules` in a
`LoRALinear`: the frozen base layer plus `lora_A` `[rank, d_in]` and `lora_B` `[d_out, rank]`,
adding `scale * B @ A @ x` (`scale = alpha / rank`, or `alpha / sqrt(rank)` with rsLoRA).
A layer stored stacked over layers gets stacked adapters (a leading `layers` axis), so the
scan over layers runs them like any other parameter.

The HF module name of a layer (`transformer.h.{i}.attn.attention.q_proj`) comes from its
model class's key map, the declaration that converts checkpoints, so targets follow PEFT's
rule for every family without a per-family list: a target matches a module whose name
equals it or ends with `.` + it (a single string is a regular expression matched against the
whole name, as in PEFT).

Training updates the adapters alone: `adapter_filter(model)` is the `eqx.partition` spec of
the `lora_A` and `lora_B` arrays (`eqx_models.training.make_train_step(trainable=...)`).
`save_adapter` writes `adapter_config.json` and `adapter_model.safetensors` under PEFT's
names (`base_model.model.<module>.lora_A.weight`), which `peft.PeftModel.from_pretrained`
loads; `load_adapter` applies a folder (or hub id) written by `peft` or by `save_adapter`;
`merge_lora` folds the adapters into plain `Linear` weights.

Reference: PEFT 0.21 (`peft/tuners/lora/layer.py`, `peft/tuners/tuners_utils.py`).
"""

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from . import nn
from .checkpoint.keymap import KeyMap, describe_names
from .errors import CheckpointError, ConfigError
from .files import atomic_folder, check_destination, give_usual_permissions
from .hub import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .models import Model

_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")

#: PEFT's `LoraConfig` options that change what a LoRA layer computes, with the value under
#: which our `LoRALinear` computes the same; a folder asking for anything else is refused.
_PLAIN_OPTIONS = {
    "bias": "none",
    "fan_in_fan_out": False,
    "use_dora": False,
    "lora_bias": False,
    "modules_to_save": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "use_qalora": False,
    "use_bdlora": None,
    "alora_invocation_tokens": None,
    "megatron_config": None,
}


class LoRALinear(nn.Adapter):
    """A linear layer with a low-rank update: `base(x) + scale * B(A(dropout(x)))`.

    - `base`: the frozen layer (any `nn.AbstractLinear`: float32, bfloat16 or other weights).
    - `lora_A`: `[rank, d_in]` (`[layers, rank, d_in]` in a stack), PEFT's kaiming-uniform start.
    - `lora_B`: `[d_out, rank]` (`[layers, d_out, rank]`), zero at the start.
    - `dropout`: applied to the adapter's input while training (PEFT's `lora_dropout`), with
      `dropout_key` (set per step by `with_dropout_keys`; `None`: no dropout).
    - `alpha`, `use_rslora`: the scaling `alpha / rank` (rsLoRA: `alpha / sqrt(rank)`).
    - `target`: the `target_modules` entry that selected this layer (saved in the config).

    The adapter computes in its own dtype (float32 over a bfloat16 base, as PEFT's
    `autocast_adapter_dtype`) and its output is cast to the base's dtype.
    """

    base: nn.AbstractLinear
    lora_A: Float[Array, "*layers rank d_in"]
    lora_B: Float[Array, "*layers d_out rank"]
    dropout: eqx.nn.Dropout
    dropout_key: PRNGKeyArray | None
    alpha: float = eqx.field(static=True)
    use_rslora: bool = eqx.field(static=True)
    target: str = eqx.field(static=True)

    def __init__(
        self,
        base: nn.AbstractLinear,
        lora_A: Float[Array, "*layers rank d_in"],
        lora_B: Float[Array, "*layers d_out rank"],
        *,
        alpha: float | int,
        use_rslora: bool = False,
        dropout: float | int = 0.0,
        target: str,
    ):
        self.base, self.lora_A, self.lora_B = base, lora_A, lora_B
        self.dropout = eqx.nn.Dropout(dropout)
        self.dropout_key = None
        self.alpha, self.use_rslora, self.target = float(alpha), use_rslora, target

    @property
    def rank(self) -> int:
        return self.lora_A.shape[-2]

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def delta(self, x: Float[Array, "*batch d_in"]) -> Float[Array, "*batch d_out"]:
        h = x.astype(self.lora_A.dtype)
        if self.dropout_key is not None and self.dropout.p > 0:
            h = self.dropout(h, key=self.dropout_key)
        # [*batch, d_in] @ [d_in, rank] -> [*batch, rank]; @ [rank, d_out] -> [*batch, d_out]
        y = (h @ self.lora_A.T) @ self.lora_B.T
        return (y * self.scale).astype(self.base.dtype)


# --------------------------------------------------------------------------- module names


def _is_linear(node: Any) -> bool:
    return isinstance(node, nn.AbstractLinear)


def _is_module(node: Any) -> bool:
    return isinstance(node, (nn.AbstractLinear, nn.Embedding))


def _modules(model: PyTree) -> list[tuple[str, Any]]:
    """`(tree path, node)` of every linear layer and embedding of `model`, in tree order."""
    found = []
    for key_path, node in jax.tree_util.tree_flatten_with_path(model, is_leaf=_is_module)[0]:
        if _is_module(node):
            found.append((jax.tree_util.keystr(key_path, simple=True, separator="."), node))
    return found


def _key_map(model: object) -> KeyMap:
    if not isinstance(model, Model):
        raise ConfigError(f"LoRA needs an eqx_models model (a registered class), got {type(model).__name__}")
    return type(model).key_map(model.config)


def _hf_module(key_map: KeyMap, path: str) -> str:
    """The HF module name of the layer at tree `path`; `{i}` marks a stacked layer."""
    return key_map.hf_pattern(path + ".")[:-1]


def _layer_names(module: str, num_layers: int) -> list[str]:
    return [module.replace("{i}", str(i)) for i in range(num_layers)] if "{i}" in module else [module]


def _matches(target: str | Sequence[str], name: str) -> str | None:
    """The `target_modules` entry matching the module `name` (PEFT's rule), or `None`."""
    if isinstance(target, str):
        return target if re.fullmatch(target, name) else None
    return next((t for t in target if name == t or name.endswith("." + t)), None)


def _matches_every_layer(target: str | Sequence[str], module: str, num_layers: int) -> str | None:
    """The entry matching `module` in every layer; an error when it matches only some (a
    stack takes an adapter in all of its layers or none)."""
    hits = [_matches(target, name) for name in _layer_names(module, num_layers)]
    if all(hit is None for hit in hits):
        return None
    if any(hit is None for hit in hits):
        raise ConfigError(
            f"target_modules {target!r} selects {module} in some layers only; LoRA on stacked layers "
            "adapts every layer of a stack or none"
        )
    return hits[0]


def _num_layers(node: Any, module: str) -> int:
    if "{i}" not in module:
        return 1
    return jax.tree.leaves(eqx.filter(node, eqx.is_array))[0].shape[0]


def lora_layers(model: PyTree) -> list[tuple[str, LoRALinear]]:
    """`(tree path, layer)` of every `LoRALinear` in `model`."""
    return [(path, node) for path, node in _modules(model) if isinstance(node, LoRALinear)]


def _refuse_adapted(model: PyTree, what: str) -> None:
    if lora_layers(model):
        raise ConfigError(f"{what} needs a model without LoRA adapters; this one has them (merge_lora folds them in)")


# --------------------------------------------------------------------------- building


def _adapter_dtype(base: nn.AbstractLinear) -> Any:
    """float32 over half-precision (or integer) bases, as PEFT's `autocast_adapter_dtype`."""
    return base.dtype if base.dtype == jnp.float64 else jnp.float32


def _check_settings(rank: Any, alpha: Any, dropout: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"LoRA dropout must be a probability in [0, 1), got {dropout!r}")


def _check_targets(target_modules: Any) -> str | tuple[str, ...]:
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as err:
            raise ConfigError(f"target_modules {target_modules!r} is not a regular expression ({err})") from None
        return target_modules
    if (
        not isinstance(target_modules, Sequence)
        or not target_modules
        or not all(isinstance(t, str) and t for t in target_modules)
    ):
        raise ConfigError(
            f"target_modules must be module names such as ['q_proj', 'v_proj'] (or one regular expression), "
            f"got {target_modules!r}"
        )
    return tuple(target_modules)


def add_lora(
    model: Model,
    *,
    rank: int,
    alpha: float | int,
    target_modules: str | Sequence[str],
    dropout: float | int = 0.0,
    use_rslora: bool = False,
    key: PRNGKeyArray,
) -> Model:
    """`model` with LoRA adapters on the linear layers `target_modules` names.

    **Arguments:**

    - `model`: any registered model (float32 or bfloat16 weights); it must not hold adapters.
    - `rank`, `alpha`: the adapters' rank and scaling numerator (`alpha / rank`).
    - `target_modules`: HF module names as PEFT takes them (`["q_proj", "v_proj"]`,
      `["query", "value"]`, `["q", "v"]`, `["c_fc"]`, full names like
      `"transformer.h.0.mlp.c_fc"`), or one regular expression over the whole name. Every
      entry must select at least one linear layer.
    - `dropout`: PEFT's `lora_dropout` on the adapters' input while training.
    - `use_rslora`: scale by `alpha / sqrt(rank)` (rank-stabilised LoRA).
    - `key`: draws `lora_A` (kaiming-uniform with `a = sqrt(5)`, PEFT's default: uniform in
      `±1/sqrt(d_in)`); `lora_B` starts at zero, so the model computes what it did.

    **Returns:** the adapted model, sharing the base arrays. Raises `ConfigError` for bad
    settings, a target that selects nothing, or a target that selects an embedding.
    """
    _check_settings(rank, alpha, dropout)
    targets = _check_targets(target_modules)
    if nn.has_separate_layers(model):
        raise ConfigError(
            "add_lora needs the layers stacked, and this model stores them separately: "
            "add the adapters to eqx_models.stack_layers(model), then separate_layers again"
        )
    key_map = _key_map(model)
    _refuse_adapted(model, "add_lora")
    chosen: list[tuple[str, Any, str, int]] = []
    used: set[str] = set()
    for path, node in _modules(model):
        module = _hf_module(key_map, path)
        num_layers = _num_layers(node, module)
        hit = _matches_every_layer(targets, module, num_layers)
        if hit is None:
            continue
        if not _is_linear(node):
            raise ConfigError(f"LoRA target {hit!r} selects {module}, an embedding; adapters go on linear layers only")
        chosen.append((path, node, hit, num_layers))
        used.add(hit)
    unused = [t for t in ((targets,) if isinstance(targets, str) else targets) if t not in used]
    if unused:
        names = sorted({_hf_module(key_map, path).rsplit(".", 1)[-1] for path, n in _modules(model) if _is_linear(n)})
        raise ConfigError(
            f"LoRA target(s) {', '.join(map(repr, unused))} match no linear layer of {type(model).__name__}; "
            f"its linear layers are named {', '.join(names)}"
        )
    keys = jax.random.split(key, len(chosen))
    inference = _in_inference_mode(model)
    layers = []
    for (path, node, hit, num_layers), layer_key in zip(chosen, keys, strict=True):
        d_out, d_in = node.features
        stack = (num_layers,) if "{i}" in _hf_module(key_map, path) else ()
        dtype = _adapter_dtype(node)
        bound = 1 / math.sqrt(d_in)
        lora_A = jax.random.uniform(layer_key, (*stack, rank, d_in), dtype, -bound, bound)
        lora_B = jnp.zeros((*stack, d_out, rank), dtype)
        layer = LoRALinear(node, lora_A, lora_B, alpha=alpha, use_rslora=use_rslora, dropout=dropout, target=hit)
        layers.append(eqx.nn.inference_mode(layer, inference))
    return _replace(model, [path for path, *_ in chosen], layers)


def _in_inference_mode(model: PyTree) -> bool:
    """Whether the model's dropout layers are off (`eqx.nn.inference_mode`, as `from_pretrained`
    returns models): new adapters follow the model."""
    is_dropout = lambda x: isinstance(x, eqx.nn.Dropout)  # noqa: E731
    layers = [x for x in jax.tree.leaves(model, is_leaf=is_dropout) if is_dropout(x)]
    return bool(layers) and all(layer.inference for layer in layers)


def _replace(model: PyTree, paths: list[str], nodes: list[Any]) -> PyTree:
    """`model` with the modules at `paths` (from `_modules`) replaced by `nodes`."""
    wanted = set(paths)
    if not paths:
        return model
    return eqx.tree_at(
        lambda m: [node for path, node in _modules(m) if path in wanted],
        model,
        nodes,
        is_leaf=lambda x: x is None,
    )


def merge_lora(model: Model) -> Model:
    """`model` with every `LoRALinear` replaced by a plain `Linear` whose weight is
    `W + scale * B @ A` (computed in float32, stored in the base's dtype)."""
    paths, merged = [], []
    for path, layer in lora_layers(model):
        base = layer.base
        if not isinstance(base, nn.Linear) or not eqx.is_inexact_array(base.weight):
            held = type(base.weight if isinstance(base, nn.Linear) else base).__name__
            raise ConfigError(
                f"merge_lora folds adapters into float Linear weights; the base at {path} holds a {held} "
                "(dequantize the model first)"
            )
        # [*layers, d_out, rank] @ [*layers, rank, d_in] -> [*layers, d_out, d_in]
        update = jnp.einsum("...or,...ri->...oi", layer.lora_B.astype(jnp.float32), layer.lora_A.astype(jnp.float32))
        weight = (base.weight.astype(jnp.float32) + layer.scale * update).astype(base.weight.dtype)
        paths.append(path)
        merged.append(eqx.tree_at(lambda linear: linear.weight, base, weight))
    return _replace(model, paths, merged)


# --------------------------------------------------------------------------- training


def adapter_filter(model: PyTree) -> PyTree:
    """The `eqx.partition` spec selecting the adapters' `lora_A` and `lora_B` arrays of
    `model` (`True`) and nothing else (`False`): what LoRA training updates."""

    def mark(node: Any) -> Any:
        if not isinstance(node, LoRALinear):
            return False
        spec = jax.tree.map(lambda _: False, node)
        return eqx.tree_at(lambda layer: (layer.lora_A, layer.lora_B), spec, (True, True))

    return jax.tree.map(mark, model, is_leaf=lambda x: isinstance(x, LoRALinear))


def with_dropout_keys(model: PyTree, key: PRNGKeyArray | None) -> PyTree:
    """`model` with a fresh dropout key in every `LoRALinear` with dropout (one key per
    layer of a stack), drawn from `key`; `None` removes them (no adapter dropout)."""
    layers = [(path, layer) for path, layer in lora_layers(model) if layer.dropout.p > 0]
    if not layers:
        return model
    keys: list[Any] = [None] * len(layers)
    if key is not None:
        subkeys = jax.random.split(key, len(layers))
        keys = [
            jax.random.split(k, layer.lora_A.shape[0]) if layer.lora_A.ndim == 3 else k
            for k, (_, layer) in zip(subkeys, layers, strict=True)
        ]
    wanted = {path for path, _ in layers}
    return eqx.tree_at(
        lambda m: [layer.dropout_key for path, layer in lora_layers(m) if path in wanted],
        model,
        keys,
        is_leaf=lambda x: x is None,
    )


def with_adapter_dropout(loss_fn: Callable[..., Any]) -> Callable[..., Any]:
    """`loss_fn(model, batch, key=...)` giving the adapters fresh dropout keys from `key`
    first (a training step's key; `None`, as in evaluation, means no dropout anywhere)."""

    def loss(model: PyTree, batch: Any, *, key: PRNGKeyArray | None = None) -> Any:
        if key is None:
            return loss_fn(model, batch, key=None)
        adapter_key, key = jax.random.split(key)
        return loss_fn(with_dropout_keys(model, adapter_key), batch, key=key)

    return loss


# --------------------------------------------------------------------------- PEFT format


def _pattern_key(name: str) -> str:
    """A PEFT `rank_pattern` / `alpha_pattern` key matching `name` in every layer."""
    return re.escape(name).replace(re.escape("{i}"), r"\d+")


def _most_common(values: list[Any]) -> Any:
    return max(set(values), key=lambda v: (values.count(v), str(v)))


def adapter_config(model: Model, *, base_model_name_or_path: str | None = None, task_type: str | None = None) -> dict:
    """The `adapter_config.json` of `model`'s adapters, as PEFT's `LoraConfig` writes it."""
    key_map = _key_map(model)
    layers = [(_hf_module(key_map, path), layer) for path, layer in lora_layers(model)]
    if not layers:
        raise ConfigError("the model has no LoRA adapters to save (add_lora or load_adapter adds them)")
    for setting, value in (
        ("use_rslora", lambda layer: layer.use_rslora),
        ("lora_dropout", lambda layer: layer.dropout.p),
    ):
        values = {value(layer) for _, layer in layers}
        if len(values) > 1:
            raise ConfigError(f"PEFT's format has one {setting} for all adapters; this model mixes {sorted(values)}")
    rank = _most_common([layer.rank for _, layer in layers])
    alpha = _most_common([layer.alpha for _, layer in layers])
    targets = sorted({layer.target for _, layer in layers})
    first = layers[0][1]
    return {
        "alpha_pattern": {_pattern_key(m): _number(a.alpha) for m, a in layers if a.alpha != alpha},
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": _number(alpha),
        "lora_dropout": first.dropout.p,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {_pattern_key(m): a.rank for m, a in layers if a.rank != rank},
        "revision": None,
        "target_modules": targets[0] if len(targets) == 1 and _is_expression(targets[0], layers) else targets,
        "task_type": task_type,
        "use_dora": False,
        "use_rslora": first.use_rslora,
    }


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _is_expression(target: str, layers: list[tuple[str, LoRALinear]]) -> bool:
    """Whether `target` was given as one regular expression: a module name (or its end)
    names every module it selected."""
    return any(_matches([target], module.replace("{i}", "0")) is None for module, _ in layers)


def adapter_state(model: Model) -> dict[str, np.ndarray]:
    """The adapters' tensors under PEFT's names, one per layer of a stack."""
    key_map = _key_map(model)
    state = {}
    for path, layer in lora_layers(model):
        module = _hf_module(key_map, path)
        num_layers = layer.lora_A.shape[0] if "{i}" in module else 1
        for part, array in (("A", layer.lora_A), ("B", layer.lora_B)):
            array = np.asarray(array)
            for i, name in enumerate(_layer_names(module, num_layers)):
                state[f"{_PREFIX}{name}.lora_{part}.weight"] = np.ascontiguousarray(
                    array[i] if array.ndim == 3 else array
                )
    return state


def save_adapter(
    model: Model,
    folder: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    overwrite: bool = False,
) -> None:
    """Writes `model`'s adapters as PEFT does: `adapter_config.json` and
    `adapter_model.safetensors` (`base_model.model.<HF module>.lora_A.weight`, ...), so that
    `peft.PeftModel.from_pretrained(hf_model, folder)` loads them onto the HF model.

    - `base_model_name_or_path`: recorded in the config (the hub id or folder of the base).
    - `task_type`: PEFT's task (`"CAUSAL_LM"`, `"SEQ_2_SEQ_LM"`, ...; `None` is allowed).
    - Atomic, and `overwrite` as in `save_pretrained`.
    """
    from safetensors.numpy import save_file

    check_destination(folder, overwrite=overwrite)
    config = adapter_config(model, base_model_name_or_path=base_model_name_or_path, task_type=task_type)
    state = adapter_state(model)
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        save_file(state, tmp / ADAPTER_WEIGHTS[0], metadata={"format": "pt"})
        give_usual_permissions(tmp / ADAPTER_WEIGHTS[0])
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot parse {path}: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path} is a {config.get('peft_type')!r} adapter; only LORA adapters load here")
    for option, plain in _PLAIN_OPTIONS.items():
        value = config.get(option, plain)
        if value != plain and not (plain is None and value in ([], {})):
            raise CheckpointError(f"{path} sets {option}={value!r}, which eqx_models' LoRA does not support")
    for name, kind in (("r", int), ("lora_alpha", (int, float))):
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
            raise CheckpointError(f"{path}: {name} must be a positive number, got {value!r}")
    return config


def _read_tensors(folder: Path) -> dict[str, Any]:
    from .checkpoint.readers import lazy_safetensors, lazy_torch_bin

    safetensors, pickled = ADAPTER_WEIGHTS  # PEFT's format, and older PEFT versions'
    if (folder / safetensors).is_file():
        return lazy_safetensors(folder / safetensors)
    if (folder / pickled).is_file():
        return lazy_torch_bin(folder / pickled)
    raise CheckpointError(f"{folder} has no {safetensors} (nor {pickled})")


def _pattern_value(patterns: Any, names: list[str], default: Any, what: str, module: str) -> Any:
    """The value PEFT's `rank_pattern` / `alpha_pattern` gives `module`'s layers (one for all)."""
    if not patterns:
        return default
    values = set()
    for name in names:
        hit = next((key for key in patterns if re.match(rf"(.*\.)?({key})$", name)), None)
        values.add(default if hit is None else patterns[hit])
    if len(values) > 1:
        raise CheckpointError(f"{what} gives {module} different values across layers ({sorted(values)})")
    return values.pop()


def load_adapter(model: Model, folder_or_repo_id: str | os.PathLike, *, revision: str | None = None) -> Model:
    """`model` (without adapters) with the LoRA adapters of a PEFT folder or hub id applied.

    Strict, like checkpoint loading: every tensor of the folder must belong to a linear layer
    of `model` (under HF's module names), every layer of an adapted stack must have both
    matrices, and shapes must fit; anything else is one `CheckpointError` line naming the key.
    Options our `LoRALinear` does not compute (DoRA, LoRA biases, `modules_to_save`...) are
    refused by name.
    """
    from .hub import folder as resolve  # noqa: I001 (the module's name is taken by an argument)

    _refuse_adapted(model, "load_adapter")
    key_map = _key_map(model)
    where = resolve(folder_or_repo_id, revision=revision, want="adapter")
    config = _read_config(where)
    tensors = _read_tensors(where)
    found: dict[str, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        match = _KEY.match(name)
        if match is None:
            raise CheckpointError(
                f"adapter tensor {name} is not a LoRA matrix (expected {_PREFIX}<module>.lora_A.weight)"
            )
        found.setdefault(match["module"], {})[match["part"]] = (name, tensor)
    target = config.get("target_modules")
    inference = _in_inference_mode(model)
    paths, layers, used = [], [], set()
    for path, node in _modules(model):
        module = _hf_module(key_map, path)
        num_layers = _num_layers(node, module)
        names = _layer_names(module, num_layers)
        present = [name for name in names if name in found]
        if not present:
            continue
        if not _is_linear(node):
            raise CheckpointError(f"adapter tensors for {present[0]}, an embedding; only linear adapters load here")
        missing = [f"{_PREFIX}{n}.lora_{p}.weight" for n in names for p in "AB" if p not in found.get(n, {})]
        if missing:
            raise CheckpointError(f"adapter is missing {len(missing)} key(s): {describe_names(missing)}")
        d_out, d_in = node.features
        first_A = found[names[0]]["A"][1]
        rank = first_A.shape[0] if len(first_A.shape) == 2 else -1  # -1: any other shape mismatches below
        parts = {}
        for part, want in (("A", (rank, d_in)), ("B", (d_out, rank))):
            arrays = []
            for name in names:
                key, tensor = found[name][part]
                if tuple(tensor.shape) != want:
                    raise CheckpointError(
                        f"shape mismatch for {key}: adapter has {tuple(tensor.shape)}, model expects {want}"
                    )
                arrays.append(tensor.read().astype(_adapter_dtype(node)))
            parts[part] = jnp.asarray(np.stack(arrays) if "{i}" in module else arrays[0])
        used.update(names)
        alpha = _pattern_value(config.get("alpha_pattern"), names, config["lora_alpha"], "alpha_pattern", module)
        hit = (target and _matches(target, names[0])) or module.rsplit(".", 1)[-1]
        layer = LoRALinear(
            node,
            parts["A"],
            parts["B"],
            alpha=alpha,
            use_rslora=bool(config.get("use_rslora", False)),
            dropout=float(config.get("lora_dropout", 0.0) or 0.0),
            target=hit,
        )
        paths.append(path)
        layers.append(eqx.nn.inference_mode(layer, inference))
    unknown = sorted(f"{_PREFIX}{m}.lora_{p}.weight" for m in found if m not in used for p in found[m])
    if unknown:
        raise CheckpointError(
            f"adapter has {len(unknown)} key(s) for modules {type(model).__name__} does not have: "
            f"{describe_names(unknown)}"
        )
    if not layers:
        raise CheckpointError(f"{where} holds no adapter tensors")
    return _replace(model, paths, layers)


__all__ = [
    "LoRALinear",
    "adapter_filter",
    "add_lora",
    "load_adapter",
    "lora_layers",
    "merge_lora",
    "save_adapter",
    "with_adapter_dropout",
    "with_dropout_keys",
]
