"""BigBird's block-sparse attention, computed block by block so that time and memory grow
linearly with the sequence length.

With `nb` blocks of `b` tokens, each query block attends to:

- blocks 0 and `nb - 1` (global rows): every key;
- block 1 and block `nb - 2`: blocks 0, 1, 2 and the last (respectively 0 and the last three)
  plus `r` random blocks;
- a middle block `i`: the first and last blocks, the sliding window `i - 1, i, i + 1` and `r`
  random blocks.

The random blocks come from a plan `[heads, nb - 2, r]` (one row per non-global query block).
At inference HF's plan is all zeros (block 0, repeated `r` times, so it counts `r + 1` times
in the softmax); `random_plan` draws a fresh one from a PRNG key for training. Masked keys get
HF's additive -10000 penalty (`nn.BIGBIRD_ADD`); padded queries output zeros.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .. import nn


class SparsePlan(eqx.Module):
    """What block-sparse attention needs besides Q/K/V: which tokens are real and, per head
    and non-global query block, the random key blocks."""

    valid: Bool[Array, " seq"]
    rand_blocks: Int[Array, "heads rows rand"]
    block_size: int = eqx.field(static=True)


def inference_plan(num_heads: int, num_blocks: int, num_rand: int) -> Int[Array, "heads rows rand"]:
    """HF's deterministic inference plan: every random block is block 0."""
    return jnp.zeros((num_heads, num_blocks - 2, num_rand), jnp.int32)


def random_plan(key: PRNGKeyArray, num_heads: int, num_blocks: int, num_rand: int) -> Int[Array, "heads rows rand"]:
    """A training plan: for each head and query block `i` in `1..nb-2`, `num_rand` distinct
    key blocks drawn uniformly from those it does not already see (not 0, not the last, not
    `i - 1, i, i + 1`). Needs `num_blocks >= num_rand + 5`."""
    rows = jnp.arange(1, num_blocks - 1)
    candidates = jnp.arange(num_blocks)

    def one_row(key, row):
        seen = (candidates == 0) | (candidates == num_blocks - 1) | (jnp.abs(candidates - row) <= 1)
        # random keys, seen blocks pushed to the end; the first `num_rand` are a uniform draw
        order = jnp.argsort(jnp.where(seen, 2.0, jax.random.uniform(key, (num_blocks,))))
        return order[:num_rand].astype(jnp.int32)

    keys = jax.random.split(key, (num_heads, num_blocks - 2))
    return jax.vmap(lambda head_keys: jax.vmap(one_row)(head_keys, rows))(keys)


def block_sparse_attention(
    q: Float[Array, "seq heads head_dim"],
    k: Float[Array, "seq heads head_dim"],
    v: Float[Array, "seq heads head_dim"],
    plan: SparsePlan,
) -> Float[Array, "seq heads head_dim"]:
    """Block-sparse softmax attention scaled by `head_dim ** -0.5`; `seq` must be a multiple
    of `plan.block_size` with at least `5 + 2 * rand` blocks, as upstream."""
    n, h, d = q.shape
    b = plan.block_size
    nb = n // b
    scale = d**-0.5
    qh, kh, vh = (t.transpose(1, 0, 2) for t in (q, k, v))  # [h, n, d]
    qb, kb, vb = (t.reshape(h, nb, b, d) for t in (qh, kh, vh))  # [h, nb, b, d]
    key_ok = plan.valid
    blocked_ok = key_ok.reshape(nb, b)
    # random blocks gathered per head: [h, nb - 2, r, b, d] -> [h, nb - 2, r * b, d]
    rand_k = jax.vmap(lambda blocks, idx: blocks[idx])(kb, plan.rand_blocks)
    rand_v = jax.vmap(lambda blocks, idx: blocks[idx])(vb, plan.rand_blocks)
    rows, r = plan.rand_blocks.shape[1], plan.rand_blocks.shape[2]
    rand_k, rand_v = (t.reshape(h, rows, r * b, d) for t in (rand_k, rand_v))
    rand_ok = blocked_ok[plan.rand_blocks].reshape(h, rows, r * b)

    def attend(queries, keys, values, ok):
        # [h, m, b, d] x [h, m, K, d] -> [h, m, b, K]; ok: [.., m, K] (broadcast over heads if 2-d)
        scores = jnp.einsum("hmqd,hmkd->hmqk", queries, keys, preferred_element_type=jnp.float32) * scale
        probs = nn.masked_softmax(scores, ok[..., None, :], nn.BIGBIRD_ADD).astype(values.dtype)
        return jnp.einsum("hmqk,hmkd->hmqd", probs, values)

    # global query blocks 0 and nb - 1: every key
    global_q = qb[:, jnp.array([0, nb - 1])]
    global_ctx = attend(global_q, jnp.stack([kh, kh], 1), jnp.stack([vh, vh], 1), jnp.stack([key_ok, key_ok]))

    # blocks 1 and nb - 2: three neighbouring blocks and a global one, plus their random blocks
    def edge(near: list[int], rand_row: int):
        blocks = jnp.array(near)
        keys = jnp.concatenate([kb[:, blocks].reshape(h, 4 * b, d), rand_k[:, rand_row]], axis=1)
        values = jnp.concatenate([vb[:, blocks].reshape(h, 4 * b, d), rand_v[:, rand_row]], axis=1)
        ok = jnp.concatenate([jnp.broadcast_to(blocked_ok[blocks].reshape(4 * b), (h, 4 * b)), rand_ok[:, rand_row]], 1)
        return keys, values, ok

    k1, v1, ok1 = edge([0, 1, 2, nb - 1], 0)
    k2, v2, ok2 = edge([0, nb - 3, nb - 2, nb - 1], rows - 1)
    edge_ctx = attend(
        qb[:, jnp.array([1, nb - 2])], jnp.stack([k1, k2], 1), jnp.stack([v1, v2], 1), jnp.stack([ok1, ok2], 1)
    )

    # middle blocks 2..nb-3: first block, sliding window of three, random blocks, last block.
    # Scores are computed per key group and joined, and the context summed per group, so the
    # keys and values are never copied into one [h, m, (5 + r) b, d] tensor.
    m = nb - 4
    mid_q = qb[:, 2:-2]  # [h, m, b, d]
    windows = [slice(1, nb - 3), slice(2, nb - 2), slice(3, nb - 1)]  # blocks i - 1, i, i + 1
    fixed = lambda t, i: jnp.einsum("hmqd,hkd->hmqk", mid_q, t[:, i], preferred_element_type=jnp.float32)  # noqa: E731
    banded = lambda t, w: jnp.einsum("hmqd,hmkd->hmqk", mid_q, t[:, w], preferred_element_type=jnp.float32)  # noqa: E731
    scores = (
        jnp.concatenate(
            [
                fixed(kb, 0),
                *(banded(kb, w) for w in windows),
                jnp.einsum("hmqd,hmkd->hmqk", mid_q, rand_k[:, 1:-1], preferred_element_type=jnp.float32),
                fixed(kb, nb - 1),
            ],
            axis=-1,
        )
        * scale
    )  # [h, m, b, (5 + r) b]
    mid_ok = jnp.concatenate(
        [
            jnp.broadcast_to(blocked_ok[0], (h, m, b)),
            jnp.broadcast_to(jnp.concatenate([blocked_ok[w] for w in windows], axis=1), (h, m, 3 * b)),
            rand_ok[:, 1:-1],
            jnp.broadcast_to(blocked_ok[nb - 1], (h, m, b)),
        ],
        axis=2,
    )
    probs = nn.masked_softmax(scores, mid_ok[:, :, None, :], nn.BIGBIRD_ADD).astype(v.dtype)
    first_p, window_p, rand_p, last_p = jnp.split(probs, [b, 4 * b, (4 + r) * b], axis=-1)
    mid_ctx = jnp.einsum("hmqk,hkd->hmqd", first_p, vb[:, 0]) + jnp.einsum("hmqk,hkd->hmqd", last_p, vb[:, nb - 1])
    for j, w in enumerate(windows):
        mid_ctx = mid_ctx + jnp.einsum("hmqk,hmkd->hmqd", window_p[..., j * b : (j + 1) * b], vb[:, w])
    mid_ctx = mid_ctx + jnp.einsum("hmqk,hmkd->hmqd", rand_p, rand_v[:, 1:-1])

    ctx = jnp.concatenate([global_ctx[:, :1], edge_ctx[:, :1], mid_ctx, edge_ctx[:, 1:], global_ctx[:, 1:]], axis=1)
    out = ctx.reshape(h, n, d).transpose(1, 0, 2)
    return out * plan.valid[:, None, None].astype(out.dtype)


def sparse_plan_mask(plan: SparsePlan) -> Bool[Array, "heads seq seq"]:
    """The dense `[heads, seq, seq]` mask that attends to exactly the keys the block-sparse
    pattern covers (valid keys only). Equal to block-sparse attention when the plan's random
    blocks are distinct from each other and from the blocks a row already sees."""
    n = plan.valid.shape[0]
    b = plan.block_size
    nb = n // b
    h = plan.rand_blocks.shape[0]
    q_block = jnp.arange(nb)[:, None]
    k_block = jnp.arange(nb)[None, :]
    near = (jnp.abs(q_block - k_block) <= 1) | (k_block == 0) | (k_block == nb - 1)
    near = near | (q_block == 0) | (q_block == nb - 1)
    rand = jnp.zeros((h, nb, nb), bool)
    rows = jnp.arange(1, nb - 1)
    rand = jax.vmap(lambda r, plan_h: r.at[rows[:, None], plan_h].set(True))(rand, plan.rand_blocks)
    blocks = near[None] | rand  # [h, nb, nb]
    dense = jnp.repeat(jnp.repeat(blocks, b, axis=1), b, axis=2)
    return dense & plan.valid[None, None, :]
