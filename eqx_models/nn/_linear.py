"""Linear and embedding layers acting on the last axis of any leading shape.

A model holds an `AbstractLinear` wherever it projects features: a plain `Linear`, or a
layer that wraps one (an `Adapter` such as LoRA, `eqx_models.lora`) or stores its weights
otherwise. Models call these layers, or `fused_projections`, and never read their weights.
"""

import abc
import itertools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._quantized import QuantizedWeight, concatenate_rows
from ._stack import whole_weights

# Measured on XLA:CPU (jax 0.10), one token against a layer's slice of stacked weights inside
# `lax.scan`: written as `x @ W.T`, the slice is read in place at full memory bandwidth while
# `d_in <= 3072`, but from `d_in = 4096` up the same form drops to about 1 GB/s; written as an
# einsum, the slice is first copied out (about 6x slower than in place, yet never pathological).
# A whole weight (outside the scan, or a layer of a stack stored separately) is the opposite
# case: the einsum goes to the library matrix product, while `x @ W.T` inside a decode loop
# let XLA hoist a transposed copy of the weight out of the loop and read it at a third of the
# speed (GPT-Neo-125M decoding, layers stored separately: 48 tok/s with einsums, 9 with `@ .T`).
_IN_PLACE_MAX_D_IN = 3072


def matmul_transposed(
    x: Float[Array, "*batch d_in"], weight: Float[Array, "d_out d_in"] | QuantizedWeight
) -> Float[Array, "*batch d_out"]:
    """`x @ weight.T`, in the form XLA runs fastest for this `d_in` (see above; a quantised
    weight has one form, `QuantizedWeight.matmul_transposed`)."""
    if isinstance(weight, QuantizedWeight):
        return weight.matmul_transposed(x)
    if weight.shape[1] <= _IN_PLACE_MAX_D_IN and not whole_weights():
        return x @ weight.T
    return jnp.einsum("...i,oi->...o", x, weight)


class AbstractLinear(eqx.Module):
    """A layer mapping the last axis `d_in -> d_out`, as `x W^T + b` does."""

    @abc.abstractmethod
    def __call__(self, x: Float[Array, "*batch d_in"]) -> Float[Array, "*batch d_out"]:
        """The projection of `x`, in the layer's `dtype`."""

    @property
    @abc.abstractmethod
    def dtype(self) -> DTypeLike:
        """The floating dtype the layer computes in (inputs are cast to it by callers that mix dtypes)."""

    @property
    @abc.abstractmethod
    def features(self) -> tuple[int, int]:
        """`(d_out, d_in)`, also when the layer is stored stacked over layers."""


class Linear(AbstractLinear):
    """`y = x W^T + b` on the last axis. The weight keeps PyTorch's `[out, in]` layout,
    so HF checkpoints need no transpose. The weight may be stored quantised, as int8 or
    bfloat16 rows with their scales (`QuantizedWeight`, made by `eqx_models.quantize`); the
    layer computes the same way."""

    weight: Float[Array, "d_out d_in"] | QuantizedWeight
    bias: Float[Array, " d_out"] | None

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        use_bias: bool = True,
        init_std: float = 0.02,
        dtype: DTypeLike = jnp.float32,
        key: PRNGKeyArray,
    ):
        self.weight = init_std * jax.random.normal(key, (d_out, d_in), dtype)
        self.bias = jnp.zeros((d_out,), dtype) if use_bias else None

    def __call__(self, x: Float[Array, "*batch d_in"]) -> Float[Array, "*batch d_out"]:
        y = matmul_transposed(x, self.weight)
        return y if self.bias is None else y + self.bias

    @property
    def dtype(self) -> DTypeLike:
        return self.weight.dtype

    @property
    def features(self) -> tuple[int, int]:
        d_out, d_in = self.weight.shape[-2:]
        return d_out, d_in


class Adapter(AbstractLinear):
    """A layer plus a learned correction, `base(x) + delta(x)` (LoRA: `eqx_models.lora`).
    `fused_projections` runs the bases of several adapters as one product and adds each
    one's `delta`, so an adapted attention keeps its fused query/key/value projection."""

    base: eqx.AbstractVar[AbstractLinear]

    @abc.abstractmethod
    def delta(self, x: Float[Array, "*batch d_in"]) -> Float[Array, "*batch d_out"]:
        """The correction added to `base(x)`, in the base's dtype."""

    def __call__(self, x: Float[Array, "*batch d_in"]) -> Float[Array, "*batch d_out"]:
        return self.base(x) + self.delta(x)

    @property
    def dtype(self) -> DTypeLike:
        return self.base.dtype

    @property
    def features(self) -> tuple[int, int]:
        return self.base.features


class Embedding(eqx.Module):
    """A lookup table `[vocab, dim]` indexed by integer ids of any shape; the table may be
    stored quantised (`QuantizedWeight`, one scale per token)."""

    weight: Float[Array, "vocab dim"] | QuantizedWeight

    def __init__(
        self,
        num_embeddings: int,
        dim: int,
        *,
        init_std: float = 0.02,
        dtype: DTypeLike = jnp.float32,
        key: PRNGKeyArray,
    ):
        self.weight = init_std * jax.random.normal(key, (num_embeddings, dim), dtype)

    def __call__(self, ids: Int[Array, "*shape"]) -> Float[Array, "*shape dim"]:
        if isinstance(self.weight, QuantizedWeight):
            return self.weight.take_rows(ids)
        return jnp.take(self.weight, ids, axis=0)

    def attend(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch vocab"]:
        """Logits against every embedding row (a tied output head)."""
        if isinstance(self.weight, QuantizedWeight):
            return self.weight.matmul_transposed(x)
        return jnp.einsum("...d,vd->...v", x, self.weight)


# Measured on XLA:CPU (jax 0.10, GPT-Neo-125M's shape, docs/benchmarks.md): concatenating
# q/k/v weights inside the layer scan copies them at every call. For one token (a decode
# step) that copy costs more than the three products save: greedy decoding ran 15% (float32)
# to 38% (int8) faster with three products. For a 512-token forward one product over the
# concatenated weights is 1-6% faster. Only a single token (a decode step) runs unfused: in
# between nothing was measured, and the choice changes bfloat16 rounding (a bfloat16-compute
# training test at 12 tokens drifted 7% from float32 unfused, within 5% fused).
# Whole weights (layers stored separately, `separate_layers`) are never fused: there the
# concatenation is a copy the unfused products do not make, while a stacked layer's slices
# are copied for the library product anyway. 512-token forward, unfused against fused,
# separate layers (2026-12-04, one interleaved run): GPT-Neo-125M 0.945x the time, Gemma-2B
# width 0.988x, XGLM-564M width 0.975x.
_FUSE_MIN_TOKENS = 2


def fused_projections(x: Float[Array, "*batch d_in"], layers: tuple[AbstractLinear, ...]) -> tuple[Array, ...]:
    """Applies several layers to the same input. For more than one token,
    `Linear`s (and the `Linear` bases of `Adapter`s, whose deltas are added after) run as one
    matmul over their concatenated weights; for one token (a decode step), layers stored
    separately, or any other layer kind, one by one (see above)."""
    bases = tuple(layer.base if isinstance(layer, Adapter) else layer for layer in layers)
    tokens = math.prod(x.shape[:-1])
    if tokens >= _FUSE_MIN_TOKENS and not whole_weights() and all(isinstance(base, Linear) for base in bases):
        outputs = _fused_linear(x, bases)
    else:
        outputs = tuple(base(x) for base in bases)
    return tuple(
        y + layer.delta(x) if isinstance(layer, Adapter) else y for y, layer in zip(outputs, layers, strict=True)
    )


def _fused_linear(x: Float[Array, "*batch d_in"], layers: tuple[Linear, ...]) -> tuple[Array, ...]:
    weights = [layer.weight for layer in layers]
    schemes = {w.scheme if isinstance(w, QuantizedWeight) else None for w in weights}
    if None not in schemes and len(schemes) == 1:
        weight = concatenate_rows(weights)
    else:  # float, or a mix (a partly quantised tree): the quantised ones in float
        weight = jnp.concatenate([w.dequantize() if isinstance(w, QuantizedWeight) else w for w in weights])
    y = matmul_transposed(x, weight)
    if any(layer.bias is not None for layer in layers):
        biases = [jnp.zeros(m.weight.shape[:1], m.weight.dtype) if m.bias is None else m.bias for m in layers]
        y = y + jnp.concatenate(biases)
    splits = [layer.weight.shape[0] for layer in layers]
    return tuple(jnp.split(y, list(itertools.accumulate(splits[:-1])), axis=-1))
