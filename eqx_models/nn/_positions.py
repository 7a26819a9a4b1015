"""Position encodings computed from explicit positions: rotary angles and sinusoids."""

import math

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def rotary_angles(
    positions: Int[Array, " seq"], head_dim: int, theta: float = 10000.0
) -> tuple[Float[Array, "seq head_dim"], Float[Array, "seq head_dim"]]:
    """`(cos, sin)` of the rotary embedding in float32, the frequencies repeated over the
    two halves of `head_dim` (HF's `rotate_half` convention)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(
    x: Float[Array, "seq heads head_dim"], cos: Float[Array, "seq head_dim"], sin: Float[Array, "seq head_dim"]
) -> Float[Array, "seq heads head_dim"]:
    """Rotates each head's pairs `(x[i], x[i + head_dim/2])` by the angles; `cos`/`sin` are
    cast to `x`'s dtype first, as HF does."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, None, :].astype(x.dtype), sin[:, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def sinusoidal_embedding(
    positions: Int[Array, " seq"], dim: int, *, padding_idx: int | None = None
) -> Float[Array, "seq dim"]:
    """Fairseq/tensor2tensor sinusoids for the given row indices: `[sin(p f), cos(p f)]`
    with `f_i = exp(-i log(10000) / (dim/2 - 1))`, a zero column if `dim` is odd, and a
    zero row at `padding_idx`. Computed in float32 for any position (no table)."""
    half = dim // 2
    scale = math.log(10000) / (half - 1)
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -scale)
    angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros((emb.shape[0], 1), jnp.float32)], axis=-1)
    if padding_idx is not None:
        emb = jnp.where((positions == padding_idx)[:, None], 0.0, emb)
    return emb


def relative_position_bucket(
    relative_position: Int[Array, "*shape"], *, bidirectional: bool, num_buckets: int, max_distance: int
) -> Int[Array, "*shape"]:
    """T5's bucket of each relative position (key minus query): exact buckets for small
    distances, logarithmic ones up to `max_distance`, the last bucket beyond; half the
    buckets for each direction when `bidirectional`."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(distance < max_exact, distance, large)
