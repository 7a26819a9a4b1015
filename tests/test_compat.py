"""eqx_models.compat against the real HF Flax classes of transformers 4.57.6, on tiny random checkpoints with every
parameter randomised: params trees, outputs on padded batches (and with `params=` overridden), hidden-state tuples,
encode/decode, the training idiom's loss and gradients, greedy and beam generation (also under `jax.jit`),
save_pretrained both ways, and HF's example scripts run with only the model class changed.

HF's Flax T5 / mT5 / LongT5 no longer run on current JAX (`jnp.clip(a_min=, a_max=)`): they run here under the
`compat_cases.hf_flax_runs` shim. Where we follow PyTorch on purpose (Gemma's rope_theta, LongT5's transient-global
blocks for some global_block_size, BigBird's causal-LM generation without cross attention), we compare with HF
PyTorch instead, and the test shows that HF Flax differs there."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from compat_cases import (
    CASES,
    NO_DROPOUT,
    SPARSE,
    SPARSE_LENGTHS,
    SPARSE_SEQ,
    Case,
    assert_close,
    assert_outputs_close,
    assert_same_params,
    assert_trees_close,
    clm_example,
    hf_flax_runs,
    new_train_state,
    output_masks,
    perturbed,
    right_padded,
    runs,
    summarization_example,
    train_step,
    user_code,
)
from oracle import left_pad

from eqx_models import compat


def ours(name: str) -> type:
    return getattr(compat, name)


def theirs(name: str) -> type:
    return getattr(transformers, name)


class Loaded:
    """A case's checkpoint folder with HF's Flax model (`from_pt=True`) and ours (`from_pretrained(folder)`)."""

    def __init__(self, case: Case, folder, **overrides):
        self.case, self.folder = case, folder
        self.torch = case.save(folder, **overrides)
        with hf_flax_runs():
            self.hf = theirs(case.name).from_pretrained(folder, from_pt=True)
        self.ours = ours(case.name).from_pretrained(folder)

    def call_hf(self, *args, **kwargs):
        with hf_flax_runs():
            return self.hf(*args, **kwargs)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """`loaded(case_id, **config overrides)`: built once per module."""
    cache = {}

    def load(case_id: str, **overrides) -> Loaded:
        key = (case_id, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = Loaded(CASES[case_id], tmp_path_factory.mktemp(case_id.replace("-", "_")), **overrides)
        return cache[key]

    return load


def tiered(params: list, fast: set) -> list:
    """`params`, those not in `fast` marked slow: the fast tier runs one class of each kind, the slow tier all."""
    slow = pytest.mark.slow
    return [p if p in fast else pytest.param(*(p if isinstance(p, tuple) else (p,)), marks=slow) for p in params]


ALL = sorted(CASES)
SEQ2SEQ = [case_id for case_id in ALL if CASES[case_id].kind == "seq2seq"]
# one class of each kind in the fast tier; the rest (and anything above ~10 s) in the slow tier
FAST = {"FlaxGPTNeoForCausalLM", "FlaxGemmaModel", "FlaxXGLMForCausalLM", "FlaxBigBirdForQuestionAnswering",
        "FlaxBigBirdForMultipleChoice", "FlaxT5ForConditionalGeneration", "FlaxLongT5ForConditionalGeneration-tglobal",
        "FlaxMT5EncoderModel"}  # fmt: skip
# The mechanism below the classes is one (params put in place, one call, one generate), so
# the costlier checks run on one class of each kind; params and outputs run on every class.
ONE_PER_KIND = sorted(FAST)
GENERATE = [
    ("FlaxGPTNeoForCausalLM", False),
    ("FlaxGPTNeoForCausalLM", True),
    ("FlaxT5ForConditionalGeneration", False),
]


# --------------------------------------------------------------------------- params


@pytest.mark.slow
@pytest.mark.parametrize("case_id", tiered(ALL, FAST))
def test_params_are_hf_flax_params(loaded, case_id):
    """Structure, key names, shapes, dtypes and values, loading the folder as it is and with `from_pt=True`."""
    pair = loaded(case_id)
    assert_same_params(pair.ours.params, pair.hf.params)
    assert_same_params(ours(pair.case.name).from_pretrained(pair.folder, from_pt=True).params, pair.hf.params)


# --------------------------------------------------------------------------- outputs


@pytest.mark.slow
@pytest.mark.parametrize("case_id", tiered(ALL, FAST))
def test_outputs_on_padded_batch(loaded, case_id):
    pair = loaded(case_id)
    inputs = pair.case.inputs(np.random.default_rng(0))
    masks = output_masks(pair.case, inputs)
    diffs = assert_outputs_close(pair.ours(**inputs), pair.call_hf(**inputs), masks)
    print(case_id, {name: f"{d:.1e}" for name, d in diffs.items()})


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ONE_PER_KIND)
def test_params_argument_overrides_the_weights(loaded, case_id):
    """Both sides get the same perturbed params; the outputs move with them."""
    pair = loaded(case_id)
    inputs = pair.case.inputs(np.random.default_rng(1))
    masks = output_masks(pair.case, inputs)
    moved = perturbed(pair.hf.params)
    reference = pair.call_hf(**inputs, params=moved)
    mine = pair.ours(**inputs, params=moved)
    assert_outputs_close(mine, reference, masks)
    assert not np.allclose(np.asarray(mine[0]), np.asarray(pair.ours(**inputs)[0]))


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ONE_PER_KIND)
def test_hidden_states_tuples_and_indexing(loaded, case_id):
    """`output_hidden_states=True` (one more than layers, per stack), `return_dict=False` tuples, `outputs[0]`."""
    pair = loaded(case_id)
    inputs = pair.case.inputs(np.random.default_rng(2))
    masks = output_masks(pair.case, inputs)
    reference = pair.call_hf(**inputs, output_hidden_states=True)
    mine = pair.ours(**inputs, output_hidden_states=True)
    diffs = assert_outputs_close(mine, reference, masks)
    assert any("hidden_states[" in name for name in diffs), sorted(diffs)

    as_tuple = pair.ours(**inputs, return_dict=False)
    reference_tuple = pair.call_hf(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(reference_tuple)
    fields = [name for name, value in pair.call_hf(**inputs).items() if value is not None]
    for index, (a, b) in enumerate(zip(as_tuple, reference_tuple, strict=True)):
        name = fields[index] if index < len(fields) else str(index)
        if isinstance(b, tuple | list):  # HF's past_key_values or hidden states
            continue
        assert_close(f"tuple[{index}] ({name})", a, b, masks["encoder" if name.startswith("encoder_") else "decoder"])
    np.testing.assert_array_equal(np.asarray(pair.ours(**inputs)[0]), np.asarray(as_tuple[0]))


@pytest.mark.slow
@pytest.mark.parametrize("config", SPARSE, ids=lambda c: f"block{c['block_size']}")
@pytest.mark.parametrize(
    "case_id",
    [
        "FlaxBigBirdModel",
        "FlaxBigBirdForMaskedLM",
    ],
)
def test_big_bird_block_sparse_outputs(loaded, case_id, config):
    """A 24-token batch (rows of 23, 19 and 17 tokens), longer than full attention's fallback: really sparse."""
    pair = loaded(case_id, **config)
    inputs = pair.case.inputs(np.random.default_rng(3), lengths=SPARSE_LENGTHS, seq=SPARSE_SEQ)
    assert SPARSE_SEQ > (5 + 2 * config["num_random_blocks"]) * config["block_size"]
    masks = output_masks(pair.case, inputs)
    assert_outputs_close(pair.ours(**inputs), pair.call_hf(**inputs), masks)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", tiered(SEQ2SEQ, FAST))
def test_encode_then_decode(loaded, case_id):
    pair = loaded(case_id)
    inputs = pair.case.inputs(np.random.default_rng(4))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    decoder_ids, decoder_mask = inputs["decoder_input_ids"], inputs["decoder_attention_mask"]
    masks = output_masks(pair.case, inputs)
    with hf_flax_runs():
        hf_encoded = pair.hf.encode(ids, attention_mask=mask)
        hf_decoded = pair.hf.decode(
            decoder_ids, hf_encoded, encoder_attention_mask=mask, decoder_attention_mask=decoder_mask
        )
    encoded = pair.ours.encode(ids, attention_mask=mask)
    assert_outputs_close(encoded, hf_encoded, {"encoder": [mask], "decoder": [mask]})
    decoded = pair.ours.decode(decoder_ids, encoded, encoder_attention_mask=mask, decoder_attention_mask=decoder_mask)
    assert_outputs_close(decoded, hf_decoded, masks)
    full = pair.ours(**inputs)
    np.testing.assert_allclose(np.asarray(decoded[0]), np.asarray(full[0]), atol=1e-5)


# --------------------------------------------------------------------------- training idiom


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ONE_PER_KIND)
def test_training_step_loss_gradients_and_update(loaded, case_id):
    """TrainState.create(apply_fn=model.__call__, params=model.params, tx=adamw), `jax.value_and_grad` over the
    params dict, jitted; `train=False` (dropout off: the two sides' dropout streams differ)."""
    pair = loaded(case_id)
    inputs = pair.case.inputs(np.random.default_rng(5))
    step = jax.jit(train_step, static_argnames="train")
    with hf_flax_runs():
        hf_state, hf_loss, hf_grads = step(new_train_state(pair.hf), inputs, train=False)
    with user_code():
        state, loss, grads = step(new_train_state(pair.ours), inputs, train=False)
    assert abs(float(loss) - float(hf_loss)) <= 2e-5 + 1e-4 * abs(float(hf_loss)), (float(loss), float(hf_loss))
    worst = assert_trees_close("gradients", grads, hf_grads)
    assert_trees_close("updated params", state.params, hf_state.params, relative=0, absolute=2e-5)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    print(f"{case_id}: loss {float(loss):.6f} vs {float(hf_loss):.6f}, worst relative gradient diff {worst:.1e}")


DROPOUT_CASES = ["FlaxGPTNeoForCausalLM", "FlaxGemmaForCausalLM", "FlaxXGLMForCausalLM", "FlaxBigBirdForMaskedLM",
                 "FlaxT5ForConditionalGeneration", "FlaxLongT5ForConditionalGeneration"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case_id", [case for case in DROPOUT_CASES if case in FAST])
def test_train_true_applies_dropout_from_dropout_rng(loaded, case_id):
    """With dropout > 0: `train=True` with a `dropout_rng` runs, is a function of the key, and differs from
    `train=False`; gradients flow through it."""
    pair = loaded(case_id)
    inputs = pair.case.inputs(np.random.default_rng(6))
    eval_out = np.asarray(pair.ours(**inputs, train=False)[0])
    a = np.asarray(pair.ours(**inputs, train=True, dropout_rng=jax.random.key(1))[0])
    again = np.asarray(pair.ours(**inputs, train=True, dropout_rng=jax.random.key(1))[0])
    other = np.asarray(pair.ours(**inputs, train=True, dropout_rng=jax.random.key(2))[0])
    np.testing.assert_array_equal(a, again)
    assert not np.allclose(a, eval_out) and not np.allclose(a, other)
    with user_code():
        _, loss, grads = jax.jit(train_step, static_argnames="train")(new_train_state(pair.ours), inputs, train=True)
    assert np.isfinite(float(loss)) and all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------- generation


def prompts(pair: Loaded, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Decoders: left-padded prompts (as HF Flax generates from); seq2seq: right-padded encoder inputs."""
    vocab = pair.case.hf_config().vocab_size
    if pair.case.kind == "seq2seq":
        return right_padded(rng, vocab, [9, 6, 4], pad=pair.case.pad)
    rows = [list(rng.integers(6, vocab, n)) for n in (7, 4, 5)]
    ids, mask = left_pad(rows, pair.case.pad)
    return ids.astype(np.int32), mask.astype(np.int32)


def first_generated_token(pair: Loaded, ids, mask) -> int:
    """Row 0's first greedy token by HF's forward: used as EOS, so that a row ends early and gets padded."""
    if pair.case.kind == "seq2seq":
        logits = pair.call_hf(ids, attention_mask=mask, decoder_input_ids=np.zeros((len(ids), 1), np.int32)).logits
        return int(np.argmax(logits[0, 0]))
    return int(np.argmax(pair.call_hf(ids, attention_mask=mask).logits[0, -1]))


def configure(model, *, num_beams: int, eos: int, pad: int, max_new_tokens: int | None, max_length: int | None):
    """`model.generation_config` as HF documents setting it."""
    config = model.generation_config
    config.num_beams, config.do_sample = num_beams, False
    config.max_length, config.max_new_tokens = max_length, max_new_tokens
    config.eos_token_id, config.pad_token_id = eos, pad


def generation_lengths(pair: Loaded, ids) -> dict:
    """Seq2seq: 6 new tokens (`max_new_tokens`); decoders: the whole length (`max_length`)."""
    if pair.case.kind == "seq2seq":
        return {"max_length": None, "max_new_tokens": 6}
    return {"max_length": ids.shape[1] + 6, "max_new_tokens": None}


def run_generate(model, ids, mask, *, jit: bool, seq2seq: bool, **options) -> np.ndarray:
    configure(model, **options)
    if seq2seq:
        model.generation_config.decoder_start_token_id = 0
    generate = jax.jit(model.generate) if jit else model.generate
    with runs(type(model)):
        return np.asarray(generate(ids, attention_mask=mask).sequences)


@pytest.mark.slow
@pytest.mark.parametrize("case_id,jit", GENERATE)
def test_greedy_generate_equals_hf_flax(loaded, case_id, jit):
    """Sequences in HF Flax's shape (`[batch, max_length]`) and padding (pad id after EOS), token for token; EOS is
    row 0's first token, so that rows end early."""
    pair = loaded(case_id)
    ids, mask = prompts(pair, np.random.default_rng(7))
    eos = first_generated_token(pair, ids, mask)
    options = dict(num_beams=1, eos=eos, pad=pair.case.pad, **generation_lengths(pair, ids))
    reference = run_generate(pair.hf, ids, mask, jit=jit, seq2seq=pair.case.kind == "seq2seq", **options)
    mine = run_generate(pair.ours, ids, mask, jit=jit, seq2seq=pair.case.kind == "seq2seq", **options)
    assert mine.shape == reference.shape
    np.testing.assert_array_equal(mine, reference)
    assert (reference == pair.case.pad).any()  # a row ended early and was padded


@pytest.mark.slow
@pytest.mark.parametrize("case_id,jit", GENERATE)
def test_beam_generate_equals_hf_pytorch(loaded, case_id, jit):
    """Beam search follows HF PyTorch where HF Flax differs (documented in docs/migration.md: at max_length running
    beams compete with finished ones), so the sequences are compared with PyTorch's `generate`; the shape and padding
    convention are still HF Flax's (`[batch, max_length]`, pad id after the end)."""
    pair = loaded(case_id)
    ids, mask = prompts(pair, np.random.default_rng(7))
    eos = first_generated_token(pair, ids, mask)
    lengths = generation_lengths(pair, ids)
    seq2seq = pair.case.kind == "seq2seq"
    mine = run_generate(
        pair.ours, ids, mask, jit=jit, seq2seq=seq2seq, num_beams=3, eos=eos, pad=pair.case.pad, **lengths
    )
    with torch.no_grad():
        expected = pair.torch.generate(
            torch.tensor(ids, dtype=torch.int64),
            attention_mask=torch.tensor(mask, dtype=torch.int64),
            num_beams=3,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pair.case.pad,
            decoder_start_token_id=0 if seq2seq else None,
            **{name: value for name, value in lengths.items() if value is not None},
        ).numpy()
    max_length = lengths["max_length"] or 1 + lengths["max_new_tokens"]
    assert mine.shape == (len(ids), max_length)
    start = 1 if seq2seq else ids.shape[1]
    for row, (a, b) in enumerate(zip(mine, expected, strict=True)):
        # PyTorch repeats EOS after a finished beam; HF Flax's convention (ours) is the pad id after the first EOS
        ends = np.flatnonzero(b[start:] == eos)
        end = start + int(ends[0]) + 1 if ends.size else len(b)
        np.testing.assert_array_equal(a[:end], b[:end], err_msg=f"row {row}")
        assert (a[end:] == pair.case.pad).all(), (row, a.tolist())


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ["FlaxGPTNeoForCausalLM", "FlaxT5ForConditionalGeneration"])
def test_generate_keyword_options_and_params(loaded, case_id):
    """Options as `generate` keywords rather than in generation_config, and `params=` for generation."""
    pair = loaded(case_id)
    ids, mask = prompts(pair, np.random.default_rng(8))
    moved = perturbed(pair.hf.params, seed=3)
    options = dict(attention_mask=mask, max_new_tokens=5, num_beams=1, params=moved, pad_token_id=pair.case.pad)
    if pair.case.kind == "seq2seq":
        options["decoder_start_token_id"] = 0
    with hf_flax_runs():
        reference = np.asarray(pair.hf.generate(ids, **options).sequences)
    np.testing.assert_array_equal(np.asarray(pair.ours.generate(ids, **options).sequences), reference)


# --------------------------------------------------------------------------- save_pretrained


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ONE_PER_KIND)
def test_save_pretrained_loads_in_hf_flax_and_back(loaded, case_id, tmp_path):
    pair = loaded(case_id)
    pair.ours.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "flax_model.msgpack").exists() and (tmp_path / "ours" / "config.json").exists()
    with hf_flax_runs():
        hf_reloaded = theirs(pair.case.name).from_pretrained(tmp_path / "ours")
    assert_same_params(hf_reloaded.params, pair.hf.params)
    assert_same_params(ours(pair.case.name).from_pretrained(tmp_path / "ours").params, pair.hf.params)

    moved = perturbed(pair.hf.params, seed=4)  # as the example scripts save: save_pretrained(folder, params=...)
    pair.ours.save_pretrained(tmp_path / "moved", params=moved)
    with hf_flax_runs():
        assert_same_params(theirs(pair.case.name).from_pretrained(tmp_path / "moved").params, moved)
    assert_same_params(ours(pair.case.name).from_pretrained(tmp_path / "moved").params, moved)


# --------------------------------------------------------------------------- HF's example scripts


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ["FlaxGPTNeoForCausalLM", "FlaxGemmaForCausalLM", "FlaxXGLMForCausalLM"])
def test_run_clm_flax_pattern(tmp_path, case_id):
    """The same run_clm_flax.py-style code with HF's class and with ours (dropout 0, so `train=True` is
    deterministic on both sides); user code runs with JAX's default (standard) dtype promotion."""
    case = CASES[case_id]
    case.save(tmp_path / "checkpoint", **NO_DROPOUT[case.dropout_family])
    ids, mask = right_padded(np.random.default_rng(10), case.hf_config().vocab_size, [12, 12], pad=case.pad)
    batch = {"input_ids": ids, "attention_mask": mask}
    results = []
    for cls, name in [(theirs(case.name), "hf"), (ours(case.name), "ours")]:
        with runs(cls), user_code():
            results.append(clm_example(cls, tmp_path / "checkpoint", batch, tmp_path / name))
    reference, mine = results
    np.testing.assert_allclose(mine["losses"], reference["losses"], rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(mine["eval_loss"], reference["eval_loss"], rtol=1e-4, atol=2e-5)
    assert reference["eval_loss"] < reference["losses"][0]  # it learnt
    assert_trees_close("trained params", mine["params"], reference["params"], relative=0, absolute=2e-5)
    with hf_flax_runs():  # what ours saved, HF loads
        saved = theirs(case.name).from_pretrained(tmp_path / "ours").params
    assert_same_params(saved, jax.tree.map(np.asarray, mine["params"]))


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ["FlaxT5ForConditionalGeneration"])
def test_run_summarization_flax_pattern(tmp_path, case_id):
    """The same run_summarization_flax.py-style code (label-smoothed train step, eval step, jitted generate step
    assigning `model.params`) with HF's class and with ours; dropout 0."""
    case = CASES[case_id]
    case.save(tmp_path / "checkpoint", **NO_DROPOUT[case.dropout_family])
    rng = np.random.default_rng(11)
    vocab = case.hf_config().vocab_size
    ids, mask = right_padded(rng, vocab, [11, 8, 5])
    labels, label_mask = right_padded(rng, vocab, [6, 3, 5])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "decoder_attention_mask": label_mask}
    results = []
    for cls, name in [(theirs(case.name), "hf"), (ours(case.name), "ours")]:
        with runs(cls), user_code():
            results.append(summarization_example(cls, tmp_path / "checkpoint", batch, tmp_path / name))
    reference, mine = results
    np.testing.assert_allclose(mine["loss"], reference["loss"], rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(mine["eval_loss"], reference["eval_loss"], rtol=1e-4, atol=2e-5)
    assert mine["generated"].shape == reference["generated"].shape == (3, 9)
    np.testing.assert_array_equal(mine["generated"], reference["generated"])
    assert_trees_close("trained params", mine["params"], reference["params"], relative=0, absolute=2e-5)


# --------------------------------------------------------------------------- where we follow PyTorch


def torch_output(model, **inputs):
    with torch.no_grad():
        return model(**{name: torch.tensor(np.asarray(value, np.int64)) for name, value in inputs.items()})


@pytest.mark.slow
def test_gemma_rope_theta_follows_pytorch(tmp_path):
    """HF Flax Gemma ignores `rope_theta` (always 10000); we use it, as PyTorch does."""
    case = CASES["FlaxGemmaForCausalLM"]
    reference = case.save(tmp_path, rope_theta=500.0)
    inputs = case.inputs(np.random.default_rng(12))
    expected = torch_output(reference, **inputs).logits.numpy()
    assert_close("logits vs PyTorch", ours(case.name).from_pretrained(tmp_path)(**inputs).logits, expected,
                 [inputs["attention_mask"]])  # fmt: skip
    with hf_flax_runs():
        hf_flax = np.asarray(theirs(case.name).from_pretrained(tmp_path, from_pt=True)(**inputs).logits)
    assert not np.allclose(hf_flax, expected, atol=1e-3)  # the deviation is real


@pytest.mark.slow
def test_long_t5_transient_global_blocks_follow_pytorch(tmp_path):
    """For global_block_size 3, HF Flax LongT5 rounds the running block boundary differently from PyTorch (a float32
    cumsum of 1/3); we follow PyTorch."""
    case = CASES["FlaxLongT5ForConditionalGeneration-tglobal"]
    reference = case.save(tmp_path, global_block_size=3)
    inputs = case.inputs(np.random.default_rng(13), lengths=(23, 17, 11))
    masks = output_masks(case, inputs)
    expected = torch_output(reference, **inputs)
    mine = ours(case.name).from_pretrained(tmp_path)(**inputs)
    assert_close("logits vs PyTorch", mine.logits, expected.logits.numpy(), masks["decoder"])
    assert_close("encoder vs PyTorch", mine.encoder_last_hidden_state, expected.encoder_last_hidden_state.numpy(),
                 masks["encoder"])  # fmt: skip
    with hf_flax_runs():
        hf_flax = theirs(case.name).from_pretrained(tmp_path, from_pt=True)(**inputs).encoder_last_hidden_state
    assert not np.allclose(np.asarray(hf_flax), expected.encoder_last_hidden_state.numpy(), atol=1e-3)


@pytest.mark.slow
def test_big_bird_causal_lm_generates_as_pytorch(tmp_path):
    """HF Flax BigBird's causal-LM cache only works with `add_cross_attention`; we generate without it, greedy
    token for token as HF PyTorch (equal-length prompts: PyTorch BigBird's positions ignore the mask)."""
    case = CASES["FlaxBigBirdForCausalLM"]
    reference = case.save(tmp_path)
    ids = np.random.default_rng(14).integers(6, case.hf_config().vocab_size, (2, 6)).astype(np.int32)
    with torch.no_grad():
        expected = reference.generate(torch.tensor(ids, dtype=torch.int64), max_new_tokens=6, do_sample=False,
                                      num_beams=1, pad_token_id=0, eos_token_id=None).numpy()  # fmt: skip
    model = ours(case.name).from_pretrained(tmp_path)
    np.testing.assert_array_equal(np.asarray(model.generate(ids, max_new_tokens=6).sequences), expected)


@pytest.mark.slow
def test_hf_flax_t5_needs_the_clip_shim_on_current_jax(loaded):
    """Why `hf_flax_runs` exists: without it HF's Flax T5 fails on current JAX."""
    pair = loaded("FlaxT5Model")
    inputs = pair.case.inputs(np.random.default_rng(15))
    with jax.numpy_dtype_promotion("standard"), pytest.raises(TypeError, match="a_max"):
        pair.hf(**inputs)


def test_every_hf_flax_class_of_our_families_is_covered():
    import transformers.models.big_bird.modeling_flax_big_bird as bird

    public = [getattr(bird, name) for name in bird.__all__]
    wanted = {cls.__name__ for cls in public if issubclass(cls, transformers.FlaxPreTrainedModel)} - {
        "FlaxBigBirdPreTrainedModel"
    }
    covered = {case.name for case in CASES.values()}
    assert wanted <= covered, wanted - covered
    assert len(covered) == 22 and all(hasattr(compat, name) for name in covered)
