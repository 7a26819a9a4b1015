"""The continuous-batching engine (`eqx_models.generation.SlotEngine`): a request's tokens do not
depend on what else is decoding, and equal `generate`'s, greedy and sampled, decoder-only and
seq2seq; requests leave at an end token, their budget, a consumer's stop or a cancel."""

import numpy as np
import pytest
from cases import tiered
from serve_cases import tiny_gpt_neo, tiny_t5

import eqx_models
from eqx_models.errors import BusyError, InputError
from eqx_models.generation import SlotEngine, SlotRequest

MODELS = {"gpt_neo": tiny_gpt_neo, "t5": tiny_t5}


@pytest.fixture(scope="module", params=tiered(sorted(MODELS), "gpt_neo"))
def engine(request):
    model = MODELS[request.param]()
    if request.param == "t5":
        return SlotEngine(model, slots=3, context=32, max_new_tokens=16, eos_token_id=[])
    return SlotEngine(model, slots=3, context=64, eos_token_id=[])


class Collect:
    """A request's tokens and how it ended."""

    def __init__(self, engine, prompt, max_tokens, **sampling):
        self.tokens, self.reason = [], None
        self.request = SlotRequest(prompt, max_tokens, on_token=self.take, on_done=self.done, **sampling)
        engine.submit(self.request)

    def take(self, token):
        self.tokens.append(token.id)
        return False

    def done(self, reason):
        self.reason = reason


def drain(engine):
    while engine.run_once():
        pass
    assert engine.active == 0 and engine.waiting == 0


def reference(engine, prompt, max_tokens, **options):
    ids = np.asarray(eqx_models.generate(engine.model, np.asarray([prompt]), max_new_tokens=max_tokens, **options))
    return ids[0, 1 if engine.seq2seq else len(prompt) :].tolist()


PROMPTS = [(3, 16), (11, 9), (14, 13), (7, 4), (5, 16)]  # (prompt length, max_tokens): 5 requests, 3 slots


def prompts(rng, vocab):
    return [(rng.integers(2, vocab, n).tolist(), new) for n, new in PROMPTS]


def test_greedy_is_the_same_alone_among_others_and_as_generate(engine):
    requests = prompts(np.random.default_rng(0), engine.model.config.vocab_size)
    alone = []
    for prompt, new in requests:
        one = Collect(engine, prompt, new)
        drain(engine)
        alone.append(one.tokens)
        assert one.reason == "length" and len(one.tokens) == new
    together = [Collect(engine, prompt, new) for prompt, new in requests]  # more requests than slots
    drain(engine)
    assert [c.tokens for c in together] == alone
    assert [reference(engine, p, n, eos_token_id=[]) for p, n in requests] == alone
    assert len({tuple(t) for t in alone}) > 1  # the prompts lead to different continuations


@pytest.mark.slow
def test_sampling_follows_each_requests_seed_and_matches_generate(engine):
    import jax

    requests = prompts(np.random.default_rng(1), engine.model.config.vocab_size)
    settings = [dict(temperature=0.7, top_p=0.9, seed=3), dict(temperature=1.3, seed=4), dict(temperature=0.0)]
    settings += [dict(temperature=1.0, top_p=0.5, seed=5), dict(temperature=0.9, seed=2**40)]
    together = [Collect(engine, p, n, **s) for (p, n), s in zip(requests, settings, strict=True)]
    drain(engine)
    for (prompt, new), s, got in zip(requests, settings, together, strict=True):
        if s["temperature"] == 0:
            options = {}
        else:
            options = dict(do_sample=True, key=jax.random.key(s["seed"]), temperature=s["temperature"])
            options.update(top_p=s["top_p"]) if "top_p" in s else None
        assert got.tokens == reference(engine, prompt, new, eos_token_id=[], **options), s


def test_requests_end_at_eos_at_a_consumers_stop_and_on_cancel(engine):
    for prompt, new in prompts(np.random.default_rng(0), engine.model.config.vocab_size):
        free = Collect(engine, prompt, new)
        drain(engine)
        later = [t for i, t in enumerate(free.tokens) if i >= 2 and t not in free.tokens[:i]]
        if later:  # a token first produced as the third or later: the end token here
            eos = later[0]
            break
    stopping = SlotEngine(engine.model, slots=2, context=engine.context, max_new_tokens=16, eos_token_id=[eos])
    ended = Collect(stopping, prompt, new)
    told = Collect(stopping, prompt, new)
    told.take = lambda token: told.tokens.append(token.id) or len(told.tokens) == 2
    told.request.on_token = told.take
    cancelled = Collect(stopping, prompt, new)  # waits for a slot, then is cancelled while decoding
    stopping.run_once()
    assert stopping.waiting == 1 and not cancelled.tokens
    drain_steps = 0
    while cancelled.reason is None and drain_steps < 50:
        if cancelled.tokens:
            stopping.cancel(cancelled.request)
        stopping.run_once()
        drain_steps += 1
    drain(stopping)
    assert ended.reason == "stop" and ended.tokens == free.tokens[: free.tokens.index(eos)]
    assert told.reason == "stop" and told.tokens == free.tokens[:2]
    assert cancelled.reason == "cancelled" and 0 < len(cancelled.tokens) < new


def test_limits_are_one_line_errors_and_a_full_queue_is_busy(engine):
    vocab = engine.model.config.vocab_size
    with pytest.raises(InputError, match="max_tokens must be between 1 and"):
        engine.submit(SlotRequest([2, 3], engine.max_new_tokens + 1))
    with pytest.raises(InputError, match="empty"):
        engine.submit(SlotRequest([], 4))
    with pytest.raises(InputError, match="outside"):
        engine.submit(SlotRequest([vocab], 4))
    with pytest.raises(InputError, match="prompt has|exceed the context"):
        engine.submit(SlotRequest([2] * (engine.context + 1), 1))
    with pytest.raises(InputError, match="use fewer slots"):
        SlotEngine(engine.model, slots=10**8, context=engine.context, max_new_tokens=engine.max_new_tokens)
    small = SlotEngine(engine.model, slots=1, context=engine.context, max_new_tokens=4, max_queue=2)
    small.submit(SlotRequest([2, 3], 4))
    small.submit(SlotRequest([2, 3], 4))
    with pytest.raises(BusyError, match="waiting"):
        small.submit(SlotRequest([2, 3], 4))


def test_the_compiled_programs_leave_the_host_checked_run_time_checks_out(engine):
    # `check` validates every request on the host, so neither program calls back to the host
    # (a round trip per step, and a program JAX's persistent compilation cache cannot store).
    rng = np.random.default_rng(3)
    Collect(engine, rng.integers(2, engine.model.config.vocab_size, 5).tolist(), 3)
    drain(engine)
    active = np.ones(engine.slots, bool)
    steps = np.zeros(engine.slots, np.int32)
    step = engine._step.lower(engine._params, engine._state, engine._tokens, active, engine._sampling(steps))
    ids, mask = engine._padded(SlotRequest([2, 3, 4], 2))
    one = lambda a: a[:1]  # noqa: E731
    join = engine._join.lower(
        engine._params,
        engine._state,
        np.int32(0),
        ids,
        mask,
        type(engine._sampling(steps))(*map(one, engine._sampling(steps))),
    )
    for program in (step, join):
        assert "callback" not in program.as_text()
