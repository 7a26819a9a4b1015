"""What decoder-only models share: slots, positions and key validity for masks, the scan
over layers with the KV cache, and the causal-LM head.

A family subclasses `DecoderModel` (its embeddings, stacked blocks and final norm) and
`DecoderLM` (the base model plus an optionally tied output projection); the forward pass,
cached decoding and cross-attention inputs are written once here, on the shared runner.

Cross-attention (`add_cross_attention` decoders): a layer implements `cross_kv(encoded)`
(keys and values heads first, computed once per encoder input) and reads `LayerContext.cross`;
`encoder_kv` and `attend_encoder` are the two halves every such layer shares (`CrossAttention`
with HF's `q_proj`... names for XGLM, BigBird's `crossattention` with its own names).
"""

import abc
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .. import nn
from ..checkpoint.keymap import KeyMap
from ..errors import InputError
from ._config import ModelConfig
from ._contract import CausalLM, Decoder
from ._runner import LayerStep, TokenInputs, check_token_ids, cross_inputs, run_stack, token_inputs


class CrossLayer(NamedTuple):
    """One layer's cross-attention keys and values (heads first) and the encoder's padding."""

    keys: Float[Array, "kv_heads src head_dim"]
    values: Float[Array, "kv_heads src head_dim"]
    valid: Bool[Array, " src"]


class LayerContext(NamedTuple):
    """A block's inputs besides its hidden states."""

    mask: Bool[Array, "seq kv"]
    positions: Int[Array, " seq"]
    write: nn.LayerWrite | None  # where to put this layer's keys/values, when decoding
    layer: Int[Array, ""]
    cross: CrossLayer | None = None  # the encoder states to attend, for cross-attention layers

    @property
    def causal(self) -> bool:
        """Queries and keys are the same slots (no cache), so attention may skip blocks."""
        return self.write is None


class DecoderModel(Decoder):
    """Base of decoder-only stacks (GPT-Neo, Gemma, XGLM). A subclass provides `embed`,
    `stack`, `final_norm`, `kv_shape` and `input_embeddings` (and `layer_windows` for
    sliding windows); the forward pass, cached decoding and the cache are written here once."""

    config: eqx.AbstractVar[ModelConfig]

    @abc.abstractmethod
    def embed(
        self, input_ids: Int[Array, " seq"], positions: Int[Array, " seq"], *, key: PRNGKeyArray | None
    ) -> Float[Array, "seq hidden"]:
        """Token (and position) embeddings with their dropout."""

    @property
    @abc.abstractmethod
    def stack(self) -> nn.Stacked:
        """The stacked decoder layers."""

    @abc.abstractmethod
    def final_norm(self, x: Float[Array, "seq hidden"]) -> Float[Array, "seq hidden"]:
        """The norm after the last layer."""

    @property
    @abc.abstractmethod
    def kv_shape(self) -> tuple[int, int]:
        """`(kv_heads, head_dim)` of the cache."""

    @property
    @abc.abstractmethod
    def input_embeddings(self) -> nn.Embedding:
        """The token embedding table (what a tied LM head multiplies by)."""

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Sliding-window width of each layer; `nn.NO_WINDOW` for full causal attention."""
        return (nn.NO_WINDOW,) * self.stack.num_layers

    @property
    def cache_shape(self) -> tuple[int, int, int]:
        return (self.stack.num_layers, *self.kv_shape)

    def __call__(
        self,
        input_ids: Int[Array, " seq"],
        *,
        attention_mask: Int[Array, " seq"] | Bool[Array, " seq"] | None = None,
        position_ids: Int[Array, " seq"] | None = None,
        encoder_hidden_states: Float[Array, "enc_seq hidden"] | None = None,
        encoder_attention_mask: Int[Array, " enc_seq"] | Bool[Array, " enc_seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq hidden"]:
        """**Arguments:**

        - `input_ids`: one sequence of token ids.
        - `attention_mask`: 1 for real tokens, 0 for padding (left padding for batches).
        - `position_ids`: default `0..seq-1`, as HF; pass `cumsum(mask) - 1` for left padding.
        - `encoder_hidden_states`, `encoder_attention_mask`: what cross-attention layers
          attend to (configs with `add_cross_attention`).
        - `key`: enables dropout (the model must not be in inference mode).

        **Returns:** final hidden states `[seq, hidden]`.
        """
        cross = cross_inputs(self.stack, encoder_hidden_states, encoder_attention_mask)
        inputs = token_inputs(input_ids, attention_mask, position_ids, None)
        hidden, _ = self._forward(input_ids, inputs, key, cross)
        return hidden

    def decode(
        self,
        input_ids: Int[Array, " new"],
        cache: nn.KVCache,
        *,
        attention_mask: Int[Array, " new"] | Bool[Array, " new"] | None = None,
        position_ids: Int[Array, " new"] | None = None,
        cross: nn.CrossKV | None = None,
    ) -> tuple[Float[Array, "new hidden"], nn.KVCache]:
        """Runs `new` tokens against the cache (a prompt, or one token at a time); `cross`
        from `cross_kv` for cross-attention layers.

        **Returns:** hidden states `[new, hidden]` and the cache with them appended.
        """
        inputs = token_inputs(input_ids, attention_mask, position_ids, cache)
        return self._forward(input_ids, inputs, None, cross)

    def cross_kv(
        self,
        encoder_hidden_states: Float[Array, "enc_seq hidden"],
        encoder_attention_mask: Int[Array, " enc_seq"] | Bool[Array, " enc_seq"] | None = None,
    ) -> nn.CrossKV:
        """Every layer's cross-attention keys and values, computed once for `decode`."""
        return cross_inputs(self.stack, encoder_hidden_states, encoder_attention_mask)

    def _forward(
        self, input_ids: Int[Array, " seq"], inputs: TokenInputs, key: PRNGKeyArray | None, cross: nn.CrossKV | None
    ) -> tuple[Float[Array, "seq hidden"], nn.KVCache | None]:
        input_ids = check_token_ids(input_ids, self.config.vocab_size)

        def layer(block, x, step: LayerStep, layer_key):
            window, cross_kv = step.inputs
            mask = nn.causal_mask(inputs.slots, inputs.kv_slots, inputs.kv_valid, window)
            crossing = None if cross_kv is None else CrossLayer(*cross_kv, cross.valid)
            return block(x, LayerContext(mask, inputs.positions, step.write, step.index, crossing), key=layer_key)

        windows = jnp.asarray(self.layer_windows, jnp.int32)
        x, write = run_stack(
            self.stack,
            embed=lambda k: self.embed(input_ids, inputs.positions, key=k),
            layer=layer,
            finish=lambda x, _: self.final_norm(x),
            key=key,
            write=inputs.write,
            per_layer=(windows, None if cross is None else (cross.keys, cross.values)),
        )
        return x, inputs.finish(write)


def attention_projections(
    dim: int, *, qkv_bias: bool, init_std: float, dtype: DTypeLike, key: PRNGKeyArray
) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    """The `q_proj`, `k_proj`, `v_proj` (biased if `qkv_bias`) and biased `out_proj` of
    `SelfAttention` and `CrossAttention`."""
    kq, kk, kv, ko = jax.random.split(key, 4)
    linear = lambda bias, k: nn.Linear(dim, dim, use_bias=bias, init_std=init_std, dtype=dtype, key=k)  # noqa: E731
    return linear(qkv_bias, kq), linear(qkv_bias, kk), linear(qkv_bias, kv), linear(True, ko)


class ProjectedAttention(eqx.Module):
    """Multi-head attention's `q_proj`/`k_proj`/`v_proj`/`out_proj` (HF's names), dropout,
    head count and score scale: what self- and cross-attention layers hold alike."""

    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    out_proj: nn.Linear
    dropout: eqx.nn.Dropout
    num_heads: int = eqx.field(static=True)
    scale: float | None = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool,
        scale: float | None,
        dropout: float,
        init_std: float,
        dtype: DTypeLike,
        key: PRNGKeyArray,
    ):
        projections = attention_projections(dim, qkv_bias=qkv_bias, init_std=init_std, dtype=dtype, key=key)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = projections
        self.dropout = eqx.nn.Dropout(dropout)
        self.num_heads, self.scale = num_heads, scale


class SelfAttention(ProjectedAttention):
    """Multi-head causal self-attention with HF's `q_proj`/`k_proj`/`v_proj`/`out_proj`
    names (GPT-Neo, XGLM), writing its keys and values to the cache when decoding."""

    def __call__(
        self, x: Float[Array, "seq dim"], ctx: LayerContext, *, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, "seq dim"], nn.LayerWrite | None]:
        seq, dim = x.shape
        q, k, v = nn.fused_projections(x, (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = (t.reshape(seq, self.num_heads, -1) for t in (q, k, v))
        write, k, v = nn.cached_kv(ctx.write, ctx.layer, k, v)
        out = nn.dot_product_attention(
            q, k, v, ctx.mask, scale=self.scale, dropout=self.dropout, key=key, causal=ctx.causal
        )
        return self.out_proj(out.reshape(seq, dim)), write


def encoder_kv(
    key_proj: nn.AbstractLinear, value_proj: nn.AbstractLinear, encoded: Float[Array, "src dim"], num_heads: int
) -> tuple[Float[Array, "heads src head_dim"], Float[Array, "heads src head_dim"]]:
    """A cross-attention layer's keys and values of the encoder states, heads first (the
    layout of `CrossLayer` and of a layer's `cross_kv`). The states are cast to the
    parameters' dtype (float32 encoder outputs into a bfloat16 decoder)."""
    encoded = encoded.astype(key_proj.dtype)
    k, v = nn.fused_projections(encoded, (key_proj, value_proj))
    return tuple(nn.heads_first(t.reshape(encoded.shape[0], num_heads, -1)) for t in (k, v))


def attend_encoder(
    q: Float[Array, "seq heads head_dim"],
    cross: CrossLayer,
    *,
    scale: float | None = None,
    dropout: eqx.nn.Dropout | None = None,
    key: PRNGKeyArray | None = None,
) -> Float[Array, "seq heads head_dim"]:
    """Cross-attention: every query attends every real encoder token (HF's inverted
    `encoder_attention_mask`: padding scores become float32's lowest value)."""
    mask = nn.padding_mask(q.shape[0], cross.valid)
    return nn.dot_product_attention(q, cross.keys, cross.values, mask, scale=scale, dropout=dropout, key=key)


def no_cross_attention(family: str) -> InputError:
    """The error for `encoder_hidden_states` given to a model built without cross-attention."""
    return InputError(
        f"encoder_hidden_states were given, but this {family} model has no cross-attention layers "
        "(its config has add_cross_attention=False)"
    )


class CrossAttention(ProjectedAttention):
    """Multi-head attention from a decoder's tokens to encoder states, with HF's
    `q_proj`/`k_proj`/`v_proj`/`out_proj` names (XGLM's `encoder_attn`). Queries come
    from the layer; keys and values from `cross_kv`, computed once per encoder input."""

    def cross_kv(
        self, encoded: Float[Array, "src dim"]
    ) -> tuple[Float[Array, "heads src head_dim"], Float[Array, "heads src head_dim"]]:
        """Keys and values of the encoder states, heads first."""
        return encoder_kv(self.k_proj, self.v_proj, encoded, self.num_heads)

    def __call__(
        self, x: Float[Array, "seq dim"], cross: CrossLayer, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq dim"]:
        seq, dim = x.shape
        q = self.q_proj(x).reshape(seq, self.num_heads, -1)
        out = attend_encoder(q, cross, scale=self.scale, dropout=self.dropout, key=key)
        return self.out_proj(out.reshape(seq, dim))


class DecoderLM(CausalLM):
    """Base of the decoder-only causal LMs: a `DecoderModel` plus an output projection,
    `lm_head`, which is `None` when tied to the input embeddings. A subclass declares the
    base model's class (`base_class`) and HF's attribute name for it (`base_name`)."""

    lm_head: eqx.AbstractVar[nn.Linear | None]
    base_class: ClassVar[type[DecoderModel]]
    base_name: ClassVar[str]

    @property
    def base(self) -> DecoderModel:
        return getattr(self, self.base_name)

    @property
    def input_embeddings(self) -> nn.Embedding:
        return self.base.input_embeddings

    @property
    def config(self) -> ModelConfig:
        return self.base.config

    @property
    def cache_shape(self) -> tuple[int, int, int]:
        return self.base.cache_shape

    def __call__(
        self,
        input_ids: Int[Array, " seq"],
        *,
        attention_mask: Int[Array, " seq"] | Bool[Array, " seq"] | None = None,
        position_ids: Int[Array, " seq"] | None = None,
        encoder_hidden_states: Float[Array, "enc_seq hidden"] | None = None,
        encoder_attention_mask: Int[Array, " enc_seq"] | Bool[Array, " enc_seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq vocab"]:
        """Next-token logits `[seq, vocab]` in float32; arguments as the base model's."""
        hidden = self.base(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            key=key,
        )
        return self.logits(hidden)

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
        hidden, cache = self.base.decode(
            input_ids, cache, attention_mask=attention_mask, position_ids=position_ids, cross=cross
        )
        return self.logits(hidden[-1:] if last_only else hidden), cache

    def cross_kv(
        self,
        encoder_hidden_states: Float[Array, "enc_seq hidden"],
        encoder_attention_mask: Int[Array, " enc_seq"] | Bool[Array, " enc_seq"] | None = None,
    ) -> nn.CrossKV:
        return self.base.cross_kv(encoder_hidden_states, encoder_attention_mask)

    @classmethod
    def key_map(cls, config: ModelConfig) -> KeyMap:
        """The base model's map nested under its prefix, plus the head; a tied head's
        `lm_head.weight` is the input embedding's (read and dropped, written for PyTorch)."""
        base = cls.base_class.key_map(config).nested()
        tied = (("lm_head.weight", base.embedding),) if config.tie_word_embeddings else ()
        return base.extended(rules=(("lm_head.", "lm_head."),), tied=tied)

    def logits(self, hidden: Float[Array, "seq hidden"]) -> Float[Array, "seq vocab"]:
        head = self.input_embeddings.attend if self.lm_head is None else self.lm_head
        return head(hidden).astype(jnp.float32)


def make_lm_head(config: ModelConfig, hidden_size: int, init_std: float, dtype: DTypeLike, key: PRNGKeyArray):
    """`None` when the head is tied to the input embeddings, else a bias-free `Linear`."""
    if config.tie_word_embeddings:
        return None
    return nn.Linear(hidden_size, config.vocab_size, use_bias=False, init_std=init_std, dtype=dtype, key=key)
