"""The compiled decoding loop: prefill the prompt into a KV cache, then one token per
`lax.while_loop` iteration until every row has stopped or the budget is spent."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from ..errors import InputError
from ..nn import KVCache


class _FromConfig:
    """Default of `eos_token_id` / `pad_token_id`: take the value from the model's config."""

    def __repr__(self) -> str:
        return "<from config>"


_FROM_CONFIG: Any = _FromConfig()


def _cache_axes(cache: KVCache) -> KVCache:
    """vmap axes for a batch of caches: the write index is shared by every row, so the
    cache update stays a `dynamic_update_slice` instead of becoming a scatter."""
    axes = jax.tree.map(lambda _: 0, cache)
    return eqx.tree_at(lambda c: c.index, axes, None, is_leaf=lambda x: x is None)


def batched_decode(
    model: Any,
    input_ids: Int[Array, "batch new"],
    cache: KVCache,
    attention_mask: Bool[Array, "batch new"],
    position_ids: Int[Array, "batch new"],
) -> tuple[Float[Array, "batch new vocab"], KVCache]:
    """`model.decode` over a batch whose caches share one write index."""
    axes = _cache_axes(cache)
    step = lambda ids, c, m, p: model.decode(ids, c, attention_mask=m, position_ids=p)  # noqa: E731
    return jax.vmap(step, in_axes=(0, axes, 0, 0), out_axes=(0, axes))(input_ids, cache, attention_mask, position_ids)


def init_batched_cache(model: Any, batch: int, max_len: int) -> KVCache:
    cache = model.init_cache(max_len)
    return eqx.tree_at(
        lambda c: (c.keys, c.values, c.valid),
        cache,
        replace_fn=lambda a: jnp.broadcast_to(a, (batch, *a.shape)),
    )


def _greedy_loop(step_fn, logits, tokens, start: int, cache, extra, max_new_tokens: int, eos_ids, pad_id: int):
    """Greedy decoding shared by decoder-only and encoder-decoder models: pick the argmax,
    write it at column `start + step`, stop rows at EOS (padding after), and feed the token
    back through `step_fn(token [batch], cache, extra) -> (logits, cache, extra)`."""
    batch = tokens.shape[0]
    eos = jnp.asarray(eos_ids, jnp.int32)

    def cond(state):
        step, _, _, _, _, finished = state
        return (step < max_new_tokens) & ~jnp.all(finished)

    def body(state):
        step, tokens, cache, logits, extra, finished = state
        token = jnp.where(finished, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        tokens = lax.dynamic_update_slice(tokens, token[:, None], (0, start + step))
        finished = finished | jnp.isin(token, eos)
        logits, cache, extra = step_fn(token, cache, extra)
        return step + 1, tokens, cache, logits, extra, finished

    state = (jnp.zeros((), jnp.int32), tokens, cache, logits, extra, jnp.zeros((batch,), bool))
    steps, tokens, *_ = lax.while_loop(cond, body, state)
    return tokens, steps


@eqx.filter_jit
def _greedy(
    model: Any,
    input_ids: Int[Array, "batch prompt"],
    attention_mask: Bool[Array, "batch prompt"],
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
    pad_id: int,
) -> tuple[Int[Array, "batch total"], Int[Array, ""]]:
    batch, prompt = input_ids.shape
    # HF's positions for left padding: count real tokens; padding gets position 1.
    positions = jnp.where(attention_mask, jnp.cumsum(attention_mask, axis=-1) - 1, 1).astype(jnp.int32)
    cache = init_batched_cache(model, batch, prompt + max_new_tokens)
    logits, cache = batched_decode(model, input_ids, cache, attention_mask, positions)
    tokens = jnp.full((batch, prompt + max_new_tokens), pad_id, jnp.int32).at[:, :prompt].set(input_ids)

    def step(token, cache, last_position):
        position = last_position + 1
        logits, cache = batched_decode(model, token[:, None], cache, jnp.ones((batch, 1), bool), position[:, None])
        return logits[:, -1], cache, position

    return _greedy_loop(step, logits[:, -1], tokens, prompt, cache, positions[:, -1], max_new_tokens, eos_ids, pad_id)


@eqx.filter_jit
def _greedy_seq2seq(
    model: Any,
    input_ids: Int[Array, "batch src"],
    attention_mask: Bool[Array, "batch src"],
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
    pad_id: int,
    start_id: int,
) -> tuple[Int[Array, "batch total"], Int[Array, ""]]:
    """Encode once, compute every layer's cross-attention keys/values once, then decode from
    `decoder_start_token_id` with the self-attention cache."""
    batch = input_ids.shape[0]
    encoded = jax.vmap(lambda ids, mask: model.encode(ids, attention_mask=mask))(input_ids, attention_mask)
    cross = jax.vmap(model.cross_kv)(encoded, attention_mask)
    cache = init_batched_cache(model, batch, 1 + max_new_tokens)
    axes = _cache_axes(cache)
    decode = jax.vmap(model.decode, in_axes=(0, axes, 0), out_axes=(0, axes))
    tokens = jnp.full((batch, 1 + max_new_tokens), pad_id, jnp.int32).at[:, 0].set(start_id)
    logits, cache = decode(tokens[:, :1], cache, cross)

    def step(token, cache, extra):
        logits, cache = decode(token[:, None], cache, cross)
        return logits[:, -1], cache, extra

    return _greedy_loop(step, logits[:, -1], tokens, 1, cache, None, max_new_tokens, eos_ids, pad_id)


def _as_ids(value: Any, name: str) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 2:
        raise InputError(f"{name} must be [batch, seq]; got shape {array.shape}. Wrap one sequence as ids[None]")
    return array


def generate(
    model: Any,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = _FROM_CONFIG,
    pad_token_id: int | None = _FROM_CONFIG,
) -> Int[Array, "batch total"]:
    """Greedy decoding with a KV cache, compiled into one program.

    **Arguments:**

    - `input_ids`: `[batch, seq]` prompts, left-padded when their lengths differ.
    - `attention_mask`: `[batch, seq]`, 1 for real tokens, 0 for padding.
    - `max_new_tokens`: how many tokens to add at most.
    - `eos_token_id`: id or ids that end a row; defaults to the config's; `None` never stops early.
    - `pad_token_id`: fills a row after its EOS; defaults to the config's, else the EOS id.

    **Returns:** `[batch, seq + steps]` prompt plus new tokens, as HF `generate` (for
    encoder-decoder models, `[batch, 1 + steps]` decoder sequences starting with
    `decoder_start_token_id`); `steps` is smaller than `max_new_tokens` when every row hit
    EOS early.
    """
    config = model.config
    ids = _as_ids(input_ids, "input_ids")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"input_ids must hold integers, got dtype {ids.dtype}")
    mask = np.ones(ids.shape, bool) if attention_mask is None else _as_ids(attention_mask, "attention_mask")
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask has shape {mask.shape} but input_ids has {ids.shape}")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise InputError(f"input_ids hold ids outside [0, {config.vocab_size}): min {ids.min()}, max {ids.max()}")
    limit = config.position_limit
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise InputError(
            f"prompt of {ids.shape[1]} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
            f"{limit} positions"
        )
    eos = config.eos_token_id if eos_token_id is _FROM_CONFIG else eos_token_id
    eos_ids = () if eos is None else tuple(int(e) for e in np.atleast_1d(eos))
    pad = config.pad_token_id if pad_token_id is _FROM_CONFIG else pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool)
    if hasattr(model, "encode"):  # encoder-decoder: returns decoder sequences, as HF
        start = config.decoder_start_token_id
        if start is None:
            raise InputError("the config has no decoder_start_token_id; set it (LongT5 uses the pad id, 0)")
        tokens, steps = _greedy_seq2seq(model, ids, mask, max_new_tokens, eos_ids, int(pad), int(start))
        return tokens[:, : 1 + int(steps)]
    tokens, steps = _greedy(model, ids, mask, max_new_tokens, eos_ids, int(pad))
    return tokens[:, : ids.shape[1] + int(steps)]
