"""Feeding a batch of rows through a model's cached `decode`: prefill, one-token steps,
and row reordering for beam search. One interface for decoder-only and encoder-decoder
models, so the search loops never ask which kind they drive."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ..models import CausalLM, Seq2SeqLM
from ..nn import CrossKV, KVCache

Generator = CausalLM | Seq2SeqLM


def cache_axes(cache: KVCache) -> KVCache:
    """vmap axes for a batch of caches. Rows decoded together (`generate`) share one write
    index, a scalar, so the cache update stays a `dynamic_update_slice` instead of becoming a
    scatter; rows that started at different times (continuous batching's slots) carry one
    index each, `[batch]`, and are mapped over it like every other leaf."""
    axes = jax.tree.map(lambda _: 0, cache)
    if cache.index.ndim:
        return axes
    return eqx.tree_at(lambda c: c.index, axes, None, is_leaf=lambda x: x is None)


def init_batched_cache(model: Generator, batch: int, max_len: int) -> KVCache:
    """`batch` empty caches of `max_len` slots sharing one write index."""
    cache = model.init_cache(max_len)
    return eqx.tree_at(
        lambda c: (c.keys, c.values, c.valid),
        cache,
        replace_fn=lambda a: jnp.broadcast_to(a, (batch, *a.shape)),
    )


def batched_decode(
    model: CausalLM,
    input_ids: Int[Array, "batch new"],
    cache: KVCache,
    attention_mask: Bool[Array, "batch new"],
    position_ids: Int[Array, "batch new"],
    *,
    last_only: bool = False,
) -> tuple[Float[Array, "batch out vocab"], KVCache]:
    """A decoder-only model's `decode` over a batch of caches, sharing one write index or
    holding one per row (`cache_axes`), logits of the last new token only with `last_only`."""
    axes = cache_axes(cache)
    step = lambda ids, c, m, p: model.decode(ids, c, attention_mask=m, position_ids=p, last_only=last_only)  # noqa: E731
    return jax.vmap(step, in_axes=(0, axes, 0, 0), out_axes=(0, axes))(input_ids, cache, attention_mask, position_ids)


def hf_positions(attention_mask: Bool[Array, "batch seq"]) -> Int[Array, "batch seq"]:
    """HF's positions for left-padded prompts: real tokens count from 0, padding gets 1."""
    return jnp.where(attention_mask, jnp.cumsum(attention_mask, axis=-1) - 1, 1).astype(jnp.int32)


class Rows(eqx.Module):
    """Per-row decoding state: the cache and, for decoder-only models, the last position."""

    cache: KVCache
    position: Int[Array, " rows"]

    def repeat(self, times: int) -> "Rows":
        """Each row `times` times in a row (beams, or several samples per prompt)."""
        return _map_rows(lambda a: jnp.repeat(a, times, axis=0), self)

    def take(self, rows: Int[Array, " rows"]) -> "Rows":
        """Rows reordered (beam search: each new beam continues its parent's cache)."""
        return _map_rows(lambda a: a[rows], self)


def _map_rows(fn, rows: Rows) -> Rows:
    # The shared write index (a scalar) is not per row.
    return jax.tree.map(lambda a: fn(a) if a.ndim else a, rows)


class Decoder(eqx.Module):
    """Runs one new token per row through `model`. `cross` holds an encoder-decoder model's
    per-row cross-attention keys and values; `None` for decoder-only models."""

    model: Generator
    cross: CrossKV | None

    def step(self, token: Int[Array, " rows"], rows: Rows) -> tuple[Float[Array, "rows vocab"], Rows]:
        if self.cross is None:
            position = rows.position + 1
            ones = jnp.ones((token.shape[0], 1), bool)
            logits, cache = batched_decode(self.model, token[:, None], rows.cache, ones, position[:, None])
        else:
            position = rows.position
            logits, cache = self._seq2seq_decode(token[:, None], rows.cache)
        return logits[:, -1].astype(jnp.float32), Rows(cache, position)

    def _seq2seq_decode(self, ids, cache):
        axes = cache_axes(cache)
        decode = jax.vmap(self.model.decode, in_axes=(0, axes, 0), out_axes=(0, axes))
        return decode(ids, cache, self.cross)

    def repeat(self, times: int) -> "Decoder":
        if self.cross is None or times == 1:
            return self
        return Decoder(self.model, jax.tree.map(lambda a: jnp.repeat(a, times, axis=0), self.cross))


def prefill(
    model: Generator,
    input_ids: Int[Array, "batch prompt"],
    attention_mask: Bool[Array, "batch prompt"],
    capacity: int,
    start_token: int | None,
) -> tuple[Decoder, Float[Array, "batch vocab"], Rows]:
    """Runs the prompt and returns the next-token logits and a cache of `capacity` slots.

    Decoder-only models: the left-padded prompt fills the cache.
    Encoder-decoder models: the prompt is encoded once, every layer's cross-attention keys
    and values are computed once, and the decoder starts from `start_token`.
    """
    batch = input_ids.shape[0]
    cache = init_batched_cache(model, batch, capacity)
    if isinstance(model, CausalLM):
        positions = hf_positions(attention_mask)
        logits, cache = batched_decode(model, input_ids, cache, attention_mask, positions, last_only=True)
        decoder, position = Decoder(model, None), positions[:, -1]
    else:
        encoded = jax.vmap(lambda ids, mask: model.encode(ids, attention_mask=mask))(input_ids, attention_mask)
        decoder = Decoder(model, jax.vmap(model.cross_kv)(encoded, attention_mask))
        start = jnp.full((batch, 1), start_token, jnp.int32)
        logits, cache = decoder._seq2seq_decode(start, cache)
        position = jnp.zeros((batch,), jnp.int32)
    return decoder, logits[:, -1].astype(jnp.float32), Rows(cache, position)
