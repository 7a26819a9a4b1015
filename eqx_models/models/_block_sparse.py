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
    #: `rand_blocks` is `inference_plan` (every random block is block 0): each row's random
    #: keys are then copies of its first block, scored once and counted `rand` more times
    #: (a 5-block key set instead of `5 + rand` blocks; 3/8 fewer products at `rand = 3`).
    random_is_first: bool = eqx.field(static=True, default=False)


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


#: Query blocks per step of the loop over rows 1..nb-2. Each step's scores (`heads x G x b x
#: (5 + r) b` floats, 1.5 MiB per block at base width and block 64) stay in cache from the
#: products through the softmax; one batched product over all rows at once wrote and re-read
#: ~100 MiB of scores at 4096 tokens and ran at a fifth of the machine's matmul rate. 1 to 4
#: measured alike on XLA:CPU (2 cores); 2 was the fastest at 1024 and 4096 tokens.
QUERY_BLOCKS_PER_STEP = 2


def block_sparse_attention(
    q: Float[Array, "seq heads head_dim"],
    k: Float[Array, "seq heads head_dim"],
    v: Float[Array, "seq heads head_dim"],
    plan: SparsePlan,
) -> Float[Array, "seq heads head_dim"]:
    """Block-sparse softmax attention scaled by `head_dim ** -0.5`; `seq` must be a multiple
    of `plan.block_size` with at least `5 + 2 * rand` blocks, as upstream.

    The two global rows are one product against every key. Rows `1..nb-2` run in a loop of
    `QUERY_BLOCKS_PER_STEP` query blocks: each step gathers its key blocks (first, the
    window `i - 1, i, i + 1` as shifted slices of one contiguous run, the random ones, last)
    into one key axis and does one score product, one softmax and one value product. Rows 1
    and `nb - 2` take the same shape: their window already holds the first (last) block, so
    the extra copy is masked out, which leaves upstream's key set (a masked key's `-10000`
    penalty underflows to an exact zero probability). With `plan.random_is_first` the random
    keys are not gathered: block 0's scores get `log(copies)` added instead, the same softmax."""
    n, h, d = q.shape
    b = plan.block_size
    nb = n // b
    scale = d**-0.5
    qh, kh, vh = (t.transpose(1, 0, 2) for t in (q, k, v))  # [h, n, d]
    qb, kb, vb = (t.reshape(h, nb, b, d) for t in (qh, kh, vh))  # [h, nb, b, d]
    ok = jnp.broadcast_to(plan.valid.reshape(nb, b, 1), (h, nb, b, 1))  # [h, nb, b, 1]: as a key block
    r = plan.rand_blocks.shape[2]

    # global query blocks 0 and nb - 1: every key
    # [h, 2b, d] x [h, n, d] -> [h, 2b, n]
    global_q = jnp.concatenate([qb[:, 0], qb[:, nb - 1]], axis=1)
    scores = jnp.einsum("hqd,hkd->hqk", global_q, kh, preferred_element_type=jnp.float32) * scale
    probs = nn.masked_softmax(scores, plan.valid, nn.BIGBIRD_ADD).astype(v.dtype)
    # [h, 2b, n] x [h, n, d] -> [h, 2, b, d]
    global_ctx = jnp.einsum("hqk,hkd->hqd", probs, vh).reshape(h, 2, b, d)

    # rows 1..nb-2 in steps of g query blocks; the last step starts early to end at row nb - 2
    rows = nb - 2
    g = min(QUERY_BLOCKS_PER_STEP, rows)
    steps = -(-rows // g)
    starts = jnp.minimum(jnp.arange(steps) * g, rows - g) + 1

    def step(start):
        row = start + jnp.arange(g)  # [g] query blocks
        rand = jax.lax.dynamic_slice_in_dim(plan.rand_blocks, start - 1, g, axis=1)  # [h, g, r]

        def keys(t):  # [h, nb, b, x] -> [h, g, K, x]: first, window, random (unless copies of first), last
            run = jax.lax.dynamic_slice_in_dim(t, start - 1, g + 2, axis=1)  # blocks start - 1 .. start + g
            ends = (t.shape[0], g, *t.shape[2:])
            parts = [
                jnp.broadcast_to(t[:, :1], ends),
                run[:, :g],
                run[:, 1 : g + 1],
                run[:, 2:],
                *([] if plan.random_is_first else [jax.vmap(lambda blocks, idx: blocks[idx])(t, rand)]),  # [h,g,r,b,x]
                jnp.broadcast_to(t[:, nb - 1 :], ends),
            ]
            return jnp.concatenate([p.reshape(h, g, -1, *t.shape[3:]) for p in parts], axis=2)

        key_ok = keys(ok)[..., 0]  # [h, g, K]
        width = key_ok.shape[-1]
        first, last = jnp.arange(width) < b, jnp.arange(width) >= width - b
        # [h, g, b, d] x [h, g, K, d] -> [h, g, b, K]
        scores = jnp.einsum(
            "hgqd,hgkd->hgqk",
            jax.lax.dynamic_slice_in_dim(qb, start, g, axis=1),
            keys(kb),
            preferred_element_type=jnp.float32,
        )
        scores = scores * scale
        # copies of block 0 in the row's key set besides a window one: 1, plus the random ones if
        # they are block 0 too; row 1's window holds block 0 and row nb - 2's the last block
        copies = jnp.where(row == 1, 0, 1) + (r if plan.random_is_first else 0)  # [g]
        if plan.random_is_first:  # weight the first block's keys by their count: exp(s + log c) = c exp(s)
            count = jnp.log(jnp.maximum(copies, 1).astype(jnp.float32))
            scores = scores + jnp.where(first, count[:, None], 0.0)[None, :, None, :]
        key_ok = key_ok & ~(first & (copies == 0)[:, None]) & ~(last & (row == nb - 2)[:, None])
        probs = nn.masked_softmax(scores, key_ok[:, :, None, :], nn.BIGBIRD_ADD).astype(v.dtype)
        # [h, g, b, K] x [h, g, K, d] -> [h, g, b, d]
        return jnp.einsum("hgqk,hgkd->hgqd", probs, keys(vb))

    band_ctx = jnp.moveaxis(jax.lax.map(step, starts), 0, 1).reshape(h, steps * g, b, d)
    overlap = steps * g - rows  # rows the last step recomputed
    band_ctx = jnp.concatenate([band_ctx[:, : (steps - 1) * g], band_ctx[:, (steps - 1) * g + overlap :]], axis=1)

    ctx = jnp.concatenate([global_ctx[:, :1], band_ctx, global_ctx[:, 1:]], axis=1)  # [h, nb, b, d]
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
