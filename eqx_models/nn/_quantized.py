"""Weights stored small with one float scale per row, computed in float: the stored form of
a quantised `Linear` or `Embedding` weight (`eqx_models.quantize` makes them). Two schemes:

- `"int8"`: symmetric int8 rows, `scale = max|row| / 127`: a quarter of float32's bytes.
- `"bfloat16"`: the weight rounded to bfloat16, half of float32's bytes, stored as float16
  rows times a power-of-two scale (`2**(floor(log2 max|row|) - 15)`). float16 holds 11
  significant bits to bfloat16's 8, so every element within 2**-29 of its row's largest is
  stored exactly (smaller ones are off by at most 2**-40 of the row's largest, far below a
  float32 product's rounding) and the products are those of the bfloat16 weights. The
  reason for the detour: the CPU this was chosen on (AVX2, no AVX512-BF16) converts float16
  in hardware and XLA:CPU fuses that conversion into its matrix-vector loop, while a
  bfloat16 operand is converted to a float32 copy first (4x slower than float32, measured
  in docs/quantization.md).

A row is an output channel of a `Linear` (`[d_out, d_in]`, PyTorch's layout) and a token of
an `Embedding` (`[vocab, dim]`), so one scale per row serves an embedding both as a lookup
table and as a tied LM head. Identical layers stored stacked keep their leading `layers`
axis on both arrays (`values [layers, rows, cols]`, `scale [layers, rows]`), so `lax.scan`
slices them as it slices float weights.

How the product is written matters on XLA:CPU (jax 0.10, measured in docs/benchmarks.md).
An int8 weight is multiplied as int8: XLA:CPU hands an int8 x int8 product with int32
accumulation (`preferred_element_type=int32`) to its YNNPACK library, which reads the int8
weight at memory speed with the CPU's integer dot-product instructions, once for all the
rows of the activation (the same for 1 row as for 8). The activation stays float: each of
its rows is written as three int8 digits, `x ~= d1*s + d2*s/254 + d3*s/254**2` with
`s = max|x| / 127` (per row), so the digits stand for `x` to within `max|x| / (2*127*254**2)`
(6.1e-8 of its largest element, float32's own rounding) and the three digit rows go through
the library product as one. The int32 sums are exact; they are combined in float and the
weight's scale applied after. Measured against the other ways of writing it (GPT-Neo-125M's
shape, greedy decoding, batch 1): the float product of the converted weight,
`(x @ q.astype(f).T) * s`, which XLA fuses into one loop bound by its conversion
instructions, was 1.5x slower inside the layer scan and 3.5x slower with the layers stored
separately; one int8 digit (activations quantised to int8) is 7% faster than three but is
not a float activation; a dot of float32 activations with the int8 weight is not given to
the library and runs at about 1 GB/s. Differentiation goes through the float product of the
converted weight (`jax.custom_jvp`): the digits' rounding has no useful derivative.

A `"bfloat16"` weight (float16 values) is multiplied as `(x @ q.astype(f).T) * s`: XLA fuses
the conversion into its matrix-vector loop; the library has no fast float16 product, and a
bfloat16 one gained little on this CPU's small per-layer matrices. The einsum spelling of
that product is the pathological one (0.13x for the LM head), so it is written `@ .T`.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Float16, Int, Int8

INT8_MAX = 127
# float16's largest finite value is just under 2**16: rows are scaled to below it.
_FLOAT16_TOP = 15


class QuantizedWeight(eqx.Module):
    """`weight ~= values * scale[..., None]`: small rows, one float scale per row.

    - `values`: `Int8[Array, "*layers rows cols"]` (scheme `"int8"`) or
      `Float16[Array, "*layers rows cols"]` (scheme `"bfloat16"`; see the module docstring).
    - `scale`: `Float[Array, "*layers rows"]`, in the model's float dtype (which is also the
      dtype products are computed in).
    - `pinned`: keep a `"bfloat16"` weight's conversion inside any loop that uses the weight
      (see `matmul_transposed`; int8 weights are not converted); `quantize` sets it for
      weights without a layers axis.
    """

    values: Int8[Array, "*layers rows cols"] | Float16[Array, "*layers rows cols"]
    scale: Float[Array, "*layers rows"]
    pinned: bool = eqx.field(static=True, default=False)

    @staticmethod
    def quantize(weight: Float[Array, "*layers rows cols"], scheme: str = "int8") -> "QuantizedWeight":
        """`weight` stored under `scheme`. `"int8"` rounds each row to the nearest multiple of
        its scale (a row of zeros gets scale 0, and zeros); `"bfloat16"` rounds each element
        to bfloat16 and stores it exactly (module docstring). A weight without a layers axis
        is `pinned`."""
        # Rounding is `reduce_precision`: under `jit` XLA may drop a float32 -> bfloat16 ->
        # float32 round trip of `astype`s (it allows excess precision), and the stored values
        # would then disagree with the scale.
        w = weight.astype(jnp.float32)
        if scheme == "bfloat16":
            w = _round_to(w, jnp.bfloat16)
            # the largest element is f * 2**exponent, f in [0.5, 1); not below float32's
            # smallest normal power of two (a row that small fits anyway)
            _, exponent = jnp.frexp(jnp.max(jnp.abs(w), axis=-1))
            scale = jnp.ldexp(jnp.ones_like(w[..., 0]), jnp.maximum(exponent - 1 - _FLOAT16_TOP, -126))
            values = (w / scale[..., None]).astype(jnp.float16)
            return QuantizedWeight(values, scale.astype(weight.dtype), pinned=weight.ndim == 2)
        stored = _round_to(jnp.max(jnp.abs(w), axis=-1) / INT8_MAX, weight.dtype)  # the scale as stored
        safe = jnp.where(stored == 0, jnp.ones_like(stored), stored)
        values = jnp.clip(jnp.round(w / safe[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
        return QuantizedWeight(values, stored.astype(weight.dtype), pinned=weight.ndim == 2)

    @property
    def scheme(self) -> str:
        """`"int8"` or `"bfloat16"`."""
        return "int8" if self.values.dtype == jnp.int8 else "bfloat16"

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
        scale = self.scale.astype(x.dtype)
        if self.scheme == "int8":
            return _int8_matmul_transposed(x, self.values, scale)
        # Inside generation's decode loop a weight used outside the layer scan (the LM head) is
        # loop-invariant, and XLA hoists its conversion out of the loop: every step then read
        # a float copy (the head ran at float32 speed). Tying the weight to this step's
        # activations keeps the conversion in the loop. Slices of stacked weights are taken
        # per layer anyway; there the barrier only cost speed (measured 5-15%).
        values = self.values
        if self.pinned:
            x, values = lax.optimization_barrier((x, values))
        return (x @ values.astype(x.dtype).T) * scale

    def take_rows(self, ids: Int[Array, "*shape"]) -> Float[Array, "*shape cols"]:
        """The float rows at `ids` (an embedding lookup)."""
        rows = jnp.take(self.values, ids, axis=0).astype(self.scale.dtype)
        return rows * jnp.take(self.scale, ids, axis=0)[..., None]


# An activation row as int8 digits: three give float32's precision (module docstring).
_DIGITS = 3
# Each digit after the first counts the remainder of the one before in steps of 1/254 of its
# step: the remainder is within half a step, so the next digit is within +-127 too.
_DIGIT_RATIO = 2 * INT8_MAX


def _int8_digit_product(
    x: Float[Array, "*batch cols"], values: Int8[Array, "rows cols"]
) -> Float[Array, "*batch rows"]:
    """`x @ values.T` in float32, computed as int8 x int8 products of `x`'s digits."""
    x = x.astype(jnp.float32)
    top = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    step = jnp.where(top > 0, top / INT8_MAX, jnp.ones_like(top))
    digits, steps, rest = [], [], x
    for _ in range(_DIGITS):
        digit = jnp.clip(jnp.round(rest / step), -INT8_MAX, INT8_MAX)
        digits.append(digit)
        steps.append(step)
        rest = rest - digit * step
        step = step / _DIGIT_RATIO
    # [digits, *batch, cols] x [rows, cols] -> [digits, *batch, rows], summed exactly in int32
    sums = lax.dot_general(
        jnp.stack(digits).astype(jnp.int8),
        values,
        (((x.ndim,), (1,)), ((), ())),
        preferred_element_type=jnp.int32,
    ).astype(jnp.float32)
    # written out digit by digit: a reduction over the digit axis ran 1.3x slower
    y = sums[0] * steps[0]
    for sum_, step_ in zip(sums[1:], steps[1:], strict=True):
        y = y + sum_ * step_
    return y


@jax.custom_jvp
def _int8_matmul_transposed(
    x: Float[Array, "*batch cols"], values: Int8[Array, "rows cols"], scale: Float[Array, " rows"]
) -> Float[Array, "*batch rows"]:
    return _int8_digit_product(x, values).astype(x.dtype) * scale


@_int8_matmul_transposed.defjvp
def _int8_matmul_transposed_jvp(primals, tangents):
    x, values, scale = primals
    dx, _, dscale = tangents
    unscaled = _int8_digit_product(x, values).astype(x.dtype)
    dy = (dx @ values.astype(dx.dtype).T) * scale + unscaled * dscale
    return unscaled * scale, dy


def _round_to(x: Float[Array, "*shape"], dtype: Any) -> Float[Array, "*shape"]:
    """float32 `x` rounded to the nearest value of the float `dtype` (ties to even), in float32."""
    info = jnp.finfo(dtype)
    return lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def concatenate_rows(weights: list["QuantizedWeight"]) -> "QuantizedWeight":
    """The rows of several unstacked weights of one scheme, in order, as one weight."""
    return QuantizedWeight(jnp.concatenate([w.values for w in weights]), jnp.concatenate([w.scale for w in weights]))
