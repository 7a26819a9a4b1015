"""Training losses against HF: every PyTorch head returns `loss` when given labels."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from cases import BIG_BIRD, GPT_NEO, LONG_T5, bird_batch, hf_bird, hf_neo, mlm_labels, right_padded
from decoder_cases import CASES
from oracle import randomise

import eqx_models
from eqx_models.training.losses import (
    causal_lm_loss,
    head_loss,
    mask_tokens,
    question_answering_loss,
    sequence_classification_loss,
)

LENGTHS = [13, 9, 4]
run_loss = eqx.filter_jit(head_loss)


def hf_loss(model, batch) -> float:
    inputs = {k: torch.tensor(np.asarray(v)) for k, v in batch.items()}
    with torch.no_grad():
        return float(model(**inputs).loss)


def ours_loss(model, batch, **kwargs):
    loss, metrics = run_loss(model, {k: jnp.asarray(v) for k, v in batch.items()}, **kwargs)
    assert set(metrics) >= {"loss"} and all(v.dtype == jnp.float32 for v in metrics.values())
    return float(loss), metrics


def check(name, ours: float, expected: float, tol: float = 1e-5):
    diff = abs(ours - expected)
    print(f"{name}: ours {ours:.6f}, HF {expected:.6f}, |diff| {diff:.2e}")
    assert np.isfinite(ours) and diff < tol * max(1.0, abs(expected)), (name, ours, expected)


def padded_lm_batch(rng, vocab, lengths, *, left=False):
    """Ids padded on the right (or left), labels = ids with -100 on padding and on a few
    real tokens; with left padding also on each row's first token (HF would predict it from
    a padding position, which `causal_lm_loss` skips)."""
    seq = max(lengths)
    ids = rng.integers(3, vocab, (len(lengths), seq))
    starts = seq - np.array(lengths) if left else np.zeros(len(lengths), int)
    span = np.arange(seq)[None]
    mask = ((span >= starts[:, None]) & (span < (starts + lengths)[:, None])).astype(np.int64)
    ids = np.where(mask, ids, 0)
    labels = np.where(mask, ids, -100)
    labels[0, 5] = labels[1, 3] = -100
    if left:
        labels[np.arange(len(lengths)), starts] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def load_hf_case(tmp_path, which):
    if which.startswith("gpt_neo"):
        return hf_neo(tmp_path, seed=1), GPT_NEO["vocab_size"]
    if which == "big_bird":
        return hf_bird(tmp_path, "BigBirdForCausalLM", seed=7, is_decoder=True), BIG_BIRD["vocab_size"]
    case = CASES[which]
    return case.save(tmp_path, seed=1), case.config["vocab_size"]


@pytest.mark.parametrize("which", ["gpt_neo", "gpt_neo-left", "gemma-mqa", "xglm", "big_bird"])
def test_causal_lm_loss_matches_hf_on_padded_batch(tmp_path, which):
    reference, vocab = load_hf_case(tmp_path, which)
    model = eqx_models.from_pretrained(tmp_path)
    batch = padded_lm_batch(np.random.default_rng(0), vocab, LENGTHS, left=which.endswith("left"))
    ours, metrics = ours_loss(model, batch)
    check(f"causal LM {which}", ours, hf_loss(reference, batch))
    assert int(metrics["tokens"]) == int((batch["labels"][:, 1:] != -100).sum())


def test_causal_lm_loss_skips_masked_positions_and_shifts():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 7, (2, 5)), jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.int32)
    logp = jax.nn.log_softmax(logits, -1)
    terms = [-logp[0, 0, labels[0, 1]], -logp[0, 1, labels[0, 2]]]
    terms += [-logp[1, t, labels[1, t + 1]] for t in range(4)]
    np.testing.assert_allclose(float(causal_lm_loss(logits, labels, mask)), float(jnp.mean(jnp.stack(terms))), 1e-6)
    ignored = labels.at[1, 2].set(-100)
    expected = jnp.mean(jnp.stack(terms[:3] + terms[4:]))
    np.testing.assert_allclose(float(causal_lm_loss(logits, ignored, mask)), float(expected), 1e-6)
    assert float(causal_lm_loss(logits, jnp.full_like(labels, -100))) == 0.0  # nothing valid: 0, not NaN


def test_masked_lm_loss_matches_hf(tmp_path):
    reference = hf_bird(tmp_path, "BigBirdForMaskedLM", seed=1)
    model = eqx_models.from_pretrained(tmp_path)
    rng = np.random.default_rng(1)
    batch = bird_batch(rng)
    batch["labels"] = mlm_labels(rng, batch)
    check("BigBirdForMaskedLM", ours_loss(model, batch)[0], hf_loss(reference, batch))


@pytest.mark.slow
def test_pretraining_loss_matches_hf(tmp_path):
    reference = hf_bird(tmp_path, "BigBirdForPreTraining", seed=2)
    model = eqx_models.from_pretrained(tmp_path)
    rng = np.random.default_rng(2)
    batch = bird_batch(rng)
    batch["labels"] = mlm_labels(rng, batch)
    mlm_only, _ = ours_loss(model, batch)
    check("BigBirdForPreTraining MLM only", mlm_only, hf_loss(reference, batch))
    batch["next_sentence_label"] = np.array([0, 1, 1])
    ours, metrics = ours_loss(model, batch)
    check("BigBirdForPreTraining MLM + NSP", ours, hf_loss(reference, batch))
    assert abs(float(metrics["mlm_loss"]) + float(metrics["nsp_loss"]) - ours) < 1e-5


SEQUENCE_CASES = {  # num_labels, labels
    "regression": (1, np.array([0.5, -1.25, 2.0], np.float32)),
    "single_label": (3, np.array([2, 0, 1])),
    "multi_label": (3, np.array([[1, 0, 1], [0, 0, 0], [1, 1, 0]], np.float32)),
}


@pytest.mark.parametrize("problem", list(SEQUENCE_CASES))
def test_sequence_classification_loss_matches_hf(tmp_path, problem):
    num_labels, labels = SEQUENCE_CASES[problem]
    reference = hf_bird(tmp_path, "BigBirdForSequenceClassification", seed=3, num_labels=num_labels)
    model = eqx_models.from_pretrained(tmp_path)
    batch = {**bird_batch(np.random.default_rng(3)), "labels": labels}
    check(f"BigBirdForSequenceClassification {problem}", ours_loss(model, batch)[0], hf_loss(reference, batch))
    expected_type = "regression" if problem == "regression" else f"{problem}_classification"
    assert reference.config.problem_type == expected_type


def test_sequence_classification_rejects_float_labels_of_the_wrong_shape():
    with pytest.raises(eqx_models.InputError, match="multi-label"):
        sequence_classification_loss(jnp.zeros((3, 4)), jnp.zeros((3,), jnp.float32))


@pytest.mark.slow
def test_multiple_choice_loss_matches_hf(tmp_path):
    reference = hf_bird(tmp_path, "BigBirdForMultipleChoice", seed=4)
    model = eqx_models.from_pretrained(tmp_path)
    rng = np.random.default_rng(4)
    rows = [right_padded(rng, [11, 7, 9, 3]) for _ in range(2)]  # 2 questions x 4 choices
    ids, mask, types = (np.stack([r[i] for r in rows]) for i in range(3))
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": np.array([3, 1])}
    check("BigBirdForMultipleChoice", ours_loss(model, batch)[0], hf_loss(reference, batch))


def test_token_classification_loss_matches_hf(tmp_path):
    reference = hf_bird(tmp_path, "BigBirdForTokenClassification", seed=5)
    model = eqx_models.from_pretrained(tmp_path)
    rng = np.random.default_rng(5)
    batch = bird_batch(rng)
    labels = np.where(batch["attention_mask"], rng.integers(0, 3, batch["input_ids"].shape), -100)
    labels[0, :3] = -100
    batch["labels"] = labels
    check("BigBirdForTokenClassification", ours_loss(model, batch)[0], hf_loss(reference, batch))


@pytest.mark.slow
def test_question_answering_loss_matches_hf_with_positions_outside_the_input(tmp_path):
    reference = hf_bird(tmp_path, "BigBirdForQuestionAnswering", seed=6, num_labels=2)
    model = eqx_models.from_pretrained(tmp_path)
    batch = bird_batch(np.random.default_rng(6))
    del batch["token_type_ids"]  # derived from the question, as upstream
    ids = batch["input_ids"]
    ids[0, 4], ids[1, 2], ids[2, 1] = 5, 5, 5  # the [SEP] ending each question
    batch["start_positions"] = np.array([6, 40, 2])  # 40 is past the end: clamped to seq, ignored
    batch["end_positions"] = np.array([8, -3, 3])  # -3 is clamped to 0
    ours, metrics = ours_loss(model, batch)
    check("BigBirdForQuestionAnswering", ours, hf_loss(reference, batch))
    assert abs((float(metrics["start_loss"]) + float(metrics["end_loss"])) / 2 - ours) < 1e-6


@pytest.mark.slow
def test_question_answering_loss_ignores_index_seq():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5)), jnp.float32)
    both = question_answering_loss(logits, logits, jnp.array([1, 5]), jnp.array([2, 9]))
    first = question_answering_loss(logits[:1], logits[:1], jnp.array([1]), jnp.array([2]))
    assert abs(float(both) - float(first)) < 1e-6


@pytest.mark.slow
def test_seq2seq_loss_matches_hf_with_shifted_labels(tmp_path):
    config = transformers.LongT5Config(**{**LONG_T5, "num_decoder_layers": 2, "decoder_start_token_id": 0})
    torch.manual_seed(0)
    reference = randomise(transformers.LongT5ForConditionalGeneration(config))
    reference.save_pretrained(tmp_path)
    model = eqx_models.from_pretrained(tmp_path)
    rng = np.random.default_rng(7)
    ids = rng.integers(2, LONG_T5["vocab_size"], (2, 19))
    mask = (np.arange(19)[None] < np.array([[19], [12]])).astype(np.int64)
    labels = rng.integers(2, LONG_T5["vocab_size"], (2, 7))
    labels[1, 5:] = -100
    batch = {"input_ids": np.where(mask, ids, 0), "attention_mask": mask, "labels": labels}
    check("LongT5ForConditionalGeneration", ours_loss(model, batch)[0], hf_loss(reference, batch))


def test_unknown_model_and_missing_keys_are_named(tmp_path):
    hf_bird(tmp_path, "BigBirdForMaskedLM")
    model = eqx_models.from_pretrained(tmp_path)
    batch = {k: jnp.asarray(v) for k, v in bird_batch(np.random.default_rng(0)).items()}
    with pytest.raises(eqx_models.InputError, match="BigBirdForMaskedLM.*'labels'"):
        head_loss(model, batch)
    with pytest.raises(eqx_models.InputError, match="BigBirdModel"):
        head_loss(model.bert, {**batch, "labels": batch["input_ids"]})
    with pytest.raises(eqx_models.InputError, match="'start_positions'"):
        head_loss(_qa_model(tmp_path / "qa"), batch)


def _qa_model(folder):
    hf_bird(folder, "BigBirdForQuestionAnswering", num_labels=2)
    return eqx_models.from_pretrained(folder)


@pytest.mark.slow
def test_gradient_is_finite_and_dropout_keys_change_the_loss(tmp_path):
    hf_bird(tmp_path, "BigBirdForSequenceClassification", seed=8)
    model = eqx_models.from_pretrained(tmp_path)
    batch = {k: jnp.asarray(v) for k, v in bird_batch(np.random.default_rng(8)).items()}
    batch["labels"] = jnp.array([0, 2, 1])
    grads = eqx.filter_jit(eqx.filter_grad(lambda m: head_loss(m, batch)[0]))(model)
    leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)
    training = eqx.nn.inference_mode(model, False)
    plain = float(run_loss(training, batch)[0])
    assert plain == float(run_loss(model, batch)[0])  # key=None: deterministic
    first = float(run_loss(training, batch, key=jax.random.key(0))[0])
    again = float(run_loss(training, batch, key=jax.random.key(0))[0])
    other = float(run_loss(training, batch, key=jax.random.key(1))[0])
    assert first == again and first != other and np.isfinite(other)


# --- mask_tokens --------------------------------------------------------------------------

VOCAB, MASK_ID, PAD_ID = 1000, 3, 0


def _corpus(rng, shape=(64, 512)):
    ids = rng.integers(10, VOCAB, shape)
    special = rng.random(shape) < 0.1
    special[:, 0] = special[:, -1] = True  # CLS / SEP
    ids[:, -40:] = PAD_ID  # padding, not flagged: `pad_token_id` makes it special
    return jnp.asarray(ids, jnp.int32), jnp.asarray(special)


@pytest.mark.slow
def test_mask_tokens_follows_bert_80_10_10():
    ids, special = _corpus(np.random.default_rng(0))
    inputs, labels = mask_tokens(
        jax.random.key(0), ids, special, vocab_size=VOCAB, mask_token_id=MASK_ID, pad_token_id=PAD_ID
    )
    ids, special, inputs, labels = (np.asarray(a) for a in (ids, special, inputs, labels))
    selected = labels != -100
    eligible = ~special & (ids != PAD_ID)
    assert not (selected & ~eligible).any()  # special tokens and padding never selected
    np.testing.assert_array_equal(labels[selected], ids[selected])  # labels: the clean ids where selected
    np.testing.assert_array_equal(inputs[~selected], ids[~selected])  # nothing else changes
    # ~24k eligible tokens, ~3.6k selected: each tolerance is at least 5 standard deviations
    rate = selected.sum() / eligible.sum()
    masked = (inputs[selected] == MASK_ID).mean()
    kept = (inputs[selected] == ids[selected]).mean()
    randomised = 1 - masked - kept
    print(f"selected {rate:.4f}, masked {masked:.4f}, random {randomised:.4f}, kept {kept:.4f}")
    assert abs(rate - 0.15) < 0.012
    assert abs(masked - 0.8) < 0.035 and abs(randomised - 0.1) < 0.026 and abs(kept - 0.1) < 0.026


def test_mask_tokens_is_deterministic_per_key_and_respects_probability():
    ids, special = _corpus(np.random.default_rng(1), (8, 128))
    kwargs = dict(vocab_size=VOCAB, mask_token_id=MASK_ID)
    first = mask_tokens(jax.random.key(3), ids, special, **kwargs)
    again = mask_tokens(jax.random.key(3), ids, special, **kwargs)
    other = mask_tokens(jax.random.key(4), ids, special, **kwargs)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(first[1]), np.asarray(other[1]))
    none = mask_tokens(jax.random.key(3), ids, special, probability=0.0, **kwargs)
    assert np.all(np.asarray(none[1]) == -100) and np.array_equal(np.asarray(none[0]), np.asarray(ids))
    everything = mask_tokens(jax.random.key(3), ids, special, probability=1.0, **kwargs)
    np.testing.assert_array_equal(np.asarray(everything[1]) != -100, ~np.asarray(special))
