"""The two search loops, each split into `start` (prefill and the first token) and
`advance` (a `lax.while_loop` of cached steps up to a step count), so the same code runs
as one compiled program or in chunks for streaming.

- Sampling (greedy when `do_sample=False`): processors, then argmax or a categorical draw
  from a key folded with the step number; rows stop at EOS and are padded after it.
- Beam search: HF's vectorised algorithm (top `max(2, 1 + n_eos) * beams` candidates per
  prompt, finished hypotheses kept in a second set of `beams` slots, length penalty, the
  same early-stopping rules), with each beam's cache rows reordered after every step.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ..models import CausalLM, Seq2SeqLM
from ._config import GenerationConfig
from ._decoding import Decoder, Rows, prefill
from ._processors import Processors, StepContext, apply_processors

_DEAD = -1.0e9  # HF's score for impossible beams


class Request(eqx.Module):
    """Per-call numbers, traced so that changing them does not recompile.

    - `first`: first token column HF would see (earlier columns are bucketing padding).
    - `prompt_length`: HF's decoder prompt length (prompt width, or 1 for encoder-decoder).
    - `budget`: `max_new_tokens`.
    """

    first: Int[Array, ""]
    prompt_length: Int[Array, ""]
    budget: Int[Array, ""]


def _context(tokens: Int[Array, "rows capacity"], column: Int[Array, ""], request: Request) -> StepContext:
    return StepContext(tokens, request.first, column, request.prompt_length, request.prompt_length + request.budget)


def _initial_tokens(
    input_ids: Int[Array, "batch prompt"], config: GenerationConfig, new_capacity: int, fill: int, seq2seq: bool
) -> Int[Array, "batch capacity"]:
    """The token buffer: the prompt (decoder-only) or the start token (encoder-decoder),
    then `new_capacity` slots holding `fill`."""
    batch = input_ids.shape[0]
    prompt = jnp.full((batch, 1), config.decoder_start_token_id, jnp.int32) if seq2seq else input_ids
    return jnp.concatenate([prompt, jnp.full((batch, new_capacity), fill, jnp.int32)], axis=1)


def _scores_buffer(config: GenerationConfig, rows: int, new_capacity: int, vocab: int):
    return jnp.zeros((rows, new_capacity, vocab), jnp.float32) if config.output_scores else None


def _record(buffer, scores, step):
    return None if buffer is None else lax.dynamic_update_slice(buffer, scores[:, None], (0, step, 0))


# ---------------------------------------------------------------- greedy and sampling


class SampleState(eqx.Module):
    step: Int[Array, ""]  # tokens produced so far
    tokens: Int[Array, "rows capacity"]
    rows: Rows
    finished: Bool[Array, " rows"]
    scores: Float[Array, "rows new_capacity vocab"] | None


def _choose(
    state: SampleState,
    logits: Float[Array, "rows vocab"],
    start: int,
    request: Request,
    config: GenerationConfig,
    processors: Processors,
    key: PRNGKeyArray | None,
) -> SampleState:
    column = start + state.step
    scores = apply_processors(processors, logits, _context(state.tokens, column, request))
    if config.do_sample:
        token = jax.random.categorical(jax.random.fold_in(key, state.step), scores, axis=-1)
    else:
        token = jnp.argmax(scores, axis=-1)
    token = jnp.where(state.finished, config.pad_token_id, token.astype(jnp.int32))
    return SampleState(
        step=state.step + 1,
        tokens=lax.dynamic_update_slice(state.tokens, token[:, None], (0, column)),
        rows=state.rows,
        finished=state.finished | jnp.isin(token, jnp.asarray(config.eos_token_id, jnp.int32)),
        scores=_record(state.scores, scores, state.step),
    )


def sample_start(
    model: CausalLM | Seq2SeqLM,
    input_ids: Int[Array, "batch prompt"],
    attention_mask: Bool[Array, "batch prompt"],
    request: Request,
    config: GenerationConfig,
    processors: Processors,
    key: PRNGKeyArray | None,
    new_capacity: int,
) -> tuple[Decoder, SampleState]:
    seq2seq = isinstance(model, Seq2SeqLM)
    tokens = _initial_tokens(input_ids, config, new_capacity, config.pad_token_id, seq2seq)
    decoder, logits, rows = prefill(model, input_ids, attention_mask, tokens.shape[1], config.decoder_start_token_id)
    copies = config.num_return_sequences
    if copies > 1:  # several samples per prompt share one prefill
        decoder, rows = decoder.repeat(copies), rows.repeat(copies)
        logits, tokens = jnp.repeat(logits, copies, axis=0), jnp.repeat(tokens, copies, axis=0)
    state = SampleState(
        step=jnp.zeros((), jnp.int32),
        tokens=tokens,
        rows=rows,
        finished=jnp.zeros((tokens.shape[0],), bool),
        scores=_scores_buffer(config, tokens.shape[0], new_capacity, logits.shape[-1]),
    )
    start = tokens.shape[1] - new_capacity
    return decoder, _choose(state, logits, start, request, config, processors, key)


def sample_advance(
    decoder: Decoder,
    state: SampleState,
    until: Int[Array, ""],
    request: Request,
    config: GenerationConfig,
    processors: Processors,
    key: PRNGKeyArray | None,
    new_capacity: int,
) -> SampleState:
    """Steps until `until` tokens exist, the budget is spent, or every row has stopped."""
    start = state.tokens.shape[1] - new_capacity
    stop = jnp.minimum(until, request.budget)

    def cond(s: SampleState):
        return (s.step < stop) & ~jnp.all(s.finished)

    def body(s: SampleState):
        last = lax.dynamic_index_in_dim(s.tokens, start + s.step - 1, axis=1, keepdims=False)
        logits, rows = decoder.step(last, s.rows)
        return _choose(eqx.tree_at(lambda t: t.rows, s, rows), logits, start, request, config, processors, key)

    return lax.while_loop(cond, body, state)


# ---------------------------------------------------------------- beam search


class BeamState(eqx.Module):
    step: Int[Array, ""]
    running: Int[Array, "batch beams capacity"]
    running_scores: Float[Array, "batch beams"]
    done: Int[Array, "batch beams capacity"]  # best finished hypotheses
    done_scores: Float[Array, "batch beams"]
    done_lengths: Int[Array, "batch beams"]  # new tokens in each finished hypothesis
    is_done: Bool[Array, "batch beams"]
    improvable: Bool[Array, "batch 1"]  # HF's `is_early_stop_heuristic_unsatisfied`
    live: Bool[Array, ""]
    rows: Rows  # batch * beams
    scores: Float[Array, "rows new_capacity vocab"] | None


def beam_fill_value(config: GenerationConfig) -> int:
    """What HF writes after a finished hypothesis: `pad or eos[0]` (note: a pad id of 0 counts
    as unset), or -1 without EOS ids."""
    if not config.eos_token_id:
        return -1
    return config.pad_token_id or config.eos_token_id[0]


def _penalty(flag: Bool[Array, "..."]) -> Float[Array, "..."]:
    return flag.astype(jnp.float32) * _DEAD


def _gather(values, indices):
    """`values[b, indices[b, j], ...]`."""
    indices = indices.reshape(indices.shape + (1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, indices, axis=1)


def _beam_update(
    state: BeamState,
    logits: Float[Array, "rows vocab"],
    start: int,
    request: Request,
    config: GenerationConfig,
    processors: Processors,
) -> BeamState:
    batch, beams, capacity = state.running.shape
    vocab = logits.shape[-1]
    column = start + state.step
    flat = state.running.reshape(batch * beams, capacity)
    log_probs = apply_processors(processors, jax.nn.log_softmax(logits, axis=-1), _context(flat, column, request))
    total = (log_probs.reshape(batch, beams, vocab) + state.running_scores[:, :, None]).reshape(batch, beams * vocab)

    keep = max(2, 1 + len(config.eos_token_id)) * beams
    top_scores, top_index = lax.top_k(total, keep)
    parent, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    candidates = lax.dynamic_update_slice(_gather(state.running, parent), token[:, :, None], (0, 0, column))
    hits = jnp.isin(token, jnp.asarray(config.eos_token_id, jnp.int32)) | (state.step + 1 >= request.budget)

    # The best `beams` candidates that did not stop keep running.
    running_scores = top_scores + _penalty(hits)
    chosen = lax.top_k(running_scores, beams)[1]
    running, running_scores, running_parent = (_gather(x, chosen) for x in (candidates, running_scores, parent))

    # Candidates among the top `beams` that stopped compete with the finished set.
    new_done = hits & (jnp.arange(keep) < beams)
    length = (state.step + 1).astype(jnp.float32)
    done_scores = top_scores / length**config.length_penalty
    full = jnp.all(state.is_done, axis=-1, keepdims=True) & (config.early_stopping is True)
    done_scores += _penalty(full) + _penalty(~state.improvable) + _penalty(~new_done)
    merged_scores = jnp.concatenate([state.done_scores, done_scores], axis=1)
    best = lax.top_k(merged_scores, beams)[1]
    done = _gather(jnp.concatenate([state.done, candidates], axis=1), best)
    done_lengths = _gather(jnp.concatenate([state.done_lengths, jnp.full(hits.shape, state.step + 1)], axis=1), best)
    is_done = _gather(jnp.concatenate([state.is_done, new_done], axis=1), best)
    done_scores = _gather(merged_scores, best)

    # HF's heuristic: can a running beam still beat the worst finished one?
    step = state.step + 1
    if config.early_stopping == "never" and config.length_penalty > 0:
        best_length = request.budget.astype(jnp.float32)
    else:
        best_length = step.astype(jnp.float32)
    best_possible = running_scores[:, :1] / best_length**config.length_penalty
    worst_done = jnp.where(is_done, jnp.min(done_scores, axis=1, keepdims=True), _DEAD)
    improvable = state.improvable & jnp.any(best_possible > worst_done, axis=-1, keepdims=True)
    open_beams = ~(jnp.all(is_done) & (config.early_stopping is True))
    live = jnp.any(improvable) & open_beams & ~jnp.all(hits)

    rows = (running_parent + beams * jnp.arange(batch)[:, None]).reshape(-1)
    return BeamState(
        step=step,
        running=running,
        running_scores=running_scores,
        done=done,
        done_scores=done_scores,
        done_lengths=done_lengths,
        is_done=is_done,
        improvable=improvable,
        live=live,
        rows=state.rows.take(rows),
        scores=_record(state.scores, log_probs, state.step),
    )


def beam_start(
    model: CausalLM | Seq2SeqLM,
    input_ids: Int[Array, "batch prompt"],
    attention_mask: Bool[Array, "batch prompt"],
    request: Request,
    config: GenerationConfig,
    processors: Processors,
    new_capacity: int,
) -> tuple[Decoder, BeamState]:
    seq2seq = isinstance(model, Seq2SeqLM)
    beams = config.num_beams
    tokens = _initial_tokens(input_ids, config, new_capacity, beam_fill_value(config), seq2seq)
    batch, capacity = tokens.shape
    decoder, logits, rows = prefill(model, input_ids, attention_mask, capacity, config.decoder_start_token_id)
    running = jnp.broadcast_to(tokens[:, None], (batch, beams, capacity))
    state = BeamState(
        step=jnp.zeros((), jnp.int32),
        running=running,
        running_scores=jnp.zeros((batch, beams)).at[:, 1:].set(_DEAD),
        done=running,
        done_scores=jnp.full((batch, beams), _DEAD),
        done_lengths=jnp.zeros((batch, beams), jnp.int32),
        is_done=jnp.zeros((batch, beams), bool),
        improvable=jnp.ones((batch, 1), bool),
        live=jnp.ones((), bool),
        rows=rows.repeat(beams),
        scores=_scores_buffer(config, batch * beams, new_capacity, logits.shape[-1]),
    )
    logits = jnp.repeat(logits, beams, axis=0)
    return decoder.repeat(beams), _beam_update(state, logits, capacity - new_capacity, request, config, processors)


def beam_advance(
    decoder: Decoder,
    state: BeamState,
    until: Int[Array, ""],
    request: Request,
    config: GenerationConfig,
    processors: Processors,
    new_capacity: int,
) -> BeamState:
    batch, beams, capacity = state.running.shape
    start = capacity - new_capacity

    def cond(s: BeamState):
        return s.live & (s.step < jnp.minimum(until, request.budget))

    def body(s: BeamState):
        last = lax.dynamic_index_in_dim(s.running, start + s.step - 1, axis=2, keepdims=False).reshape(-1)
        logits, rows = decoder.step(last, s.rows)
        return _beam_update(eqx.tree_at(lambda t: t.rows, s, rows), logits, start, request, config, processors)

    return lax.while_loop(cond, body, state)
