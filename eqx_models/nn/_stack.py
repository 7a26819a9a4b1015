"""Identical layers stored stacked along a leading `layers` axis and run with `lax.scan`.

Compile time does not grow with depth when scanning. The Python-loop path
(`scan=False`) runs the same stacked parameters one slice at a time.
"""

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import PRNGKeyArray

Layer = TypeVar("Layer", bound=eqx.Module)


class Stacked(eqx.Module, Generic[Layer]):
    """`num_layers` copies of one layer module, each array leaf with a leading `layers` axis."""

    layers: Layer
    num_layers: int = eqx.field(static=True)

    def __init__(self, make_layer: Callable[[PRNGKeyArray], Layer], num_layers: int, *, key: PRNGKeyArray):
        self.layers = eqx.filter_vmap(make_layer)(jax.random.split(key, num_layers))
        self.num_layers = num_layers

    def layer(self, i: int) -> Layer:
        """The `i`-th layer as an ordinary (unstacked) module."""
        arrays, static = eqx.partition(self.layers, eqx.is_array)
        return eqx.combine(jax.tree.map(lambda a: a[i], arrays), static)

    def scan(
        self,
        step: Callable[[Layer, Any, Any], tuple[Any, Any]],
        carry: Any,
        xs: Any = None,
        *,
        scan_layers: bool = True,
        remat: bool = False,
    ) -> tuple[Any, Any]:
        """Runs `carry, y = step(layer, carry, x)` through the layers in order.

        `xs` holds per-layer inputs with a leading `layers` axis (windows, dropout
        keys, layer indices); the `y`s are returned stacked. `remat` wraps each
        step in `jax.checkpoint`, trading recomputation for activation memory.
        """
        arrays, static = eqx.partition(self.layers, eqx.is_array)

        def body(carry, inputs):
            layer_arrays, x = inputs
            return step(eqx.combine(layer_arrays, static), carry, x)

        if remat:
            body = jax.checkpoint(body)
        if scan_layers:
            return lax.scan(body, carry, (arrays, xs))
        ys = []
        for i in range(self.num_layers):
            carry, y = body(carry, jax.tree.map(lambda a: a[i], (arrays, xs)))
            ys.append(y)
        return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys[0] is not None else None
