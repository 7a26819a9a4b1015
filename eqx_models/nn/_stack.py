"""Identical layers stored stacked along a leading `layers` axis and run with `lax.scan`.

Compile time does not grow with depth when scanning. The Python-loop path
(`RunOptions(scan_layers=False)`) runs the same stacked parameters one slice at a time.
How a stack runs (scan or loop, remat or not) is a `RunOptions` value held by the stack
itself, apart from the model's HF config: `with_run_options` swaps it everywhere in a tree.

For inference a stack may also hold its layers *separately* (`separate_layers`, undone by
`stack_layers`): a tuple of ordinary layer modules, each array its own buffer, run by a
Python loop. Inside the scan XLA:CPU reads each layer's weights out of the stacked array
(a copy before every library matrix product with more than one row, a slower fused loop for
one row); separate buffers go straight to the library. Measured in docs/benchmarks.md:
decoding 1.10-1.33x faster; compile time grows with depth. Checkpoints are written stacked,
and LoRA is added to stacked layers.
"""

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import PRNGKeyArray

from ..errors import ConfigError
from ._quantized import QuantizedWeight

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


#: True while tracing the layers of a stack stored separately: their weights are whole
#: arrays, not slices of a stacked one, and `nn.matmul_transposed` picks its form for that.
_WHOLE_WEIGHTS = contextvars.ContextVar("eqx_models_whole_weights", default=False)


def whole_weights() -> bool:
    """Whether the layer being traced holds its own weight arrays (a stack stored
    separately) rather than slices of stacked ones."""
    return _WHOLE_WEIGHTS.get()


@contextlib.contextmanager
def _tracing_whole_weights() -> Iterator[None]:
    token = _WHOLE_WEIGHTS.set(True)
    try:
        yield
    finally:
        _WHOLE_WEIGHTS.reset(token)


class Stacked(eqx.Module, Generic[Layer]):
    """`num_layers` copies of one layer module, each array leaf with a leading `layers`
    axis. Build one with `Stacked.build`; `Stacked(layers, options)` re-wraps stacked
    layers (e.g. with other run options). `layers` may instead be a tuple of unstacked
    layer modules (`separate_layers`), which run by a Python loop whatever the options."""

    layers: Layer | tuple[Layer, ...]
    num_layers: int = eqx.field(static=True)
    options: RunOptions = eqx.field(static=True)

    def __init__(self, layers: Layer | tuple[Layer, ...], options: RunOptions = RunOptions()):
        if not isinstance(options, RunOptions):
            raise TypeError(f"options must be a RunOptions, got {type(options).__name__}")
        if isinstance(layers, tuple):
            if not layers:
                raise ValueError("a stack needs at least one layer")
            self.layers, self.num_layers, self.options = layers, len(layers), options
            return
        sizes = {leaf.shape[0] for leaf in jax.tree.leaves(eqx.filter(layers, eqx.is_array)) if leaf.ndim}
        if len(sizes) != 1:
            raise ValueError(f"stacked layers need one leading `layers` axis on every array, got sizes {sorted(sizes)}")
        self.layers, self.num_layers, self.options = layers, sizes.pop(), options

    @classmethod
    def build(cls, make_layer: Callable[[PRNGKeyArray], Layer], num_layers: int, *, key: PRNGKeyArray) -> "Stacked":
        """`num_layers` layers from `make_layer(key)`, one key each, stacked by `filter_vmap`."""
        return cls(eqx.filter_vmap(make_layer)(jax.random.split(key, num_layers)))

    @property
    def separate(self) -> bool:
        """Whether the layers are stored separately (a tuple of modules), not stacked."""
        return isinstance(self.layers, tuple)

    def layer(self, i: int) -> Layer:
        """The `i`-th layer as an ordinary (unstacked) module."""
        if isinstance(self.layers, tuple):
            return self.layers[i]
        arrays, static = eqx.partition(self.layers, eqx.is_array)
        return eqx.combine(jax.tree.map(lambda a: a[i], arrays), static)

    def scan(self, step: Callable[[Layer, Any, Any], tuple[Any, Any]], carry: Any, xs: Any = None) -> tuple[Any, Any]:
        """Runs `carry, y = step(layer, carry, x)` through the layers in order.

        `xs` holds per-layer inputs with a leading `layers` axis (windows, dropout
        keys, layer indices); the `y`s are returned stacked.
        """
        if isinstance(self.layers, tuple):
            with _tracing_whole_weights():
                return self._loop(step, carry, xs, self.layers)
        if not self.options.scan_layers:
            return self._loop(step, carry, xs, [self.layer(i) for i in range(self.num_layers)])
        arrays, static = eqx.partition(self.layers, eqx.is_array)

        def body(carry, inputs):
            layer_arrays, x = inputs
            return step(eqx.combine(layer_arrays, static), carry, x)

        return lax.scan(jax.checkpoint(body) if self.options.remat else body, carry, (arrays, xs))

    def _loop(
        self, step: Callable[[Layer, Any, Any], tuple[Any, Any]], carry: Any, xs: Any, layers: Sequence[Layer]
    ) -> tuple[Any, Any]:
        """The layers one after another in Python (unrolled: compile time grows with depth)."""
        ys = []
        for i, layer in enumerate(layers):
            arrays, static = eqx.partition(layer, eqx.is_array)

            def body(carry, inputs, static=static):
                layer_arrays, x = inputs
                return step(eqx.combine(layer_arrays, static), carry, x)

            if self.options.remat:
                body = jax.checkpoint(body)
            carry, y = body(carry, (arrays, jax.tree.map(lambda a: a[i], xs)))
            ys.append(y)
        return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys[0] is not None else None


def separate_layers(tree: T) -> T:
    """`tree` with the layers of every stack in it stored separately: each layer's arrays
    copied out of the stacked ones into buffers of their own, run by a Python loop (module
    docstring). Faster decoding on XLA:CPU; compile time grows with depth. For inference:
    `stack_layers` undoes it (saving and exporting do so themselves)."""
    stacks = _stacks(tree)
    if not stacks or all(s.separate for s in stacks):
        return tree
    # `s.layer(i)` indexes concrete stacked arrays: each slice is a new buffer
    new = [
        s if s.separate else Stacked(tuple(_pinned(s.layer(i), True) for i in range(s.num_layers)), s.options)
        for s in stacks
    ]
    return eqx.tree_at(_stacks, tree, new)


def stack_layers(tree: T) -> T:
    """`tree` with every stack stored stacked again (the inverse of `separate_layers`)."""
    stacks = _stacks(tree)
    if not any(s.separate for s in stacks):
        return tree

    def restacked(s: Stacked) -> Stacked:
        if not s.separate:
            return s
        layers = [_pinned(layer, False) for layer in s.layers]
        static = eqx.filter(layers[0], eqx.is_array, inverse=True)
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *(eqx.filter(layer, eqx.is_array) for layer in layers))
        return Stacked(eqx.combine(stacked, static), s.options)

    return eqx.tree_at(_stacks, tree, [restacked(s) for s in stacks])


def _pinned(layer: Any, pinned: bool) -> Any:
    """`layer` with its quantised weights pinned in loops, as `QuantizedWeight.quantize`
    pins every weight without a layers axis, or not, as it leaves stacked ones."""

    def pin(node: Any) -> Any:
        return QuantizedWeight(node.values, node.scale, pinned=pinned) if isinstance(node, QuantizedWeight) else node

    return jax.tree.map(pin, layer, is_leaf=lambda node: isinstance(node, QuantizedWeight))


def has_separate_layers(tree: Any) -> bool:
    """Whether any stack in `tree` holds its layers separately."""
    return any(s.separate for s in _stacks(tree))


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
