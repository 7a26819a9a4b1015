"""LongT5: a T5 encoder-decoder whose encoder self-attention is local (blockwise, a
three-block window, one relative bias for every block) or transient-global (local plus
attention to per-block summaries), so time and memory grow linearly with input length.

Everything but the encoder's attention is T5's (`t5.py`): feed-forward, decoder with its
cache and cross-attention, and the model shells.

Reference: HF `modeling_flax_longt5.py` and `modeling_longt5.py` (4.57.6). Attribute names
are HF's (`shared`, `encoder.block.{i}.layer.0.LocalSelfAttention.q`, `...layer.1.DenseReluDense`,
`final_layer_norm`). The relative attention biases, which HF stores in block 0, live once per
stack so that the blocks can be scanned.
"""

import dataclasses
from typing import ClassVar, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, Shaped

from .. import nn
from ..checkpoint.keymap import Rule
from ..validation import Count, Size
from ._contract import Family
from ._runner import LayerStep, run_stack
from .t5 import (
    ConditionalGenerationShell,
    EncoderDecoderShell,
    EncoderShell,
    T5Config,
    T5Decoder,
    T5LayerFF,
    init_encoder,
    init_encoder_decoder,
    relative_bias,
    relative_bias_table,
    t5_norm,
    t5_projections,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LongT5Config(T5Config):
    """HF's `LongT5Config`: T5's fields (same names and defaults) and the encoder's attention."""

    model_type: ClassVar[str] = "longt5"
    local_radius: Count = 127
    global_block_size: Size = 16
    encoder_attention_type: Literal["local", "transient-global"] = "local"

    @property
    def block_len(self) -> int:
        return self.local_radius + 1


Bias = tuple[Float[Array, "heads block window"], Bool[Array, "blocks 1 block window"]]
#: What the transient-global attention needs beside `Bias`: the bias of each global block id
#: (row `id + 1`, so padding's -1 is row 0) towards every global block, each token's global
#: block id and validity, and which global blocks hold (or precede) real tokens. Rows for
#: single tokens are gathered per chunk of queries, never `[heads, seq, globals]` at once.
SideBias = tuple[Float[Array, "heads ids globals"], Int[Array, " seq"], Bool[Array, " seq"], Bool[Array, " globals"]]


class LongT5LocalAttention(eqx.Module):
    """Each block of `block_len` queries attends to its own and the two neighbouring blocks,
    keys within `local_radius`, with a relative bias shared by all blocks. No score scaling."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    dropout: eqx.nn.Dropout
    num_heads: int = eqx.field(static=True)
    block_len: int = eqx.field(static=True)

    def __init__(self, config: LongT5Config, *, dtype: DTypeLike, key: PRNGKeyArray):
        self.q, self.k, self.v, self.o = t5_projections(config, dtype, key)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)
        self.num_heads, self.block_len = config.num_heads, config.block_len

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        local: Bias,
        side: SideBias | None,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq dim"]:
        q, k, v = (_heads_first(t, self.num_heads) for t in nn.fused_projections(x, (self.q, self.k, self.v)))
        out = blocked_attention(q, k, v, local, None, self.block_len, self.dropout, key=key)
        return self.o(out.reshape(x.shape[0], -1))


def _three_blocks(x: Shaped[Array, "..."], *, axis: int = 0, edges: bool = True) -> Shaped[Array, "..."]:
    """Concatenates each block (along `axis`) with its neighbours: zero blocks at the edges,
    or with `edges=False` only the inner blocks, whose neighbours are the first and last."""
    if edges:
        x = jnp.pad(x, tuple((1, 1) if i == axis else (0, 0) for i in range(x.ndim)))
    count = x.shape[axis] - 2
    parts = [jax.lax.slice_in_dim(x, start, start + count, axis=axis) for start in range(3)]
    return jnp.concatenate(parts, axis=axis + 1)


def _heads_first(x: Float[Array, "seq inner"], heads: int) -> Float[Array, "heads seq head_dim"]:
    """A projection `[seq, heads * head_dim]` split into heads, heads first."""
    return nn.heads_first(x.reshape(x.shape[0], heads, -1))


def local_bias(relative_bias_table: nn.Embedding, valid: Bool[Array, " seq"], config: "LongT5Config") -> Bias:
    """What every local-attention layer adds to its scores: relative position buckets within
    the three-block window, and which keys are allowed (real, and within `local_radius`)."""
    length = config.block_len
    blocks = -(-valid.shape[0] // length)
    positions = jnp.arange(3 * length)
    relative = positions[None, :] - positions[length:-length, None]  # [block, window]
    bias = relative_bias(relative_bias_table, relative, bidirectional=True, config=config)  # [heads, block, window]
    blocked = jnp.pad(valid, (0, blocks * length - valid.shape[0])).reshape(blocks, length)
    allowed = blocked[:, :, None] & _three_blocks(blocked)[:, None, :] & (jnp.abs(relative) < length)[None]
    return bias, allowed[:, None]


def global_block_ids(
    valid: Bool[Array, " seq"], global_block_size: int
) -> tuple[Int[Array, " seq"], Int[Array, " globals"]]:
    """HF's fixed global blocks: each real token's block (`i // global_block_size`, orphan
    tokens of a last incomplete block joining the block before), -1 for padding; and per
    global block, 1 if any real token belongs to it or to a later block."""
    seq = valid.shape[0]
    step = jnp.float32(1.0 / global_block_size)
    # i / global_block_size exactly as upstream rounds it: torch's cumsum of float32 steps
    # accumulates in double and rounds once, which is (i + 1) * step rounded to float32
    # (jnp.cumsum rounds differently, and the rounding moves block boundaries)
    fixed = jnp.arange(1, seq + 1, dtype=jnp.float32) * step - step
    offset = jnp.where(valid, 1.0, -1000.0)
    ids = jnp.maximum(jnp.floor(offset + fixed - 1.0), -1.0)
    ids = jnp.where(valid, ids, -1.0).astype(jnp.int32)
    block_ends = (jnp.arange(seq) % global_block_size) == global_block_size - 1
    full_blocks = jnp.sum(block_ends & (ids >= 0)).astype(jnp.int32) - 1
    ids = jnp.where(ids < full_blocks, ids, full_blocks)
    num_globals = seq // global_block_size
    segments = (jnp.arange(num_globals) <= jnp.max(ids)).astype(jnp.int32)
    return ids, segments


def side_bias(global_relative_bias: nn.Embedding, valid: Bool[Array, " seq"], config: "LongT5Config") -> SideBias:
    """Bias of every global block id towards every global block (relative buckets of
    `global - block`), each token's block id and validity, and which global blocks a real token
    may attend (a token attends the global blocks whose validity equals its own)."""
    ids, segments = global_block_ids(valid, config.global_block_size)
    num_globals = segments.shape[0]
    # one row per id from -1 (padding) to num_globals - 1: [ids, globals]
    relative = jnp.arange(num_globals)[None, :] - jnp.arange(-1, num_globals)[:, None]
    bias = relative_bias(global_relative_bias, relative, bidirectional=True, config=config)  # [heads, ids, globals]
    return bias, ids, valid, segments.astype(bool)


#: Queries are processed in chunks of whole blocks holding at most this many float32 scores
#: (local and side together; at least one block), so memory stays bounded for any length.
#: Measured at base width (12 heads, blocks of 128): 2**22 (chunks of 16 MiB of scores) ran
#: 2k tokens twice as fast as 2**24 and 16k tokens as fast, in less memory.
_CHUNK_SCORES = 2**22


def blocked_attention(
    q: Float[Array, "heads seq head_dim"],
    k: Float[Array, "heads seq head_dim"],
    v: Float[Array, "heads seq head_dim"],
    local: Bias,
    side: tuple[Float[Array, "heads globals head_dim"], Float[Array, "heads globals head_dim"], SideBias] | None,
    block_len: int,
    dropout: eqx.nn.Dropout,
    *,
    key: PRNGKeyArray | None = None,
) -> Float[Array, "seq heads head_dim"]:
    """LongT5's encoder attention: each block of `block_len` queries attends its own and the
    two neighbouring key blocks (`local`: relative bias and mask) and, when `side` is given
    (`side_k`, `side_v` and `SideBias`), every global block too, with one softmax over the
    local and side scores. No score scaling.

    Inputs are heads first (`nn.heads_first`), so that every product is a plain batched
    matmul; the output is sequence first, ready for the output projection. Chunks of query
    blocks run one after another (`jax.lax.map`), so neither the scores nor the side bias
    exist for all queries at once: memory is bounded by `_CHUNK_SCORES`, not by the length."""
    (bias, allowed), (heads, seq, _) = local, q.shape
    blocks = allowed.shape[0]
    width = 3 * block_len + (0 if side is None else side[0].shape[1])
    chunks = -(-blocks // max(1, _CHUNK_SCORES // (heads * block_len * width)))
    per_chunk = -(-blocks // chunks)  # fewer than `chunks` padding blocks
    rows = per_chunk * block_len
    padded = chunks * rows
    q = jnp.pad(q, ((0, 0), (0, padded - seq), (0, 0)))
    # keys and values with one zero block before and after, so that every chunk slices its window
    k, v = (jnp.pad(t, ((0, 0), (block_len, padded - seq + block_len), (0, 0))) for t in (k, v))
    # [blocks, 1, block, window] -> [1, blocks, block, window], to broadcast over heads
    allowed = jnp.pad(allowed, ((0, chunks * per_chunk - blocks), (0, 0), (0, 0), (0, 0))).swapaxes(0, 1)
    if side is not None:
        side_k, side_v, (side_bias, ids, valid, segments) = side
        ids = jnp.pad(ids, (0, padded - seq), constant_values=-1)
        valid = jnp.pad(valid, (0, padded - seq))

    def chunk(index: Int[Array, ""]) -> Float[Array, "rows heads head_dim"]:
        start = index * rows
        qc = jax.lax.dynamic_slice_in_dim(q, start, rows, axis=1)  # [h, rows, d]
        # [h, per_chunk + 2, block, d] -> [h, per_chunk, 3 * block, d]: blocks i - 1, i, i + 1
        k3, v3 = (
            _three_blocks(
                jax.lax.dynamic_slice_in_dim(t, start, rows + 2 * block_len, axis=1).reshape(
                    heads, per_chunk + 2, block_len, -1
                ),
                axis=1,
                edges=False,
            )
            for t in (k, v)
        )
        chunk_allowed = jax.lax.dynamic_slice_in_dim(allowed, index * per_chunk, per_chunk, axis=1)
        # [h, b, block, d] x [h, b, 3 * block, d] -> [h, b, block, 3 * block]
        qb = qc.reshape(heads, per_chunk, block_len, -1)
        scores = jnp.einsum("hbqd,hbkd->hbqk", qb, k3, preferred_element_type=jnp.float32) + bias[:, None]
        if side is not None:
            chunk_ids = jax.lax.dynamic_slice_in_dim(ids, start, rows)
            chunk_valid = jax.lax.dynamic_slice_in_dim(valid, start, rows)
            # [h, rows, d] x [h, globals, d] -> [h, rows, globals]; each token's bias row by its id
            side_scores = jnp.einsum("hmd,hgd->hmg", qc, side_k, preferred_element_type=jnp.float32)
            side_scores = (side_scores + side_bias[:, chunk_ids + 1]).reshape(heads, per_chunk, block_len, -1)
            side_allowed = (chunk_valid[:, None] == segments[None, :]).reshape(1, per_chunk, block_len, -1)
            scores = jnp.concatenate([scores, side_scores], axis=-1)
            chunk_allowed = jnp.concatenate([chunk_allowed, side_allowed], axis=-1)
        chunk_key = None if key is None else jax.random.fold_in(key, index)
        probs = dropout(nn.masked_softmax(scores, chunk_allowed, nn.LONGT5_ADD), key=chunk_key).astype(v.dtype)
        # [h, b, block, 3 * block] x [h, b, 3 * block, d] -> [h, rows, d]
        out = jnp.einsum("hbqk,hbkd->hbqd", probs[..., : 3 * block_len], v3).reshape(heads, rows, -1)
        if side is not None:
            # [h, rows, globals] x [h, globals, d] -> [h, rows, d]
            side_probs = probs[..., 3 * block_len :].reshape(heads, rows, -1)
            out = out + jnp.einsum("hmg,hgd->hmd", side_probs, side_v)
        return out.swapaxes(0, 1)

    out = chunk(jnp.int32(0)) if chunks == 1 else jax.lax.map(chunk, jnp.arange(chunks)).reshape(padded, heads, -1)
    return out[:seq]


class LongT5TransientGlobalAttention(eqx.Module):
    """Local attention plus attention to one summary per fixed block of `global_block_size`
    tokens (their normalised sum), computed afresh in every layer."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    global_input_layer_norm: nn.RMSNorm
    dropout: eqx.nn.Dropout
    num_heads: int = eqx.field(static=True)
    block_len: int = eqx.field(static=True)

    def __init__(self, config: LongT5Config, *, dtype: DTypeLike, key: PRNGKeyArray):
        self.q, self.k, self.v, self.o = t5_projections(config, dtype, key)
        self.global_input_layer_norm = t5_norm(config, dtype)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)
        self.num_heads, self.block_len = config.num_heads, config.block_len

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        local: Bias,
        side: SideBias,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq dim"]:
        seq, (_, block_ids, _, segments) = x.shape[0], side
        num_globals = segments.shape[0]
        # each global input sums its block's tokens (padding, id -1, is dropped); a segment sum
        # is linear in length where upstream's one-hot matmul is quadratic
        sums = jax.ops.segment_sum(x, jnp.where(block_ids >= 0, block_ids, num_globals), num_segments=num_globals + 1)
        global_inputs = self.global_input_layer_norm(sums[:num_globals])
        q, k, v = (_heads_first(t, self.num_heads) for t in nn.fused_projections(x, (self.q, self.k, self.v)))
        side_k, side_v = (_heads_first(t, self.num_heads) for t in (self.k(global_inputs), self.v(global_inputs)))
        out = blocked_attention(q, k, v, local, (side_k, side_v, side), self.block_len, self.dropout, key=key)
        return self.o(out.reshape(seq, -1))


class LongT5LayerTransientGlobalSelfAttention(eqx.Module):
    TransientGlobalSelfAttention: LongT5TransientGlobalAttention
    layer_norm: nn.RMSNorm
    dropout: eqx.nn.Dropout

    def __init__(self, config: LongT5Config, *, dtype: DTypeLike, key: PRNGKeyArray):
        self.TransientGlobalSelfAttention = LongT5TransientGlobalAttention(config, dtype=dtype, key=key)
        self.layer_norm = t5_norm(config, dtype)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)

    def __call__(self, x: Float[Array, "seq dim"], *bias_and_ids, key) -> Float[Array, "seq dim"]:
        k1, k2 = nn.split_key(key, 2)
        attention = self.TransientGlobalSelfAttention(self.layer_norm(x), *bias_and_ids, key=k1)
        return x + self.dropout(attention, key=k2)


class LongT5LayerLocalSelfAttention(eqx.Module):
    LocalSelfAttention: LongT5LocalAttention
    layer_norm: nn.RMSNorm
    dropout: eqx.nn.Dropout

    def __init__(self, config: LongT5Config, *, dtype: DTypeLike, key: PRNGKeyArray):
        self.LocalSelfAttention = LongT5LocalAttention(config, dtype=dtype, key=key)
        self.layer_norm = t5_norm(config, dtype)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)

    def __call__(self, x: Float[Array, "seq dim"], *bias_and_ids, key) -> Float[Array, "seq dim"]:
        k1, k2 = nn.split_key(key, 2)
        return x + self.dropout(self.LocalSelfAttention(self.layer_norm(x), *bias_and_ids, key=k1), key=k2)


class LongT5EncoderBlock(eqx.Module):
    layer: tuple[LongT5LayerLocalSelfAttention | LongT5LayerTransientGlobalSelfAttention, T5LayerFF]

    def __init__(self, config: LongT5Config, *, dtype: DTypeLike, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        transient = config.encoder_attention_type == "transient-global"
        attention = LongT5LayerTransientGlobalSelfAttention if transient else LongT5LayerLocalSelfAttention
        self.layer = (attention(config, dtype=dtype, key=k1), T5LayerFF(config, dtype=dtype, key=k2))


class LongT5Encoder(eqx.Module):
    """The encoder stack: embedding dropout, scanned blocks, final norm and dropout."""

    relative_attention_bias: nn.Embedding
    global_relative_attention_bias: nn.Embedding | None
    block: nn.Stacked[LongT5EncoderBlock]
    final_layer_norm: nn.RMSNorm
    dropout: eqx.nn.Dropout

    def __init__(self, config: LongT5Config, *, dtype: DTypeLike, key: PRNGKeyArray):
        k_bias, k_global, k_blocks = jax.random.split(key, 3)
        self.relative_attention_bias = relative_bias_table(config, dtype, k_bias)
        transient = config.encoder_attention_type == "transient-global"
        self.global_relative_attention_bias = relative_bias_table(config, dtype, k_global) if transient else None
        self.block = nn.Stacked.build(
            lambda k: LongT5EncoderBlock(config, dtype=dtype, key=k), config.num_layers, key=k_blocks
        )
        self.final_layer_norm = t5_norm(config, dtype)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        valid: Bool[Array, " seq"],
        config: LongT5Config,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq dim"]:
        local, side = local_bias(self.relative_attention_bias, valid, config), None
        if self.global_relative_attention_bias is not None:
            side = side_bias(self.global_relative_attention_bias, valid, config)

        def layer(block: LongT5EncoderBlock, x, step: LayerStep, layer_key):
            k1, k2 = nn.split_key(layer_key, 2)
            return block.layer[1](block.layer[0](x, local, side, key=k1), key=k2), None

        x, _ = run_stack(
            self.block,
            embed=lambda k: self.dropout(x, key=k),
            layer=layer,
            finish=lambda x, k: self.dropout(self.final_layer_norm(x), key=k),
            key=key,
        )
        return x

    @staticmethod
    def key_rules(config: "LongT5Config") -> tuple[Rule, ...]:
        """HF names below `encoder.` of the biases (in block 0 upstream) and the blocks."""
        transient = config.encoder_attention_type == "transient-global"
        block0 = f"block.0.layer.0.{'TransientGlobalSelfAttention' if transient else 'LocalSelfAttention'}."
        return (
            (block0 + "relative_attention_bias.", "relative_attention_bias."),
            (block0 + "global_relative_attention_bias.", "global_relative_attention_bias."),
            ("block.{i}.", "block.layers."),
        )


class LongT5Model(EncoderDecoderShell):
    """Encoder and decoder sharing `shared` embeddings; returns the decoder's hidden states."""

    shared: nn.Embedding
    encoder: LongT5Encoder
    decoder: T5Decoder
    config: LongT5Config = eqx.field(static=True)
    encoder_class: ClassVar[type] = LongT5Encoder

    def __init__(self, config: LongT5Config, *, dtype: DTypeLike = jnp.float32, key: PRNGKeyArray):
        init_encoder_decoder(self, config, dtype, key)


class LongT5ForConditionalGeneration(ConditionalGenerationShell):
    """LongT5 with its LM head; `model(input_ids, decoder_input_ids)` returns float32 logits
    `[tgt, vocab]`. A tied head rescales the decoder output by `d_model ** -0.5`, as upstream."""

    model: LongT5Model
    lm_head: nn.Linear | None
    base_class: ClassVar[type] = LongT5Model


class LongT5EncoderModel(EncoderShell):
    """The LongT5 encoder alone; `model(input_ids)` returns hidden states `[seq, d_model]`."""

    shared: nn.Embedding
    encoder: LongT5Encoder
    config: LongT5Config = eqx.field(static=True)
    encoder_class: ClassVar[type] = LongT5Encoder

    def __init__(self, config: LongT5Config, *, dtype: DTypeLike = jnp.float32, key: PRNGKeyArray):
        init_encoder(self, config, dtype, key)


FAMILY = Family(LongT5Config, (LongT5Model, LongT5ForConditionalGeneration, LongT5EncoderModel))
