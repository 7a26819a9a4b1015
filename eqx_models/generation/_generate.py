"""`generate` and `stream`: check the request on the host, bucket its shapes, run the
compiled search, and trim the result the way HF's `generate` does.

Under a transformation (`jax.jit(lambda ids: generate(model, ids, ...))`) the prompt is a
tracer: the request is then planned from shapes alone (ids are range-checked inside the
model, at run time) and `generate` returns the whole budget, `[rows, seq + max_new_tokens]`,
with the pad id after each row's end, since the number of steps taken is not known while
tracing."""

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..errors import InputError
from ..models import CausalLM, Model, Seq2SeqLM, checked_on_host
from ..validation import MAX_INT32
from ._config import GenerationConfig, resolve
from ._processors import LogitsProcessor, build_processors
from ._search import Request, beam_advance, beam_start, sample_advance, sample_start


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """What `generate(..., output_scores=True)` returns (HF's `return_dict_in_generate`).

    - `sequences`: `[rows, total]` as `generate` returns them.
    - `scores`: `[rows, steps, vocab]` processed scores of every step (beam search: the
      processed log-probabilities of every running beam, `rows = batch * num_beams`).
    - `sequences_scores`: `[rows]` length-penalised beam scores (beam search only).
    """

    sequences: Int[Array, "rows total"]
    scores: Float[Array, "score_rows steps vocab"] | None = None
    sequences_scores: Float[Array, " rows"] | None = None


def size_class(n: int) -> int:
    """The padded size for `n` prompt tokens or new tokens: the next power of two, at least
    16. Requests in one class share a compiled program."""
    return max(16, 1 << (n - 1).bit_length())


def is_traced(value: Any) -> bool:
    """`value` is an abstract array of a JAX transformation (no values to check on the host)."""
    return isinstance(value, jax.core.Tracer)


def _as_ids(value: Any, name: str) -> Any:
    array = value if is_traced(value) else np.asarray(value)
    if array.ndim != 2:
        raise InputError(f"{name} must be [batch, seq]; got shape {array.shape}. Wrap one sequence as ids[None]")
    return array


def _checked_inputs(model: Model, input_ids: Any, attention_mask: Any) -> tuple[Any, Any]:
    """The prompt as int32 ids and a boolean mask: numpy arrays, checked value by value, or
    (when either is traced) JAX arrays checked by shape and dtype only."""
    ids = _as_ids(input_ids, "input_ids")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"input_ids must hold integers, got dtype {ids.dtype}")
    if ids.shape[1] == 0:
        raise InputError("input_ids is empty: give at least one prompt token")
    mask = np.ones(ids.shape, bool) if attention_mask is None else _as_ids(attention_mask, "attention_mask")
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask has shape {mask.shape} but input_ids has {ids.shape}")
    if is_traced(ids) or is_traced(mask):
        return jnp.asarray(ids, jnp.int32), jnp.asarray(mask).astype(bool)
    vocab = model.config.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise InputError(f"input_ids hold ids outside [0, {vocab}): min {ids.min()}, max {ids.max()}")
    return ids.astype(np.int32), mask.astype(bool)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A checked request: bucketed arrays plus everything static about the program."""

    ids: Array
    mask: Array
    request: Request
    config: GenerationConfig
    processors: tuple[LogitsProcessor, ...]
    new_capacity: int
    width: int  # the caller's prompt width
    seq2seq: bool
    traced: bool  # planned from shapes: the result spans the whole budget
    budget: int  # max_new_tokens


def _plan(model: Model, input_ids: Any, attention_mask: Any, custom: Sequence[LogitsProcessor], options) -> _Plan:
    ids, mask = _checked_inputs(model, input_ids, attention_mask)
    if not isinstance(model, CausalLM | Seq2SeqLM):
        raise InputError(
            f"{type(model).__name__} cannot generate: generation needs a causal LM or a seq2seq LM "
            "(a ...ForCausalLM or ...ForConditionalGeneration class)"
        )
    seq2seq = isinstance(model, Seq2SeqLM)
    batch, width = ids.shape
    unknown = set(options) - {f.name for f in dataclasses.fields(GenerationConfig)} - {"max_length"}
    if unknown:
        raise InputError(f"unknown generation options {sorted(unknown)}; see eqx_models.generation.GenerationConfig")
    prompt_length = 1 if seq2seq else width
    config = resolve(model.config, prompt_length=prompt_length, seq2seq=seq2seq, **options)
    limit = model.config.position_limit
    if limit is not None and not seq2seq and width + config.max_new_tokens > limit:
        raise InputError(
            f"prompt of {width} tokens plus max_new_tokens={config.max_new_tokens} "
            f"exceeds the model's {limit} positions"
        )
    _check_budget(model, config, batch, width, seq2seq)
    for processor in custom:
        if not isinstance(processor, LogitsProcessor):
            raise InputError(f"logits_processors must be LogitsProcessor modules, got {type(processor).__name__}")

    padded = size_class(width)
    fill = config.pad_token_id
    traced = isinstance(ids, jax.Array)
    pad = jnp.pad if traced else np.pad
    if seq2seq:  # encoder input: pad on the right
        ids = pad(ids, ((0, 0), (0, padded - width)), constant_values=fill)
        mask = pad(mask, ((0, 0), (0, padded - width)))
        first = 0
    else:  # decoder prompt: pad on the left, where HF's positions ignore it
        ids = pad(ids, ((0, 0), (padded - width, 0)), constant_values=fill)
        mask = pad(mask, ((0, 0), (padded - width, 0)))
        first = padded - width
    request = Request(
        first=jnp.asarray(first, jnp.int32),
        prompt_length=jnp.asarray(prompt_length, jnp.int32),
        budget=jnp.asarray(config.max_new_tokens, jnp.int32),
    )
    processors = build_processors(config, prompt_length=prompt_length, custom=tuple(custom))
    return _Plan(
        ids=jnp.asarray(ids),
        mask=jnp.asarray(mask),
        request=request,
        config=config.static(),
        processors=processors,
        new_capacity=size_class(config.max_new_tokens),
        width=width,
        seq2seq=seq2seq,
        traced=traced,
        budget=config.max_new_tokens,
    )


#: Peak memory of a decoding run over the bytes of its KV cache, measured with `stream` on a
#: tiny Gemma at 2**18 to 2**21 cache slots: 3.25 to 3.5 (XLA holds the cache given to the
#: prefill, the one it returns and the one the loop updates). Rounded up.
CACHE_COPIES = 4
_CACHE_LAYOUT: dict[Any, tuple[int, int]] = {}  # (model class, config, dtype) -> (fixed, per-slot) bytes


def tree_bytes(tree: Any) -> int:
    arrays = (leaf for leaf in jax.tree.leaves(tree) if isinstance(leaf, jax.Array | jax.ShapeDtypeStruct))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in arrays)


def cache_bytes(model: CausalLM | Seq2SeqLM, slots: int) -> int:
    """Bytes of one row's KV cache of `slots` slots. Linear in `slots`, so measured once per
    model shape with `jax.eval_shape` (which allocates nothing)."""
    dtype = next((leaf.dtype for leaf in jax.tree.leaves(model) if eqx.is_inexact_array(leaf)), None)
    key = (type(model), model.config, dtype)
    if key not in _CACHE_LAYOUT:
        one, two = (tree_bytes(jax.eval_shape(lambda n=n: model.init_cache(n))) for n in (1, 2))
        _CACHE_LAYOUT[key] = (2 * one - two, two - one)
    fixed, per_slot = _CACHE_LAYOUT[key]
    return fixed + per_slot * slots


def memory_limit() -> tuple[int, str]:
    """The bytes a request may use, and what they are: the accelerator's memory if JAX
    reports it, else the machine's physical memory (or its cgroup's limit, if lower)."""
    device = jax.devices()[0]
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if limit:
        return int(limit), f"{device.platform} memory"
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = min(limit, int(Path(path).read_text()))
        except (OSError, ValueError):  # absent, or "max"
            pass
    return limit, "memory"


def show_bytes(n: int) -> str:
    """`n` bytes in decimal units: `38.8 GB`."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def _check_budget(model: CausalLM | Seq2SeqLM, config: GenerationConfig, batch: int, width: int, seq2seq: bool) -> None:
    """Refuses, before anything is allocated, a budget beyond int32 positions or one whose
    cache and buffers need more memory than there is (rotary and relative positions place
    any length, so memory is their only limit)."""
    new = config.max_new_tokens
    prompt_slots = 1 if seq2seq else size_class(width)
    slots = prompt_slots + size_class(new)
    if slots > MAX_INT32:
        raise InputError(
            f"max_new_tokens={new} is too large: with the {width}-token prompt the token buffer and cache need "
            f"{slots} positions, beyond the {MAX_INT32} of JAX's int32 indices"
        )
    rows = batch * max(config.num_beams, config.num_return_sequences)
    weights = tree_bytes(eqx.filter(model, eqx.is_array))

    def needed(capacity: int) -> tuple[int, int]:
        """KV cache bytes and token (and score) buffer bytes for `capacity` new slots."""
        cache = rows * cache_bytes(model, prompt_slots + capacity)
        buffers = rows * (prompt_slots + capacity) * 4 * (2 if config.is_beam_search else 1)
        if config.output_scores:
            buffers += rows * capacity * model.config.vocab_size * 4
        return cache, buffers

    def fits(capacity: int) -> bool:
        cache, buffers = needed(capacity)
        return weights + CACHE_COPIES * cache + buffers <= limit

    limit, what = memory_limit()
    capacity = size_class(new)
    if fits(capacity):
        return
    cache, buffers = needed(capacity)
    while capacity > 16 and not fits(capacity):
        capacity //= 2
    advice = f"at most about {capacity} new tokens fit" if fits(capacity) else "not even 16 new tokens fit"
    raise InputError(
        f"max_new_tokens={new} needs more memory than there is: {rows} row(s) of {slots} cache slots take about "
        f"{show_bytes(CACHE_COPIES * cache + buffers)} while decoding ({show_bytes(cache)} of KV cache, held up to "
        f"{CACHE_COPIES} times, and {show_bytes(buffers)} of token buffers) beside the model's {show_bytes(weights)}, "
        f"but the machine has {show_bytes(limit)} of {what}; {advice}"
    )


def _sample_program(model, ids, mask, request, config, processors, key, new_capacity):
    decoder, state = sample_start(model, ids, mask, request, config, processors, key, new_capacity)
    state = sample_advance(decoder, state, request.budget, request, config, processors, key, new_capacity)
    return state.tokens, state.step, state.scores


def _beam_program(model, ids, mask, request, config, processors, new_capacity):
    decoder, state = beam_start(model, ids, mask, request, config, processors, new_capacity)
    state = beam_advance(decoder, state, request.budget, request, config, processors, new_capacity)
    keep = config.num_return_sequences
    flat = lambda x: x[:, :keep].reshape(-1, *x.shape[2:])  # noqa: E731
    return flat(state.done), flat(state.done_lengths), flat(state.done_scores), state.scores, state.step


def host_checkable(program: Callable) -> Callable:
    """`program` with a keyword argument `host_checked` (static, so it keys the compiled
    program): when `_plan` checked the ids on the host and sized the cache for the budget,
    the model's run-time checks are left out (`checked_on_host`), which also lets JAX's
    persistent compilation cache store the program."""

    def run(*args: Any, host_checked: bool) -> Any:
        with checked_on_host() if host_checked else contextlib.nullcontext():
            return program(*args)

    # the program's name (compiled programs and cache entries are named after it), not its
    # signature: `functools.wraps` would make `jit` bind arguments to `program`'s
    run.__name__ = run.__qualname__ = program.__name__
    return run


# Module-level so a test can wrap them in `eqx.debug.assert_max_traces`.
compiled_sample = eqx.filter_jit(host_checkable(_sample_program))
compiled_beam = eqx.filter_jit(host_checkable(_beam_program))
compiled_sample_start = eqx.filter_jit(host_checkable(sample_start))
compiled_sample_advance = eqx.filter_jit(host_checkable(sample_advance))


def _key(key: Any, config: GenerationConfig) -> PRNGKeyArray | None:
    if not config.do_sample:
        return None
    if key is None:
        raise InputError("do_sample=True needs a PRNG key: pass key=jax.random.key(seed)")
    return key


def _new_columns(plan: _Plan) -> int:
    """Index of the first new-token column in the token buffer."""
    return 1 if plan.seq2seq else plan.ids.shape[1]


def _prompt_columns(plan: _Plan) -> slice:
    """The buffer columns HF's output starts with: the caller's prompt, or the start token."""
    return slice(0, 1) if plan.seq2seq else slice(plan.ids.shape[1] - plan.width, plan.ids.shape[1])


def generate(
    model: Model,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    key: PRNGKeyArray | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    streamer: Callable[[np.ndarray], None] | None = None,
    chunk_size: int = 8,
    **options: Any,
) -> Int[Array, "rows total"] | GenerateOutput:
    """Decodes with a KV cache in one compiled program (prefill + `lax.while_loop`).

    **Arguments:**

    - `input_ids`: `[batch, seq]` prompts, left-padded for decoder-only models when their
      lengths differ (the encoder input for encoder-decoder models).
    - `attention_mask`: `[batch, seq]`, 1 for real tokens, 0 for padding.
    - `key`: PRNG key, required when `do_sample=True`.
    - `logits_processors`: extra `LogitsProcessor` modules, run after the built-in ones.
    - `streamer`: called with each chunk of new tokens (`[rows, n]` numpy) as it is produced;
      the loop then runs `chunk_size` steps per compiled call (see `stream`).
    - `**options`: the fields of `GenerationConfig` (`max_new_tokens` or `max_length`,
      `do_sample`, `temperature`, `top_k`, `top_p`, `min_p`, `num_beams`, `length_penalty`,
      `early_stopping`, `num_return_sequences`, `repetition_penalty`, `no_repeat_ngram_size`,
      `bad_words_ids`, `min_length`, `min_new_tokens`, `forced_bos_token_id`,
      `forced_eos_token_id`, `suppress_tokens`, `begin_suppress_tokens`, `eos_token_id`,
      `pad_token_id`, `output_scores`). EOS and pad ids default to the model config's.

    **Returns:** `[rows, seq + steps]` prompt plus new tokens as HF `generate` (for
    encoder-decoder models `[rows, 1 + steps]` decoder sequences starting with
    `decoder_start_token_id`); `rows` is `batch * num_return_sequences`. With
    `output_scores=True`, a `GenerateOutput`. Called on traced inputs (inside `jax.jit`),
    `steps` is `max_new_tokens`, rows that stopped early holding the pad id after their end
    (beam search: what HF PyTorch writes there), and `scores` span the whole budget.
    """
    plan = _plan(model, input_ids, attention_mask, logits_processors, options)
    config = plan.config
    key = _key(key, config)
    if streamer is not None:
        if plan.traced:
            raise InputError("generate cannot stream inside a JAX transformation (jit, vmap): call it eagerly")
        if config.is_beam_search:
            raise InputError("beam search cannot stream: its best hypothesis is only known at the end")
        if chunk_size < 1:
            raise InputError(f"chunk_size must be at least 1, got {chunk_size}")
        return _collect(_stream_chunks(plan, model, key, chunk_size), streamer, plan)
    budget = plan.budget
    inputs = (model, plan.ids, plan.mask, plan.request, config, plan.processors)
    if config.is_beam_search:
        done, lengths, sequence_scores, scores, steps = compiled_beam(
            *inputs, plan.new_capacity, host_checked=not plan.traced
        )
        new, steps = (budget, budget) if plan.traced else (int(jnp.max(lengths)), int(steps))
        sequences = _trim(done, plan, new)
        if not config.output_scores:
            return sequences
        return GenerateOutput(sequences, scores[:, :steps], sequence_scores)
    tokens, steps, scores = compiled_sample(*inputs, key, plan.new_capacity, host_checked=not plan.traced)
    steps = budget if plan.traced else int(steps)
    sequences = _trim(tokens, plan, steps)
    if not config.output_scores:
        return sequences
    return GenerateOutput(sequences, scores[:, :steps])


def _trim(tokens: Array, plan: _Plan, new: int) -> Array:
    prompt = _prompt_columns(plan)
    return tokens[:, prompt.start : _new_columns(plan) + new]


def _collect(chunks: Iterator[np.ndarray], streamer: Callable[[np.ndarray], None], plan: _Plan) -> Array:
    pieces = []
    for chunk in chunks:
        streamer(chunk)
        pieces.append(chunk)
    rows = pieces[0].shape[0]
    if plan.seq2seq:
        prompt = np.full((rows, 1), plan.config.decoder_start_token_id, np.int32)
    else:  # each prompt once per returned sequence
        prompt = np.repeat(np.asarray(plan.ids)[:, _prompt_columns(plan)], rows // plan.ids.shape[0], axis=0)
    return jnp.asarray(np.concatenate([prompt, *pieces], axis=1))


def stream(
    model: Model,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    key: PRNGKeyArray | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    chunk_size: int = 8,
    **options: Any,
) -> Iterator[np.ndarray]:
    """Greedy or sampled decoding that yields new tokens as they are produced.

    Takes `generate`'s arguments (not beam search). Yields numpy `[rows, n]` chunks of new
    tokens, `n <= chunk_size` (the first chunk holds the first token alone, so a reader
    sees output right after the prompt is processed). Rows that hit EOS show the pad id
    afterwards; iteration ends at the budget or when every row has stopped. Each chunk is
    one call of a compiled `lax.while_loop`, so streaming costs one host round trip per
    chunk, not per token; the next chunk is dispatched before the current one is read.
    """
    if chunk_size < 1:
        raise InputError(f"chunk_size must be at least 1, got {chunk_size}")
    plan = _plan(model, input_ids, attention_mask, logits_processors, options)
    config = plan.config
    if plan.traced:
        raise InputError("stream cannot run inside a JAX transformation (jit, vmap): call it eagerly")
    if config.is_beam_search:
        raise InputError("beam search cannot stream: its best hypothesis is only known at the end")
    key = _key(key, config)
    return _stream_chunks(plan, model, key, chunk_size)


def _stream_chunks(plan: _Plan, model: CausalLM | Seq2SeqLM, key: Any, chunk_size: int) -> Iterator[np.ndarray]:
    config, request = plan.config, plan.request
    decoder, state = compiled_sample_start(
        model, plan.ids, plan.mask, request, config, plan.processors, key, plan.new_capacity, host_checked=True
    )
    start, emitted = _new_columns(plan), 0
    while True:
        # The next chunk is dispatched before this one is read (JAX runs it asynchronously): its
        # tracing, and its compilation the first time, overlap this chunk's run instead of
        # following it, and no chunk waits for the host. Past the end it runs no steps.
        ahead = compiled_sample_advance(
            decoder,
            state,
            state.step + chunk_size,
            request,
            config,
            plan.processors,
            key,
            plan.new_capacity,
            host_checked=True,
        )
        steps = int(state.step)
        if steps > emitted:
            yield np.asarray(state.tokens[:, start + emitted : start + steps])
            emitted = steps
        if steps >= plan.budget or bool(jnp.all(state.finished)):
            return
        state = ahead
