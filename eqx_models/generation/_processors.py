"""Logits processors and warpers: small modules that rewrite next-token scores.

Each one is an `eqx.Module` called as `processor(scores, context) -> scores` on a batch of
rows, so they compose as a tuple and run inside the compiled loop. Their semantics follow
HF's processors of the same name, including which tokens they look at: `context` exposes
exactly the tokens HF's `input_ids` would hold (the prompt with its padding, then the new
tokens), even though our buffer is wider (bucketed prompt, preallocated budget).
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from ._config import GenerationConfig

NEG_INF = -jnp.inf


class StepContext(eqx.Module):
    """Where decoding stands, as HF's processors see it.

    - `tokens`: the token buffer; columns `[first, length)` are HF's `input_ids`.
    - `first`: first column HF would see (columns before it are our bucketing padding).
    - `length`: the next column to be written.
    - `prompt_length`: HF's `input_ids_seq_length` (decoder prompt length).
    - `max_length`: HF's `max_length` (prompt length plus `max_new_tokens`).
    """

    tokens: Int[Array, "rows capacity"]
    first: Int[Array, ""]
    length: Int[Array, ""]
    prompt_length: Int[Array, ""]
    max_length: Int[Array, ""]

    @property
    def current_length(self) -> Int[Array, ""]:
        """HF's `cur_len`: `input_ids.shape[-1]`."""
        return self.length - self.first

    def visible(self) -> Bool[Array, " capacity"]:
        columns = jnp.arange(self.tokens.shape[1])
        return (columns >= self.first) & (columns < self.length)


class LogitsProcessor(eqx.Module):
    """Base class: `__call__(scores [rows, vocab], context) -> scores`."""

    @abc.abstractmethod
    def __call__(self, scores: Float[Array, "rows vocab"], context: StepContext) -> Float[Array, "rows vocab"]: ...


def _mark(shape: tuple[int, int], ids: Int[Array, "rows n"], where: Bool[Array, "rows n"]) -> Bool[Array, "rows vocab"]:
    """A `[rows, vocab]` mask that is True at `ids[r, i]` wherever `where[r, i]`."""
    rows = jnp.arange(shape[0])[:, None]
    return jnp.zeros(shape, bool).at[rows, jnp.where(where, ids, shape[1])].set(True, mode="drop")


def _vocab_mask(ids: tuple[int, ...], vocab: int) -> Bool[Array, " vocab"]:
    return jnp.zeros((vocab,), bool).at[jnp.asarray(ids, jnp.int32)].set(True)


def _only(ids: tuple[int, ...], scores: Float[Array, "rows vocab"]) -> Float[Array, "rows vocab"]:
    """Scores that force one of `ids`: 0 for them, -inf elsewhere."""
    forced = jnp.where(_vocab_mask(ids, scores.shape[-1]), 0.0, NEG_INF).astype(scores.dtype)
    return jnp.broadcast_to(forced, scores.shape)


class RepetitionPenalty(LogitsProcessor):
    """Divides positive (multiplies negative) scores of every token already in the sequence."""

    penalty: float

    def __call__(self, scores, context):
        seen = _mark(scores.shape, context.tokens, jnp.broadcast_to(context.visible(), context.tokens.shape))
        penalised = jnp.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return jnp.where(seen, penalised, scores)


class NoRepeatNGram(LogitsProcessor):
    """Bans every token that would complete an n-gram already present in the sequence."""

    size: int

    def __call__(self, scores, context):
        n, tokens = self.size, context.tokens
        starts = tokens.shape[1] - n + 1
        if starts <= 0:
            return scores
        windows = jnp.stack([tokens[:, k : starts + k] for k in range(n)], axis=-1)  # [rows, starts, n]
        tail = lax.dynamic_slice_in_dim(tokens, context.length - (n - 1), n - 1, axis=1)  # last n-1 tokens
        match = jnp.all(windows[..., :-1] == tail[:, None, :], axis=-1)
        start = jnp.arange(starts)
        match &= (start >= context.first) & (start <= context.length - n)
        banned = _mark(scores.shape, windows[..., -1], match)
        return jnp.where(banned & (context.current_length + 1 >= n), NEG_INF, scores)


class BadWords(LogitsProcessor):
    """Bans the last token of each word whose other tokens end the sequence (single-token
    words are always banned). Single-token words equal to an EOS id are ignored, as in HF."""

    words: tuple[tuple[int, ...], ...]

    def __call__(self, scores, context):
        vocab = scores.shape[-1]
        single = tuple(w[0] for w in self.words if len(w) == 1)
        banned = jnp.broadcast_to(_vocab_mask(single, vocab), scores.shape) if single else jnp.zeros(scores.shape, bool)
        for word in (w for w in self.words if 1 < len(w) <= context.tokens.shape[1]):  # longer ones never fit
            prefix = lax.dynamic_slice_in_dim(context.tokens, context.length - (len(word) - 1), len(word) - 1, axis=1)
            match = jnp.all(prefix == jnp.asarray(word[:-1], jnp.int32), axis=-1)
            match &= context.current_length >= len(word)
            banned = banned.at[:, word[-1]].max(match)
        return jnp.where(banned, NEG_INF, scores)


class MinLength(LogitsProcessor):
    """No EOS while the sequence (prompt included) is shorter than `min_length`."""

    min_length: int
    eos_token_id: tuple[int, ...]

    def __call__(self, scores, context):
        block = _vocab_mask(self.eos_token_id, scores.shape[-1]) & (context.current_length < self.min_length)
        return jnp.where(block, NEG_INF, scores)


class MinNewTokens(LogitsProcessor):
    """No EOS before `min_new_tokens` tokens have been generated."""

    min_new_tokens: int
    eos_token_id: tuple[int, ...]

    def __call__(self, scores, context):
        new = context.current_length - context.prompt_length
        block = _vocab_mask(self.eos_token_id, scores.shape[-1]) & (new < self.min_new_tokens)
        return jnp.where(block, NEG_INF, scores)


class ForcedBOS(LogitsProcessor):
    """Forces `token_id` as the first generated token of an encoder-decoder model."""

    token_id: int

    def __call__(self, scores, context):
        return jnp.where(context.current_length == 1, _only((self.token_id,), scores), scores)


class ForcedEOS(LogitsProcessor):
    """Forces an EOS id as the last token when `max_length` is reached."""

    eos_token_id: tuple[int, ...]

    def __call__(self, scores, context):
        return jnp.where(context.current_length == context.max_length - 1, _only(self.eos_token_id, scores), scores)


class SuppressTokens(LogitsProcessor):
    """Never emit these ids."""

    token_ids: tuple[int, ...]

    def __call__(self, scores, context):
        return jnp.where(_vocab_mask(self.token_ids, scores.shape[-1]), NEG_INF, scores)


class SuppressTokensAtBegin(LogitsProcessor):
    """Suppress these ids for the first generated token only (`offset` skips a forced BOS)."""

    token_ids: tuple[int, ...]
    offset: int = 0

    def __call__(self, scores, context):
        at_begin = context.current_length == context.prompt_length + self.offset
        return jnp.where(_vocab_mask(self.token_ids, scores.shape[-1]) & at_begin, NEG_INF, scores)


class Temperature(LogitsProcessor):
    """Divides the scores by `temperature`: one number, or one per row (`[rows, 1]`, the
    slots of continuous batching, each with its request's temperature)."""

    temperature: float | Float[Array, "rows 1"]

    def __call__(self, scores, context):
        return scores / self.temperature


class TopK(LogitsProcessor):
    """Keeps the `k` highest scores (ties with the k-th included)."""

    k: int
    min_tokens_to_keep: int = 1

    def __call__(self, scores, context):
        k = min(max(self.k, self.min_tokens_to_keep), scores.shape[-1])
        kth = lax.top_k(scores, k)[0][:, -1:]
        return jnp.where(scores < kth, NEG_INF, scores)


class TopP(LogitsProcessor):
    """Nucleus sampling: keeps the smallest set of highest-probability tokens whose mass
    exceeds `p` (HF's rule: drop tokens whose ascending cumulative mass is <= 1 - p). `p` is
    one number, or one per row (`[rows, 1]`)."""

    p: float | Float[Array, "rows 1"]
    min_tokens_to_keep: int = 1

    def __call__(self, scores, context):
        order = jnp.argsort(scores, axis=-1, stable=True)  # ascending
        ascending = jnp.take_along_axis(scores, order, axis=-1)
        mass = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
        drop = mass <= 1 - self.p
        drop = drop.at[:, -self.min_tokens_to_keep :].set(False)
        drop = jnp.take_along_axis(drop, jnp.argsort(order, axis=-1), axis=-1)  # back to vocab order
        return jnp.where(drop, NEG_INF, scores)


class MinP(LogitsProcessor):
    """Keeps tokens whose probability is at least `p` times the most likely token's."""

    p: float
    min_tokens_to_keep: int = 1

    def __call__(self, scores, context):
        probs = jax.nn.softmax(scores, axis=-1)
        drop = probs < self.p * jnp.max(probs, axis=-1, keepdims=True)
        kth = lax.top_k(scores, min(self.min_tokens_to_keep, scores.shape[-1]))[0][:, -1:]
        return jnp.where(drop & (scores < kth), NEG_INF, scores)


Processors = tuple[LogitsProcessor, ...]


def build_processors(config: GenerationConfig, *, prompt_length: int, custom: Processors = ()) -> Processors:
    """The processors HF's `generate` would build for `config`, in HF's order; `custom`
    ones run after the built-in processors and before the sampling warpers, as in HF.

    `prompt_length`: HF's `input_ids_seq_length`; after a one-token prompt (the start token of
    an encoder-decoder model) a forced BOS moves `begin_suppress_tokens` one step later, as in HF.
    """
    eos = config.eos_token_id
    chain: list[LogitsProcessor] = []
    if config.repetition_penalty != 1.0:
        chain.append(RepetitionPenalty(config.repetition_penalty))
    if config.no_repeat_ngram_size > 0:
        chain.append(NoRepeatNGram(config.no_repeat_ngram_size))
    if config.bad_words_ids:
        words = tuple(w for w in config.bad_words_ids if not (len(w) == 1 and w[0] in eos))
        if words:
            chain.append(BadWords(words))
    if config.min_length > 0 and eos:
        chain.append(MinLength(config.min_length, eos))
    if config.min_new_tokens > 0 and eos:
        chain.append(MinNewTokens(config.min_new_tokens, eos))
    if config.forced_bos_token_id is not None:
        chain.append(ForcedBOS(config.forced_bos_token_id))
    if config.forced_eos_token_id:
        chain.append(ForcedEOS(config.forced_eos_token_id))
    if config.suppress_tokens:
        chain.append(SuppressTokens(config.suppress_tokens))
    if config.begin_suppress_tokens:
        offset = int(prompt_length == 1 and config.forced_bos_token_id is not None)
        chain.append(SuppressTokensAtBegin(config.begin_suppress_tokens, offset))
    chain.extend(custom)
    if config.do_sample:
        if config.temperature != 1.0:
            chain.append(Temperature(config.temperature))
        if config.top_k:
            chain.append(TopK(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            chain.append(TopP(config.top_p))
        if config.min_p is not None:
            chain.append(MinP(config.min_p))
    return tuple(chain)


def apply_processors(
    processors: Processors, scores: Float[Array, "rows vocab"], context: StepContext
) -> Float[Array, "rows vocab"]:
    for processor in processors:
        scores = processor(scores, context)
    return scores
