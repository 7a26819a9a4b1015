"""BigBird: a BERT-style post-LayerNorm encoder with `original_full` attention, and the
eight HF heads.

Reference: HF `modeling_flax_big_bird.py` and `modeling_big_bird.py` (4.57.6). Parameter
and attribute names are HF's (`bert`, `cls`, `classifier`, `qa_classifier`), except that a
layer's `attention.self` is stored as `attention.self_attn` (`self` cannot name a field).

Attention: `original_full`, or `block_sparse` (see `_block_sparse.py`), which like upstream
pads inputs to whole blocks and falls back to full attention on inputs of at most
`(5 + 2 * num_random_blocks) * block_size` tokens. Cached decoding (the causal LM) always
uses full attention.

Cross-attention decoders (`is_decoder=True`, `add_cross_attention=True`): each layer's
`crossattention` (stored, like `attention`, with `self` renamed `self_attn`) attends to
`encoder_hidden_states` after the causal self-attention, as HF Flax's `FlaxBigBirdLayer`
and BERT's decoder layers do, always with full attention (HF switches such models to
`original_full`). HF PyTorch 4.57.6's `BigBirdLayer` also hands the encoder states to its
*self*-attention, which then attends to them instead of to the decoder's own tokens; we
follow the Flax reference, not that bug.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .. import nn
from ..checkpoint.keymap import KeyMap
from ..errors import ConfigError, InputError
from ..validation import (
    Count,
    Layers,
    NonNegativeFloat,
    PositiveFloat,
    Probability,
    Relation,
    Size,
    TokenId,
    TokenIds,
    divisible,
    show_value,
)
from ._block_sparse import SparsePlan, block_sparse_attention, inference_plan, random_plan
from ._config import Activation, ModelConfig
from ._contract import CausalLM, Decoder, Family, Model
from ._decoder import CrossLayer, LayerContext, attend_encoder, encoder_kv, no_cross_attention
from ._runner import (
    LayerStep,
    TokenInputs,
    check_token_ids,
    cross_inputs,
    run_stack,
    token_inputs,
    valid_mask,
    vmap_recording,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BigBirdConfig(ModelConfig):
    """HF's `BigBirdConfig` fields (same names and defaults), plus `num_labels` (HF derives
    it from `id2label`)."""

    model_type: ClassVar[str] = "big_bird"
    vocab_size: Size = 50358
    hidden_size: Size = 768
    num_hidden_layers: Layers = 12
    num_attention_heads: Size = 12
    intermediate_size: Size = 3072
    hidden_act: Activation = "gelu_new"
    hidden_dropout_prob: Probability = 0.1
    attention_probs_dropout_prob: Probability = 0.1
    max_position_embeddings: Size = 4096
    type_vocab_size: Size = 2
    initializer_range: NonNegativeFloat = 0.02
    layer_norm_eps: PositiveFloat = 1e-12
    pad_token_id: TokenId | None = 0
    bos_token_id: TokenId | None = 1
    eos_token_id: TokenIds | None = 2
    sep_token_id: TokenId | None = 66
    attention_type: Literal["original_full", "block_sparse"] = "block_sparse"
    use_bias: bool = True
    rescale_embeddings: bool = False
    block_size: Size = 64
    num_random_blocks: Count = 3
    classifier_dropout: Probability | None = None
    num_labels: Size = 2
    is_decoder: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True

    RELATIONS: ClassVar = (
        divisible("hidden_size", "num_attention_heads"),
        # cross-attention layers belong to a decoder, as in HF's BigBirdLayer
        Relation(
            ("add_cross_attention", "is_decoder"),
            lambda cross, decoder: decoder or not cross,
            "add_cross_attention=True needs is_decoder=True",
        ),
    )

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides: Any):
        labels = hf.get("id2label") if isinstance(hf, Mapping) else None
        if labels is not None and "num_labels" not in overrides:
            if not isinstance(labels, dict):
                raise ConfigError(
                    f"big_bird config: id2label must be an object of labels by id, got {show_value(labels)}"
                )
            overrides = {**overrides, "num_labels": len(labels)}
        return super().from_hf_config(hf, **overrides)

    def to_hf_config(self) -> dict[str, Any]:
        out = super().to_hf_config()
        if len(out.get("id2label") or {}) != self.num_labels:
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        out.pop("num_labels")
        return out

    @property
    def position_limit(self) -> int:
        return self.max_position_embeddings

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def block_sparse(self) -> bool:
        """Whether long inputs use block-sparse attention: never with cross-attention, as
        HF's `BigBirdModel` switches such models to `original_full`."""
        return self.attention_type == "block_sparse" and not self.add_cross_attention

    @property
    def max_full_attention_tokens(self) -> int:
        """Up to this length `block_sparse` falls back to full attention, as upstream."""
        return (5 + 2 * self.num_random_blocks) * self.block_size

    @property
    def classifier_dropout_rate(self) -> float:
        return self.hidden_dropout_prob if self.classifier_dropout is None else self.classifier_dropout


def _linear(config: BigBirdConfig, d_in: int, d_out: int, dtype: DTypeLike, key: PRNGKeyArray, bias: bool = True):
    return nn.Linear(d_in, d_out, use_bias=bias, init_std=config.initializer_range, dtype=dtype, key=key)


class BigBirdEmbeddings(eqx.Module):
    """Word + token-type + position embeddings, dropout, then LayerNorm (HF's order)."""

    word_embeddings: nn.Embedding
    position_embeddings: nn.Embedding
    token_type_embeddings: nn.Embedding
    LayerNorm: nn.LayerNorm
    dropout: eqx.nn.Dropout
    rescale: float = eqx.field(static=True)

    def __init__(self, config: BigBirdConfig, *, dtype: DTypeLike, key: PRNGKeyArray):
        kw, kp, kt = jax.random.split(key, 3)
        dim, std = config.hidden_size, config.initializer_range
        self.word_embeddings = nn.Embedding(config.vocab_size, dim, init_std=std, dtype=dtype, key=kw)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, dim, init_std=std, dtype=dtype, key=kp)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, dim, init_std=std, dtype=dtype, key=kt)
        self.LayerNorm = nn.LayerNorm(dim, eps=config.layer_norm_eps, dtype=dtype)
        self.dropout = eqx.nn.Dropout(config.hidden_dropout_prob)
        self.rescale = config.hidden_size**0.5 if config.rescale_embeddings else 1.0

    def __call__(
        self,
        input_ids: Int[Array, " seq"],
        token_type_ids: Int[Array, " seq"],
        position_ids: Int[Array, " seq"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq hidden"]:
        x = self.word_embeddings(input_ids)
        if self.rescale != 1.0:
            x = x * self.rescale
        x = x + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        return self.LayerNorm(self.dropout(x, key=key))


class BigBirdSelfAttention(eqx.Module):
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    dropout: eqx.nn.Dropout
    num_heads: int = eqx.field(static=True)

    def __init__(self, config: BigBirdConfig, *, dtype: DTypeLike, key: PRNGKeyArray):
        kq, kk, kv = jax.random.split(key, 3)
        dim = config.hidden_size
        self.query = _linear(config, dim, dim, dtype, kq, config.use_bias)
        self.key = _linear(config, dim, dim, dtype, kk, config.use_bias)
        self.value = _linear(config, dim, dim, dtype, kv, config.use_bias)
        self.dropout = eqx.nn.Dropout(config.attention_probs_dropout_prob)
        self.num_heads = config.num_attention_heads

    def __call__(
        self,
        x: Float[Array, "seq hidden"],
        ctx: LayerContext,
        *,
        key: PRNGKeyArray | None = None,
        sparse: SparsePlan | None = None,
    ) -> tuple[Float[Array, "seq hidden"], nn.LayerWrite | None]:
        seq, dim = x.shape
        q, k, v = nn.fused_projections(x, (self.query, self.key, self.value))
        q, k, v = (t.reshape(seq, self.num_heads, -1) for t in (q, k, v))
        if sparse is not None:  # upstream applies no attention dropout on this path
            return block_sparse_attention(q, k, v, sparse).reshape(seq, dim), ctx.write
        write, k, v = nn.cached_kv(ctx.write, ctx.layer, k, v)
        out = nn.dot_product_attention(q, k, v, ctx.mask, dropout=self.dropout, key=key)
        return out.reshape(seq, dim), write

    def cross_kv(
        self, encoded: Float[Array, "src hidden"]
    ) -> tuple[Float[Array, "heads src head_dim"], Float[Array, "heads src head_dim"]]:
        """Keys and values of the encoder states, heads first (as a `crossattention`)."""
        return encoder_kv(self.key, self.value, encoded, self.num_heads)

    def attend_encoder(
        self, x: Float[Array, "seq hidden"], cross: CrossLayer, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq hidden"]:
        """Queries from `x` attending to the encoder's keys and values (as a `crossattention`)."""
        seq, dim = x.shape
        q = self.query(x).reshape(seq, self.num_heads, -1)
        return attend_encoder(q, cross, dropout=self.dropout, key=key).reshape(seq, dim)


class BigBirdResidualOutput(eqx.Module):
    """`LayerNorm(x + dropout(dense(h)))`: HF's `BigBirdSelfOutput` and `BigBirdOutput`."""

    dense: nn.Linear
    LayerNorm: nn.LayerNorm
    dropout: eqx.nn.Dropout

    def __init__(self, config: BigBirdConfig, d_in: int, *, dtype: DTypeLike, key: PRNGKeyArray):
        self.dense = _linear(config, d_in, config.hidden_size, dtype, key)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
        self.dropout = eqx.nn.Dropout(config.hidden_dropout_prob)

    def __call__(
        self, h: Float[Array, "seq d_in"], x: Float[Array, "seq hidden"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq hidden"]:
        return self.LayerNorm(x + self.dropout(self.dense(h), key=key))


class BigBirdAttention(eqx.Module):
    self_attn: BigBirdSelfAttention
    output: BigBirdResidualOutput

    def __init__(self, config: BigBirdConfig, *, dtype: DTypeLike, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.self_attn = BigBirdSelfAttention(config, dtype=dtype, key=k1)
        self.output = BigBirdResidualOutput(config, config.hidden_size, dtype=dtype, key=k2)

    def __call__(
        self,
        x: Float[Array, "seq hidden"],
        ctx: LayerContext,
        *,
        key: PRNGKeyArray | None = None,
        sparse: SparsePlan | None = None,
    ) -> tuple[Float[Array, "seq hidden"], nn.LayerWrite | None]:
        k1, k2 = nn.split_key(key, 2)
        h, write = self.self_attn(x, ctx, key=k1, sparse=sparse)
        return self.output(h, x, key=k2), write

    def cross(
        self, x: Float[Array, "seq hidden"], cross: CrossLayer, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq hidden"]:
        """As a `crossattention`: `LN(x + dense(attention(x, encoder)))`."""
        k1, k2 = nn.split_key(key, 2)
        return self.output(self.self_attn.attend_encoder(x, cross, key=k1), x, key=k2)


class BigBirdIntermediate(eqx.Module):
    dense: nn.Linear
    hidden_act: str = eqx.field(static=True)

    def __init__(self, config: BigBirdConfig, *, dtype: DTypeLike, key: PRNGKeyArray):
        self.dense = _linear(config, config.hidden_size, config.intermediate_size, dtype, key)
        self.hidden_act = config.hidden_act

    def __call__(self, x: Float[Array, "seq hidden"]) -> Float[Array, "seq inner"]:
        return nn.activation(self.hidden_act)(self.dense(x))


class BigBirdLayer(eqx.Module):
    """Post-LayerNorm: `x = LN(x + attn(x))`, with encoder states `x = LN(x + cross(x,
    encoder))`, then `LN(x + out(act(inter(x))))`."""

    attention: BigBirdAttention
    crossattention: BigBirdAttention | None  # `None` without add_cross_attention
    intermediate: BigBirdIntermediate
    output: BigBirdResidualOutput

    def __init__(self, config: BigBirdConfig, *, dtype: DTypeLike, key: PRNGKeyArray):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.attention = BigBirdAttention(config, dtype=dtype, key=k1)
        self.crossattention = BigBirdAttention(config, dtype=dtype, key=k4) if config.add_cross_attention else None
        self.intermediate = BigBirdIntermediate(config, dtype=dtype, key=k2)
        self.output = BigBirdResidualOutput(config, config.intermediate_size, dtype=dtype, key=k3)

    def __call__(
        self,
        x: Float[Array, "seq hidden"],
        ctx: LayerContext,
        *,
        key: PRNGKeyArray | None = None,
        sparse: SparsePlan | None = None,
    ) -> tuple[Float[Array, "seq hidden"], nn.LayerWrite | None]:
        k1, k2, k3 = nn.split_key(key, 3)
        x, write = self.attention(x, ctx, key=k1, sparse=sparse)
        if ctx.cross is not None:  # without encoder states HF skips the block
            x = self._crossattention().cross(x, ctx.cross, key=k3)
        return self.output(self.intermediate(x), x, key=k2), write

    def cross_kv(
        self, encoded: Float[Array, "src hidden"]
    ) -> tuple[Float[Array, "heads src head_dim"], Float[Array, "heads src head_dim"]]:
        """This layer's cross-attention keys and values (heads first), computed once per input."""
        return self._crossattention().self_attn.cross_kv(encoded)

    def _crossattention(self) -> BigBirdAttention:
        if self.crossattention is None:
            raise no_cross_attention("BigBird")
        return self.crossattention


class BigBirdOutput(NamedTuple):
    """The base model's outputs: per-token hidden states and the pooled first token."""

    last_hidden_state: Float[Array, "seq hidden"]
    pooler_output: Float[Array, " hidden"] | None


class BigBirdModel(Decoder):
    """The BigBird encoder (with its pooler unless built with `add_pooling_layer=False`).

    `model(input_ids, *, attention_mask, token_type_ids, position_ids,
    encoder_hidden_states, encoder_attention_mask, key)` returns a
    `BigBirdOutput(last_hidden_state [seq, hidden], pooler_output [hidden] | None)`.
    With `is_decoder=True` attention is causal; with `add_cross_attention=True` too, the
    layers attend to `encoder_hidden_states [enc_seq, hidden]`.
    """

    outputs: ClassVar[tuple[str, ...]] = ("last_hidden_state", "pooler_output")

    embeddings: BigBirdEmbeddings
    encoder: nn.Stacked[BigBirdLayer]
    pooler: nn.Linear | None
    config: BigBirdConfig = eqx.field(static=True)

    def __init__(
        self,
        config: BigBirdConfig,
        *,
        add_pooling_layer: bool = True,
        dtype: DTypeLike = jnp.float32,
        key: PRNGKeyArray,
    ):
        k_emb, k_enc, k_pool = jax.random.split(key, 3)
        self.embeddings = BigBirdEmbeddings(config, dtype=dtype, key=k_emb)
        self.encoder = nn.Stacked.build(
            lambda k: BigBirdLayer(config, dtype=dtype, key=k), config.num_hidden_layers, key=k_enc
        )
        dim = config.hidden_size
        self.pooler = _linear(config, dim, dim, dtype, k_pool) if add_pooling_layer else None
        self.config = config

    def __call__(
        self,
        input_ids: Int[Array, " seq"],
        *,
        attention_mask: Int[Array, " seq"] | Bool[Array, " seq"] | None = None,
        token_type_ids: Int[Array, " seq"] | None = None,
        position_ids: Int[Array, " seq"] | None = None,
        encoder_hidden_states: Float[Array, "enc_seq hidden"] | None = None,
        encoder_attention_mask: Int[Array, " enc_seq"] | Bool[Array, " enc_seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> BigBirdOutput:
        cfg = self.config
        seq = input_ids.shape[0]
        cross = cross_inputs(self.encoder, encoder_hidden_states, encoder_attention_mask)
        sparse = cfg.block_sparse and seq > cfg.max_full_attention_tokens
        if sparse:  # pad to whole blocks as upstream; the padding is masked and cut off after
            pad = -seq % cfg.block_size
            valid = valid_mask(input_ids, attention_mask)
            input_ids = jnp.pad(input_ids, (0, pad), constant_values=cfg.pad_token_id or 0)
            attention_mask = jnp.pad(valid, (0, pad))
            if token_type_ids is not None:
                token_type_ids = jnp.pad(token_type_ids, (0, pad))
            if position_ids is not None:
                position_ids = jnp.pad(position_ids, (0, pad), constant_values=cfg.pad_token_id or 0)
        inputs = token_inputs(input_ids, attention_mask, position_ids, None)
        x, _ = self._forward(input_ids, inputs, token_type_ids, key, cross, sparse=sparse)
        pooled = None if self.pooler is None else jnp.tanh(self.pooler(x[0]))
        return BigBirdOutput(x[:seq], pooled)

    def decode(
        self,
        input_ids: Int[Array, " new"],
        cache: nn.KVCache,
        *,
        attention_mask: Int[Array, " new"] | Bool[Array, " new"] | None = None,
        position_ids: Int[Array, " new"] | None = None,
        token_type_ids: Int[Array, " new"] | None = None,
        cross: nn.CrossKV | None = None,
    ) -> tuple[Float[Array, "new hidden"], nn.KVCache]:
        """Cached decoding (`is_decoder=True` configs): hidden states of the `new` tokens
        and the cache with them appended; `cross` from `cross_kv` for cross-attention layers."""
        if not self.config.is_decoder:
            raise InputError("cached decoding needs a decoder config (is_decoder=True), as HF's BigBirdForCausalLM")
        inputs = token_inputs(input_ids, attention_mask, position_ids, cache)
        return self._forward(input_ids, inputs, token_type_ids, None, cross)

    def cross_kv(
        self,
        encoder_hidden_states: Float[Array, "enc_seq hidden"],
        encoder_attention_mask: Int[Array, " enc_seq"] | Bool[Array, " enc_seq"] | None = None,
    ) -> nn.CrossKV:
        """Every layer's cross-attention keys and values, computed once for `decode`."""
        return cross_inputs(self.encoder, encoder_hidden_states, encoder_attention_mask)

    @property
    def cache_shape(self) -> tuple[int, int, int]:
        cfg = self.config
        return cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim

    def _forward(
        self,
        input_ids: Int[Array, " seq"],
        inputs: TokenInputs,
        token_type_ids: Int[Array, " seq"] | None,
        key: PRNGKeyArray | None,
        cross: nn.CrossKV | None,
        *,
        sparse: bool = False,
    ) -> tuple[Float[Array, "seq hidden"], nn.KVCache | None]:
        cfg = self.config
        seq = input_ids.shape[0]
        input_ids = check_token_ids(input_ids, cfg.vocab_size)
        token_type_ids = jnp.zeros((seq,), jnp.int32) if token_type_ids is None else token_type_ids
        if cfg.is_decoder:
            mask = nn.causal_mask(inputs.slots, inputs.kv_slots, inputs.kv_valid)
        else:
            mask = nn.padding_mask(seq, inputs.kv_valid)
        num_blocks = seq // cfg.block_size
        heads, rand = cfg.num_attention_heads, cfg.num_random_blocks

        def layer(block: BigBirdLayer, x, step: LayerStep, layer_key):
            plan = None
            if sparse:  # HF's fixed plan at inference; a fresh random one per layer and step in training
                if layer_key is None:
                    rand_blocks = inference_plan(heads, num_blocks, rand)
                else:
                    layer_key, plan_key = jax.random.split(layer_key)
                    rand_blocks = random_plan(plan_key, heads, num_blocks, rand)
                plan = SparsePlan(inputs.kv_valid, rand_blocks, cfg.block_size, random_is_first=layer_key is None)
            crossing = None if step.inputs is None else CrossLayer(*step.inputs, cross.valid)
            ctx = LayerContext(mask, inputs.positions, step.write, step.index, crossing)
            return block(x, ctx, key=layer_key, sparse=plan)

        x, write = run_stack(
            self.encoder,
            embed=lambda k: self.embeddings(input_ids, token_type_ids, inputs.positions, key=k),
            layer=layer,
            finish=lambda x, _: x,
            key=key,
            write=inputs.write,
            per_layer=None if cross is None else (cross.keys, cross.values),
        )
        return x, inputs.finish(write)

    @property
    def input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    @classmethod
    def key_map(cls, config: BigBirdConfig) -> KeyMap:
        return KeyMap(
            rules=(
                ("encoder.layer.{i}.attention.self.", "encoder.layers.attention.self_attn."),
                ("encoder.layer.{i}.crossattention.self.", "encoder.layers.crossattention.self_attn."),
                ("encoder.layer.{i}.", "encoder.layers."),
                ("", ""),
            ),
            ignore=(r"embeddings\.(position_ids|token_type_ids)",),  # buffers some savers kept
            prefix="bert",
            embedding="embeddings.word_embeddings.weight",
        )


class BigBirdPredictionHeadTransform(eqx.Module):
    dense: nn.Linear
    LayerNorm: nn.LayerNorm
    hidden_act: str = eqx.field(static=True)

    def __init__(self, config: BigBirdConfig, *, dtype: DTypeLike, key: PRNGKeyArray):
        self.dense = _linear(config, config.hidden_size, config.hidden_size, dtype, key)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
        self.hidden_act = config.hidden_act

    def __call__(self, x: Float[Array, "seq hidden"]) -> Float[Array, "seq hidden"]:
        return self.LayerNorm(nn.activation(self.hidden_act)(self.dense(x)))


class BigBirdLMPredictionHead(eqx.Module):
    """Transform, then logits against the word embeddings (tied) or `decoder`, plus `bias`."""

    transform: BigBirdPredictionHeadTransform
    bias: Float[Array, " vocab"]
    decoder: nn.Linear | None

    def __init__(self, config: BigBirdConfig, *, dtype: DTypeLike, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.transform = BigBirdPredictionHeadTransform(config, dtype=dtype, key=k1)
        self.bias = jnp.zeros((config.vocab_size,), dtype)
        tied = config.tie_word_embeddings
        self.decoder = None if tied else _linear(config, config.hidden_size, config.vocab_size, dtype, k2, False)

    def __call__(self, x: Float[Array, "seq hidden"], embeddings: nn.Embedding) -> Float[Array, "seq vocab"]:
        h = self.transform(x)
        logits = embeddings.attend(h) if self.decoder is None else self.decoder(h)
        return (logits + self.bias).astype(jnp.float32)


class BigBirdOnlyMLMHead(eqx.Module):
    predictions: BigBirdLMPredictionHead

    def __init__(self, config: BigBirdConfig, *, dtype: DTypeLike, key: PRNGKeyArray):
        self.predictions = BigBirdLMPredictionHead(config, dtype=dtype, key=key)


class BigBirdPreTrainingHeads(eqx.Module):
    predictions: BigBirdLMPredictionHead
    seq_relationship: nn.Linear

    def __init__(self, config: BigBirdConfig, *, dtype: DTypeLike, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.predictions = BigBirdLMPredictionHead(config, dtype=dtype, key=k1)
        self.seq_relationship = _linear(config, config.hidden_size, 2, dtype, k2)


class BigBirdClassificationHead(eqx.Module):
    """On the first token: dropout, dense, activation, dropout, `out_proj`."""

    dense: nn.Linear
    dropout: eqx.nn.Dropout
    out_proj: nn.Linear
    hidden_act: str = eqx.field(static=True)

    def __init__(self, config: BigBirdConfig, *, dtype: DTypeLike, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.dense = _linear(config, config.hidden_size, config.hidden_size, dtype, k1)
        self.dropout = eqx.nn.Dropout(config.classifier_dropout_rate)
        self.out_proj = _linear(config, config.hidden_size, config.num_labels, dtype, k2)
        self.hidden_act = config.hidden_act

    def __call__(self, x: Float[Array, "seq hidden"], *, key: PRNGKeyArray | None = None) -> Float[Array, " labels"]:
        k1, k2 = nn.split_key(key, 2)
        h = nn.activation(self.hidden_act)(self.dense(self.dropout(x[0], key=k1)))
        return self.out_proj(self.dropout(h, key=k2))


class BigBirdForQuestionAnsweringHead(eqx.Module):
    dropout: eqx.nn.Dropout
    intermediate: BigBirdIntermediate
    output: BigBirdResidualOutput
    qa_outputs: nn.Linear

    def __init__(self, config: BigBirdConfig, *, dtype: DTypeLike, key: PRNGKeyArray):
        k1, k2, k3 = jax.random.split(key, 3)
        self.dropout = eqx.nn.Dropout(config.hidden_dropout_prob)
        self.intermediate = BigBirdIntermediate(config, dtype=dtype, key=k1)
        self.output = BigBirdResidualOutput(config, config.intermediate_size, dtype=dtype, key=k2)
        self.qa_outputs = _linear(config, config.hidden_size, config.num_labels, dtype, k3)

    def __call__(self, x: Float[Array, "seq hidden"], *, key: PRNGKeyArray | None = None) -> Float[Array, "seq labels"]:
        k1, k2 = nn.split_key(key, 2)
        h = self.output(self.intermediate(self.dropout(x, key=k1)), x, key=k2)
        return self.qa_outputs(h)


class _BigBirdHead(Model):
    """What every head shares: the `bert` base model, its inputs and its key map."""

    bert: BigBirdModel
    head_rules: ClassVar[tuple[tuple[str, str], ...]]
    #: The head predicts tokens (`cls.predictions`), whose decoder PyTorch ties to the word
    #: embeddings (unless `tie_word_embeddings=False`) and to `cls.predictions.bias`.
    mlm_head: ClassVar[bool] = False
    #: HF's Flax class builds its base model with the pooler (some heads never use it).
    flax_pooler: ClassVar[bool] = True

    @property
    def config(self) -> BigBirdConfig:
        return self.bert.config

    def __call__(
        self,
        input_ids: Int[Array, " seq"],
        *,
        attention_mask: Int[Array, " seq"] | Bool[Array, " seq"] | None = None,
        token_type_ids: Int[Array, " seq"] | None = None,
        position_ids: Int[Array, " seq"] | None = None,
        encoder_hidden_states: Float[Array, "enc_seq hidden"] | None = None,
        encoder_attention_mask: Int[Array, " enc_seq"] | Bool[Array, " enc_seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Any:
        """Runs `bert` on one sequence (attending to `encoder_hidden_states` in
        cross-attention decoders), then the head (`head`, typed with its output shape)."""
        k1, k2 = nn.split_key(key, 2)
        out = self._encode(
            input_ids, attention_mask, token_type_ids, position_ids, k1, encoder_hidden_states, encoder_attention_mask
        )
        return self.head(out, key=k2)

    def head(self, out: BigBirdOutput, *, key: PRNGKeyArray | None = None) -> Any:
        """The head on the base model's outputs (heads with their own `__call__` skip it)."""
        raise TypeError(f"{type(self).__name__} has no separate head")  # pragma: no cover

    def _encode(
        self,
        input_ids,
        attention_mask,
        token_type_ids,
        position_ids,
        key,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
    ) -> BigBirdOutput:
        return self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            key=key,
        )

    @classmethod
    def key_map(cls, config: BigBirdConfig) -> KeyMap:
        base = BigBirdModel.key_map(config).nested()
        tied: tuple[tuple[str, str], ...] = ()
        if cls.mlm_head:  # savers keep either or both of each tied pair
            tied = (("cls.predictions.decoder.bias", "cls.predictions.bias"),)
            if config.tie_word_embeddings:
                tied += (("cls.predictions.decoder.weight", base.embedding),)
        not_in_flax = () if cls.flax_pooler else ("bert.pooler.",)
        return base.extended(rules=cls.head_rules, tied=tied, not_in_flax=not_in_flax)


class BigBirdForPreTrainingOutput(NamedTuple):
    prediction_logits: Float[Array, "seq vocab"]
    seq_relationship_logits: Float[Array, " 2"]


class BigBirdForPreTraining(_BigBirdHead):
    """Masked-LM and next-sentence heads; returns `BigBirdForPreTrainingOutput`."""

    cls: BigBirdPreTrainingHeads
    task: ClassVar[str | None] = "pretraining"
    outputs: ClassVar[tuple[str, ...]] = ("prediction_logits", "seq_relationship_logits")
    head_rules: ClassVar = (("cls.", "cls."),)
    mlm_head: ClassVar[bool] = True

    def __init__(self, config: BigBirdConfig, *, dtype: DTypeLike = jnp.float32, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.bert = BigBirdModel(config, dtype=dtype, key=k1)
        self.cls = BigBirdPreTrainingHeads(config, dtype=dtype, key=k2)

    def head(self, out: BigBirdOutput, *, key: PRNGKeyArray | None = None) -> BigBirdForPreTrainingOutput:
        mlm = self.cls.predictions(out.last_hidden_state, self.bert.input_embeddings)
        return BigBirdForPreTrainingOutput(mlm, self.cls.seq_relationship(out.pooler_output).astype(jnp.float32))


class BigBirdForMaskedLM(_BigBirdHead):
    """Masked-LM logits `[seq, vocab]`."""

    cls: BigBirdOnlyMLMHead
    task: ClassVar[str | None] = "masked_lm"
    outputs: ClassVar[tuple[str, ...]] = ("logits",)
    head_rules: ClassVar = (("cls.", "cls."),)
    mlm_head: ClassVar[bool] = True
    flax_pooler: ClassVar[bool] = False

    def __init__(self, config: BigBirdConfig, *, dtype: DTypeLike = jnp.float32, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.bert = BigBirdModel(config, dtype=dtype, key=k1)
        self.cls = BigBirdOnlyMLMHead(config, dtype=dtype, key=k2)

    def head(self, out: BigBirdOutput, *, key: PRNGKeyArray | None = None) -> Float[Array, "seq vocab"]:
        return self.cls.predictions(out.last_hidden_state, self.bert.input_embeddings)


class BigBirdForCausalLM(_BigBirdHead, CausalLM):
    """Next-token logits `[seq, vocab]` from the MLM head. With `is_decoder=True` (as HF
    expects for this class) attention is causal and `decode`/`init_cache` give cached
    generation through `eqx_models.generate`."""

    cls: BigBirdOnlyMLMHead
    head_rules: ClassVar = (("cls.", "cls."),)
    mlm_head: ClassVar[bool] = True
    flax_pooler: ClassVar[bool] = False

    def __init__(self, config: BigBirdConfig, *, dtype: DTypeLike = jnp.float32, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.bert = BigBirdModel(config, dtype=dtype, key=k1)
        self.cls = BigBirdOnlyMLMHead(config, dtype=dtype, key=k2)

    def head(self, out: BigBirdOutput, *, key: PRNGKeyArray | None = None) -> Float[Array, "seq vocab"]:
        return self.cls.predictions(out.last_hidden_state, self.bert.input_embeddings)

    def decode(
        self,
        input_ids: Int[Array, " new"],
        cache: nn.KVCache,
        *,
        attention_mask: Int[Array, " new"] | Bool[Array, " new"] | None = None,
        position_ids: Int[Array, " new"] | None = None,
        last_only: bool = False,
        cross: nn.CrossKV | None = None,
    ) -> tuple[Float[Array, "out vocab"], nn.KVCache]:
        """Cached step: logits for the `new` tokens (only the last one's with `last_only`);
        `cross` from `cross_kv` for cross-attention layers."""
        hidden, cache = self.bert.decode(
            input_ids, cache, attention_mask=attention_mask, position_ids=position_ids, cross=cross
        )
        return self.head(BigBirdOutput(hidden[-1:] if last_only else hidden, None)), cache

    def cross_kv(
        self,
        encoder_hidden_states: Float[Array, "enc_seq hidden"],
        encoder_attention_mask: Int[Array, " enc_seq"] | Bool[Array, " enc_seq"] | None = None,
    ) -> nn.CrossKV:
        """Every layer's cross-attention keys and values, computed once for `decode`."""
        return self.bert.cross_kv(encoder_hidden_states, encoder_attention_mask)

    @property
    def cache_shape(self) -> tuple[int, int, int]:
        return self.bert.cache_shape


class BigBirdForSequenceClassification(_BigBirdHead):
    """Logits `[num_labels]` from the first token (regression when `num_labels == 1`)."""

    classifier: BigBirdClassificationHead
    task: ClassVar[str | None] = "sequence_classification"
    outputs: ClassVar[tuple[str, ...]] = ("logits",)
    head_rules: ClassVar = (("classifier.", "classifier."),)

    def __init__(self, config: BigBirdConfig, *, dtype: DTypeLike = jnp.float32, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.bert = BigBirdModel(config, dtype=dtype, key=k1)
        self.classifier = BigBirdClassificationHead(config, dtype=dtype, key=k2)

    def head(self, out: BigBirdOutput, *, key: PRNGKeyArray | None = None) -> Float[Array, " labels"]:
        return self.classifier(out.last_hidden_state, key=key).astype(jnp.float32)


class BigBirdForMultipleChoice(_BigBirdHead):
    """One score per choice: `input_ids [choices, seq]` -> `[choices]`."""

    dropout: eqx.nn.Dropout
    classifier: nn.Linear
    task: ClassVar[str | None] = "multiple_choice"
    outputs: ClassVar[tuple[str, ...]] = ("logits",)
    head_rules: ClassVar = (("classifier.", "classifier."),)

    def __init__(self, config: BigBirdConfig, *, dtype: DTypeLike = jnp.float32, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.bert = BigBirdModel(config, dtype=dtype, key=k1)
        self.dropout = eqx.nn.Dropout(config.hidden_dropout_prob)
        self.classifier = _linear(config, config.hidden_size, 1, dtype, k2)

    def __call__(
        self,
        input_ids: Int[Array, "choices seq"],
        *,
        attention_mask: Int[Array, "choices seq"] | Bool[Array, "choices seq"] | None = None,
        token_type_ids: Int[Array, "choices seq"] | None = None,
        position_ids: Int[Array, "choices seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, " choices"]:
        choices = input_ids.shape[0]
        k1, k2 = nn.split_key(key, 2)
        keys = None if k1 is None else jax.random.split(k1, choices)

        def score(ids, mask, types, positions, choice_key, drop_key):
            pooled = self._encode(ids, mask, types, positions, choice_key).pooler_output
            return self.classifier(self.dropout(pooled, key=drop_key))[0]

        drop_keys = None if k2 is None else jax.random.split(k2, choices)
        scores = vmap_recording(score, input_ids, attention_mask, token_type_ids, position_ids, keys, drop_keys)
        return scores.astype(jnp.float32)


class BigBirdForTokenClassification(_BigBirdHead):
    """Per-token logits `[seq, num_labels]`."""

    dropout: eqx.nn.Dropout
    classifier: nn.Linear
    task: ClassVar[str | None] = "token_classification"
    outputs: ClassVar[tuple[str, ...]] = ("logits",)
    head_rules: ClassVar = (("classifier.", "classifier."),)
    flax_pooler: ClassVar[bool] = False

    def __init__(self, config: BigBirdConfig, *, dtype: DTypeLike = jnp.float32, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.bert = BigBirdModel(config, dtype=dtype, key=k1)
        self.dropout = eqx.nn.Dropout(config.classifier_dropout_rate)
        self.classifier = _linear(config, config.hidden_size, config.num_labels, dtype, k2)

    def head(self, out: BigBirdOutput, *, key: PRNGKeyArray | None = None) -> Float[Array, "seq labels"]:
        return self.classifier(self.dropout(out.last_hidden_state, key=key)).astype(jnp.float32)


class BigBirdForQuestionAnsweringOutput(NamedTuple):
    start_logits: Float[Array, " seq"]
    end_logits: Float[Array, " seq"]


class BigBirdForQuestionAnswering(_BigBirdHead):
    """Span start and end logits. As upstream, tokens up to the first `sep_token_id` are the
    question: unless `question_lengths` is given, its length comes from there, question
    tokens get `token_type_ids` 0 and the rest 1 (when not given), and question positions
    after the first are pushed down by 1e6 in both logits."""

    qa_classifier: BigBirdForQuestionAnsweringHead
    task: ClassVar[str | None] = "question_answering"
    outputs: ClassVar[tuple[str, ...]] = ("start_logits", "end_logits")
    head_rules: ClassVar = (("qa_classifier.", "qa_classifier."),)

    def __init__(
        self,
        config: BigBirdConfig,
        *,
        add_pooling_layer: bool = False,
        dtype: DTypeLike = jnp.float32,
        key: PRNGKeyArray,
    ):
        k1, k2 = jax.random.split(key)
        self.bert = BigBirdModel(config, add_pooling_layer=add_pooling_layer, dtype=dtype, key=k1)
        self.qa_classifier = BigBirdForQuestionAnsweringHead(config, dtype=dtype, key=k2)

    def __call__(
        self,
        input_ids: Int[Array, " seq"],
        *,
        attention_mask: Int[Array, " seq"] | Bool[Array, " seq"] | None = None,
        token_type_ids: Int[Array, " seq"] | None = None,
        position_ids: Int[Array, " seq"] | None = None,
        question_lengths: Int[Array, ""] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> BigBirdForQuestionAnsweringOutput:
        seq = input_ids.shape[0]
        if question_lengths is None:
            question_lengths = jnp.argmax(input_ids == self.config.sep_token_id) + 1
        in_question = jnp.arange(seq) < question_lengths
        if token_type_ids is None:
            token_type_ids = (~in_question).astype(jnp.int32)
        k1, k2 = nn.split_key(key, 2)
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, k1)
        logits = self.qa_classifier(out.last_hidden_state, key=k2).astype(jnp.float32)
        penalty = in_question.at[0].set(False).astype(jnp.float32) * 1e6
        logits = logits - penalty[:, None]
        return BigBirdForQuestionAnsweringOutput(logits[:, 0], logits[:, 1])


FAMILY = Family(
    BigBirdConfig,
    (
        BigBirdModel,
        BigBirdForPreTraining,
        BigBirdForMaskedLM,
        BigBirdForCausalLM,
        BigBirdForSequenceClassification,
        BigBirdForMultipleChoice,
        BigBirdForTokenClassification,
        BigBirdForQuestionAnswering,
    ),
)
