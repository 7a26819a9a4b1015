"""LongT5: a T5 encoder-decoder whose encoder self-attention is local (blockwise, a
three-block window, one relative bias for every block) or transient-global (local plus
attention to per-block summaries), so time and memory grow linearly with input length.

Reference: HF `modeling_flax_longt5.py` and `modeling_longt5.py` (4.57.6). Attribute names
are HF's (`shared`, `encoder.block.{i}.layer.0.LocalSelfAttention.q`, `...layer.1.DenseReluDense`,
`final_layer_norm`). The relative attention biases, which HF stores in block 0, live once per
stack so that the blocks can be scanned.
"""

import dataclasses
from typing import Annotated, ClassVar, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, Shaped

from .. import nn
from ..checkpoint.keymap import KeyMap
from ..nn._activations import ACTIVATIONS
from ._config import (
    MAX_INT32,
    Count,
    Layers,
    ModelConfig,
    NonNegativeFloat,
    Note,
    PositiveFloat,
    Probability,
    Range,
    Relation,
    Satisfies,
    Size,
    TokenId,
    TokenIds,
)
from ._decoder import DecoderInputs, check_token_ids, decoder_inputs, split_layer_keys

MASKED = -1e10  # HF's additive mask value for LongT5


def _feed_forward(proj: str) -> tuple[str, bool] | None:
    """`(activation name, gated)` parsed from `feed_forward_proj` as HF does: `"relu"`,
    `"gelu"`, `"gated-gelu"` (which means tanh GELU), `"gated-silu"`...; `None` if invalid."""
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        return None
    name = "gelu_new" if proj == "gated-gelu" else parts[-1]
    return (name, parts[0] == "gated") if name in ACTIVATIONS else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class LongT5Config(ModelConfig):
    """HF's `LongT5Config` fields (same names and defaults)."""

    model_type: ClassVar[str] = "longt5"
    vocab_size: Size = 32128
    d_model: Size = 512
    d_kv: Size = 64
    d_ff: Size = 2048
    num_layers: Layers = 6
    num_decoder_layers: Layers | None = None
    num_heads: Size = 8
    local_radius: Count = 127
    global_block_size: Size = 16
    # T5's buckets: half per direction, half of those exact: 4 leaves one exact bucket each way
    relative_attention_num_buckets: Annotated[int, Range(4, MAX_INT32)] = 32
    relative_attention_max_distance: Size = 128
    dropout_rate: Probability = 0.1
    layer_norm_epsilon: PositiveFloat = 1e-6
    initializer_factor: NonNegativeFloat = 1.0
    feed_forward_proj: Annotated[
        str,
        Satisfies(lambda proj: _feed_forward(proj) is not None, "of the form 'ACT' or 'gated-ACT'"),
        Note(f"ACT one of {', '.join(sorted(ACTIVATIONS))}"),
    ] = "relu"
    is_encoder_decoder: bool = True
    encoder_attention_type: Literal["local", "transient-global"] = "local"
    pad_token_id: TokenId | None = 0
    eos_token_id: TokenIds | None = 1
    decoder_start_token_id: TokenId | None = None  # HF leaves it unset; released checkpoints use 0
    tie_word_embeddings: bool = True

    RELATIONS: ClassVar = (
        # the logarithmic buckets span the distances from the exact ones to the maximum
        Relation(
            ("relative_attention_max_distance", "relative_attention_num_buckets"),
            lambda distance, buckets: distance > buckets // 2,
            "relative_attention_max_distance must exceed half of relative_attention_num_buckets",
        ),
    )

    @property
    def activation(self) -> tuple[str, bool]:
        """`(activation name, gated)` parsed from `feed_forward_proj`."""
        return _feed_forward(self.feed_forward_proj)  # type: ignore[return-value]  # checked on creation

    @property
    def block_len(self) -> int:
        return self.local_radius + 1

    @property
    def position_limit(self) -> None:
        return None


def _linear(config: LongT5Config, d_in: int, d_out: int, dtype: DTypeLike, key: PRNGKeyArray) -> nn.Linear:
    std = config.initializer_factor * d_in**-0.5
    return nn.Linear(d_in, d_out, use_bias=False, init_std=std, dtype=dtype, key=key)


def _projections(config: LongT5Config, dtype: DTypeLike, key: PRNGKeyArray) -> tuple[nn.Linear, ...]:
    """The bias-free `q`, `k`, `v` and `o` projections of every LongT5 attention."""
    kq, kk, kv, ko = jax.random.split(key, 4)
    inner = config.num_heads * config.d_kv
    return (
        _linear(config, config.d_model, inner, dtype, kq),
        _linear(config, config.d_model, inner, dtype, kk),
        _linear(config, config.d_model, inner, dtype, kv),
        _linear(config, inner, config.d_model, dtype, ko),
    )


def _t5_norm(config: LongT5Config, dtype: DTypeLike) -> nn.RMSNorm:
    return nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dtype)


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
        self.q, self.k, self.v, self.o = _projections(config, dtype, key)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)
        self.num_heads, self.block_len = config.num_heads, config.block_len

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        bias: Float[Array, "blocks heads block window"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq dim"]:
        seq = x.shape[0]
        blocks, length = bias.shape[0], self.block_len
        pad = blocks * length - seq
        q, k, v = nn.fused_projections(x, (self.q, self.k, self.v))
        # [seq, h * d] -> [blocks, block, h, d]; keys/values see blocks i - 1, i, i + 1
        q, k, v = (jnp.pad(t, ((0, pad), (0, 0))).reshape(blocks, length, self.num_heads, -1) for t in (q, k, v))
        k3, v3 = (_three_blocks(t) for t in (k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k3, preferred_element_type=jnp.float32) + bias
        probs = self.dropout(jax.nn.softmax(scores, axis=-1), key=key).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v3).reshape(blocks * length, -1)[:seq]
        return self.o(out)


def _three_blocks(x: Shaped[Array, "blocks block *rest"]) -> Shaped[Array, "blocks window *rest"]:
    """Concatenates each block with its neighbours (zero blocks at the edges)."""
    padded = jnp.pad(x, ((1, 1),) + ((0, 0),) * (x.ndim - 1))
    return jnp.concatenate([padded[:-2], padded[1:-1], padded[2:]], axis=1)


def local_bias(
    relative_bias: nn.Embedding, valid: Bool[Array, " seq"], config: LongT5Config
) -> Float[Array, "blocks heads block window"]:
    """The bias every local-attention layer adds: relative position buckets within the
    three-block window, and -1e10 where a key is padding or farther than `local_radius`."""
    length = config.block_len
    blocks = -(-valid.shape[0] // length)
    positions = jnp.arange(3 * length)
    relative = positions[None, :] - positions[length:-length, None]  # [block, window]
    buckets = nn.relative_position_bucket(
        relative,
        bidirectional=True,
        num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance,
    )
    position_bias = jnp.moveaxis(relative_bias(buckets), -1, 0).astype(jnp.float32)  # [heads, block, window]
    blocked = jnp.pad(valid, (0, blocks * length - valid.shape[0])).reshape(blocks, length)
    allowed = blocked[:, :, None] & _three_blocks(blocked)[:, None, :] & (jnp.abs(relative) < length)[None]
    return position_bias[None] + jnp.where(allowed, 0.0, MASKED)[:, None]


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


def side_bias(
    global_relative_bias: nn.Embedding, valid: Bool[Array, " seq"], config: LongT5Config
) -> Float[Array, "blocks heads block globals"]:
    """Bias of every token towards every global block: relative buckets of `global - block`
    and -1e10 where the token's validity differs from the global block's."""
    ids, segments = global_block_ids(valid, config.global_block_size)
    length = config.block_len
    blocks = -(-valid.shape[0] // length)
    relative = jnp.arange(segments.shape[0])[None, :] - ids[:, None]  # [seq, globals]
    buckets = nn.relative_position_bucket(
        relative,
        bidirectional=True,
        num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance,
    )
    bias = jnp.where(valid.astype(jnp.int32)[:, None] == segments[None, :], 0.0, MASKED)
    bias = bias + global_relative_bias(buckets).astype(jnp.float32).transpose(2, 0, 1)  # [heads, seq, globals]
    bias = jnp.pad(bias, ((0, 0), (0, blocks * length - valid.shape[0]), (0, 0)))
    return bias.reshape(bias.shape[0], blocks, length, -1).transpose(1, 0, 2, 3)


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
        self.q, self.k, self.v, self.o = _projections(config, dtype, key)
        self.global_input_layer_norm = _t5_norm(config, dtype)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)
        self.num_heads, self.block_len = config.num_heads, config.block_len

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        bias: tuple[Float[Array, "blocks heads block window"], Float[Array, "blocks heads block globals"]],
        block_ids: Int[Array, " seq"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq dim"]:
        local, side = bias
        seq, num_globals = x.shape[0], side.shape[-1]
        blocks, length = local.shape[0], self.block_len
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
        local_scores = jnp.einsum("bqhd,bkhd->bhqk", q, k3, preferred_element_type=jnp.float32) + local
        side_scores = jnp.einsum("bqhd,ghd->bhqg", q, side_k, preferred_element_type=jnp.float32) + side
        probs = jax.nn.softmax(jnp.concatenate([local_scores, side_scores], axis=-1), axis=-1)
        probs = self.dropout(probs, key=key).astype(v.dtype)
        local_p, side_p = probs[..., : 3 * length], probs[..., 3 * length :]
        out = jnp.einsum("bhqk,bkhd->bqhd", local_p, v3) + jnp.einsum("bhqg,ghd->bqhd", side_p, side_v)
        return self.o(out.reshape(blocks * length, -1)[:seq])


class LongT5LayerTransientGlobalSelfAttention(eqx.Module):
    TransientGlobalSelfAttention: LongT5TransientGlobalAttention
    layer_norm: nn.RMSNorm
    dropout: eqx.nn.Dropout

    def __init__(self, config: LongT5Config, *, dtype: DTypeLike, key: PRNGKeyArray):
        self.TransientGlobalSelfAttention = LongT5TransientGlobalAttention(config, dtype=dtype, key=key)
        self.layer_norm = _t5_norm(config, dtype)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)

    def __call__(
        self, x: Float[Array, "seq dim"], bias: tuple, block_ids: Int[Array, " seq"], *, key
    ) -> Float[Array, "seq dim"]:
        k1, k2 = (None, None) if key is None else jax.random.split(key)
        attention = self.TransientGlobalSelfAttention(self.layer_norm(x), bias, block_ids, key=k1)
        return x + self.dropout(attention, key=k2)


class LongT5LayerLocalSelfAttention(eqx.Module):
    LocalSelfAttention: LongT5LocalAttention
    layer_norm: nn.RMSNorm
    dropout: eqx.nn.Dropout

    def __init__(self, config: LongT5Config, *, dtype: DTypeLike, key: PRNGKeyArray):
        self.LocalSelfAttention = LongT5LocalAttention(config, dtype=dtype, key=key)
        self.layer_norm = _t5_norm(config, dtype)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)

    def __call__(self, x: Float[Array, "seq dim"], bias: tuple, block_ids: None, *, key) -> Float[Array, "seq dim"]:
        k1, k2 = (None, None) if key is None else jax.random.split(key)
        return x + self.dropout(self.LocalSelfAttention(self.layer_norm(x), bias[0], key=k1), key=k2)


class LongT5DenseReluDense(eqx.Module):
    """`wo(act(wi(x)))`, or gated: `wo(act(wi_0(x)) * wi_1(x))`."""

    wi: nn.Linear | None
    wi_0: nn.Linear | None
    wi_1: nn.Linear | None
    wo: nn.Linear
    dropout: eqx.nn.Dropout
    act: str = eqx.field(static=True)

    def __init__(self, config: LongT5Config, *, dtype: DTypeLike, key: PRNGKeyArray):
        k0, k1, k2 = jax.random.split(key, 3)
        self.act, gated = config.activation
        self.wi = None if gated else _linear(config, config.d_model, config.d_ff, dtype, k0)
        self.wi_0 = _linear(config, config.d_model, config.d_ff, dtype, k0) if gated else None
        self.wi_1 = _linear(config, config.d_model, config.d_ff, dtype, k1) if gated else None
        self.wo = _linear(config, config.d_ff, config.d_model, dtype, k2)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)

    def __call__(self, x: Float[Array, "seq dim"], *, key: PRNGKeyArray | None = None) -> Float[Array, "seq dim"]:
        act = nn.activation(self.act)
        h = act(self.wi(x)) if self.wi is not None else act(self.wi_0(x)) * self.wi_1(x)
        return self.wo(self.dropout(h, key=key))


class LongT5LayerFF(eqx.Module):
    DenseReluDense: LongT5DenseReluDense
    layer_norm: nn.RMSNorm
    dropout: eqx.nn.Dropout

    def __init__(self, config: LongT5Config, *, dtype: DTypeLike, key: PRNGKeyArray):
        self.DenseReluDense = LongT5DenseReluDense(config, dtype=dtype, key=key)
        self.layer_norm = _t5_norm(config, dtype)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)

    def __call__(self, x: Float[Array, "seq dim"], *, key: PRNGKeyArray | None = None) -> Float[Array, "seq dim"]:
        k1, k2 = (None, None) if key is None else jax.random.split(key)
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x), key=k1), key=k2)


class LongT5EncoderBlock(eqx.Module):
    layer: tuple[LongT5LayerLocalSelfAttention | LongT5LayerTransientGlobalSelfAttention, LongT5LayerFF]

    def __init__(self, config: LongT5Config, *, dtype: DTypeLike, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        transient = config.encoder_attention_type == "transient-global"
        attention = LongT5LayerTransientGlobalSelfAttention if transient else LongT5LayerLocalSelfAttention
        self.layer = (attention(config, dtype=dtype, key=k1), LongT5LayerFF(config, dtype=dtype, key=k2))

    def __call__(
        self, x: Float[Array, "seq dim"], bias: tuple, block_ids: Int[Array, " seq"] | None, *, key: PRNGKeyArray | None
    ) -> Float[Array, "seq dim"]:
        k1, k2 = (None, None) if key is None else jax.random.split(key)
        return self.layer[1](self.layer[0](x, bias, block_ids, key=k1), key=k2)


class LongT5Encoder(eqx.Module):
    """The encoder stack: embedding dropout, scanned blocks, final norm and dropout."""

    relative_attention_bias: nn.Embedding
    global_relative_attention_bias: nn.Embedding | None
    block: nn.Stacked[LongT5EncoderBlock]
    final_layer_norm: nn.RMSNorm
    dropout: eqx.nn.Dropout

    def __init__(self, config: LongT5Config, *, dtype: DTypeLike, key: PRNGKeyArray):
        k_bias, k_global, k_blocks = jax.random.split(key, 3)
        std = config.initializer_factor * config.d_model**-0.5
        bias_table = lambda k: nn.Embedding(  # noqa: E731
            config.relative_attention_num_buckets, config.num_heads, init_std=std, dtype=dtype, key=k
        )
        self.relative_attention_bias = bias_table(k_bias)
        transient = config.encoder_attention_type == "transient-global"
        self.global_relative_attention_bias = bias_table(k_global) if transient else None
        self.block = nn.Stacked(
            lambda k: LongT5EncoderBlock(config, dtype=dtype, key=k), config.num_layers, key=k_blocks
        )
        self.final_layer_norm = _t5_norm(config, dtype)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        valid: Bool[Array, " seq"],
        config: LongT5Config,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq dim"]:
        embed_key, layer_keys = split_layer_keys(key, config.num_layers)
        k_in, k_out = (None, None) if embed_key is None else jax.random.split(embed_key)
        bias, block_ids = (local_bias(self.relative_attention_bias, valid, config),), None
        if self.global_relative_attention_bias is not None:
            bias += (side_bias(self.global_relative_attention_bias, valid, config),)
            block_ids = global_block_ids(valid, config.global_block_size)[0]

        def step(block: LongT5EncoderBlock, x, layer_key):
            return block(x, bias, block_ids, key=layer_key), None

        x, _ = self.block.scan(
            step, self.dropout(x, key=k_in), layer_keys, scan_layers=config.scan_layers, remat=config.remat
        )
        return self.dropout(self.final_layer_norm(x), key=k_out)


class LongT5EncoderModel(eqx.Module):
    """The LongT5 encoder alone; `model(input_ids)` returns hidden states `[seq, d_model]`."""

    shared: nn.Embedding
    encoder: LongT5Encoder
    config: LongT5Config = eqx.field(static=True)

    def __init__(self, config: LongT5Config, *, dtype: DTypeLike = jnp.float32, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.shared = nn.Embedding(
            config.vocab_size, config.d_model, init_std=config.initializer_factor, dtype=dtype, key=k1
        )
        self.encoder = LongT5Encoder(config, dtype=dtype, key=k2)
        self.config = config

    def __call__(
        self,
        input_ids: Int[Array, " seq"],
        *,
        attention_mask: Int[Array, " seq"] | Bool[Array, " seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq d_model"]:
        """**Arguments:** one sequence of ids, `attention_mask` (1 real, 0 padding), `key`
        for dropout. **Returns:** the encoder's hidden states."""
        input_ids = check_token_ids(input_ids, self.config.vocab_size)
        valid = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        return self.encoder(self.shared(input_ids), valid, self.config, key=key)

    @classmethod
    def key_map(cls, config: LongT5Config) -> KeyMap:
        attention = (
            "TransientGlobalSelfAttention"
            if config.encoder_attention_type == "transient-global"
            else ("LocalSelfAttention")
        )
        block0 = f"encoder.block.0.layer.0.{attention}."
        return KeyMap(
            rules=(
                (block0 + "relative_attention_bias.", "encoder.relative_attention_bias."),
                (block0 + "global_relative_attention_bias.", "encoder.global_relative_attention_bias."),
                ("encoder.block.{i}.", "encoder.block.layers."),
                ("", ""),
            ),
            ignore=(r"encoder\.embed_tokens\.weight",),  # a tied copy of `shared.weight`
        )


class LongT5Attention(eqx.Module):
    """Full T5 attention (decoder self-attention and cross-attention): no score scaling; the
    relative bias and masks arrive as one additive `bias`."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    dropout: eqx.nn.Dropout
    num_heads: int = eqx.field(static=True)

    def __init__(self, config: LongT5Config, *, dtype: DTypeLike, key: PRNGKeyArray):
        self.q, self.k, self.v, self.o = _projections(config, dtype, key)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)
        self.num_heads = config.num_heads

    def heads(self, layer: nn.Linear, x: Float[Array, "seq dim"]) -> Float[Array, "seq heads head_dim"]:
        return layer(x).reshape(x.shape[0], self.num_heads, -1)

    def attend(
        self,
        x: Float[Array, "seq dim"],
        k: Float[Array, "heads kv head_dim"],
        v: Float[Array, "heads kv head_dim"],
        bias: Float[Array, "#heads #seq kv"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq dim"]:
        q = self.heads(self.q, x)
        scores = jnp.einsum("qhd,hkd->hqk", q, k, preferred_element_type=jnp.float32) + bias
        probs = self.dropout(jax.nn.softmax(scores, axis=-1), key=key).astype(v.dtype)
        return self.o(jnp.einsum("hqk,hkd->qhd", probs, v).reshape(x.shape[0], -1))


class LongT5LayerSelfAttention(eqx.Module):
    SelfAttention: LongT5Attention
    layer_norm: nn.RMSNorm
    dropout: eqx.nn.Dropout

    def __init__(self, config: LongT5Config, *, dtype: DTypeLike, key: PRNGKeyArray):
        self.SelfAttention = LongT5Attention(config, dtype=dtype, key=key)
        self.layer_norm = _t5_norm(config, dtype)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        bias: Float[Array, "heads seq kv"],
        write: nn.LayerWrite | None,
        layer: Int[Array, ""],
        *,
        key: PRNGKeyArray | None,
    ) -> tuple[Float[Array, "seq dim"], nn.LayerWrite | None]:
        k1, k2 = (None, None) if key is None else jax.random.split(key)
        attention = self.SelfAttention
        normed = self.layer_norm(x)
        write, k, v = nn.cached_kv(
            write, layer, attention.heads(attention.k, normed), attention.heads(attention.v, normed)
        )
        return x + self.dropout(attention.attend(normed, k, v, bias, key=k1), key=k2), write


class LongT5LayerCrossAttention(eqx.Module):
    EncDecAttention: LongT5Attention
    layer_norm: nn.RMSNorm
    dropout: eqx.nn.Dropout

    def __init__(self, config: LongT5Config, *, dtype: DTypeLike, key: PRNGKeyArray):
        self.EncDecAttention = LongT5Attention(config, dtype=dtype, key=key)
        self.layer_norm = _t5_norm(config, dtype)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        cross: tuple[Float[Array, "heads src head_dim"], Float[Array, "heads src head_dim"]],
        bias: Float[Array, "1 1 src"],
        *,
        key: PRNGKeyArray | None,
    ) -> Float[Array, "seq dim"]:
        k1, k2 = (None, None) if key is None else jax.random.split(key)
        return x + self.dropout(self.EncDecAttention.attend(self.layer_norm(x), *cross, bias, key=k1), key=k2)


class LongT5DecoderBlock(eqx.Module):
    layer: tuple[LongT5LayerSelfAttention, LongT5LayerCrossAttention, LongT5LayerFF]

    def __init__(self, config: LongT5Config, *, dtype: DTypeLike, key: PRNGKeyArray):
        k1, k2, k3 = jax.random.split(key, 3)
        self.layer = (
            LongT5LayerSelfAttention(config, dtype=dtype, key=k1),
            LongT5LayerCrossAttention(config, dtype=dtype, key=k2),
            LongT5LayerFF(config, dtype=dtype, key=k3),
        )

    def cross_kv(
        self, encoded: Float[Array, "src dim"]
    ) -> tuple[Float[Array, "heads src head_dim"], Float[Array, "heads src head_dim"]]:
        """This layer's cross-attention keys and values (heads first), computed once per input."""
        attention = self.layer[1].EncDecAttention
        return nn.heads_first(attention.heads(attention.k, encoded)), nn.heads_first(
            attention.heads(attention.v, encoded)
        )

    def __call__(self, x, self_bias, write, index, cross, cross_bias, *, key):
        k1, k2, k3 = (None,) * 3 if key is None else jax.random.split(key, 3)
        x, write = self.layer[0](x, self_bias, write, index, key=k1)
        x = self.layer[1](x, cross, cross_bias, key=k2)
        return self.layer[2](x, key=k3), write


class CrossKV(eqx.Module):
    """Every decoder layer's cross-attention keys and values and the encoder's padding."""

    keys: Float[Array, "layers heads src head_dim"]
    values: Float[Array, "layers heads src head_dim"]
    valid: Bool[Array, " src"]


class LongT5Decoder(eqx.Module):
    """Causal self-attention with a unidirectional relative bias (once per stack) and an
    optional KV cache, cross-attention to the encoder output, feed-forward; final norm."""

    relative_attention_bias: nn.Embedding
    block: nn.Stacked[LongT5DecoderBlock]
    final_layer_norm: nn.RMSNorm
    dropout: eqx.nn.Dropout

    def __init__(self, config: LongT5Config, *, dtype: DTypeLike, key: PRNGKeyArray):
        k_bias, k_blocks = jax.random.split(key)
        std = config.initializer_factor * config.d_model**-0.5
        self.relative_attention_bias = nn.Embedding(
            config.relative_attention_num_buckets, config.num_heads, init_std=std, dtype=dtype, key=k_bias
        )
        layers = config.num_layers if config.num_decoder_layers is None else config.num_decoder_layers
        self.block = nn.Stacked(lambda k: LongT5DecoderBlock(config, dtype=dtype, key=k), layers, key=k_blocks)
        self.final_layer_norm = _t5_norm(config, dtype)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)

    def cross_kv(self, encoded: Float[Array, "src dim"], valid: Bool[Array, " src"], config: LongT5Config) -> CrossKV:
        _, (keys, values) = self.block.scan(
            lambda block, carry, _: (carry, block.cross_kv(encoded)), None, scan_layers=config.scan_layers
        )
        return CrossKV(keys, values, valid)

    def __call__(
        self,
        x: Float[Array, "tgt dim"],
        inputs: DecoderInputs,
        cross: CrossKV,
        config: LongT5Config,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "tgt dim"], nn.KVCache | None]:
        embed_key, layer_keys = split_layer_keys(key, self.block.num_layers)
        k_in, k_out = (None, None) if embed_key is None else jax.random.split(embed_key)
        buckets = nn.relative_position_bucket(
            inputs.kv_slots[None, :] - inputs.slots[:, None],
            bidirectional=False,
            num_buckets=config.relative_attention_num_buckets,
            max_distance=config.relative_attention_max_distance,
        )
        mask = nn.causal_mask(inputs.slots, inputs.kv_slots, inputs.kv_valid)
        self_bias = jnp.moveaxis(self.relative_attention_bias(buckets), -1, 0).astype(jnp.float32)
        self_bias = self_bias + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
        cross_bias = jnp.where(cross.valid, 0.0, jnp.finfo(jnp.float32).min)[None, None, :]

        def step(block: LongT5DecoderBlock, carry, per_layer):
            x, write = carry
            index, keys, values, layer_key = per_layer
            x, write = block(x, self_bias, write, index, (keys, values), cross_bias, key=layer_key)
            return (x, write), None

        per_layer = (jnp.arange(self.block.num_layers, dtype=jnp.int32), cross.keys, cross.values, layer_keys)
        (x, write), _ = self.block.scan(
            step,
            (self.dropout(x, key=k_in), inputs.write),
            per_layer,
            scan_layers=config.scan_layers,
            remat=config.remat,
        )
        return self.dropout(self.final_layer_norm(x), key=k_out), inputs.finish(write)


class LongT5Model(eqx.Module):
    """Encoder and decoder sharing `shared` embeddings; returns the decoder's hidden states."""

    shared: nn.Embedding
    encoder: LongT5Encoder
    decoder: LongT5Decoder
    config: LongT5Config = eqx.field(static=True)

    def __init__(self, config: LongT5Config, *, dtype: DTypeLike = jnp.float32, key: PRNGKeyArray):
        k1, k2, k3 = jax.random.split(key, 3)
        self.shared = nn.Embedding(
            config.vocab_size, config.d_model, init_std=config.initializer_factor, dtype=dtype, key=k1
        )
        self.encoder = LongT5Encoder(config, dtype=dtype, key=k2)
        self.decoder = LongT5Decoder(config, dtype=dtype, key=k3)
        self.config = config

    def encode(
        self,
        input_ids: Int[Array, " src"],
        *,
        attention_mask: Int[Array, " src"] | Bool[Array, " src"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "src d_model"]:
        """The encoder's hidden states for one input sequence."""
        input_ids = check_token_ids(input_ids, self.config.vocab_size)
        valid = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        return self.encoder(self.shared(input_ids), valid, self.config, key=key)

    def cross_kv(
        self,
        encoded: Float[Array, "src d_model"],
        attention_mask: Int[Array, " src"] | Bool[Array, " src"] | None = None,
    ) -> CrossKV:
        """Every decoder layer's cross-attention keys and values for one encoded input."""
        valid = jnp.ones(encoded.shape[:1], bool) if attention_mask is None else attention_mask.astype(bool)
        return self.decoder.cross_kv(encoded, valid, self.config)

    def decode_full(
        self,
        decoder_input_ids: Int[Array, " tgt"],
        encoded: Float[Array, "src d_model"],
        *,
        attention_mask: Int[Array, " src"] | Bool[Array, " src"] | None = None,
        decoder_attention_mask: Int[Array, " tgt"] | Bool[Array, " tgt"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "tgt d_model"]:
        """The decoder's hidden states for a whole target sequence (no cache)."""
        decoder_input_ids = check_token_ids(decoder_input_ids, self.config.vocab_size)
        inputs = decoder_inputs(decoder_input_ids, decoder_attention_mask, None, None)
        cross = self.cross_kv(encoded, attention_mask)
        hidden, _ = self.decoder(self.shared(decoder_input_ids), inputs, cross, self.config, key=key)
        return hidden

    def decode(
        self,
        decoder_input_ids: Int[Array, " new"],
        cache: nn.KVCache,
        cross: CrossKV,
    ) -> tuple[Float[Array, "new d_model"], nn.KVCache]:
        """Cached decoding: hidden states of the `new` decoder tokens and the updated cache."""
        decoder_input_ids = check_token_ids(decoder_input_ids, self.config.vocab_size)
        inputs = decoder_inputs(decoder_input_ids, None, None, cache)
        return self.decoder(self.shared(decoder_input_ids), inputs, cross, self.config)

    def init_cache(self, max_len: int, dtype: DTypeLike | None = None) -> nn.KVCache:
        """An empty decoder self-attention cache for `max_len` target tokens."""
        cfg = self.config
        dtype = dtype or self.shared.weight.dtype
        return nn.KVCache.empty(self.decoder.block.num_layers, max_len, cfg.num_heads, cfg.d_kv, dtype)

    def __call__(
        self,
        input_ids: Int[Array, " src"],
        decoder_input_ids: Int[Array, " tgt"],
        *,
        attention_mask: Int[Array, " src"] | Bool[Array, " src"] | None = None,
        decoder_attention_mask: Int[Array, " tgt"] | Bool[Array, " tgt"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "tgt d_model"]:
        k1, k2 = (None, None) if key is None else jax.random.split(key)
        encoded = self.encode(input_ids, attention_mask=attention_mask, key=k1)
        return self.decode_full(
            decoder_input_ids,
            encoded,
            attention_mask=attention_mask,
            decoder_attention_mask=decoder_attention_mask,
            key=k2,
        )

    @classmethod
    def key_map(cls, config: LongT5Config) -> KeyMap:
        encoder = LongT5EncoderModel.key_map(config)
        return KeyMap(
            rules=(
                ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.", "decoder.relative_attention_bias."),
                ("decoder.block.{i}.", "decoder.block.layers."),
                *encoder.rules,
            ),
            ignore=encoder.ignore
            + (
                r"decoder\.embed_tokens\.weight",
                r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",
            ),
        )


class LongT5ForConditionalGeneration(eqx.Module):
    """LongT5 with its LM head; `model(input_ids, decoder_input_ids)` returns float32 logits
    `[tgt, vocab]`. A tied head rescales the decoder output by `d_model ** -0.5`, as upstream."""

    model: LongT5Model
    lm_head: nn.Linear | None

    def __init__(self, config: LongT5Config, *, dtype: DTypeLike = jnp.float32, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.model = LongT5Model(config, dtype=dtype, key=k1)
        self.lm_head = (
            None if config.tie_word_embeddings else _linear(config, config.d_model, config.vocab_size, dtype, k2)
        )

    @property
    def config(self) -> LongT5Config:
        return self.model.config

    def __call__(
        self,
        input_ids: Int[Array, " src"],
        decoder_input_ids: Int[Array, " tgt"],
        *,
        attention_mask: Int[Array, " src"] | Bool[Array, " src"] | None = None,
        decoder_attention_mask: Int[Array, " tgt"] | Bool[Array, " tgt"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "tgt vocab"]:
        hidden = self.model(
            input_ids,
            decoder_input_ids,
            attention_mask=attention_mask,
            decoder_attention_mask=decoder_attention_mask,
            key=key,
        )
        return self.logits(hidden)

    def encode(
        self,
        input_ids: Int[Array, " src"],
        *,
        attention_mask: Int[Array, " src"] | Bool[Array, " src"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "src d_model"]:
        return self.model.encode(input_ids, attention_mask=attention_mask, key=key)

    def cross_kv(
        self,
        encoded: Float[Array, "src d_model"],
        attention_mask: Int[Array, " src"] | Bool[Array, " src"] | None = None,
    ) -> CrossKV:
        return self.model.cross_kv(encoded, attention_mask)

    def decode(
        self, decoder_input_ids: Int[Array, " new"], cache: nn.KVCache, cross: CrossKV
    ) -> tuple[Float[Array, "new vocab"], nn.KVCache]:
        """Cached step: logits for the `new` decoder tokens and the updated cache."""
        hidden, cache = self.model.decode(decoder_input_ids, cache, cross)
        return self.logits(hidden), cache

    def init_cache(self, max_len: int, dtype: DTypeLike | None = None) -> nn.KVCache:
        return self.model.init_cache(max_len, dtype)

    def logits(self, hidden: Float[Array, "tgt d_model"]) -> Float[Array, "tgt vocab"]:
        if self.lm_head is None:
            return self.model.shared.attend(hidden * (self.config.d_model**-0.5)).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    @classmethod
    def key_map(cls, config: LongT5Config) -> KeyMap:
        # the encoder-decoder is not nested under a prefix in HF's names: `shared`, `encoder`,
        # `decoder` and `lm_head` all sit at the top
        base = LongT5Model.key_map(config)
        tied = (r"lm_head\.weight",) if config.tie_word_embeddings else ()
        return KeyMap(
            rules=tuple((hf, "model." + tree) for hf, tree in base.rules[:-1])
            + (("lm_head.", "lm_head."), ("", "model.")),
            ignore=base.ignore + tied,
        )


def shift_tokens_right(
    labels: Int[Array, " tgt"], decoder_start_token_id: int, pad_token_id: int
) -> Int[Array, " tgt"]:
    """Decoder inputs for training: labels shifted right behind `decoder_start_token_id`,
    with label padding (-100) replaced by `pad_token_id`, as HF's `_shift_right`."""
    shifted = jnp.concatenate([jnp.array([decoder_start_token_id], labels.dtype), labels[:-1]])
    return jnp.where(shifted == -100, pad_token_id, shifted)
