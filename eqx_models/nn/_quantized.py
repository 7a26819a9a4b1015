"""Int8 weights with one float scale per row: the stored form of a quantised `Linear` or
`Embedding` weight (`eqx_models.quantize` makes them). Activations stay in float.

A row is an output channel of a `Linear` (`[d_out, d_in]`, PyTorch's layout) and a token of
an `Embedding` (`[vocab, dim]`), so one scale per row serves an embedding both as a lookup
table and as a tied LM head. Identical layers stored stacked keep their leading `layers`
axis on both arrays (`values [layers, rows, cols]`, `scale [layers, rows]`), so `lax.scan`
slices them as it slices float weights.

How the product is written matters on XLA:CPU (jax 0.10, measured in docs/benchmarks.md,
a decode step of GPT-Neo-125M's shape, batch 1, inside the layer scan): `(x @ q.astype(f).T) * s`
(the scale applied after the product) reads the int8 slice in place, the conversion fused
into the matrix-vector loop, at 2.4-3.7x the speed of the float32 product; dequantising
first (`x @ (q * s[:, None]).T`) materialises the float matrix (1.3-1.4x), an int8 x int8
dot with int32 accumulation (`preferred_element_type=int32`, activations quantised per
token) is slower than float32 (0.6x), as is an int8 x float `dot_general` (0.5x), and a
blockwise loop over row blocks is 1.3x. The einsum spelling of the same product is the
pathological one here (0.13x for the LM head), so int8 products are always written `@ .T`.
"""

import equinox as eqx
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, Int8

INT8_MAX = 127


class Int8Weight(eqx.Module):
    """`weight ~= values * scale[..., None]`: symmetric int8 rows, one float scale per row
    (`scale = max|row| / 127`, so every element is within `scale / 2` of its float value).

    - `values`: `Int8[Array, "*layers rows cols"]`.
    - `scale`: `Float[Array, "*layers rows"]`, in the model's float dtype (which is also the
      dtype products are computed in).
    - `pinned`: keep the conversion inside any loop that uses the weight (see
      `matmul_transposed`); `quantize` sets it for weights without a layers axis.
    """

    values: Int8[Array, "*layers rows cols"]
    scale: Float[Array, "*layers rows"]
    pinned: bool = eqx.field(static=True, default=False)

    @staticmethod
    def quantize(weight: Float[Array, "*layers rows cols"]) -> "Int8Weight":
        """Rounds each row of `weight` to the nearest multiple of its scale. A row of zeros
        gets scale 0 (and zeros). A weight without a layers axis is `pinned`."""
        w = weight.astype(jnp.float32)
        scale = (jnp.max(jnp.abs(w), axis=-1) / INT8_MAX).astype(weight.dtype)
        stored = scale.astype(jnp.float32)  # divide by the scale as stored (bfloat16 rounds it)
        safe = jnp.where(stored == 0, jnp.ones_like(stored), stored)
        values = jnp.clip(jnp.round(w / safe[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
        return Int8Weight(values, scale, pinned=weight.ndim == 2)

    def dequantize(self) -> Float[Array, "*layers rows cols"]:
        return self.values.astype(self.scale.dtype) * self.scale[..., None]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the float weight this stands for."""
        return self.values.shape

    @property
    def dtype(self):
        """The float dtype products are computed in (the scale's)."""
        return self.scale.dtype

    def matmul_transposed(self, x: Float[Array, "*batch cols"]) -> Float[Array, "*batch rows"]:
        """`x @ weight.T` with the scale applied after the product (see the module docstring)."""
        # Inside generation's decode loop a weight used outside the layer scan (the LM head) is
        # loop-invariant, and XLA hoists its conversion out of the loop: every step then read
        # a float copy (the head ran at float32 speed). Tying the weight to this step's
        # activations keeps the conversion in the loop. Slices of stacked weights are taken
        # per layer anyway; there the barrier only cost speed (measured 5-15%).
        values = self.values
        if self.pinned:
            x, values = lax.optimization_barrier((x, values))
        return (x @ values.astype(x.dtype).T) * self.scale.astype(x.dtype)

    def take_rows(self, ids: Int[Array, "*shape"]) -> Float[Array, "*shape cols"]:
        """The float rows at `ids` (an embedding lookup)."""
        rows = jnp.take(self.values, ids, axis=0).astype(self.scale.dtype)
        return rows * jnp.take(self.scale, ids, axis=0)[..., None]


def concatenate_rows(weights: list["Int8Weight"]) -> "Int8Weight":
    """The rows of several unstacked weights, in order, as one weight."""
    return Int8Weight(jnp.concatenate([w.values for w in weights]), jnp.concatenate([w.scale for w in weights]))
