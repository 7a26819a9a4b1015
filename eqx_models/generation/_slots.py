"""Continuous batching: a fixed number of decoding slots advanced by one compiled step.

Each slot holds one request: its rows of a KV cache (with its own write index and position,
so requests that joined at different times decode side by side) and, for encoder-decoder
models, its encoder's cross-attention keys and values. A request joins a free slot between
steps: its prompt goes through `prefill`, the same as `generate`'s, into that slot's rows
(the prompt padded to a power of two, so few programs compile). One compiled step then runs
`Decoder.step`, the same as `generate`'s loop, over every slot (free slots compute and are
ignored) and picks each slot's next token with its own temperature, top-p and seed. A request
leaves at an end token, at its budget, or when its consumer says stop, and frees its slot.

Only `submit`, `cancel` and the counters may be used from other threads: one thread owns the
device and calls `run_once` (or `run`, which loops).
"""

import collections
import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int, UInt32

from ..errors import BusyError, InputError
from ..models import CausalLM, Seq2SeqLM
from ..nn import CrossKV
from ._decoding import Decoder, Rows, init_batched_cache, prefill
from ._generate import cache_bytes, host_checkable, memory_limit, show_bytes, size_class, tree_bytes
from ._processors import Temperature, TopP

_log = logging.getLogger(__name__)

#: How many of the most likely tokens each step reports with their log-probabilities
#: (OpenAI's largest `logprobs` for completions).
TOP_LOGPROBS = 5
#: The default context of models that place any length (rotary or relative positions), and
#: the default `max_new_tokens` of encoder-decoder models.
DEFAULT_CONTEXT = 512


class Token(NamedTuple):
    """One generated token: its id, its log-probability under the model, and, when its
    request asked for them (`SlotRequest.top_logprobs`), the `TOP_LOGPROBS` most likely ids
    of that step with theirs (most likely first; empty otherwise)."""

    id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def _ignore(token: Token) -> bool:
    return False


def _nothing(reason: str) -> None:
    return None


@dataclasses.dataclass(eq=False)
class SlotRequest:
    """One request to the engine.

    - `prompt`: token ids (the decoder prompt, or the encoder input of a seq2seq model).
    - `max_tokens`: at most this many new tokens.
    - `temperature`: 0 is greedy (argmax); above 0 samples at that temperature.
    - `top_p`: nucleus sampling's mass (1 keeps every token, 0 only the most likely).
    - `seed`: the sampler's seed (`jax.random.key(seed)`, folded with the step number, as
      `generate(..., do_sample=True, key=jax.random.key(seed))` draws).
    - `top_logprobs`: whether its tokens carry the step's most likely alternatives
      (`Token.top`); the engine ranks the vocabulary only while some request wants them.
    - `on_token(token) -> bool`: called, in the engine's thread, with each new token (end
      tokens excluded); returning True ends the request with reason `"stop"`.
    - `on_done(reason)`: called once at the end: `"stop"` (an end token, or `on_token`
      said so), `"length"` (`max_tokens` reached), `"cancelled"`, or `"error"` (a step failed).
    """

    prompt: Sequence[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    top_logprobs: bool = False
    on_token: Callable[[Token], bool] = _ignore
    on_done: Callable[[str], None] = _nothing
    cancelled: bool = dataclasses.field(default=False, init=False)


class SlotState(eqx.Module):
    """The device side of every slot: cache rows (one write index each) and positions, and
    the cross-attention keys and values of encoder-decoder models."""

    rows: Rows
    cross: CrossKV | None


class Choice(NamedTuple):
    token: Int[Array, " rows"]
    logprob: Float[Array, " rows"]
    top_ids: Int[Array, "rows top"]
    top_logprobs: Float[Array, "rows top"]


class Sampling(NamedTuple):
    """Per-row sampling settings and where each row stands (its new-token count)."""

    temperature: Float[Array, " rows"]
    top_p: Float[Array, " rows"]
    keys: UInt32[Array, "rows key"]  # raw key data of jax.random.key(seed)
    steps: Int[Array, " rows"]
    ranked: Bool[Array, " rows"]  # the row wants the step's most likely alternatives


def _choose(logits: Float[Array, "rows vocab"], sampling: Sampling) -> Choice:
    """Each row's next token: argmax where its temperature is 0, else a draw after its
    temperature and top-p (the processors `generate` uses, with one value per row). The
    draw, and top-p's sort of the vocabulary, run only when some row needs them."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampling_rows = sampling.temperature > 0

    def draw() -> Int[Array, " rows"]:
        temperature = sampling.temperature[:, None]
        # Temperature and top-p read no step context.
        scores = Temperature(jnp.where(temperature > 0, temperature, 1.0))(logits, None)
        nucleus = lambda s: TopP(sampling.top_p[:, None])(s, None)  # noqa: E731
        scores = lax.cond(jnp.any(sampling_rows & (sampling.top_p < 1)), nucleus, lambda s: s, scores)
        keys = jax.random.wrap_key_data(sampling.keys)
        one = lambda key, step, row: jax.random.categorical(jax.random.fold_in(key, step), row)  # noqa: E731
        sampled = jax.vmap(one)(keys, sampling.steps, scores).astype(jnp.int32)
        return jnp.where(sampling_rows, sampled, greedy)

    token = lax.cond(jnp.any(sampling_rows), draw, lambda: greedy)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
    k = min(TOP_LOGPROBS, logits.shape[-1])
    unranked = lambda: (jnp.zeros(token.shape + (k,), log_probs.dtype), jnp.zeros(token.shape + (k,), jnp.int32))  # noqa: E731
    top_logprobs, top_ids = lax.cond(jnp.any(sampling.ranked), lambda: tuple(lax.top_k(log_probs, k)), unranked)
    return Choice(token, chosen, top_ids.astype(jnp.int32), top_logprobs)


def _source_axis(shape: tuple[int, ...]) -> int:
    """The source axis of cross-attention keys and values (`[..., src, head_dim]`) or of
    their validity (`[..., src]`)."""
    return -2 if len(shape) > 2 else -1


def _widen_source(one: Array, shape: tuple[int, ...]) -> Array:
    """One row of cross-attention keys, values or validity padded to the source length of
    the slots' (whose shape is `shape`)."""
    axis = _source_axis(one.shape)
    pad = [(0, 0)] * one.ndim
    pad[axis] = (0, shape[axis] - one.shape[axis])
    return jnp.pad(one, pad)


def _join(
    static,
    start_token: int | None,
    params,
    state: SlotState,
    slot: Int[Array, ""],
    ids: Int[Array, "1 width"],
    mask: Bool[Array, "1 width"],
    sampling: Sampling,
) -> tuple[SlotState, Choice]:
    """Prefills one request into `slot` and picks its first token."""
    model = eqx.combine(params, static)
    decoder, logits, rows = prefill(model, ids, mask, state.rows.cache.valid.shape[-1], start_token)
    # Prefill's row (batch 1, its write index a scalar) goes into the slot's row.
    put = lambda whole, one: whole.at[slot].set(one[0] if one.ndim == whole.ndim else one)  # noqa: E731
    cache = jax.tree.map(put, state.rows.cache, rows.cache)
    cross = state.cross
    if cross is not None:  # the encoder's keys and values, padded to the slots' source length
        cross = jax.tree.map(lambda whole, one: put(whole, _widen_source(one, whole.shape)), cross, decoder.cross)
    state = SlotState(Rows(cache, put(state.rows.position, rows.position)), cross)
    return state, _choose(logits, sampling)


def _step(
    static, params, state: SlotState, tokens: Int[Array, " slots"], active: Bool[Array, " slots"], sampling: Sampling
) -> tuple[SlotState, Choice]:
    """One new token for every slot. Free slots run from the start of their rows (so they
    never write past the cache) and their output is ignored."""
    model = eqx.combine(params, static)
    cache = state.rows.cache
    cache = eqx.tree_at(lambda c: c.index, cache, jnp.where(active, cache.index, 0))
    rows = Rows(cache, jnp.where(active, state.rows.position, 0))
    logits, rows = Decoder(model, state.cross).step(tokens, rows)
    return SlotState(rows, state.cross), _choose(logits, sampling)


@dataclasses.dataclass(eq=False)
class _Running:
    request: SlotRequest
    produced: int = 0


class SlotEngine:
    """Continuous batching over `slots` decoding slots of `model` (a causal or seq2seq LM).

    **Arguments:**

    - `slots`: how many requests decode at once (the compiled step's batch).
    - `context`: decoder-only models: the cache slots of one request, prompt (padded to a
      power of two when that fits) plus new tokens; default and at most the model's
      positions. Encoder-decoder models: the longest encoder input, in tokens (default the
      model's positions, or 512 for relative positions).
    - `max_new_tokens`: the largest `max_tokens` a request may ask for (default: `context`
      for decoder-only models, 512 for encoder-decoder ones, whose decoder cache it sizes).
    - `max_queue`: requests that may wait for a slot; `submit` raises `BusyError` beyond.
    - `eos_token_id`: ids that end a request (default: the model config's).
    """

    def __init__(
        self,
        model: CausalLM | Seq2SeqLM,
        *,
        slots: int = 8,
        context: int | None = None,
        max_new_tokens: int | None = None,
        max_queue: int = 64,
        eos_token_id: Sequence[int] | int | None = None,
    ):
        if not isinstance(model, CausalLM | Seq2SeqLM):
            raise InputError(f"{type(model).__name__} cannot generate: serving needs a causal LM or a seq2seq LM")
        for name, value in (("slots", slots), ("max_queue", max_queue)):
            if value < 1:
                raise InputError(f"{name} must be at least 1, got {value}")
        model = eqx.nn.inference_mode(model)  # serving never trains: no dropout
        self.model = model
        self.seq2seq = isinstance(model, Seq2SeqLM)
        limit = model.config.position_limit
        if context is None:
            context = limit if limit is not None else DEFAULT_CONTEXT
        if context < 1 or (limit is not None and context > limit):
            raise InputError(f"context must be between 1 and the model's {limit} positions, got {context}")
        if max_new_tokens is None:
            max_new_tokens = DEFAULT_CONTEXT if self.seq2seq else context
        if max_new_tokens < 1 or (not self.seq2seq and max_new_tokens > context):
            raise InputError(f"max_new_tokens must be between 1 and the context of {context}, got {max_new_tokens}")
        eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
        self.eos = frozenset(int(e) for e in np.atleast_1d(np.asarray(eos if eos is not None else [], np.int64)))
        self.slots, self.context, self.max_new_tokens, self.max_queue = slots, context, max_new_tokens, max_queue
        self._check_memory()

        params, static = eqx.partition(model, eqx.is_array)
        self._params = params
        start = model.config.decoder_start_token_id if self.seq2seq else None
        # `check` keeps every request's ids in the vocabulary and its prompt and budget in its
        # rows, so the programs leave the model's run-time checks out: no host round trip per
        # step, and programs JAX's persistent compilation cache can store for the next start.
        self._join = jax.jit(
            functools.partial(host_checkable(_join), static, start, host_checked=True), donate_argnums=(1,)
        )
        self._step = jax.jit(functools.partial(host_checkable(_step), static, host_checked=True), donate_argnums=(1,))
        self._state = self._empty()

        self._running: list[_Running | None] = [None] * slots
        self._tokens = np.zeros(slots, np.int32)
        self._temperature = np.zeros(slots, np.float32)
        self._top_p = np.ones(slots, np.float32)
        self._ranked = np.zeros(slots, bool)
        self._keys = np.zeros((slots, *jax.random.key_data(jax.random.key(0)).shape), np.uint32)
        self._waiting: collections.deque[SlotRequest] = collections.deque()
        self._wake = threading.Condition()

    def _check_memory(self) -> None:
        """Refuses, before allocating, slots whose caches would not fit beside the weights."""
        length = self.max_new_tokens if self.seq2seq else self.context
        cache = self.slots * cache_bytes(self.model, length)
        if self.seq2seq:  # cross keys and values: as many bytes per source token as the cache per slot
            cache += self.slots * (cache_bytes(self.model, self.context) - cache_bytes(self.model, 0))
        weights = tree_bytes(eqx.filter(self.model, eqx.is_array))
        limit, what = memory_limit()
        # The step's output cache may briefly live beside its (donated) input.
        if weights + 2 * cache > limit:
            raise InputError(
                f"{self.slots} slots of {length} tokens need about {show_bytes(2 * cache)} of KV cache beside the "
                f"model's {show_bytes(weights)}, but the machine has {show_bytes(limit)} of {what}; "
                "use fewer slots (--max-batch) or a shorter context (--context)"
            )

    def _empty(self) -> SlotState:
        """Every slot free: zero caches (one write index each) and cross keys and values."""
        model, slots = self.model, self.slots
        cache = init_batched_cache(model, slots, self.max_new_tokens if self.seq2seq else self.context)
        cache = eqx.tree_at(lambda c: c.index, cache, jnp.zeros((slots,), jnp.int32))
        cross = None
        if self.seq2seq:  # shapes of one prefilled row's cross keys and values, widened to every slot
            one = jnp.ones((1, 1), jnp.int32)
            start = model.config.decoder_start_token_id
            shape = jax.eval_shape(lambda: prefill(model, one, one.astype(bool), 1, start)[0].cross)
            cross = jax.tree.map(lambda a: jnp.zeros(self._all_slots(a.shape), a.dtype), shape)
        return SlotState(Rows(cache, jnp.zeros((slots,), jnp.int32)), cross)

    def _all_slots(self, row: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of every slot's cross keys, values or validity from one row's."""
        shape = [self.slots, *row[1:]]
        shape[_source_axis(row)] = self.context
        return tuple(shape)

    # ------------------------------------------------------------------ any thread

    def check(self, request: SlotRequest) -> None:
        """Raises `InputError` naming the limit a request exceeds."""
        n, new = len(request.prompt), request.max_tokens
        vocab = self.model.config.vocab_size
        if n == 0:
            raise InputError("the prompt is empty: give at least one token")
        if min(request.prompt) < 0 or max(request.prompt) >= vocab:
            raise InputError(f"the prompt holds token ids outside [0, {vocab})")
        if not 1 <= new <= self.max_new_tokens:
            raise InputError(f"max_tokens must be between 1 and {self.max_new_tokens}, got {new}")
        if self.seq2seq and n > self.context:
            raise InputError(f"the prompt has {n} tokens but the server accepts at most {self.context}")
        if not self.seq2seq and n + new > self.context:
            raise InputError(
                f"the prompt's {n} tokens plus max_tokens={new} exceed the context of {self.context} "
                f"positions; ask for at most {self.context - n} new tokens"
                if n < self.context
                else f"the prompt has {n} tokens but the context holds {self.context} (prompt plus new tokens)"
            )
        if request.temperature < 0 or not 0 < request.top_p <= 1:
            raise InputError(
                f"temperature must be >= 0 and top_p in (0, 1]; got {request.temperature}, {request.top_p}"
            )

    def submit(self, *requests: SlotRequest) -> None:
        """Queues checked requests, all or none: raises `InputError` for one beyond a limit and
        `BusyError` when they would make more than `max_queue` requests wait."""
        for request in requests:
            self.check(request)
        with self._wake:
            if len(self._waiting) + len(requests) > self.max_queue:
                raise BusyError(
                    f"{len(self._waiting)} requests are waiting for a slot already (at most {self.max_queue}); "
                    "retry later"
                )
            self._waiting.extend(requests)
            self._wake.notify()

    def cancel(self, request: SlotRequest) -> None:
        """Ends a request at the next step (`on_done("cancelled")`), freeing its slot."""
        with self._wake:
            request.cancelled = True
            self._wake.notify()

    @property
    def active(self) -> int:
        return sum(r is not None for r in self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------ the device's thread

    def run(self, stop: threading.Event, *, poll: float = 0.05) -> None:
        """Serves until `stop` is set (work in hand is left where it is). A failing step ends
        every request in hand with `"error"` and the engine goes on with the next ones."""
        while not stop.is_set():
            try:
                worked = self.run_once()
            except Exception:
                _log.exception("a decoding step failed; the requests in hand end with an error")
                self._fail_all()
                continue
            if not worked:
                with self._wake:
                    if not self._waiting:
                        self._wake.wait(poll)

    def _fail_all(self) -> None:
        self._state = self._empty()  # the failed step may have consumed (donated) the old one
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for slot, running in enumerate(self._running):
            if running is not None:
                self._finish(slot, "error")
        for request in waiting:
            request.on_done("error")

    def run_once(self) -> bool:
        """Admits waiting requests into free slots, then advances every busy slot one token.
        Returns whether there was anything to do."""
        for slot, running in enumerate(self._running):
            if running is not None and running.request.cancelled:
                self._finish(slot, "cancelled")
        admitted = self._admit()
        busy = [slot for slot, running in enumerate(self._running) if running is not None]
        if not busy:
            return admitted
        active = np.zeros(self.slots, bool)
        active[busy] = True
        steps = np.asarray([0 if r is None else r.produced for r in self._running], np.int32)
        self._state, choice = self._step(self._params, self._state, self._tokens, active, self._sampling(steps))
        choice = jax.device_get(choice)
        for slot in busy:
            self._deliver(slot, choice, slot)
        return True

    def _sampling(self, steps: np.ndarray) -> Sampling:
        return Sampling(self._temperature, self._top_p, self._keys, steps, self._ranked)

    def _admit(self) -> bool:
        admitted = False
        while None in self._running:
            with self._wake:
                if not self._waiting:
                    return admitted
                request = self._waiting.popleft()
            if request.cancelled:
                request.on_done("cancelled")
                continue
            slot = self._running.index(None)
            ids, mask = self._padded(request)
            self._running[slot] = _Running(request)
            self._temperature[slot] = request.temperature
            self._top_p[slot] = request.top_p
            self._ranked[slot] = request.top_logprobs
            self._keys[slot] = np.asarray(jax.random.key_data(jax.random.key(request.seed)))
            one = lambda a: a[slot : slot + 1]  # noqa: E731
            sampling = Sampling(*map(one, self._sampling(np.zeros(self.slots, np.int32))))
            self._state, choice = self._join(self._params, self._state, np.int32(slot), ids, mask, sampling)
            self._deliver(slot, jax.device_get(choice), 0)
            admitted = True
        return admitted

    def _padded(self, request: SlotRequest) -> tuple[np.ndarray, np.ndarray]:
        """The prompt as one row padded to its size class: on the right for an encoder (at
        most the source length), on the left for a decoder (exactly when the class would not
        leave room for `max_tokens`)."""
        n = len(request.prompt)
        width = size_class(n)
        if self.seq2seq:
            width = min(width, self.context)
        elif width + request.max_tokens > self.context:
            width = n
        ids = np.zeros((1, width), np.int32)
        mask = np.zeros((1, width), bool)
        where = slice(0, n) if self.seq2seq else slice(width - n, width)
        ids[0, where], mask[0, where] = request.prompt, True
        return ids, mask

    def _deliver(self, slot: int, choice: Choice, row: int) -> None:
        running = self._running[slot]
        token = int(choice.token[row])
        self._tokens[slot] = token
        running.produced += 1
        if token in self.eos:
            return self._finish(slot, "stop")
        top = ()
        if running.request.top_logprobs:
            top = tuple(zip(choice.top_ids[row].tolist(), choice.top_logprobs[row].tolist(), strict=True))
        try:
            stop = running.request.on_token(Token(token, float(choice.logprob[row]), top))
        except Exception:  # a consumer's failure ends its request, never the engine
            _log.exception("on_token failed; the request is cancelled")
            return self._finish(slot, "cancelled")
        if stop:
            self._finish(slot, "stop")
        elif running.produced >= running.request.max_tokens:
            self._finish(slot, "length")

    def _finish(self, slot: int, reason: str) -> None:
        running, self._running[slot] = self._running[slot], None
        self._temperature[slot], self._ranked[slot] = 0.0, False  # a free slot asks for no draw and no ranking
        running.request.on_done(reason)
