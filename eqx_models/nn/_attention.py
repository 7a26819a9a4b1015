"""The attention core shared by every model: masks, grouped KV heads, scaling, dropout.

Masks are built from *slots* (a token's index in the sequence or in the KV cache),
not from position ids: HF's causal and sliding-window masks count padding slots too,
and positions only feed the position embeddings.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

# A window this wide masks nothing: used for "global" layers stored beside "local" ones.
NO_WINDOW = 2**30


def causal_mask(
    q_slots: Int[Array, " q"],
    kv_slots: Int[Array, " kv"],
    kv_valid: Bool[Array, " kv"],
    window: Int[Array, ""] | int = NO_WINDOW,
) -> Bool[Array, "q kv"]:
    """`True` where query slot `i` may attend key slot `j`: `i - window < j <= i` and `j` valid."""
    distance = q_slots[:, None] - kv_slots[None, :]
    return (distance >= 0) & (distance < window) & kv_valid[None, :]


def padding_mask(q_len: int, kv_valid: Bool[Array, " kv"]) -> Bool[Array, "q kv"]:
    """Bidirectional mask: every query sees every valid key."""
    return jnp.broadcast_to(kv_valid[None, :], (q_len, kv_valid.shape[0]))


def dot_product_attention(
    q: Float[Array, "q heads head_dim"],
    k: Float[Array, "kv kv_heads head_dim"],
    v: Float[Array, "kv kv_heads head_dim"],
    mask: Bool[Array, "q kv"] | None = None,
    *,
    scale: float | None = None,
    bias: Float[Array, "heads q kv"] | None = None,
    dropout: eqx.nn.Dropout | None = None,
    key: PRNGKeyArray | None = None,
) -> Float[Array, "q heads head_dim"]:
    """Softmax attention with grouped KV heads (MHA, GQA and MQA alike).

    **Arguments:**
    - `q`, `k`, `v`: per-head projections; `heads` must be a multiple of `kv_heads`.
      K/V are never repeated in memory: queries are grouped onto their KV head.
    - `mask`: `True` where attention is allowed.
    - `scale`: multiplies the scores; `None` means `head_dim ** -0.5`, `1.0` none (GPT-Neo, T5).
    - `bias`: added to the scores before masking (relative position bias).
    - `dropout`, `key`: dropout on the attention probabilities.

    Scores and softmax are computed in float32; the output has `v`'s dtype.
    """
    q_len, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    if scale is None:
        scale = head_dim**-0.5
    # [q, kv_heads, groups, head_dim] x [kv, kv_heads, head_dim] -> [kv_heads, groups, q, kv]
    grouped_q = q.reshape(q_len, kv_heads, groups, head_dim)
    scores = jnp.einsum("qhgd,khd->hgqk", grouped_q, k, preferred_element_type=jnp.float32)
    if scale != 1.0:
        scores = scores * scale
    if bias is not None:
        scores = scores + bias.astype(jnp.float32).reshape(kv_heads, groups, q_len, -1)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if dropout is not None:
        probs = dropout(probs, key=key)
    # [kv_heads, groups, q, kv] x [kv, kv_heads, head_dim] -> [q, kv_heads, groups, head_dim]
    out = jnp.einsum("hgqk,khd->qhgd", probs, v)
    return out.reshape(q_len, heads, head_dim)
