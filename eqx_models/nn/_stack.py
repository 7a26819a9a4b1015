"""Identical layers stored stacked along a leading `layers` axis and run with `lax.scan`.

Compile time does not grow with depth when scanning. The Python-loop path
(`RunOptions(scan_layers=False)`) runs the same stacked parameters one slice at a time.
How a stack runs (scan or loop, remat or not) is a `RunOptions` value held by the stack
itself, apart from the model's HF config: `with_run_options` swaps it everywhere in a tree.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import PRNGKeyArray

from ..errors import ConfigError

Layer = TypeVar("Layer", bound=eqx.Module)
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a `Stacked` runs its layers; no effect on the values computed.

    - `scan_layers`: one `lax.scan` over the layers (compile time independent of depth), or a
      Python loop over slices (`False`; unrolled, compile time grows with depth).
    - `remat`: wrap each layer in `jax.checkpoint`, trading recomputation in the backward
      pass for activation memory.
    """

    scan_layers: bool = True
    remat: bool = False

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if type(value) is not bool:
                raise ConfigError(f"run option {field.name} must be True or False, got {value!r}")

    def as_dict(self) -> dict[str, bool]:
        return dataclasses.asdict(self)


class Stacked(eqx.Module, Generic[Layer]):
    """`num_layers` copies of one layer module, each array leaf with a leading `layers`
    axis. Build one with `Stacked.build`; `Stacked(layers, options)` re-wraps stacked
    layers (e.g. with other run options)."""

    layers: Layer
    num_layers: int = eqx.field(static=True)
    options: RunOptions = eqx.field(static=True)

    def __init__(self, layers: Layer, options: RunOptions = RunOptions()):
        sizes = {leaf.shape[0] for leaf in jax.tree.leaves(eqx.filter(layers, eqx.is_array)) if leaf.ndim}
        if len(sizes) != 1:
            raise ValueError(f"stacked layers need one leading `layers` axis on every array, got sizes {sorted(sizes)}")
        if not isinstance(options, RunOptions):
            raise TypeError(f"options must be a RunOptions, got {type(options).__name__}")
        self.layers, self.num_layers, self.options = layers, sizes.pop(), options

    @classmethod
    def build(cls, make_layer: Callable[[PRNGKeyArray], Layer], num_layers: int, *, key: PRNGKeyArray) -> "Stacked":
        """`num_layers` layers from `make_layer(key)`, one key each, stacked by `filter_vmap`."""
        return cls(eqx.filter_vmap(make_layer)(jax.random.split(key, num_layers)))

    def layer(self, i: int) -> Layer:
        """The `i`-th layer as an ordinary (unstacked) module."""
        arrays, static = eqx.partition(self.layers, eqx.is_array)
        return eqx.combine(jax.tree.map(lambda a: a[i], arrays), static)

    def scan(self, step: Callable[[Layer, Any, Any], tuple[Any, Any]], carry: Any, xs: Any = None) -> tuple[Any, Any]:
        """Runs `carry, y = step(layer, carry, x)` through the layers in order.

        `xs` holds per-layer inputs with a leading `layers` axis (windows, dropout
        keys, layer indices); the `y`s are returned stacked.
        """
        arrays, static = eqx.partition(self.layers, eqx.is_array)

        def body(carry, inputs):
            layer_arrays, x = inputs
            return step(eqx.combine(layer_arrays, static), carry, x)

        if self.options.remat:
            body = jax.checkpoint(body)
        if self.options.scan_layers:
            return lax.scan(body, carry, (arrays, xs))
        ys = []
        for i in range(self.num_layers):
            carry, y = body(carry, jax.tree.map(lambda a: a[i], (arrays, xs)))
            ys.append(y)
        return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys[0] is not None else None


def _is_stacked(node: Any) -> bool:
    return isinstance(node, Stacked)


def _stacks(tree: Any) -> list[Stacked]:
    return [node for node in jax.tree.leaves(tree, is_leaf=_is_stacked) if _is_stacked(node)]


def with_run_options(tree: T, **options: bool) -> T:
    """`tree` with every `Stacked` in it running with changed options, e.g.
    `with_run_options(model, scan_layers=False, remat=True)`; parameters are shared, and options
    not named keep their value."""
    known = {f.name for f in dataclasses.fields(RunOptions)}
    unknown = set(options) - known
    if unknown:
        raise ConfigError(f"unknown run option(s) {sorted(unknown)}; known: {sorted(known)}")
    stacks = _stacks(tree)
    if not stacks:
        return tree
    new = [Stacked(s.layers, dataclasses.replace(s.options, **options)) for s in stacks]
    return eqx.tree_at(_stacks, tree, new)


def run_options(tree: Any) -> RunOptions:
    """The options of the stacks in `tree` (the defaults when it has none)."""
    stacks = _stacks(tree)
    return stacks[0].options if stacks else RunOptions()


def split_key(key: PRNGKeyArray | None, num: int) -> tuple[PRNGKeyArray | None, ...]:
    """`num` keys from `key`, or `num` `None`s when `key` is `None` (no dropout)."""
    if key is None:
        return (None,) * num
    return tuple(jax.random.split(key, num))
