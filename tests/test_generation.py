"""`generate` against HF PyTorch `generate`, token for token: greedy and beam search on every
architecture with a causal or seq2seq head, logits processors end to end, scores,
bucketing without recompilation, streaming, and request errors."""

import dataclasses

import equinox as eqx
import jax
import numpy as np
import pytest
import torch
import transformers
from cases import BIG_BIRD, GPT_NEO, LONG_T5
from decoder_cases import CASES
from oracle import hf_generate, left_padded, randomise

import eqx_models
from eqx_models.generation import _generate


@dataclasses.dataclass(frozen=True)
class Arch:
    config_class: str
    model_class: str
    config: dict
    seq2seq: bool = False

    def build(self, folder, seed):
        torch.manual_seed(seed)
        config = getattr(transformers, self.config_class)(**self.config)
        reference = randomise(getattr(transformers, self.model_class)(config), seed)
        reference.save_pretrained(folder)
        return reference, eqx_models.from_pretrained(folder)


ARCHS = {
    "gpt_neo": Arch(
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        {**GPT_NEO, "num_layers": 2, "attention_types": [[["global", "local"], 1]], "pad_token_id": 0},
    ),
    "gemma": Arch("GemmaConfig", "GemmaForCausalLM", {**CASES["gemma-gqa2"].config, "num_hidden_layers": 2}),
    "xglm": Arch("XGLMConfig", "XGLMForCausalLM", {**CASES["xglm"].config, "num_layers": 2}),
    "big_bird": Arch(
        "BigBirdConfig", "BigBirdForCausalLM", {**BIG_BIRD, "is_decoder": True, "eos_token_id": 2, "pad_token_id": 0}
    ),
    "long_t5_local": Arch(
        "LongT5Config",
        "LongT5ForConditionalGeneration",
        {**LONG_T5, "num_decoder_layers": 2, "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0},
        seq2seq=True,
    ),
    "long_t5_tglobal": Arch(
        "LongT5Config",
        "LongT5ForConditionalGeneration",
        {
            **LONG_T5,
            "encoder_attention_type": "transient-global",
            "num_decoder_layers": 2,
            "decoder_start_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 0,
        },
        seq2seq=True,
    ),
}


def prompts(arch: Arch, seed: int):
    """A padded batch of three prompts: left-padded for decoder-only models, right-padded
    encoder inputs for seq2seq."""
    vocab, pad = arch.config["vocab_size"], arch.config.get("pad_token_id", 0)
    rng = np.random.default_rng(seed)
    if arch.seq2seq:
        ids = rng.integers(2, vocab, (3, 11))
        mask = (np.arange(11)[None] < np.array([[11], [7], [4]])).astype(np.int64)
    else:
        ids, mask = left_padded(rng, vocab, [7, 3, 5])
    return np.where(mask, ids, pad), mask


def pick_eos(model, ids, mask, seq2seq):
    """An id the model emits early in one row, so rows and beams stop at different steps."""
    first = np.asarray(eqx_models.generate(model, ids, mask, max_new_tokens=3, eos_token_id=None))
    return int(first[1, 2 if seq2seq else ids.shape[1] + 1])


STRATEGIES = {
    "greedy": dict(),
    "beam": dict(num_beams=3, num_return_sequences=2),
    "beam-early": dict(num_beams=2, early_stopping=True, length_penalty=0.6),
    "beam-never": dict(num_beams=3, early_stopping="never", length_penalty=1.7, num_return_sequences=3),
}
RUNS = [(arch, strategy) for arch in ARCHS for strategy in ("greedy", "beam")] + [
    ("gpt_neo", "beam-early"),
    ("gpt_neo", "beam-never"),
    ("long_t5_tglobal", "beam-early"),
    ("long_t5_local", "beam-never"),
]


@pytest.mark.slow
@pytest.mark.parametrize("arch,strategy", RUNS)
def test_greedy_and_beam_search_match_hf_token_for_token(tmp_path, arch, strategy):
    arch_ = ARCHS[arch]
    reference, model = arch_.build(tmp_path, seed=11)
    ids, mask = prompts(arch_, seed=12)
    eos = pick_eos(model, ids, mask, arch_.seq2seq)
    pad = arch_.config.get("pad_token_id", 0)
    options = dict(max_new_tokens=9, eos_token_id=eos, pad_token_id=pad, **STRATEGIES[strategy])
    ours = eqx_models.generate(model, ids, mask, output_scores=True, **options)
    theirs = hf_generate(reference, ids, mask, do_sample=False, output_scores=True, **options)
    np.testing.assert_array_equal(np.asarray(ours.sequences), theirs.sequences.numpy())
    if strategy == "greedy":
        expected = torch.stack(theirs.scores, 1).numpy()
        got = np.asarray(ours.scores)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)
    else:
        np.testing.assert_allclose(np.asarray(ours.sequences_scores), theirs.sequences_scores.numpy(), atol=2e-5)


PROCESSED = [
    dict(repetition_penalty=1.8, no_repeat_ngram_size=2, min_new_tokens=4),
    dict(bad_words_ids=[[5], [7, 8], [3, 4, 9]], suppress_tokens=[10, 11], min_length=9, forced_eos_token_id=[6]),
    dict(num_beams=3, repetition_penalty=0.7, no_repeat_ngram_size=3, begin_suppress_tokens=[12]),
]


@pytest.mark.slow
@pytest.mark.parametrize("options", PROCESSED)
def test_processors_end_to_end_match_hf(tmp_path, options):
    arch = ARCHS["gpt_neo"]
    reference, model = arch.build(tmp_path, seed=13)
    ids, mask = prompts(arch, seed=14)
    eos = pick_eos(model, ids, mask, False)
    common = dict(max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    ours = np.asarray(eqx_models.generate(model, ids, mask, **common, **options))
    theirs = hf_generate(reference, ids, mask, do_sample=False, **common, **options).sequences.numpy()
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.slow
def test_seq2seq_forced_bos_and_begin_suppression_match_hf(tmp_path):
    arch = ARCHS["long_t5_local"]
    reference, model = arch.build(tmp_path, seed=15)
    ids, mask = prompts(arch, seed=16)
    options = dict(max_new_tokens=6, forced_bos_token_id=9, begin_suppress_tokens=[3, 4], eos_token_id=1)
    ours = np.asarray(eqx_models.generate(model, ids, mask, num_beams=2, **options))
    theirs = hf_generate(reference, ids, mask, do_sample=False, num_beams=2, **options).sequences.numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert (ours[:, 1] == 9).all()


@pytest.fixture(scope="module")
def neo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("neo")
    return ARCHS["gpt_neo"].build(folder, seed=17)[1]


@pytest.mark.slow
def test_prompt_and_budget_buckets_share_one_compiled_program(neo, monkeypatch):
    counted = eqx.filter_jit(
        eqx.debug.assert_max_traces(_generate.host_checkable(_generate._sample_program), max_traces=1)
    )
    monkeypatch.setattr(_generate, "compiled_sample", counted)
    rng = np.random.default_rng(0)
    for width, new in [(3, 5), (9, 12), (16, 16), (1, 9)]:  # prompts of 1..16 tokens, budgets of 1..16
        ids = rng.integers(0, 90, (2, width))
        out = eqx_models.generate(neo, ids, max_new_tokens=new, eos_token_id=None)
        assert out.shape == (2, width + new)
    with pytest.raises(RuntimeError, match="traced"):  # the next size class compiles anew
        eqx_models.generate(neo, rng.integers(0, 90, (2, 17)), max_new_tokens=4, eos_token_id=None)


@pytest.mark.slow
def test_bucket_padding_does_not_change_the_result(neo):
    """The same prompt generated in two size classes (by adding HF-visible left padding)
    gives the same new tokens."""
    ids = np.array([[5, 6, 7, 8, 9]])
    short = np.asarray(eqx_models.generate(neo, ids, max_new_tokens=6, eos_token_id=None))[:, 5:]
    padded = np.pad(ids, ((0, 0), (14, 0)))
    mask = np.pad(np.ones_like(ids), ((0, 0), (14, 0)))
    long = np.asarray(eqx_models.generate(neo, padded, mask, max_new_tokens=6, eos_token_id=None))[:, 19:]
    np.testing.assert_array_equal(short, long)


@pytest.mark.slow
@pytest.mark.parametrize("sampled", [False, True])
def test_streaming_yields_the_tokens_of_generate(neo, sampled):
    ids, mask = left_padded(np.random.default_rng(1), 90, [6, 2])
    options = dict(max_new_tokens=13, eos_token_id=None)
    if sampled:
        options.update(do_sample=True, top_k=20, key=jax.random.key(3))
    whole = np.asarray(eqx_models.generate(neo, ids, mask, **options))
    chunks = list(eqx_models.generation.stream(neo, ids, mask, chunk_size=4, **options))
    assert [c.shape[1] for c in chunks] == [1, 4, 4, 4]
    np.testing.assert_array_equal(np.concatenate(chunks, 1), whole[:, ids.shape[1] :])
    seen = []
    via_callback = np.asarray(eqx_models.generate(neo, ids, mask, streamer=seen.append, chunk_size=5, **options))
    np.testing.assert_array_equal(via_callback, whole)
    assert [c.shape[1] for c in seen] == [1, 5, 5, 2]


def test_streaming_stops_when_every_row_has_ended(neo):
    ids = np.array([[4, 5, 6]])
    first = np.asarray(eqx_models.generate(neo, ids, max_new_tokens=3, eos_token_id=None))
    eos = int(first[0, 4])  # the second new token
    chunks = list(eqx_models.generation.stream(neo, ids, chunk_size=8, max_new_tokens=30, eos_token_id=eos))
    assert np.concatenate(chunks, 1).tolist() == [first[0, 3:5].tolist()]


@pytest.mark.slow
def test_max_length_and_several_samples_per_prompt(neo):
    ids, mask = left_padded(np.random.default_rng(2), 90, [5, 3])
    by_new = eqx_models.generate(neo, ids, mask, max_new_tokens=4, eos_token_id=None)
    by_length = eqx_models.generate(neo, ids, mask, max_length=9, eos_token_id=None)
    np.testing.assert_array_equal(np.asarray(by_new), np.asarray(by_length))
    samples = np.asarray(
        eqx_models.generate(
            neo, ids, mask, max_new_tokens=8, do_sample=True, num_return_sequences=3, key=jax.random.key(0)
        )
    )
    assert samples.shape == (6, 13)
    np.testing.assert_array_equal(samples[:3, :5], np.repeat(ids[:1], 3, 0))  # rows 0-2 continue prompt 0
    assert len({tuple(r) for r in samples[:3, 5:].tolist()}) > 1  # independent draws


BAD_REQUESTS = [
    (dict(max_new_tokens=4, do_sample=True), "needs a PRNG key"),
    (dict(max_new_tokens=4, top_k=5), "do_sample=True"),
    (
        dict(max_new_tokens=4, do_sample=True, temperature=0.0, key=jax.random.key(0)),
        "temperature must be a finite number > 0",
    ),
    (dict(max_new_tokens=4, num_beams=2, num_return_sequences=3), "cannot exceed num_beams"),
    (dict(max_new_tokens=4, num_return_sequences=2), "needs do_sample or num_beams"),
    (dict(max_new_tokens=4, num_beams=2, do_sample=True, key=jax.random.key(0)), "beam sampling"),
    (dict(max_new_tokens=4, max_length=9), "exactly one of"),
    (dict(max_length=2), "leaves no room"),
    (dict(max_new_tokens=4, beam_size=2), "unknown generation options"),
    (dict(max_new_tokens=4, bad_words_ids=[[3, 500]]), r"outside \[0, 97\)"),
    (dict(max_new_tokens=4, bad_words_ids=[3, 4]), "list of non-empty lists"),
    (dict(max_new_tokens=4, early_stopping="sometimes", num_beams=2), "early_stopping"),
    (dict(max_new_tokens=62), "exceeds the model's 64 positions"),
]


@pytest.mark.parametrize("options,match", BAD_REQUESTS)
def test_bad_requests_are_named_before_compiling(neo, options, match):
    with pytest.raises(eqx_models.InputError, match=match):
        eqx_models.generate(neo, np.array([[1, 2, 3]]), **options)


def test_beam_search_cannot_stream(neo):
    with pytest.raises(eqx_models.InputError, match="cannot stream"):
        next(eqx_models.generation.stream(neo, np.array([[1, 2]]), max_new_tokens=3, num_beams=2))


@pytest.mark.slow
def test_traced_prompts_keep_the_models_run_time_checks(neo):
    """`generate` on concrete ids leaves the model's run-time checks out of its program (the
    ids were checked on the host); the same call under `jax.jit` must not reuse that program."""
    eqx_models.generate(neo, np.array([[5, 6]]), max_new_tokens=2, eos_token_id=None)
    bad = np.array([[5, neo.config.vocab_size + 3]])
    with pytest.raises(Exception, match="token id outside"):
        jax.block_until_ready(jax.jit(lambda ids: eqx_models.generate(neo, ids, max_new_tokens=2))(bad))
