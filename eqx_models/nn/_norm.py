"""Normalisation layers, computed in float32 and cast back to the input dtype."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Float


class LayerNorm(eqx.Module):
    """LayerNorm over the last axis with learned scale (`weight`) and `bias`."""

    weight: Float[Array, " dim"]
    bias: Float[Array, " dim"] | None
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, *, eps: float = 1e-5, use_bias: bool = True, dtype: DTypeLike = jnp.float32):
        self.weight = jnp.ones((dim,), dtype)
        self.bias = jnp.zeros((dim,), dtype) if use_bias else None
        self.eps = eps

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jnp.reciprocal(jnp.sqrt(var + self.eps))
        h = h.astype(x.dtype) * self.weight
        return h if self.bias is None else h + self.bias


class RMSNorm(eqx.Module):
    """RMS normalisation over the last axis, scaled by `offset + weight`.

    Gemma stores `weight` around 0 and uses `offset=1` (the `1 + weight` of its checkpoints);
    T5-style norms use `offset=0`. Normalisation and scaling are done in float32 and the
    result is cast back to the input dtype.
    """

    weight: Float[Array, " dim"]
    eps: float = eqx.field(static=True)
    offset: float = eqx.field(static=True)

    def __init__(self, dim: int, *, eps: float = 1e-6, offset: float = 0.0, dtype: DTypeLike = jnp.float32):
        self.weight = jnp.zeros((dim,), dtype) if offset else jnp.ones((dim,), dtype)
        self.eps = eps
        self.offset = offset

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps)
        return (h * (self.offset + self.weight.astype(jnp.float32))).astype(x.dtype)
