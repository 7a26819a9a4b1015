"""What decoder-only models share: slots, positions and key validity for masks, the scan
over layers with the KV cache, and the causal-LM head.

A family subclasses `DecoderModel` (its embeddings, stacked blocks and final norm) and
`CausalLM` (the base model plus an optionally tied output projection); the forward pass,
cached decoding and cache allocation are written once here.
"""

from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, Int, Key, PRNGKeyArray

from .. import nn
from ..checkpoint.keymap import KeyMap
from ..errors import InputError


class DecoderInputs(NamedTuple):
    """What every layer of a decoder needs besides its hidden states."""

    positions: Int[Array, " seq"]  # feed the position embeddings / rotary angles
    slots: Int[Array, " seq"]  # the queries' slots, for causal / window masks
    kv_slots: Int[Array, " kv"]  # the keys' slots (the whole cache when decoding)
    kv_valid: Bool[Array, " kv"]  # keys that are real tokens, not padding or empty cache
    cache: nn.KVCache | None  # the cache with these tokens' slots marked, if decoding
    write: nn.LayerWrite | None

    def finish(self, write: nn.LayerWrite | None) -> nn.KVCache | None:
        """The cache after every layer wrote its keys and values."""
        if self.cache is None or write is None:
            return None
        return nn.KVCache(write.keys, write.values, self.cache.valid, self.cache.index)


class LayerContext(NamedTuple):
    """A block's inputs besides its hidden states, one layer's view of `DecoderInputs`."""

    mask: Bool[Array, "seq kv"]
    positions: Int[Array, " seq"]
    write: nn.LayerWrite | None  # where to put this layer's keys/values, when decoding
    layer: Int[Array, ""]

    @property
    def causal(self) -> bool:
        """Queries and keys are the same slots (no cache), so attention may skip blocks."""
        return self.write is None


def decoder_inputs(
    input_ids: Int[Array, " seq"],
    attention_mask: Int[Array, " seq"] | Bool[Array, " seq"] | None,
    position_ids: Int[Array, " seq"] | None,
    cache: nn.KVCache | None,
) -> DecoderInputs:
    """Slots, positions and key validity for a forward pass or a cached decode step.

    Default positions are the slots `0..seq-1` (offset by the cache index), as in HF;
    pass explicit `position_ids` for left-padded batches.
    """
    seq = input_ids.shape[0]
    valid = jnp.ones((seq,), bool) if attention_mask is None else attention_mask.astype(bool)
    if cache is None:
        slots = jnp.arange(seq, dtype=jnp.int32)
        positions = slots if position_ids is None else position_ids
        return DecoderInputs(positions, slots, slots, valid, None, None)
    if seq > cache.max_len:
        raise InputError(f"{seq} tokens do not fit a KV cache of {cache.max_len} slots")
    slots = cache.slots(seq)
    slots = eqx.error_if(
        slots, slots[-1] >= cache.max_len, "decode step writes past the end of the KV cache; allocate a longer one"
    )
    positions = slots if position_ids is None else position_ids
    write = nn.LayerWrite(cache.keys, cache.values, cache.index)
    cache = cache.with_tokens(valid)
    kv_slots = jnp.arange(cache.max_len, dtype=jnp.int32)
    return DecoderInputs(positions, slots, kv_slots, cache.valid, cache, write)


def check_token_ids(input_ids: Int[Array, " seq"], vocab_size: int) -> Int[Array, " seq"]:
    """Returns `input_ids`, failing at run time if any id is outside `[0, vocab_size)`."""
    bad = jnp.any((input_ids < 0) | (input_ids >= vocab_size))
    return eqx.error_if(input_ids, bad, f"input_ids contain a token id outside [0, {vocab_size})")


def split_layer_keys(
    key: PRNGKeyArray | None, num_layers: int
) -> tuple[PRNGKeyArray | None, Key[Array, " layers"] | None]:
    """One key for the embeddings and one per layer (stacked), or `None`s without dropout."""
    if key is None:
        return None, None
    embed_key, layers_key = jax.random.split(key)
    return embed_key, jax.random.split(layers_key, num_layers)


class DecoderModel(eqx.Module):
    """Base of decoder-only stacks. A subclass provides `config`, `embed`, `stack`,
    `final_norm`, `kv_shape`, `input_embeddings` and, for sliding windows,
    `layer_windows`; this class runs them."""

    def embed(
        self, input_ids: Int[Array, " seq"], positions: Int[Array, " seq"], *, key: PRNGKeyArray | None
    ) -> Float[Array, "seq hidden"]:
        raise NotImplementedError  # pragma: no cover - every subclass defines it

    @property
    def stack(self) -> nn.Stacked:
        raise NotImplementedError  # pragma: no cover

    def final_norm(self, x: Float[Array, "seq hidden"]) -> Float[Array, "seq hidden"]:
        raise NotImplementedError  # pragma: no cover

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Sliding-window width of each layer; `nn.NO_WINDOW` for full causal attention."""
        return (nn.NO_WINDOW,) * self.stack.num_layers

    @property
    def kv_shape(self) -> tuple[int, int]:
        """`(kv_heads, head_dim)` of the cache."""
        raise NotImplementedError  # pragma: no cover

    @property
    def input_embeddings(self) -> nn.Embedding:
        """The token embedding table (what a tied LM head multiplies by)."""
        raise NotImplementedError  # pragma: no cover

    def __call__(
        self,
        input_ids: Int[Array, " seq"],
        *,
        attention_mask: Int[Array, " seq"] | Bool[Array, " seq"] | None = None,
        position_ids: Int[Array, " seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq hidden"]:
        """**Arguments:**

        - `input_ids`: one sequence of token ids.
        - `attention_mask`: 1 for real tokens, 0 for padding (left padding for batches).
        - `position_ids`: default `0..seq-1`, as HF; pass `cumsum(mask) - 1` for left padding.
        - `key`: enables dropout (the model must not be in inference mode).

        **Returns:** final hidden states `[seq, hidden]`.
        """
        inputs = decoder_inputs(input_ids, attention_mask, position_ids, None)
        hidden, _ = self._forward(input_ids, inputs, key)
        return hidden

    def decode(
        self,
        input_ids: Int[Array, " new"],
        cache: nn.KVCache,
        *,
        attention_mask: Int[Array, " new"] | Bool[Array, " new"] | None = None,
        position_ids: Int[Array, " new"] | None = None,
    ) -> tuple[Float[Array, "new hidden"], nn.KVCache]:
        """Runs `new` tokens against the cache (a prompt, or one token at a time).

        **Returns:** hidden states `[new, hidden]` and the cache with them appended.
        """
        inputs = decoder_inputs(input_ids, attention_mask, position_ids, cache)
        return self._forward(input_ids, inputs, None)

    def init_cache(self, max_len: int, dtype: DTypeLike | None = None) -> nn.KVCache:
        """An empty cache for `max_len` slots (prompt plus new tokens), in the parameters'
        dtype unless `dtype` is given."""
        if dtype is None:
            dtype = jax.tree.leaves(eqx.filter(self.stack, eqx.is_inexact_array))[0].dtype
        return nn.KVCache.empty(self.stack.num_layers, max_len, *self.kv_shape, dtype)

    def _forward(self, input_ids: Int[Array, " seq"], inputs: DecoderInputs, key: PRNGKeyArray | None):
        config = self.config
        input_ids = check_token_ids(input_ids, config.vocab_size)
        embed_key, layer_keys = split_layer_keys(key, self.stack.num_layers)
        x = self.embed(input_ids, inputs.positions, key=embed_key)

        def step(block, carry, per_layer):
            x, write = carry
            layer, window, layer_key = per_layer
            mask = nn.causal_mask(inputs.slots, inputs.kv_slots, inputs.kv_valid, window)
            x, write = block(x, LayerContext(mask, inputs.positions, write, layer), key=layer_key)
            return (x, write), None

        per_layer = (
            jnp.arange(self.stack.num_layers, dtype=jnp.int32),
            jnp.asarray(self.layer_windows, jnp.int32),
            layer_keys,
        )
        (x, write), _ = self.stack.scan(
            step, (x, inputs.write), per_layer, scan_layers=config.scan_layers, remat=config.remat
        )
        return self.final_norm(x), inputs.finish(write)


class SelfAttention(eqx.Module):
    """Multi-head causal self-attention with HF's `q_proj`/`k_proj`/`v_proj`/`out_proj`
    names (GPT-Neo, XGLM), writing its keys and values to the cache when decoding."""

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
        kq, kk, kv, ko = jax.random.split(key, 4)
        linear = lambda bias, k: nn.Linear(dim, dim, use_bias=bias, init_std=init_std, dtype=dtype, key=k)  # noqa: E731
        self.q_proj, self.k_proj, self.v_proj = linear(qkv_bias, kq), linear(qkv_bias, kk), linear(qkv_bias, kv)
        self.out_proj = linear(True, ko)
        self.dropout = eqx.nn.Dropout(dropout)
        self.num_heads, self.scale = num_heads, scale

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


class CausalLM(eqx.Module):
    """Base of causal language models: a `DecoderModel` plus an output projection,
    `lm_head`, which is `None` when tied to the input embeddings. A subclass declares the
    base model's class (`base_class`) and HF's attribute name for it (`base_name`)."""

    base_class: ClassVar[type]
    base_name: ClassVar[str]

    @property
    def base(self) -> DecoderModel:
        return getattr(self, self.base_name)

    @property
    def input_embeddings(self) -> nn.Embedding:
        return self.base.input_embeddings

    @property
    def config(self) -> Any:
        return self.base.config

    def __call__(
        self,
        input_ids: Int[Array, " seq"],
        *,
        attention_mask: Int[Array, " seq"] | Bool[Array, " seq"] | None = None,
        position_ids: Int[Array, " seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq vocab"]:
        """Next-token logits `[seq, vocab]` in float32; arguments as the base model's."""
        hidden = self.base(input_ids, attention_mask=attention_mask, position_ids=position_ids, key=key)
        return self.logits(hidden)

    def decode(
        self,
        input_ids: Int[Array, " new"],
        cache: nn.KVCache,
        *,
        attention_mask: Int[Array, " new"] | Bool[Array, " new"] | None = None,
        position_ids: Int[Array, " new"] | None = None,
        last_only: bool = False,
    ) -> tuple[Float[Array, "out vocab"], nn.KVCache]:
        """Cached step: logits for the `new` tokens (only the last one's with `last_only`,
        which spares a prompt's LM head) and the updated cache."""
        hidden, cache = self.base.decode(input_ids, cache, attention_mask=attention_mask, position_ids=position_ids)
        return self.logits(hidden[-1:] if last_only else hidden), cache

    def init_cache(self, max_len: int, dtype: DTypeLike | None = None) -> nn.KVCache:
        return self.base.init_cache(max_len, dtype)

    @classmethod
    def key_map(cls, config: Any) -> KeyMap:
        """The base model's map nested under its prefix, plus the head; a tied head's
        `lm_head.weight` (written by some savers) is read and dropped."""
        tied = ("lm_head.weight",) if config.tie_word_embeddings else ()
        return cls.base_class.key_map(config).nested().extended(rules=(("lm_head.", "lm_head."),), ignore=tied)

    def logits(self, hidden: Float[Array, "seq hidden"]) -> Float[Array, "seq vocab"]:
        head = self.input_embeddings.attend if self.lm_head is None else self.lm_head
        return head(hidden).astype(jnp.float32)


def make_lm_head(config: Any, hidden_size: int, init_std: float, dtype: DTypeLike, key: PRNGKeyArray):
    """`None` when the head is tied to the input embeddings, else a bias-free `Linear`."""
    if config.tie_word_embeddings:
        return None
    return nn.Linear(hidden_size, config.vocab_size, use_bias=False, init_std=init_std, dtype=dtype, key=key)
