"""The HF Flax layout of a model tree: the nested `params` dict HF's Flax class of the same
architecture holds, and the way back, as pure `jax.numpy` operations on pytrees.

A leaf's Flax name is its PyTorch name (from the model's `KeyMap`) with the last component
renamed by the kind of module that owns the leaf, declared once in `FLAX_LEAF_NAMES`:
`flax.linen.Dense` calls its matrix `kernel` and stores it transposed, `Embed` calls its
table `embedding`, `LayerNorm` its weight `scale`; HF's own RMS norms (T5, Gemma) keep
`weight`, and so does every other leaf. A stacked leaf `[layers, ...]` is one dict per
layer (`h/0`, `h/1`, ...), as HF's Flax modules nest them.

`tree_to_flax` and `tree_from_flax` only index, stack and transpose arrays, so they run
inside `jax.jit` and `jax.grad` (the `eqx_models.compat` classes hold HF's Flax `params`
and call the Equinox model through them). `flax_to_state` renames a flat Flax-named state to
PyTorch names by the same declaration, for the strict loader (`keymap.fill_tree`).
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import nn
from ..errors import CheckpointError
from .keymap import KeyMap, describe_names

#: `(module type, field) -> (Flax name, stored transposed)`; any other leaf keeps its name.
FLAX_LEAF_NAMES: dict[tuple[type, str], tuple[str, bool]] = {
    (nn.Linear, "weight"): ("kernel", True),
    (nn.Embedding, "weight"): ("embedding", False),
    (nn.LayerNorm, "weight"): ("scale", False),
}

_ARRAY_TYPES = (jax.Array, np.ndarray, jax.ShapeDtypeStruct)


@dataclasses.dataclass(frozen=True)
class FlaxLeaf:
    """Where one array leaf of the tree lives in HF's Flax `params`.

    - `path`: the dotted tree path (as `keymap.array_leaves` spells it).
    - `hf`: its PyTorch name, `{i}` standing for the layer of a stacked leaf.
    - `flax`: its Flax path, a `"{i}"` component for the layer.
    - `transpose`: Flax stores each (per-layer) matrix transposed.
    - `stacked`: the leaf has a leading `layers` axis, one Flax entry per layer.
    """

    path: str
    hf: str
    flax: tuple[str, ...]
    transpose: bool
    stacked: bool

    def flax_path(self, layer: int | None) -> tuple[str, ...]:
        return self.flax if layer is None else tuple(str(layer) if c == "{i}" else c for c in self.flax)


def _child(node: Any, key: Any) -> Any:
    if isinstance(key, jax.tree_util.GetAttrKey):
        return getattr(node, key.name)
    if isinstance(key, jax.tree_util.DictKey):
        return node[key.key]
    if isinstance(key, jax.tree_util.SequenceKey):
        return node[key.idx]
    raise CheckpointError(f"cannot name the Flax parameter below {type(node).__name__} (key {key})")


def _field(key: Any) -> str:
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    return str(getattr(key, "idx", key))


def flax_layout(tree: Any, key_map: KeyMap) -> list[tuple[str, FlaxLeaf | None, Any]]:
    """`(path, FlaxLeaf, leaf)` for every array leaf of `tree` (a model or its
    `eqx.filter_eval_shape` skeleton) in `keymap.array_leaves` order; the `FlaxLeaf` is
    `None` for a leaf HF's Flax class does not hold (`KeyMap.not_in_flax`)."""
    out: list[tuple[str, FlaxLeaf | None, Any]] = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not isinstance(leaf, _ARRAY_TYPES):
            continue
        path = jax.tree_util.keystr(key_path, simple=True, separator=".")
        if key_map.not_in_flax and path.startswith(key_map.not_in_flax):
            out.append((path, None, leaf))
            continue
        owner = tree
        for key in key_path[:-1]:
            owner = _child(owner, key)
        hf = key_map.hf_pattern(path)
        stacked = "{i}" in hf
        if stacked and not leaf.ndim:
            raise CheckpointError(f"stacked parameter {path} has no layers axis")
        *stem, last = hf.split(".")
        name, transpose = FLAX_LEAF_NAMES.get((type(owner), _field(key_path[-1])), (last, False))
        spec = FlaxLeaf(path, hf, (*stem, name), transpose and leaf.ndim - stacked == 2, stacked)
        out.append((path, spec, leaf))
    return out


def unwrap_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """HF Flax params as users hold them: the dict itself, a flax `FrozenDict`, or either
    wrapped as `{"params": ...}` (the variables `module.init` returns)."""
    if not isinstance(params, Mapping):
        raise CheckpointError(f"Flax params must be a nested dict, got {type(params).__name__}")
    if len(params) == 1 and "params" in params and isinstance(params["params"], Mapping):
        return params["params"]
    return params


def flatten_params(params: Mapping[str, Any], separator: str = ".") -> dict[str, Any]:
    """A nested params dict as `{joined path: leaf}`; keys must be strings."""
    flat: dict[str, Any] = {}
    todo: list[tuple[str, Any]] = [("", params)]
    while todo:
        prefix, node = todo.pop()
        for key, value in node.items():
            if not isinstance(key, str):
                raise CheckpointError(f"Flax params keys must be strings, got {key!r} under {prefix or 'the top'}")
            name = f"{prefix}{separator}{key}" if prefix else key
            if isinstance(value, Mapping):
                todo.append((name, value))
            else:
                flat[name] = value
    return flat


def _orient(array: Any, spec: FlaxLeaf) -> Any:
    return array.T if spec.transpose else array


def tree_to_flax(tree: Any, key_map: KeyMap) -> dict[str, Any]:
    """The nested params dict HF's Flax class holds for the model `tree`: per-layer dicts
    for stacked leaves, `kernel`s transposed, HF's leaf names. Values are the tree's arrays
    (sliced and transposed with `jax.numpy`), so this runs under `jax.jit` and `jax.grad`."""
    params: dict[str, Any] = {}
    for _, spec, leaf in flax_layout(tree, key_map):
        if spec is None:
            continue
        layers = range(leaf.shape[0]) if spec.stacked else [None]
        for i in layers:
            node = params
            *stem, last = spec.flax_path(i)
            for part in stem:
                node = node.setdefault(part, {})
            node[last] = _orient(leaf if i is None else leaf[i], spec)
    return params


def tree_from_flax(tree: Any, params: Mapping[str, Any], key_map: KeyMap) -> Any:
    """`tree` (a model, or its `eqx.filter_eval_shape` skeleton) with every parameter HF's
    Flax class holds taken from `params` (nested as HF's `.params`, possibly wrapped as
    `{"params": ...}`): layers stacked with `jnp.stack`, kernels transposed, cast to the
    tree's dtypes. Traceable: under `jax.grad`, gradients flow to `params`.

    Strict, by structure alone (so also while tracing): a missing or unexpected entry or a
    shape mismatch is a `CheckpointError` naming the Flax path. Leaves HF's Flax class does
    not hold (`KeyMap.not_in_flax`) keep the tree's values; a skeleton has none to keep."""
    params = unwrap_params(params)
    flat = flatten_params(params, "/")
    used: set[str] = set()
    values: list[Any] = []
    for path, spec, leaf in flax_layout(tree, key_map):
        if spec is None:
            if isinstance(leaf, jax.ShapeDtypeStruct):
                raise CheckpointError(
                    f"HF's Flax params do not hold the parameter {path}: pass a model with values "
                    "for it, not a skeleton"
                )
            values.append(leaf)
            continue
        want = tuple(leaf.shape[1:] if spec.stacked else leaf.shape)
        parts = []
        for i in range(leaf.shape[0]) if spec.stacked else [None]:
            name = "/".join(spec.flax_path(i))
            if name not in flat:
                raise CheckpointError(f"Flax params are missing {name} (parameter {spec.path})")
            array = flat[name]
            shape = tuple(getattr(array, "shape", ()))
            expected = want[::-1] if spec.transpose else want
            if shape != expected:
                raise CheckpointError(
                    f"shape mismatch for {name}: Flax params have {shape}, model expects {expected} "
                    f"(parameter {spec.path})"
                )
            used.add(name)
            parts.append(_orient(jnp.asarray(array), spec).astype(leaf.dtype))
        values.append(jnp.stack(parts) if spec.stacked else parts[0])
    unexpected = sorted(set(flat) - used)
    if unexpected:
        raise CheckpointError(
            f"Flax params have {len(unexpected)} unexpected entr(ies) for this model: {describe_names(unexpected)}"
        )
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    it = iter(values)
    return jax.tree_util.tree_unflatten(
        treedef, [next(it) if isinstance(leaf, _ARRAY_TYPES) else leaf for leaf in leaves]
    )


def flax_to_state(state: Mapping[str, Any], tree: Any, key_map: KeyMap) -> dict[str, Any]:
    """A flat Flax-named state (`.`-joined paths; arrays or `LazyTensor`s) under PyTorch
    names, renamed and transposed (a `LazyTensor` unread) as `FLAX_LEAF_NAMES` declares for
    the leaves of `tree`, for the strict loader. The model's prefix may be present or not
    (base checkpoints load into heads and back, as `keymap.align_prefix` then does). A name
    the layout does not know is kept as it is, for the loader to report or drop."""
    renames: dict[str, tuple[str, bool]] = {}
    head = key_map.prefix + "." if key_map.prefix else ""
    for _, spec, _ in flax_layout(tree, key_map):
        if spec is None:
            continue
        flax, hf = ".".join(spec.flax), spec.hf
        renames[flax] = (hf, spec.transpose)
        if head and flax.startswith(head):
            renames[flax[len(head) :]] = (hf[len(head) :], spec.transpose)
        elif head:
            renames[head + flax] = (head + hf, spec.transpose)
    out: dict[str, Any] = {}
    source: dict[str, str] = {}
    for name, array in state.items():
        renamed, transpose = name, False
        if name in renames:
            renamed, transpose = renames[name]
        else:
            parts = name.split(".")
            for at, part in enumerate(parts):
                if part.isascii() and part.isdecimal():
                    pattern = ".".join([*parts[:at], "{i}", *parts[at + 1 :]])
                    if pattern in renames:
                        hf, transpose = renames[pattern]
                        renamed = hf.replace("{i}", part)
                        break
        if renamed in out:
            raise CheckpointError(
                f"checkpoint has both {source[renamed]} and {name}, which are both {renamed} in PyTorch "
                "names: ambiguous, refused"
            )
        out[renamed], source[renamed] = (array.T if transpose else array), name
    return out
