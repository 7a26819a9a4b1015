"""The train step: the loss falls when overfitting one batch, the weight-decay mask, and a
bfloat16-compute run over float32 master weights."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from cases import GPT_NEO, LONG_T5, bird_batch, hf_bird, hf_neo, mlm_labels, right_padded
from decoder_cases import CASES
from oracle import randomise

import eqx_models
from eqx_models import nn
from eqx_models.training.optim import adamw, decay_mask, warmup_cosine
from eqx_models.training.step import init_state, make_train_step


def lm_batch(vocab: int, batch: int = 4, seq: int = 12, seed: int = 0):
    ids = np.random.default_rng(seed).integers(0, vocab, (batch, seq))
    return {"input_ids": jnp.asarray(ids, jnp.int32), "labels": jnp.asarray(ids, jnp.int32)}


def train(model, batch, steps, *, lr=1e-2, **step_options):
    optimizer = adamw(lr, model, weight_decay=0.0)
    state = init_state(model, optimizer, key=jax.random.key(0))
    step = make_train_step(optimizer, **step_options)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_decay_mask_decays_only_linear_weights(tmp_path):
    hf_neo(tmp_path)
    model = eqx_models.from_pretrained(tmp_path)
    mask = decay_mask(eqx.filter(model, eqx.is_inexact_array))
    linears = [
        x for x in jax.tree.leaves(model, is_leaf=lambda x: isinstance(x, nn.Linear)) if isinstance(x, nn.Linear)
    ]
    assert linears
    flags = jax.tree.leaves(mask)
    decayed = sum(flag for flag in flags)
    assert decayed == sum(1 for linear in linears)  # one weight per Linear; no bias, norm or embedding
    base = model.transformer
    assert not any(jax.tree.leaves(decay_mask(base.wte))) and not any(jax.tree.leaves(decay_mask(base.ln_f)))


@pytest.mark.slow
def test_overfitting_one_batch_lowers_the_causal_lm_loss(tmp_path):
    hf_neo(tmp_path)
    model = eqx_models.from_pretrained(tmp_path)
    _, losses = train(model, lm_batch(GPT_NEO["vocab_size"]), 25)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow
def test_overfitting_one_batch_lowers_the_classification_loss(tmp_path):
    hf_bird(
        tmp_path,
        "BigBirdForSequenceClassification",
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = eqx_models.from_pretrained(tmp_path)
    ids, mask, types = right_padded(np.random.default_rng(1), [13, 9, 4])
    batch = {
        "input_ids": jnp.asarray(ids, jnp.int32),
        "attention_mask": jnp.asarray(mask, jnp.int32),
        "token_type_ids": jnp.asarray(types, jnp.int32),
        "labels": jnp.asarray([0, 2, 1], jnp.int32),
    }
    _, losses = train(model, batch, 30, lr=3e-3)
    assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_master_weights_and_tracks_float32(tmp_path):
    hf_neo(tmp_path)
    model = eqx_models.from_pretrained(tmp_path)
    batch = lm_batch(GPT_NEO["vocab_size"], seed=2)
    _, reference = train(model, batch, 8)
    state, mixed = train(model, batch, 8, compute_dtype=jnp.bfloat16)
    assert all(np.isfinite(mixed))
    assert {x.dtype for x in jax.tree.leaves(eqx.filter(state.model, eqx.is_inexact_array))} == {jnp.dtype("float32")}
    np.testing.assert_allclose(mixed, reference, rtol=0.05)
    assert mixed[-1] < 0.8 * mixed[0]


def test_schedule_and_bad_options_are_named():
    schedule = warmup_cosine(1e-3, warmup_steps=10, total_steps=100)
    assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(100)) == pytest.approx(1e-4)
    with pytest.raises(eqx_models.InputError, match="warmup_steps"):
        warmup_cosine(1e-3, warmup_steps=100, total_steps=100)
    with pytest.raises(eqx_models.InputError, match="accumulate"):
        adamw(1e-3, {}, accumulate=0)


@pytest.mark.slow
def test_fit_logs_metrics_evaluates_and_plots(tmp_path):
    from eqx_models.training.data import PackedBatches
    from eqx_models.training.loop import fit, plot_losses, read_metrics

    hf_neo(tmp_path / "model")
    model = eqx_models.from_pretrained(tmp_path / "model")
    tokens = np.random.default_rng(3).integers(0, GPT_NEO["vocab_size"], 2000).astype(np.int32)
    train_data = PackedBatches(tokens[:1600], seq_len=16, batch_size=4, seed=0)
    eval_data = PackedBatches(tokens[1600:], seq_len=16, batch_size=4, seed=0)
    optimizer = adamw(1e-2, model)
    state = init_state(model, optimizer, key=jax.random.key(0))
    seen = []
    state, records = fit(
        state,
        make_train_step(optimizer),
        (batch | {"labels": batch["input_ids"]} for batch in iter(train_data.next_batch, None)),
        steps=6,
        tokens_per_batch=train_data.tokens_per_batch,
        metrics_path=tmp_path / "metrics.jsonl",
        evaluate_every=3,
        eval_batches=lambda: (b | {"labels": b["input_ids"]} for b in eval_data),
        on_step=lambda s, r: seen.append(r["step"]),
        progress=False,
    )
    assert int(state.step) == 6 and seen == [1, 2, 3, 4, 5, 6]
    logged = read_metrics(tmp_path / "metrics.jsonl")
    assert logged == records
    assert [r["step"] for r in logged if "eval_loss" in r] == [3, 6]
    assert all(r["tokens_per_s"] > 0 for r in logged if "loss" in r)
    assert plot_losses(logged, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _bird(folder, head, **overrides):
    hf_bird(folder, head, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **overrides)
    return eqx_models.from_pretrained(folder)


def _head_cases():
    """Per head: a model factory and one batch (HF names), built from the loss tests' inputs."""

    def masked_lm(folder, rng):
        batch = bird_batch(rng)
        return _bird(folder, "BigBirdForMaskedLM"), {**batch, "labels": mlm_labels(rng, batch)}

    def pretraining(folder, rng):
        batch = bird_batch(rng)
        labels = {"labels": mlm_labels(rng, batch), "next_sentence_label": np.array([0, 1, 1])}
        return _bird(folder, "BigBirdForPreTraining"), {**batch, **labels}

    def token_classification(folder, rng):
        batch = bird_batch(rng)
        labels = np.where(batch["attention_mask"], rng.integers(0, 2, batch["input_ids"].shape), -100)
        return _bird(folder, "BigBirdForTokenClassification"), {**batch, "labels": labels}

    def multiple_choice(folder, rng):
        rows = [right_padded(rng, [11, 7, 9]) for _ in range(2)]
        ids, mask, types = (np.stack([r[i] for r in rows]) for i in range(3))
        batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": np.array([2, 0])}
        return _bird(folder, "BigBirdForMultipleChoice"), batch

    def question_answering(folder, rng):
        batch = bird_batch(rng)
        del batch["token_type_ids"]
        batch["input_ids"][:, 2] = 5  # each question ends at its [SEP]
        spans = {"start_positions": np.array([4, 3, 3]), "end_positions": np.array([6, 5, 3])}
        return _bird(folder, "BigBirdForQuestionAnswering", num_labels=2), {**batch, **spans}

    def causal(case):
        def build(folder, rng):
            CASES[case].save(folder)
            ids = rng.integers(3, CASES[case].config["vocab_size"], (3, 10))
            return eqx_models.from_pretrained(folder), {"input_ids": ids, "labels": ids}

        return build

    def seq2seq(folder, rng):
        config = transformers.LongT5Config(
            **{**LONG_T5, "num_decoder_layers": 2, "decoder_start_token_id": 0, "dropout_rate": 0.0}
        )
        randomise(transformers.LongT5ForConditionalGeneration(config)).save_pretrained(folder)
        ids = rng.integers(2, LONG_T5["vocab_size"], (2, 12))
        labels = rng.integers(2, LONG_T5["vocab_size"], (2, 6))
        return eqx_models.from_pretrained(folder), {"input_ids": ids, "labels": labels}

    return {
        "big_bird_masked_lm": masked_lm,
        "big_bird_pretraining": pretraining,
        "big_bird_token_classification": token_classification,
        "big_bird_multiple_choice": multiple_choice,
        "big_bird_question_answering": question_answering,
        "gemma_causal_lm": causal("gemma-gqa2"),
        "xglm_causal_lm": causal("xglm"),
        "long_t5_seq2seq": seq2seq,
    }


@pytest.mark.slow
@pytest.mark.parametrize("head", list(_head_cases()))
def test_overfitting_one_batch_lowers_every_heads_loss(tmp_path, head):
    """Together with the GPT-Neo causal-LM and BigBird classification tests above: every head."""
    model, batch = _head_cases()[head](tmp_path, np.random.default_rng(0))
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
    _, losses = train(model, batch, 60, lr=3e-3)
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.slow
def test_a_trained_model_exported_to_hf_gives_the_same_logits_in_transformers(tmp_path):
    import torch

    hf_neo(tmp_path / "start")
    model = eqx_models.from_pretrained(tmp_path / "start")
    state, _ = train(model, lm_batch(GPT_NEO["vocab_size"]), 3)
    trained = eqx.nn.inference_mode(state.model)
    eqx_models.export_hf(trained, tmp_path / "exported")
    reference = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path / "exported").eval()
    ids = np.random.default_rng(4).integers(0, GPT_NEO["vocab_size"], (1, 9))
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()[0]
    ours = np.asarray(trained(jnp.asarray(ids[0], jnp.int32)))
    assert np.abs(ours - expected).max() < 2e-5
    assert np.abs(ours - np.asarray(eqx.nn.inference_mode(model)(jnp.asarray(ids[0], jnp.int32)))).max() > 1e-3
