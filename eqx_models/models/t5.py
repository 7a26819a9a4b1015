"""T5 (original, v1.1, FLAN-T5) and mT5: an encoder-decoder with relative position buckets,
RMS norms before every sub-layer, unscaled attention and a ReLU or gated-GELU feed-forward.

The pieces here are also LongT5's (`long_t5.py`), which differs only in its encoder's
attention: the feed-forward, full attention, the decoder with its cache and
cross-attention, and the model shells (`T5Model`-like, `...ForConditionalGeneration`-like,
`...EncoderModel`-like), whose encoder class is a class variable.

Reference: HF `modeling_t5.py` and `modeling_flax_t5.py` (4.57.6). Attribute names are HF's
(`shared`, `encoder.block.{i}.layer.0.SelfAttention.q`, `...layer.1.DenseReluDense.wi_0`,
`decoder.block.{i}.layer.1.EncDecAttention`, `final_layer_norm`). The relative attention
biases, which HF stores in block 0, live once per stack so that the blocks can be scanned.
"""

import dataclasses
from typing import Annotated, Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .. import nn
from ..checkpoint.keymap import KeyMap, Rule
from ..validation import (
    MAX_INT32,
    Layers,
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
from ._config import ModelConfig
from ._contract import EncoderDecoder, Family, Model, Seq2SeqLM
from ._runner import LayerStep, TokenInputs, check_token_ids, run_stack, stack_cross_kv, token_inputs, valid_mask


def _feed_forward(proj: str) -> tuple[str, bool] | None:
    """`(activation name, gated)` parsed from `feed_forward_proj` as HF does: `"relu"`,
    `"gelu"`, `"gated-gelu"` (which means tanh GELU, for backwards compatibility),
    `"gated-silu"`...; `None` if invalid."""
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        return None
    name = "gelu_new" if proj == "gated-gelu" else parts[-1]
    return (name, parts[0] == "gated") if name in nn.ACTIVATIONS else None


FeedForwardProj = Annotated[
    str,
    Satisfies(lambda proj: _feed_forward(proj) is not None, "of the form 'ACT' or 'gated-ACT'"),
    Note(f"ACT one of {', '.join(sorted(nn.ACTIVATIONS))}"),
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class T5Config(ModelConfig):
    """HF's `T5Config` fields (same names and defaults); LongT5's and mT5's configs extend it.
    HF's `classifier_dropout`, `dense_act_fn` and `is_gated_act` are kept in `extra` (the
    latter two are derived from `feed_forward_proj`, as HF derives them)."""

    model_type: ClassVar[str] = "t5"
    vocab_size: Size = 32128
    d_model: Size = 512
    d_kv: Size = 64
    d_ff: Size = 2048
    num_layers: Layers = 6
    num_decoder_layers: Layers | None = None  # None: as many as the encoder
    num_heads: Size = 8
    # T5's buckets: half per direction, half of those exact: 4 leaves one exact bucket each way
    relative_attention_num_buckets: Annotated[int, Range(4, MAX_INT32)] = 32
    relative_attention_max_distance: Size = 128
    dropout_rate: Probability = 0.1
    layer_norm_epsilon: PositiveFloat = 1e-6
    initializer_factor: NonNegativeFloat = 1.0
    feed_forward_proj: FeedForwardProj = "relu"  # "gated-gelu" for T5 v1.1, FLAN-T5 and mT5
    is_encoder_decoder: bool = True
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
    def decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers


@dataclasses.dataclass(frozen=True, kw_only=True)
class MT5Config(T5Config):
    """HF's `MT5Config`: T5's fields with mT5's defaults."""

    model_type: ClassVar[str] = "mt5"
    vocab_size: Size = 250112
    d_ff: Size = 1024
    num_layers: Layers = 8
    num_heads: Size = 6
    feed_forward_proj: FeedForwardProj = "gated-gelu"
    decoder_start_token_id: TokenId | None = 0
    tie_word_embeddings: bool = False


def t5_linear(config: Any, d_in: int, d_out: int, dtype: DTypeLike, key: PRNGKeyArray) -> nn.Linear:
    """A bias-free projection initialised as upstream (`initializer_factor * d_in ** -0.5`)."""
    std = config.initializer_factor * d_in**-0.5
    return nn.Linear(d_in, d_out, use_bias=False, init_std=std, dtype=dtype, key=key)


def t5_projections(config: Any, dtype: DTypeLike, key: PRNGKeyArray) -> tuple[nn.Linear, ...]:
    """The bias-free `q`, `k`, `v` and `o` projections of every T5-style attention."""
    kq, kk, kv, ko = jax.random.split(key, 4)
    inner = config.num_heads * config.d_kv
    return (
        t5_linear(config, config.d_model, inner, dtype, kq),
        t5_linear(config, config.d_model, inner, dtype, kk),
        t5_linear(config, config.d_model, inner, dtype, kv),
        t5_linear(config, inner, config.d_model, dtype, ko),
    )


def t5_norm(config: Any, dtype: DTypeLike) -> nn.RMSNorm:
    return nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dtype)


def relative_bias_table(config: Any, dtype: DTypeLike, key: PRNGKeyArray) -> nn.Embedding:
    """A `[buckets, heads]` table of relative position biases."""
    std = config.initializer_factor * config.d_model**-0.5
    return nn.Embedding(config.relative_attention_num_buckets, config.num_heads, init_std=std, dtype=dtype, key=key)


def relative_bias(
    table: nn.Embedding, relative: Int[Array, "q kv"], *, bidirectional: bool, config: Any
) -> Float[Array, "heads q kv"]:
    """The bias of each head for key-minus-query distances `relative`, bucketed as T5."""
    buckets = nn.relative_position_bucket(
        relative,
        bidirectional=bidirectional,
        num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance,
    )
    return jnp.moveaxis(table(buckets), -1, 0).astype(jnp.float32)


class T5Attention(eqx.Module):
    """Full T5 attention (encoder and decoder self-attention, cross-attention): no score
    scaling; the relative bias and the mask are added to the scores (HF's additive masks)."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    dropout: eqx.nn.Dropout
    num_heads: int = eqx.field(static=True)

    def __init__(self, config: Any, *, dtype: DTypeLike, key: PRNGKeyArray):
        self.q, self.k, self.v, self.o = t5_projections(config, dtype, key)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)
        self.num_heads = config.num_heads

    def heads(self, layer: nn.Linear, x: Float[Array, "seq dim"]) -> Float[Array, "seq heads head_dim"]:
        """`layer(x)` split into heads."""
        return layer(x).reshape(x.shape[0], self.num_heads, -1)

    def attend(
        self,
        x: Float[Array, "seq dim"],
        k: Float[Array, "heads kv head_dim"],
        v: Float[Array, "heads kv head_dim"],
        mask: Bool[Array, "seq kv"],
        bias: Float[Array, "heads seq kv"] | None,
        *,
        causal: bool = False,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq dim"]:
        q = self.heads(self.q, x)
        out = nn.dot_product_attention(
            q, k, v, mask, scale=1.0, bias=bias, dropout=self.dropout, key=key, causal=causal, masking=nn.T5_ADD_MIN
        )
        return self.o(out.reshape(x.shape[0], -1))


class T5LayerSelfAttention(eqx.Module):
    """`x + dropout(attention(norm(x)))`, writing keys and values to the cache when decoding."""

    SelfAttention: T5Attention
    layer_norm: nn.RMSNorm
    dropout: eqx.nn.Dropout

    def __init__(self, config: Any, *, dtype: DTypeLike, key: PRNGKeyArray):
        self.SelfAttention = T5Attention(config, dtype=dtype, key=key)
        self.layer_norm = t5_norm(config, dtype)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        mask: Bool[Array, "seq kv"],
        bias: Float[Array, "heads seq kv"],
        step: LayerStep,
        *,
        key: PRNGKeyArray | None,
    ) -> tuple[Float[Array, "seq dim"], nn.LayerWrite | None]:
        k1, k2 = nn.split_key(key, 2)
        attention, normed = self.SelfAttention, self.layer_norm(x)
        k, v = (attention.heads(layer, normed) for layer in (attention.k, attention.v))
        write, k, v = nn.cached_kv(step.write, step.index, k, v)
        out = attention.attend(normed, k, v, mask, bias, causal=step.write is None, key=k1)
        return x + self.dropout(out, key=k2), write


class T5LayerCrossAttention(eqx.Module):
    """`x + dropout(attention(norm(x), encoder keys and values))`."""

    EncDecAttention: T5Attention
    layer_norm: nn.RMSNorm
    dropout: eqx.nn.Dropout

    def __init__(self, config: Any, *, dtype: DTypeLike, key: PRNGKeyArray):
        self.EncDecAttention = T5Attention(config, dtype=dtype, key=key)
        self.layer_norm = t5_norm(config, dtype)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)

    def cross_kv(
        self, encoded: Float[Array, "src dim"]
    ) -> tuple[Float[Array, "heads src head_dim"], Float[Array, "heads src head_dim"]]:
        attention = self.EncDecAttention
        return tuple(nn.heads_first(attention.heads(layer, encoded)) for layer in (attention.k, attention.v))

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        k: Float[Array, "heads src head_dim"],
        v: Float[Array, "heads src head_dim"],
        valid: Bool[Array, " src"],
        *,
        key: PRNGKeyArray | None,
    ) -> Float[Array, "seq dim"]:
        k1, k2 = nn.split_key(key, 2)
        mask = nn.padding_mask(x.shape[0], valid)
        return x + self.dropout(self.EncDecAttention.attend(self.layer_norm(x), k, v, mask, None, key=k1), key=k2)


class T5DenseReluDense(eqx.Module):
    """`wo(act(wi(x)))`, or gated: `wo(act(wi_0(x)) * wi_1(x))`."""

    wi: nn.Linear | None
    wi_0: nn.Linear | None
    wi_1: nn.Linear | None
    wo: nn.Linear
    dropout: eqx.nn.Dropout
    act: str = eqx.field(static=True)

    def __init__(self, config: Any, *, dtype: DTypeLike, key: PRNGKeyArray):
        k0, k1, k2 = jax.random.split(key, 3)
        self.act, gated = config.activation
        self.wi = None if gated else t5_linear(config, config.d_model, config.d_ff, dtype, k0)
        self.wi_0 = t5_linear(config, config.d_model, config.d_ff, dtype, k0) if gated else None
        self.wi_1 = t5_linear(config, config.d_model, config.d_ff, dtype, k1) if gated else None
        self.wo = t5_linear(config, config.d_ff, config.d_model, dtype, k2)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)

    def __call__(self, x: Float[Array, "seq dim"], *, key: PRNGKeyArray | None = None) -> Float[Array, "seq dim"]:
        act = nn.activation(self.act)
        h = act(self.wi(x)) if self.wi is not None else act(self.wi_0(x)) * self.wi_1(x)
        return self.wo(self.dropout(h, key=key))


class T5LayerFF(eqx.Module):
    DenseReluDense: T5DenseReluDense
    layer_norm: nn.RMSNorm
    dropout: eqx.nn.Dropout

    def __init__(self, config: Any, *, dtype: DTypeLike, key: PRNGKeyArray):
        self.DenseReluDense = T5DenseReluDense(config, dtype=dtype, key=key)
        self.layer_norm = t5_norm(config, dtype)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)

    def __call__(self, x: Float[Array, "seq dim"], *, key: PRNGKeyArray | None = None) -> Float[Array, "seq dim"]:
        k1, k2 = nn.split_key(key, 2)
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x), key=k1), key=k2)


class T5EncoderBlock(eqx.Module):
    layer: tuple[T5LayerSelfAttention, T5LayerFF]

    def __init__(self, config: T5Config, *, dtype: DTypeLike, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.layer = (T5LayerSelfAttention(config, dtype=dtype, key=k1), T5LayerFF(config, dtype=dtype, key=k2))


class T5Encoder(eqx.Module):
    """Bidirectional self-attention with a relative bias (once per stack), feed-forward;
    embedding dropout, final norm and dropout."""

    relative_attention_bias: nn.Embedding
    block: nn.Stacked[T5EncoderBlock]
    final_layer_norm: nn.RMSNorm
    dropout: eqx.nn.Dropout

    def __init__(self, config: T5Config, *, dtype: DTypeLike, key: PRNGKeyArray):
        k_bias, k_blocks = jax.random.split(key)
        self.relative_attention_bias = relative_bias_table(config, dtype, k_bias)
        self.block = nn.Stacked.build(
            lambda k: T5EncoderBlock(config, dtype=dtype, key=k), config.num_layers, key=k_blocks
        )
        self.final_layer_norm = t5_norm(config, dtype)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)

    def __call__(
        self, x: Float[Array, "seq dim"], valid: Bool[Array, " seq"], config: T5Config, *, key: PRNGKeyArray | None
    ) -> Float[Array, "seq dim"]:
        seq = jnp.arange(x.shape[0])
        bias = relative_bias(
            self.relative_attention_bias, seq[None, :] - seq[:, None], bidirectional=True, config=config
        )
        mask = nn.padding_mask(x.shape[0], valid)

        def layer(block: T5EncoderBlock, x, step: LayerStep, layer_key):
            k1, k2 = nn.split_key(layer_key, 2)
            x, _ = block.layer[0](x, mask, bias, step, key=k1)
            return block.layer[1](x, key=k2), None

        x, _ = run_stack(
            self.block,
            embed=lambda k: self.dropout(x, key=k),
            layer=layer,
            finish=lambda x, k: self.dropout(self.final_layer_norm(x), key=k),
            key=key,
        )
        return x

    @staticmethod
    def key_rules(config: T5Config) -> tuple[Rule, ...]:
        """HF names below `encoder.` of the biases (in block 0 upstream) and the blocks."""
        return (
            ("block.0.layer.0.SelfAttention.relative_attention_bias.", "relative_attention_bias."),
            ("block.{i}.", "block.layers."),
        )


class T5DecoderBlock(eqx.Module):
    layer: tuple[T5LayerSelfAttention, T5LayerCrossAttention, T5LayerFF]

    def __init__(self, config: Any, *, dtype: DTypeLike, key: PRNGKeyArray):
        k1, k2, k3 = jax.random.split(key, 3)
        self.layer = (
            T5LayerSelfAttention(config, dtype=dtype, key=k1),
            T5LayerCrossAttention(config, dtype=dtype, key=k2),
            T5LayerFF(config, dtype=dtype, key=k3),
        )

    def cross_kv(
        self, encoded: Float[Array, "src dim"]
    ) -> tuple[Float[Array, "heads src head_dim"], Float[Array, "heads src head_dim"]]:
        """This layer's cross-attention keys and values (heads first), computed once per input."""
        return self.layer[1].cross_kv(encoded)


class T5Decoder(eqx.Module):
    """Causal self-attention with a unidirectional relative bias (once per stack) and an
    optional KV cache, cross-attention to the encoder output, feed-forward; final norm."""

    relative_attention_bias: nn.Embedding
    block: nn.Stacked[T5DecoderBlock]
    final_layer_norm: nn.RMSNorm
    dropout: eqx.nn.Dropout

    def __init__(self, config: Any, *, dtype: DTypeLike, key: PRNGKeyArray):
        k_bias, k_blocks = jax.random.split(key)
        self.relative_attention_bias = relative_bias_table(config, dtype, k_bias)
        self.block = nn.Stacked.build(
            lambda k: T5DecoderBlock(config, dtype=dtype, key=k), config.decoder_layers, key=k_blocks
        )
        self.final_layer_norm = t5_norm(config, dtype)
        self.dropout = eqx.nn.Dropout(config.dropout_rate)

    def cross_kv(self, encoded: Float[Array, "src dim"], valid: Bool[Array, " src"]) -> nn.CrossKV:
        return stack_cross_kv(self.block, encoded, valid)

    def __call__(
        self,
        x: Float[Array, "tgt dim"],
        inputs: TokenInputs,
        cross: nn.CrossKV,
        config: Any,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "tgt dim"], nn.KVCache | None]:
        relative = inputs.kv_slots[None, :] - inputs.slots[:, None]
        bias = relative_bias(self.relative_attention_bias, relative, bidirectional=False, config=config)
        mask = nn.causal_mask(inputs.slots, inputs.kv_slots, inputs.kv_valid)

        def layer(block: T5DecoderBlock, x, step: LayerStep, layer_key):
            k1, k2, k3 = nn.split_key(layer_key, 3)
            cross_k, cross_v = step.inputs
            x, write = block.layer[0](x, mask, bias, step, key=k1)
            x = block.layer[1](x, cross_k, cross_v, cross.valid, key=k2)
            return block.layer[2](x, key=k3), write

        x, write = run_stack(
            self.block,
            embed=lambda k: self.dropout(x, key=k),
            layer=layer,
            finish=lambda x, k: self.dropout(self.final_layer_norm(x), key=k),
            key=key,
            write=inputs.write,
            per_layer=(cross.keys, cross.values),
        )
        return x, inputs.finish(write)

    @staticmethod
    def key_rules() -> tuple[Rule, ...]:
        """HF names below `decoder.` of the bias (in block 0 upstream) and the blocks."""
        return (
            ("block.0.layer.0.SelfAttention.relative_attention_bias.", "relative_attention_bias."),
            ("block.{i}.", "block.layers."),
        )


def _under(prefix: str, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    return tuple((prefix + hf, prefix + tree) for hf, tree in rules)


# --------------------------------------------------------------------------- shells
# What T5 and LongT5 share above their encoders: the shared embedding and the way a model
# encodes, decodes and maps its keys. A family's final classes name their encoder class.

#: PyTorch's tied copies of `shared.weight`, and a cross-attention bias table some savers
#: wrote although upstream never uses it (read and dropped).
_ENCODER_TIED = (("encoder.embed_tokens.weight", "shared.weight"),)
_DECODER_TIED = (("decoder.embed_tokens.weight", "shared.weight"),)
_DECODER_IGNORED = (r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",)
_ENCODER_ONLY_IGNORED = (r"decoder\..*", r"lm_head\..*")


class EncoderShell(Model):
    """The encoder alone; `model(input_ids)` returns hidden states `[seq, d_model]`."""

    shared: eqx.AbstractVar[nn.Embedding]
    encoder: eqx.AbstractVar[Any]
    encoder_class: ClassVar[type]

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
        valid = valid_mask(input_ids, attention_mask)
        return self.encoder(self.shared(input_ids), valid, self.config, key=key)

    @classmethod
    def key_map(cls, config: Any) -> KeyMap:
        # A whole encoder-decoder checkpoint loads too, its decoder and head read and dropped,
        # as HF's `T5EncoderModel` (`_keys_to_ignore_on_load_unexpected = [r"decoder"]`).
        return KeyMap(
            rules=(*_under("encoder.", cls.encoder_class.key_rules(config)), ("", "")),
            ignore=_ENCODER_ONLY_IGNORED,
            tied=_ENCODER_TIED,
            embedding="shared.weight",
        )


class EncoderDecoderShell(EncoderDecoder):
    """Encoder and decoder sharing `shared` embeddings; `model(input_ids, decoder_input_ids)`
    returns the decoder's hidden states."""

    shared: eqx.AbstractVar[nn.Embedding]
    encoder: eqx.AbstractVar[Any]
    decoder: eqx.AbstractVar[T5Decoder]
    encoder_class: ClassVar[type]

    def encode(
        self,
        input_ids: Int[Array, " src"],
        *,
        attention_mask: Int[Array, " src"] | Bool[Array, " src"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "src d_model"]:
        input_ids = check_token_ids(input_ids, self.config.vocab_size)
        return self.encoder(self.shared(input_ids), valid_mask(input_ids, attention_mask), self.config, key=key)

    def cross_kv(
        self,
        encoded: Float[Array, "src d_model"],
        attention_mask: Int[Array, " src"] | Bool[Array, " src"] | None = None,
    ) -> nn.CrossKV:
        valid = jnp.ones(encoded.shape[:1], bool) if attention_mask is None else attention_mask.astype(bool)
        return self.decoder.cross_kv(encoded, valid)

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
        inputs = token_inputs(decoder_input_ids, decoder_attention_mask, None, None)
        cross = self.cross_kv(encoded, attention_mask)
        hidden, _ = self.decoder(self.shared(decoder_input_ids), inputs, cross, self.config, key=key)
        return hidden

    def decode(
        self, decoder_input_ids: Int[Array, " new"], cache: nn.KVCache, cross: nn.CrossKV
    ) -> tuple[Float[Array, "new d_model"], nn.KVCache]:
        """Cached decoding: hidden states of the `new` decoder tokens and the updated cache."""
        decoder_input_ids = check_token_ids(decoder_input_ids, self.config.vocab_size)
        inputs = token_inputs(decoder_input_ids, None, None, cache)
        return self.decoder(self.shared(decoder_input_ids), inputs, cross, self.config)

    @property
    def cache_shape(self) -> tuple[int, int, int]:
        return self.decoder.block.num_layers, self.config.num_heads, self.config.d_kv

    def __call__(
        self,
        input_ids: Int[Array, " src"],
        decoder_input_ids: Int[Array, " tgt"],
        *,
        attention_mask: Int[Array, " src"] | Bool[Array, " src"] | None = None,
        decoder_attention_mask: Int[Array, " tgt"] | Bool[Array, " tgt"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "tgt d_model"]:
        k1, k2 = nn.split_key(key, 2)
        encoded = self.encode(input_ids, attention_mask=attention_mask, key=k1)
        return self.decode_full(
            decoder_input_ids,
            encoded,
            attention_mask=attention_mask,
            decoder_attention_mask=decoder_attention_mask,
            key=k2,
        )

    @classmethod
    def key_map(cls, config: Any) -> KeyMap:
        return KeyMap(
            rules=(
                *_under("decoder.", T5Decoder.key_rules()),
                *_under("encoder.", cls.encoder_class.key_rules(config)),
                ("", ""),
            ),
            ignore=_DECODER_IGNORED,
            tied=_ENCODER_TIED + _DECODER_TIED,
            embedding="shared.weight",
        )


def init_encoder_decoder(model: EncoderDecoderShell, config: Any, dtype: DTypeLike, key: PRNGKeyArray) -> None:
    """Fills a shell's `shared`, `encoder`, `decoder` and `config` (called from `__init__`)."""
    k1, k2, k3 = jax.random.split(key, 3)
    model.shared = nn.Embedding(
        config.vocab_size, config.d_model, init_std=config.initializer_factor, dtype=dtype, key=k1
    )
    model.encoder = model.encoder_class(config, dtype=dtype, key=k2)
    model.decoder = T5Decoder(config, dtype=dtype, key=k3)
    model.config = config


def init_encoder(model: EncoderShell, config: Any, dtype: DTypeLike, key: PRNGKeyArray) -> None:
    """Fills an encoder shell's `shared`, `encoder` and `config` (called from `__init__`)."""
    k1, k2 = jax.random.split(key)
    model.shared = nn.Embedding(
        config.vocab_size, config.d_model, init_std=config.initializer_factor, dtype=dtype, key=k1
    )
    model.encoder = model.encoder_class(config, dtype=dtype, key=k2)
    model.config = config


class ConditionalGenerationShell(Seq2SeqLM):
    """An encoder-decoder shell (`model`) with its LM head; `model(input_ids,
    decoder_input_ids)` returns float32 logits `[tgt, vocab]`. A tied head rescales the
    decoder output by `d_model ** -0.5`, as upstream."""

    model: eqx.AbstractVar[EncoderDecoderShell]
    lm_head: eqx.AbstractVar[nn.Linear | None]
    base_class: ClassVar[type[EncoderDecoderShell]]

    def __init__(self, config: Any, *, dtype: DTypeLike = jnp.float32, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.model = self.base_class(config, dtype=dtype, key=k1)
        self.lm_head = (
            None if config.tie_word_embeddings else t5_linear(config, config.d_model, config.vocab_size, dtype, k2)
        )

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def cache_shape(self) -> tuple[int, int, int]:
        return self.model.cache_shape

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
    ) -> nn.CrossKV:
        return self.model.cross_kv(encoded, attention_mask)

    def decode_full(
        self,
        decoder_input_ids: Int[Array, " tgt"],
        encoded: Float[Array, "src d_model"],
        *,
        attention_mask: Int[Array, " src"] | Bool[Array, " src"] | None = None,
        decoder_attention_mask: Int[Array, " tgt"] | Bool[Array, " tgt"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "tgt vocab"]:
        """Logits of a whole target sequence (no cache)."""
        hidden = self.model.decode_full(
            decoder_input_ids,
            encoded,
            attention_mask=attention_mask,
            decoder_attention_mask=decoder_attention_mask,
            key=key,
        )
        return self.logits(hidden)

    def decode(
        self, decoder_input_ids: Int[Array, " new"], cache: nn.KVCache, cross: nn.CrossKV
    ) -> tuple[Float[Array, "new vocab"], nn.KVCache]:
        """Cached step: logits for the `new` decoder tokens and the updated cache."""
        hidden, cache = self.model.decode(decoder_input_ids, cache, cross)
        return self.logits(hidden), cache

    def logits(self, hidden: Float[Array, "tgt d_model"]) -> Float[Array, "tgt vocab"]:
        if self.lm_head is None:
            return self.model.shared.attend(hidden * (self.config.d_model**-0.5)).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    @classmethod
    def key_map(cls, config: Any) -> KeyMap:
        # the encoder-decoder is not nested under a prefix in HF's names: `shared`, `encoder`,
        # `decoder` and `lm_head` all sit at the top
        base = cls.base_class.key_map(config)
        tied = (("lm_head.weight", base.embedding),) if config.tie_word_embeddings else ()
        return KeyMap(
            rules=tuple((hf, "model." + tree) for hf, tree in base.rules[:-1])
            + (("lm_head.", "lm_head."), ("", "model.")),
            ignore=base.ignore,
            tied=base.tied + tied,
            embedding=base.embedding,
        )


def shift_tokens_right(
    labels: Int[Array, " tgt"], decoder_start_token_id: int, pad_token_id: int
) -> Int[Array, " tgt"]:
    """Decoder inputs for training: labels shifted right behind `decoder_start_token_id`,
    with label padding (-100) replaced by `pad_token_id`, as HF's `_shift_right`."""
    shifted = jnp.concatenate([jnp.array([decoder_start_token_id], labels.dtype), labels[:-1]])
    return jnp.where(shifted == -100, pad_token_id, shifted)


# --------------------------------------------------------------------------- T5 and mT5


class T5Model(EncoderDecoderShell):
    shared: nn.Embedding
    encoder: T5Encoder
    decoder: T5Decoder
    config: T5Config = eqx.field(static=True)
    encoder_class: ClassVar[type] = T5Encoder

    def __init__(self, config: T5Config, *, dtype: DTypeLike = jnp.float32, key: PRNGKeyArray):
        init_encoder_decoder(self, config, dtype, key)


class T5ForConditionalGeneration(ConditionalGenerationShell):
    model: T5Model
    lm_head: nn.Linear | None
    base_class: ClassVar[type] = T5Model


class T5EncoderModel(EncoderShell):
    shared: nn.Embedding
    encoder: T5Encoder
    config: T5Config = eqx.field(static=True)
    encoder_class: ClassVar[type] = T5Encoder

    def __init__(self, config: T5Config, *, dtype: DTypeLike = jnp.float32, key: PRNGKeyArray):
        init_encoder(self, config, dtype, key)


class MT5Model(T5Model):
    """mT5 is T5 v1.1's architecture; only its config's defaults and HF's class names differ."""


class MT5ForConditionalGeneration(ConditionalGenerationShell):
    model: MT5Model
    lm_head: nn.Linear | None
    base_class: ClassVar[type] = MT5Model


class MT5EncoderModel(T5EncoderModel):
    pass


FAMILY = Family(T5Config, (T5Model, T5ForConditionalGeneration, T5EncoderModel))
MT5_FAMILY = Family(MT5Config, (MT5Model, MT5ForConditionalGeneration, MT5EncoderModel))
