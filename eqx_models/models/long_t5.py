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
SideBias = tuple[Float[Array, "blocks heads block globals"], Bool[Array, "blocks 1 block globals"]]


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
        block_ids: None,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq dim"]:
        bias, allowed = local
        seq = x.shape[0]
        blocks, length = allowed.shape[0], self.block_len
        pad = blocks * length - seq
        q, k, v = nn.fused_projections(x, (self.q, self.k, self.v))
        # [seq, h * d] -> [blocks, block, h, d]; keys/values see blocks i - 1, i, i + 1
        q, k, v = (jnp.pad(t, ((0, pad), (0, 0))).reshape(blocks, length, self.num_heads, -1) for t in (q, k, v))
        k3, v3 = (_three_blocks(t) for t in (k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k3, preferred_element_type=jnp.float32) + bias
        probs = self.dropout(nn.masked_softmax(scores, allowed, nn.LONGT5_ADD), key=key).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v3).reshape(blocks * length, -1)[:seq]
        return self.o(out)


def _three_blocks(x: Shaped[Array, "blocks block *rest"]) -> Shaped[Array, "blocks window *rest"]:
    """Concatenates each block with its neighbours (zero blocks at the edges)."""
    padded = jnp.pad(x, ((1, 1),) + ((0, 0),) * (x.ndim - 1))
    return jnp.concatenate([padded[:-2], padded[1:-1], padded[2:]], axis=1)


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
    """Bias of every token towards every global block (relative buckets of `global - block`)
    and which global blocks it may attend (those whose validity equals its own)."""
    ids, segments = global_block_ids(valid, config.global_block_size)
    length = config.block_len
    blocks = -(-valid.shape[0] // length)
    pad = blocks * length - valid.shape[0]
    relative = jnp.arange(segments.shape[0])[None, :] - ids[:, None]  # [seq, globals]
    bias = relative_bias(global_relative_bias, relative, bidirectional=True, config=config)  # [heads, seq, globals]
    bias = jnp.pad(bias, ((0, 0), (0, pad), (0, 0)))
    allowed = jnp.pad(valid.astype(jnp.int32)[:, None] == segments[None, :], ((0, pad), (0, 0)), constant_values=True)
    blocked = lambda t: t.reshape(t.shape[0], blocks, length, -1).transpose(1, 0, 2, 3)  # noqa: E731
    return blocked(bias), blocked(allowed[None])


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
        block_ids: Int[Array, " seq"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq dim"]:
        (local_bias, local_allowed), (side_bias, side_allowed) = local, side
        seq, num_globals = x.shape[0], side_bias.shape[-1]
        blocks, length = local_allowed.shape[0], self.block_len
        # each global input sums its block's tokens (padding, id -1, is dropped); a segment sum
        # is linear in length where upstream's one-hot matmul is quadratic
        segments = jnp.where(block_ids >= 0, block_ids, num_globals)
        sums = jax.ops.segment_sum(x, segments, num_segments=num_globals + 1)[:num_globals]
        global_inputs = self.global_input_layer_norm(sums)
        q, k, v = nn.fused_projections(x, (self.q, self.k, self.v))
        q, k, v = (
            jnp.pad(t, ((0, blocks * length - seq), (0, 0))).reshape(blocks, length, self.num_heads, -1)
            for t in (q, k, v)
        )
        side_k, side_v = (
            t.reshape(num_globals, self.num_heads, -1) for t in (self.k(global_inputs), self.v(global_inputs))
        )
        k3, v3 = _three_blocks(k), _three_blocks(v)
        local_scores = jnp.einsum("bqhd,bkhd->bhqk", q, k3, preferred_element_type=jnp.float32) + local_bias
        side_scores = jnp.einsum("bqhd,ghd->bhqg", q, side_k, preferred_element_type=jnp.float32) + side_bias
        scores = jnp.concatenate([local_scores, side_scores], axis=-1)
        allowed = jnp.concatenate([local_allowed, side_allowed], axis=-1)
        probs = self.dropout(nn.masked_softmax(scores, allowed, nn.LONGT5_ADD), key=key).astype(v.dtype)
        local_p, side_p = probs[..., : 3 * length], probs[..., 3 * length :]
        out = jnp.einsum("bhqk,bkhd->bqhd", local_p, v3) + jnp.einsum("bhqg,ghd->bqhd", side_p, side_v)
        return self.o(out.reshape(blocks * length, -1)[:seq])


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
        local, side, block_ids = local_bias(self.relative_attention_bias, valid, config), None, None
        if self.global_relative_attention_bias is not None:
            side = side_bias(self.global_relative_attention_bias, valid, config)
            block_ids = global_block_ids(valid, config.global_block_size)[0]

        def layer(block: LongT5EncoderBlock, x, step: LayerStep, layer_key):
            k1, k2 = nn.split_key(layer_key, 2)
            return block.layer[1](block.layer[0](x, local, side, block_ids, key=k1), key=k2), None

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
