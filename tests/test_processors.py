"""Logits processors and warpers against HF's classes of the same meaning, and sampling
through the public `generate` on a tiny GPT-Neo.

Processors see a token buffer wider than HF's `input_ids`: junk columns before `first` and
after `length` must be ignored. Every processor is run eagerly and under `jax.jit`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers
from cases import hf_neo
from oracle import hf_positions, left_padded, torch_logits
from transformers.generation import logits_process as hf
from transformers.generation.utils import GenerationMixin

import eqx_models
from eqx_models.generation import (
    ForcedBOS,
    ForcedEOS,
    GenerationConfig,
    LogitsProcessor,
    MinLength,
    MinNewTokens,
    MinP,
    NoRepeatNGram,
    RepetitionPenalty,
    StepContext,
    SuppressTokens,
    SuppressTokensAtBegin,
    Temperature,
    TopK,
    TopP,
)
from eqx_models.generation._processors import apply_processors, build_processors

ROWS, VOCAB = 4, 50
BEFORE, CAPACITY = 3, 48  # junk columns before what HF sees; the buffer's width (junk after it)
TOL = 1e-6  # on finite values; -inf positions must match exactly


# ---------------------------------------------------------------- helpers


def make_inputs(seed: int, cur_len: int, alphabet: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Mixed-sign float32 scores `[ROWS, VOCAB]` and `input_ids` `[ROWS, cur_len]` drawn from
    a small alphabet, so that tokens and n-grams repeat."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(0.0, 3.0, (ROWS, VOCAB)).astype(np.float32)
    ids = rng.integers(0, alphabet, (ROWS, cur_len))
    return scores, ids


def step_context(ids: np.ndarray, *, prompt_length: int | None = None, max_length: int | None = None, seed: int = 0):
    """`ids` inside a wider buffer of `CAPACITY` columns: `BEFORE` junk columns, then `ids`,
    then junk. The junk overlaps the ids' alphabet, so it would change results if seen."""
    rows, cur_len = ids.shape
    tokens = np.random.default_rng(seed + 10_000).integers(0, 12, (rows, CAPACITY)).astype(np.int32)
    tokens[:, BEFORE : BEFORE + cur_len] = ids
    as_int = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    return StepContext(
        tokens=jnp.asarray(tokens),
        first=as_int(BEFORE),
        length=as_int(BEFORE + cur_len),
        prompt_length=as_int(cur_len if prompt_length is None else prompt_length),
        max_length=as_int(cur_len + 10 if max_length is None else max_length),
    )


def with_junk_visible(context: StepContext, *, after: bool = False) -> StepContext:
    """The same buffer with the junk before `first` (or after `length`) exposed."""
    if after:
        return eqx.tree_at(lambda c: c.length, context, jnp.asarray(CAPACITY, jnp.int32))
    return eqx.tree_at(lambda c: c.first, context, jnp.asarray(0, jnp.int32))


# The processors are static (hashable modules): one compilation per processor and shape.
jitted_processors = jax.jit(apply_processors, static_argnums=0)


def run_ours(processors, scores: np.ndarray, context: StepContext) -> list[np.ndarray]:
    """One processor or a chain, eagerly and under `jax.jit`."""
    chain = processors if isinstance(processors, tuple) else (processors,)
    scores = jnp.asarray(scores)
    return [np.asarray(apply_processors(chain, scores, context)), np.asarray(jitted_processors(chain, scores, context))]


def run_hf(processor, scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return processor(torch.tensor(ids, dtype=torch.long), torch.tensor(scores)).numpy()


def assert_same(ours: np.ndarray, expected: np.ndarray, tol: float = TOL) -> float:
    """Same -inf (and +inf, NaN) positions; finite values within `tol` relative (absolute
    below 1); returns the max |diff|. (XLA on CPU divides by a scalar through its reciprocal,
    torch divides: `Temperature` may differ by an ulp.)"""
    assert ours.shape == expected.shape and ours.dtype == np.float32
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(expected))
    np.testing.assert_array_equal(np.isposinf(ours), np.isposinf(expected))
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(expected))
    finite = np.isfinite(expected)
    diff = np.abs(ours[finite].astype(np.float64) - expected[finite])
    assert (diff <= tol * np.maximum(1.0, np.abs(expected[finite]))).all(), diff.max()
    return float(diff.max(initial=0.0))


def check(ours_processor, hf_processor, scores, ids, context, *, fires: bool | None = True, label=""):
    """Ours (eager and jitted) against HF; `fires` says whether HF must change the scores."""
    expected = run_hf(hf_processor, scores, ids)
    if fires is not None:
        changed = not np.array_equal(expected, scores)
        assert changed == fires, f"HF's processor {'did not fire' if fires else 'fired'}: the case is not testing"
    diffs = [assert_same(out, expected) for out in run_ours(ours_processor, scores, context)]
    print(f"{label or type(hf_processor).__name__}: max |diff| eager {diffs[0]:.1e}, jit {diffs[1]:.1e}")
    return expected


# ---------------------------------------------------------------- processors


@pytest.mark.slow
@pytest.mark.parametrize("penalty", [1.3, 0.7])
@pytest.mark.parametrize("cur_len", [1, 7])
def test_repetition_penalty(penalty, cur_len):
    scores, ids = make_inputs(1, cur_len)
    context = step_context(ids, seed=1)
    assert (scores < 0).any() and (scores > 0).any()
    expected = check(RepetitionPenalty(penalty), hf.RepetitionPenaltyLogitsProcessor(penalty), scores, ids, context)
    # The junk on either side would change the result if it were seen.
    for after in (False, True):
        exposed = with_junk_visible(context, after=after)
        assert not np.array_equal(run_ours(RepetitionPenalty(penalty), scores, exposed)[0], expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    "size,cur_len,alphabet,fires",
    [
        (1, 1, 8, True),
        (1, 9, 8, True),
        (2, 1, 8, False),  # no bigram yet
        (2, 2, 2, None),  # one bigram: fires only if both tokens are equal
        (2, 12, 4, True),
        (3, 1, 8, False),  # cur_len shorter than n - 1
        (3, 2, 8, False),  # cur_len + 1 == n: checked, but no trigram exists
        (3, 14, 3, True),
        (3, 30, 2, True),
    ],
)
def test_no_repeat_ngram(size, cur_len, alphabet, fires):
    scores, ids = make_inputs(10 * size + cur_len, cur_len, alphabet)
    context = step_context(ids, seed=size)
    if cur_len >= size - 1:  # junk n-grams "tail + 40" before `first` and "tail + 41" after `length`
        tail = ids[:, cur_len - (size - 1) :]
        tokens = context.tokens.at[:, BEFORE - size : BEFORE].set(np.concatenate([tail, np.full((ROWS, 1), 40)], 1))
        tokens = tokens.at[:, BEFORE + cur_len : BEFORE + cur_len + size].set(
            np.concatenate([tail, np.full((ROWS, 1), 41)], 1)
        )
        context = eqx.tree_at(lambda c: c.tokens, context, tokens)
    expected = check(NoRepeatNGram(size), hf.NoRepeatNGramLogitsProcessor(size), scores, ids, context, fires=fires)
    assert np.isfinite(expected[:, [40, 41]]).all()
    if cur_len >= size - 1:  # the junk would ban 40 if it were seen
        assert np.isneginf(run_ours(NoRepeatNGram(size), scores, with_junk_visible(context))[0][:, 40]).all()


EOS = (3, 11)
# [3] and [11] are EOS ids: HF drops them. The last word is longer than the whole buffer.
WORDS = [[7], [1, 2], [2, 5, 1], [4, 4], [3], [5, 3], [11], [5] * (CAPACITY + 1)]


@pytest.mark.parametrize("cur_len", [1, 2, 3, 9])
def test_bad_words(cur_len):
    scores, ids = make_inputs(20 + cur_len, cur_len)
    # Row r ends with the prefix of a multi-token word (where it fits): [1], [2, 5], [4], [5].
    for row, prefix in enumerate([[1], [2, 5], [4], [5]]):
        n = min(len(prefix), cur_len)
        ids[row, cur_len - n :] = prefix[len(prefix) - n :]
    context = step_context(ids, seed=2)
    # The junk just before `first` completes the prefixes HF cannot see.
    context = eqx.tree_at(lambda c: c.tokens, context, context.tokens.at[:, BEFORE - 2 : BEFORE].set(2))
    config = GenerationConfig(max_new_tokens=1, bad_words_ids=tuple(map(tuple, WORDS)), eos_token_id=EOS)
    ours = build_processors(config, prompt_length=6)
    theirs = hf.NoBadWordsLogitsProcessor(WORDS, eos_token_id=list(EOS))
    expected = check(ours, theirs, scores, ids, context)
    # The words [3] and [11] (EOS ids) are dropped; [5, 3] bans 3 after a 5 only.
    assert np.isfinite(expected[:, 11]).all() and np.isfinite(expected[[0, 2], 3]).all()
    assert np.isneginf(expected[[1, 3], 3]).all() == (cur_len >= 2)


def test_bad_words_of_only_eos_ids():
    """HF drops single-token words equal to an EOS id; when nothing is left its processor
    leaves the scores untouched, and we build no processor."""
    config = GenerationConfig(max_new_tokens=1, bad_words_ids=((3,), (11,)), eos_token_id=EOS)
    assert build_processors(config, prompt_length=6) == ()
    scores, ids = make_inputs(25, 4)
    np.testing.assert_array_equal(run_hf(hf.NoBadWordsLogitsProcessor([[3], [11]], list(EOS)), scores, ids), scores)


EOS3 = (3, 7, 49, 60)  # 60 is beyond the vocabulary, as in HF's tiny test configs: never matches


@pytest.mark.parametrize("cur_len,fires", [(5, True), (9, True), (10, False), (14, False)])
def test_min_length(cur_len, fires):
    scores, ids = make_inputs(30 + cur_len, cur_len)
    check(MinLength(10, EOS3), hf.MinLengthLogitsProcessor(10, list(EOS3)), scores, ids, step_context(ids), fires=fires)


@pytest.mark.parametrize("cur_len,fires", [(6, True), (8, True), (9, False), (12, False)])
def test_min_new_tokens(cur_len, fires):
    """A 6-token prompt and min_new_tokens=3: EOS is banned until 3 tokens were generated."""
    scores, ids = make_inputs(40 + cur_len, cur_len)
    context = step_context(ids, prompt_length=6)
    theirs = hf.MinNewTokensLengthLogitsProcessor(6, 3, list(EOS3))
    check(MinNewTokens(3, EOS3), theirs, scores, ids, context, fires=fires)


@pytest.mark.parametrize("cur_len,fires", [(1, True), (2, False)])
def test_forced_bos(cur_len, fires):
    scores, ids = make_inputs(50 + cur_len, cur_len)
    context = step_context(ids, prompt_length=1)
    check(ForcedBOS(4), hf.ForcedBOSTokenLogitsProcessor(4), scores, ids, context, fires=fires)


@pytest.mark.parametrize("cur_len,fires", [(8, False), (9, True), (10, False)])
@pytest.mark.parametrize("eos", [(7,), (3, 7, 49)])
def test_forced_eos(cur_len, fires, eos):
    scores, ids = make_inputs(60 + cur_len, cur_len)
    context = step_context(ids, prompt_length=4, max_length=10)
    check(ForcedEOS(eos), hf.ForcedEOSTokenLogitsProcessor(10, list(eos)), scores, ids, context, fires=fires)


def test_suppress_tokens():
    scores, ids = make_inputs(70, 5)
    tokens = (0, 5, 49)
    check(SuppressTokens(tokens), hf.SuppressTokensLogitsProcessor(tokens), scores, ids, step_context(ids))


@pytest.mark.parametrize(
    "prompt_length,offset,cur_len,fires",
    [(5, 0, 5, True), (5, 0, 6, False), (5, 0, 4, False), (1, 1, 1, False), (1, 1, 2, True), (1, 0, 1, True)],
)
def test_suppress_tokens_at_begin(prompt_length, offset, cur_len, fires):
    scores, ids = make_inputs(80 + cur_len, cur_len)
    tokens = (1, 2, 9)
    context = step_context(ids, prompt_length=prompt_length)
    theirs = hf.SuppressTokensAtBeginLogitsProcessor(tokens, prompt_length + offset)
    check(SuppressTokensAtBegin(tokens, offset), theirs, scores, ids, context, fires=fires)


# ---------------------------------------------------------------- warpers


def warper_scores(seed: int) -> np.ndarray:
    """Random rows, plus rows as earlier processors leave them: some -inf entries, scores
    whose probability underflows to 0, one finite entry, and ties."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(0.0, 3.0, (6, VOCAB)).astype(np.float32)
    scores[1, rng.choice(VOCAB, 20, replace=False)] = -np.inf
    scores[2, :10] -= 300.0  # probabilities exactly 0 in float32
    scores[3, 1:] = -np.inf
    scores[4] = np.round(scores[4])  # many ties
    return scores


WARPERS = [
    (Temperature(0.7), hf.TemperatureLogitsWarper(0.7)),
    (Temperature(2.0), hf.TemperatureLogitsWarper(2.0)),
    (Temperature(0.3), hf.TemperatureLogitsWarper(0.3)),
    (TopK(1), hf.TopKLogitsWarper(1)),
    (TopK(5), hf.TopKLogitsWarper(5)),
    (TopK(60), hf.TopKLogitsWarper(60)),  # k > vocab
    (TopK(2, min_tokens_to_keep=6), hf.TopKLogitsWarper(2, min_tokens_to_keep=6)),
    (TopP(0.3), hf.TopPLogitsWarper(0.3)),
    (TopP(0.9), hf.TopPLogitsWarper(0.9)),
    (TopP(1.0), hf.TopPLogitsWarper(1.0)),  # drops only probability-0 tokens
    (TopP(0.3, min_tokens_to_keep=3), hf.TopPLogitsWarper(0.3, min_tokens_to_keep=3)),
    (MinP(0.05), hf.MinPLogitsWarper(0.05)),
    (MinP(0.5), hf.MinPLogitsWarper(0.5)),
    (MinP(0.5, min_tokens_to_keep=3), hf.MinPLogitsWarper(0.5, min_tokens_to_keep=3)),
]


@pytest.mark.slow
@pytest.mark.parametrize("ours,theirs", WARPERS, ids=[repr(w[0]).replace(" ", "") for w in WARPERS])
@pytest.mark.parametrize("seed", [0, 1])
def test_warper(ours, theirs, seed):
    scores = warper_scores(seed)
    if isinstance(ours, (TopP, MinP)):
        scores[4] += np.random.default_rng(seed).normal(0, 1e-3, VOCAB).astype(np.float32)  # their sorts are unstable
    ids = np.random.default_rng(seed).integers(0, VOCAB, (scores.shape[0], 3))
    context = step_context(ids)
    fires = None if isinstance(ours, TopP) and ours.p == 1.0 else not (isinstance(ours, TopK) and ours.k > VOCAB)
    expected = check(ours, theirs, scores, ids, context, fires=fires, label=repr(ours))
    if isinstance(ours, TopP) and ours.p == 1.0:
        assert np.isneginf(expected[2, :10]).all() and np.isfinite(expected[0]).all()


# ---------------------------------------------------------------- the whole chain

CHAIN = dict(
    repetition_penalty=1.2,
    no_repeat_ngram_size=2,
    bad_words_ids=((7,), (1, 2), (3,), (2, 5, 6)),
    min_length=10,
    min_new_tokens=3,
    forced_bos_token_id=4,
    forced_eos_token_id=(3,),
    suppress_tokens=(0, 49),
    begin_suppress_tokens=(9, 10, 6),
    eos_token_id=(3, 11),
    do_sample=True,
    temperature=0.8,
    top_k=20,
    top_p=0.9,
    min_p=0.05,
)


def hf_chain(options: dict, prompt_length: int, max_length: int) -> transformers.LogitsProcessorList:
    """The list HF's own `generate` builds (`GenerationMixin._get_logits_processor`)."""
    config = transformers.GenerationConfig(
        **{k: [list(w) for w in v] if k == "bad_words_ids" else v for k, v in options.items()}, max_length=max_length
    )
    config._eos_token_tensor = torch.tensor(options["eos_token_id"])  # set by HF's `_prepare_special_tokens`
    processors = GenerationMixin._get_logits_processor(
        GenerationMixin(), config, input_ids_seq_length=prompt_length, device="cpu"
    )
    names = [type(p).__name__ for p in processors]
    assert names == [
        "RepetitionPenaltyLogitsProcessor",
        "NoRepeatNGramLogitsProcessor",
        "NoBadWordsLogitsProcessor",
        "MinLengthLogitsProcessor",
        "MinNewTokensLengthLogitsProcessor",
        "ForcedBOSTokenLogitsProcessor",
        "ForcedEOSTokenLogitsProcessor",
        "SuppressTokensLogitsProcessor",
        "SuppressTokensAtBeginLogitsProcessor",
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
        "MinPLogitsWarper",
    ]
    return processors


@pytest.mark.slow
@pytest.mark.parametrize(
    "cur_len,prompt_length,max_length",
    [
        (6, 6, 12),  # first new token: min length, min new tokens, begin-suppress
        (8, 6, 12),  # min length and min new tokens
        (9, 6, 20),  # min length only
        (11, 6, 12),  # forced EOS
        (13, 6, 30),  # only the sequence-dependent processors and the warpers
        (1, 1, 8),  # forced BOS
        (2, 1, 8),  # begin-suppress after a forced BOS
        (3, 1, 8),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_full_chain_matches_hf_generate_processors(cur_len, prompt_length, max_length, seed):
    scores, ids = make_inputs(100 + seed, cur_len, alphabet=12)
    if cur_len >= 2:
        ids[0, -1] = 1  # bad word [1, 2]
        ids[1, -2:] = [2, 5]  # bad word [2, 5, 6]
    config = GenerationConfig(max_new_tokens=max_length - prompt_length, **CHAIN)
    ours = build_processors(config, prompt_length=prompt_length)
    assert len(ours) == 13
    context = step_context(ids, prompt_length=prompt_length, max_length=max_length, seed=seed)
    theirs = hf_chain(CHAIN, prompt_length, max_length)
    expected = check(ours, theirs, scores, ids, context, label=f"chain cur_len={cur_len}")
    assert np.isfinite(expected).any(axis=-1).all()


# ---------------------------------------------------------------- sampling through `generate`


@pytest.fixture(scope="module")
def neo(tmp_path_factory):
    """A random tiny GPT-Neo (vocab 97, 128 positions): ours and HF's."""
    path = tmp_path_factory.mktemp("neo")
    reference = hf_neo(path, seed=3, max_position_embeddings=128)
    return eqx_models.from_pretrained(path), reference


WARPER_OPTIONS = [
    dict(top_k=3),
    dict(temperature=0.7, top_p=0.6, min_p=0.05),
]


@pytest.mark.parametrize("options", WARPER_OPTIONS, ids=str)
def test_sampling_never_emits_excluded_tokens(neo, options):
    """Every sampled token has a finite processed score at its step, and the processed scores
    are HF's warpers applied to HF's logits of the sampled sequence (-inf masks identical,
    finite values within 1e-4: cached decoding against HF's full forward)."""
    model, reference = neo
    ids, mask = left_padded(np.random.default_rng(4), 97, [5, 3, 6, 2])
    steps, width = 20, ids.shape[1]
    kwargs = dict(do_sample=True, max_new_tokens=steps, eos_token_id=None, output_scores=True, **options)
    run = lambda key: eqx_models.generate(model, ids, mask, key=key, **kwargs)  # noqa: E731
    out = run(jax.random.key(0))
    sequences, scores = np.asarray(out.sequences), np.asarray(out.scores)
    assert sequences.shape == (4, width + steps) and scores.shape == (4, steps, 97)
    np.testing.assert_array_equal(sequences[:, :width], ids)
    new = sequences[:, width:]
    chosen = np.take_along_axis(scores, new[..., None], axis=-1)[..., 0]
    assert np.isfinite(chosen).all()
    if options == dict(top_k=3):
        np.testing.assert_array_equal(np.isfinite(scores).sum(-1), 3)

    # HF's warpers on HF's logits of the same sequences.
    full_mask = np.concatenate([mask, np.ones((4, steps), mask.dtype)], axis=1)
    logits = torch_logits(reference, sequences.astype(np.int64), full_mask, hf_positions(full_mask))[:, width - 1 : -1]
    config = transformers.GenerationConfig(**{"do_sample": True, "top_k": 0, **options})
    config._eos_token_tensor = None
    warpers = GenerationMixin._get_logits_processor(GenerationMixin(), config, input_ids_seq_length=width)
    expected = np.stack([run_hf(warpers, logits[:, t], sequences[:, : width + t]) for t in range(steps)], axis=1)
    diff = assert_same(scores, expected, tol=1e-4)
    print(f"generate {options}: processed scores vs HF warpers max |diff| {diff:.1e}")

    np.testing.assert_array_equal(run(jax.random.key(0)).sequences, sequences)  # same key, same tokens


class FixedLogits(LogitsProcessor):
    """Replaces the model's scores with one fixed distribution for every row and step."""

    logits: jax.Array

    def __call__(self, scores, context):
        return jnp.broadcast_to(self.logits, scores.shape)


TARGET_IDS = np.array([5, 17, 42, 90])
TARGET_P = np.array([0.1, 0.2, 0.3, 0.4])


def target_processor(vocab: int = 97) -> FixedLogits:
    logits = np.full(vocab, -np.inf, np.float32)
    logits[TARGET_IDS] = np.log(TARGET_P)
    return FixedLogits(jnp.asarray(logits))


_SQRT = np.sqrt(TARGET_P) / np.sqrt(TARGET_P).sum()  # temperature 2: p^(1/2), renormalised
DISTRIBUTIONS = [
    (dict(), TARGET_P),
    (dict(temperature=2.0), _SQRT),  # [0.163, 0.230, 0.282, 0.325]
    # Ascending cumulative mass 0.1, 0.3, 0.6, 1.0: the two tokens with mass <= 0.5 go.
    (dict(top_p=0.5), np.array([0, 0, 3, 4]) / 7),
    # Temperature first: cumulative 0.163, 0.393, 0.675, 1.0, only the first token has mass
    # <= 0.35 (top-p first would drop two: 0.1, 0.3).
    (dict(temperature=2.0, top_p=0.65), np.array([0, *_SQRT[1:]]) / _SQRT[1:].sum()),
]


@pytest.mark.slow
@pytest.mark.parametrize("options,expected", DISTRIBUTIONS, ids=[str(d[0]) for d in DISTRIBUTIONS])
def test_sample_frequencies_match_the_distribution(neo, options, expected):
    """4096 draws (64 rows x 64 steps) from fixed logits over 4 tokens (p = 0.1, 0.2, 0.3,
    0.4; every other token -inf), warped by `options`. Tolerance: a chi-square goodness-of-fit
    test on the tokens of nonzero expected probability must give p > 1e-3; the key is fixed,
    so the test is deterministic. Tokens of zero probability must never appear."""
    model, _ = neo
    prompts = np.tile(np.array([[1, 2, 3]]), (64, 1))

    def draw(key):
        out = eqx_models.generate(
            model,
            prompts,
            key=key,
            logits_processors=[target_processor()],
            do_sample=True,
            max_new_tokens=64,
            eos_token_id=None,
            **options,
        )
        return np.asarray(out)[:, 3:]

    new = draw(jax.random.key(0))
    assert new.shape == (64, 64)
    assert np.isin(new, TARGET_IDS[expected > 0]).all()
    counts = (new.ravel()[:, None] == TARGET_IDS).sum(0)
    kept = expected > 0
    result = scipy.stats.chisquare(counts[kept], expected[kept] * new.size)
    print(
        f"sampling {options}: counts {counts.tolist()}, expected {np.round(expected * new.size).tolist()}, "
        f"chi-square p = {result.pvalue:.3f}"
    )
    assert result.pvalue > 1e-3

    if not options:  # keys: the same one reproduces the draws, another changes them
        np.testing.assert_array_equal(draw(jax.random.key(0)), new)
        # Each draw coincides with probability sum(p^2) = 0.3: about 30% of them.
        assert (draw(jax.random.key(1)) != new).mean() > 0.5
        # Rows and steps are independent draws, not copies of each other.
        assert len({tuple(row) for row in new}) == 64 and len({tuple(col) for col in new.T}) == 64
