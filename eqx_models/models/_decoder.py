"""Plumbing shared by decoder stacks: slots, positions, masks' inputs and the KV cache."""

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int, Key, PRNGKeyArray

from .. import nn
from ..errors import InputError


class DecoderInputs(NamedTuple):
    """What every layer of a decoder needs besides its hidden states."""

    positions: Int[Array, " seq"]  # feed the position embeddings
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
