"""BigBird heads with `original_full` attention against transformers 4.57.6 PyTorch."""

import jax
import numpy as np
import pytest
import torch
import transformers
from cases import BIG_BIRD, hf_bird, right_padded
from oracle import assert_same_tree, max_diff_valid

import eqx_models
from eqx_models.models import BigBirdConfig


def run_torch(model, **inputs):
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in inputs.items()})


def run_ours(model, ids, mask, types):
    return jax.vmap(lambda i, m, t: model(i, attention_mask=m, token_type_ids=t))(ids, mask, types)


LENGTHS = [13, 9, 4]


@pytest.mark.parametrize("scan_layers", [True, False])
def test_base_model_hidden_states_and_pooler_match_hf(tmp_path, scan_layers):
    reference = hf_bird(tmp_path, "BigBirdModel", rescale_embeddings=True)
    model = eqx_models.from_pretrained(tmp_path, scan_layers=scan_layers)
    ids, mask, types = right_padded(np.random.default_rng(0), LENGTHS)
    expected = run_torch(reference, input_ids=ids, attention_mask=mask, token_type_ids=types)
    ours = run_ours(model, ids, mask, types)
    diff = max_diff_valid(ours.last_hidden_state, expected.last_hidden_state.numpy(), mask)
    pooled = float(np.abs(np.asarray(ours.pooler_output) - expected.pooler_output.numpy()).max())
    print(f"BigBird base scan={scan_layers}: hidden {diff:.2e}, pooler {pooled:.2e}")
    assert diff < 2e-5 and pooled < 2e-5


def test_masked_lm_and_pretraining_match_hf(tmp_path):
    ids, mask, types = right_padded(np.random.default_rng(1), LENGTHS)
    reference = hf_bird(tmp_path / "mlm", "BigBirdForMaskedLM")
    model = eqx_models.from_pretrained(tmp_path / "mlm")
    expected = run_torch(reference, input_ids=ids, attention_mask=mask, token_type_ids=types).logits.numpy()
    mlm_diff = max_diff_valid(run_ours(model, ids, mask, types), expected, mask)
    reference = hf_bird(tmp_path / "pre", "BigBirdForPreTraining", seed=1)
    model = eqx_models.from_pretrained(tmp_path / "pre")
    expected = run_torch(reference, input_ids=ids, attention_mask=mask, token_type_ids=types)
    ours = run_ours(model, ids, mask, types)
    pre_diff = max_diff_valid(ours.prediction_logits, expected.prediction_logits.numpy(), mask)
    nsp_diff = float(np.abs(np.asarray(ours.seq_relationship_logits) - expected.seq_relationship_logits.numpy()).max())
    print(f"BigBird MLM {mlm_diff:.2e}, pretraining MLM {pre_diff:.2e}, NSP {nsp_diff:.2e}")
    assert max(mlm_diff, pre_diff, nsp_diff) < 2e-5


@pytest.mark.parametrize("head", ["BigBirdForSequenceClassification", "BigBirdForTokenClassification"])
def test_classification_heads_match_hf(tmp_path, head):
    reference = hf_bird(tmp_path, head, seed=2)
    model = eqx_models.from_pretrained(tmp_path)
    assert model.config.num_labels == 3
    ids, mask, types = right_padded(np.random.default_rng(2), LENGTHS)
    expected = run_torch(reference, input_ids=ids, attention_mask=mask, token_type_ids=types).logits.numpy()
    ours = np.asarray(run_ours(model, ids, mask, types))
    diff = max_diff_valid(ours, expected, mask) if ours.ndim == 3 else float(np.abs(ours - expected).max())
    print(f"{head}: {diff:.2e}")
    assert diff < 2e-5


def test_multiple_choice_takes_choices_by_seq(tmp_path):
    reference = hf_bird(tmp_path, "BigBirdForMultipleChoice", seed=3)
    model = eqx_models.from_pretrained(tmp_path)
    rng = np.random.default_rng(3)
    batch = [right_padded(rng, [11, 7, 9, 3]) for _ in range(2)]  # 2 questions x 4 choices
    ids, mask, types = (np.stack([b[i] for b in batch]) for i in range(3))
    expected = run_torch(reference, input_ids=ids, attention_mask=mask, token_type_ids=types).logits.numpy()
    ours = np.asarray(run_ours(model, ids, mask, types))
    assert ours.shape == (2, 4)
    assert float(np.abs(ours - expected).max()) < 2e-5


def test_question_answering_masks_the_question_as_upstream(tmp_path):
    reference = hf_bird(tmp_path, "BigBirdForQuestionAnswering", seed=4, num_labels=2)
    model = eqx_models.from_pretrained(tmp_path)
    rng = np.random.default_rng(4)
    ids, mask, _ = right_padded(rng, LENGTHS)
    ids[0, 4], ids[1, 2], ids[2, 1] = 5, 5, 5  # the [SEP] ending each question
    expected = run_torch(reference, input_ids=ids, attention_mask=mask)
    ours = jax.vmap(lambda i, m: model(i, attention_mask=m))(ids, mask)
    for name in ("start_logits", "end_logits"):
        diff = max_diff_valid(getattr(ours, name), getattr(expected, name).numpy(), mask)
        assert diff < 2e-5, (name, diff)
    assert np.asarray(ours.start_logits)[0, 1:5].max() < -1e5  # question tokens are masked


def test_base_checkpoint_loads_into_heads_with_new_weights_reported(tmp_path):
    hf_bird(tmp_path, "BigBirdModel")
    model, report = eqx_models.load_with_report(tmp_path, architecture="BigBirdForSequenceClassification")
    assert set(report.initialised) == {
        "classifier.dense.weight",
        "classifier.dense.bias",
        "classifier.out_proj.weight",
        "classifier.out_proj.bias",
    }
    base = eqx_models.from_pretrained(tmp_path)
    assert_same_tree(model.bert, base)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["BigBirdForPreTraining", "BigBirdForQuestionAnswering"])
def test_formats_and_export_round_trip(tmp_path, head):
    reference = hf_bird(tmp_path / "hf", head, seed=5, num_labels=2)
    reference.save_pretrained(tmp_path / "bin", safe_serialization=False)
    model = eqx_models.from_pretrained(tmp_path / "hf")
    assert_same_tree(eqx_models.from_pretrained(tmp_path / "bin"), model)
    eqx_models.export_hf(model, tmp_path / "export")
    reloaded = getattr(transformers, head).from_pretrained(tmp_path / "export")
    ours, theirs = reloaded.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)


def test_block_sparse_falls_back_to_full_attention_on_short_inputs_as_upstream(tmp_path):
    config = dict(attention_type="block_sparse", block_size=2, num_random_blocks=1)  # full up to 14 tokens
    reference = hf_bird(tmp_path, "BigBirdForMaskedLM", seed=6, **config)
    model = eqx_models.from_pretrained(tmp_path)
    assert model.config.attention_type == "block_sparse"
    ids, mask, types = right_padded(np.random.default_rng(6), [13, 14, 5])
    expected = run_torch(reference, input_ids=ids, attention_mask=mask, token_type_ids=types).logits.numpy()
    assert max_diff_valid(run_ours(model, ids, mask, types), expected, mask) < 2e-5


SPARSE = [  # block size, random blocks, right-padded lengths (none a multiple of the block size)
    (2, 1, [23, 17, 21]),
    (4, 2, [45, 39, 41]),
    (3, 1, [40, 33, 28]),
]


@pytest.mark.slow
@pytest.mark.parametrize("block_size,num_random_blocks,lengths", SPARSE)
def test_block_sparse_masked_lm_matches_hf(tmp_path, block_size, num_random_blocks, lengths):
    config = dict(attention_type="block_sparse", block_size=block_size, num_random_blocks=num_random_blocks)
    reference = hf_bird(tmp_path, "BigBirdForMaskedLM", seed=block_size, **config)
    model = eqx_models.from_pretrained(tmp_path)
    ids, mask, types = right_padded(np.random.default_rng(block_size), lengths)
    assert ids.shape[1] > model.config.max_full_attention_tokens  # really sparse
    expected = run_torch(reference, input_ids=ids, attention_mask=mask, token_type_ids=types).logits.numpy()
    diff = max_diff_valid(run_ours(model, ids, mask, types), expected, mask)
    print(f"block_sparse b={block_size} r={num_random_blocks} len={ids.shape[1]}: {diff:.2e}")
    assert diff < 2e-5


@pytest.mark.slow
@pytest.mark.parametrize(
    "head",
    [
        "BigBirdModel",
        "BigBirdForPreTraining",
        "BigBirdForCausalLM",
        "BigBirdForSequenceClassification",
        "BigBirdForTokenClassification",
        "BigBirdForQuestionAnswering",
    ],
)
def test_block_sparse_heads_match_hf(tmp_path, head):
    config = dict(attention_type="block_sparse", block_size=2, num_random_blocks=1)
    if head == "BigBirdForQuestionAnswering":
        config["num_labels"] = 2
    reference = hf_bird(tmp_path, head, seed=9, **config)
    model = eqx_models.from_pretrained(tmp_path)
    ids, mask, types = right_padded(np.random.default_rng(9), [23, 19, 16])
    ids[:, 3] = BIG_BIRD["sep_token_id"]
    expected = run_torch(reference, input_ids=ids, attention_mask=mask, token_type_ids=types)
    ours = run_ours(model, ids, mask, types)
    fields = {
        "BigBirdModel": ("last_hidden_state", "pooler_output"),
        "BigBirdForPreTraining": ("prediction_logits", "seq_relationship_logits"),
        "BigBirdForQuestionAnswering": ("start_logits", "end_logits"),
    }
    if head in fields:
        pairs = [(getattr(ours, name), getattr(expected, name)) for name in fields[head]]
    else:
        pairs = [(ours, expected.logits)]
    for mine, theirs in pairs:
        mine, theirs = np.asarray(mine), theirs.numpy()
        diff = (
            max_diff_valid(mine, theirs, mask)
            if mine.ndim >= 2 and mine.shape[1] == ids.shape[1]
            else float(np.abs(mine - theirs).max())
        )
        assert diff < 2e-5, (head, diff)


@pytest.mark.slow
def test_block_sparse_multiple_choice_matches_hf(tmp_path):
    config = dict(attention_type="block_sparse", block_size=2, num_random_blocks=1)
    reference = hf_bird(tmp_path, "BigBirdForMultipleChoice", seed=10, **config)
    model = eqx_models.from_pretrained(tmp_path)
    rng = np.random.default_rng(10)
    batch = [right_padded(rng, [21, 17, 19]) for _ in range(2)]
    ids, mask, types = (np.stack([b[i] for b in batch]) for i in range(3))
    expected = run_torch(reference, input_ids=ids, attention_mask=mask, token_type_ids=types).logits.numpy()
    assert float(np.abs(np.asarray(run_ours(model, ids, mask, types)) - expected).max()) < 2e-5


@pytest.mark.slow
@pytest.mark.parametrize("block_size,num_random_blocks,num_blocks", [(2, 1, 9), (3, 2, 11), (4, 3, 12)])
def test_block_sparse_equals_dense_attention_under_the_plans_mask(getkey, block_size, num_random_blocks, num_blocks):
    """Our own reference for the sparse kernel: with a valid random plan (random blocks
    distinct and not already seen), it is dense attention restricted to the plan's mask."""
    from eqx_models import nn
    from eqx_models.models._block_sparse import SparsePlan, block_sparse_attention, random_plan, sparse_plan_mask

    heads, n = 3, num_blocks * block_size
    q, k, v = (jax.random.normal(getkey(), (n, heads, 8)) for _ in range(3))
    valid = jax.numpy.arange(n) < n - 3
    plan = SparsePlan(valid, random_plan(getkey(), heads, num_blocks, num_random_blocks), block_size)
    sparse = block_sparse_attention(q, k, v, plan)
    dense_mask = sparse_plan_mask(plan)
    dense = jax.vmap(
        lambda qh, kh, vh, mh: nn.dot_product_attention(qh[:, None], kh[None], vh[None], mh),
        in_axes=(1, 1, 1, 0),
        out_axes=1,
    )(q, k, v, dense_mask)[:, :, 0]
    np.testing.assert_allclose(np.asarray(sparse)[: n - 3], np.asarray(dense)[: n - 3], atol=1e-5)
    assert not np.asarray(sparse)[n - 3 :].any()  # padded queries output zeros, as upstream


@pytest.mark.parametrize("block_size,num_random_blocks,num_blocks", [(2, 1, 9), (4, 3, 12)])
def test_inference_plan_shortcut_equals_gathering_block_0(getkey, block_size, num_random_blocks, num_blocks):
    """`random_is_first` scores block 0 once and counts it for the random copies; the same
    attention as gathering the inference plan's random blocks (all block 0) as keys."""
    from eqx_models.models._block_sparse import SparsePlan, block_sparse_attention, inference_plan

    heads, n = 3, num_blocks * block_size
    q, k, v = (jax.random.normal(getkey(), (n, heads, 8)) for _ in range(3))
    valid = jax.numpy.arange(n) < n - 3
    rand_blocks = inference_plan(heads, num_blocks, num_random_blocks)
    gathered = block_sparse_attention(q, k, v, SparsePlan(valid, rand_blocks, block_size))
    counted = block_sparse_attention(q, k, v, SparsePlan(valid, rand_blocks, block_size, random_is_first=True))
    np.testing.assert_allclose(np.asarray(counted), np.asarray(gathered), atol=1e-6)


@pytest.mark.slow
def test_random_plan_is_valid_keyed_and_reproducible(getkey):
    from eqx_models.models._block_sparse import random_plan

    key = getkey()
    plan = np.asarray(random_plan(key, 4, 12, 3))
    assert plan.shape == (4, 10, 3)
    for head in plan:
        for row, blocks in enumerate(head, start=1):
            assert len(set(blocks)) == 3
            assert not {0, 11, row - 1, row, row + 1} & set(blocks.tolist())
    np.testing.assert_array_equal(plan, random_plan(key, 4, 12, 3))
    assert not np.array_equal(plan, np.asarray(random_plan(getkey(), 4, 12, 3)))


@pytest.mark.slow
def test_block_sparse_training_draws_a_new_plan_per_key(tmp_path):
    import equinox as eqx

    hf_bird(
        tmp_path,
        "BigBirdForMaskedLM",
        attention_type="block_sparse",
        block_size=2,
        num_random_blocks=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = eqx.nn.inference_mode(eqx_models.from_pretrained(tmp_path), False)
    ids = jax.numpy.arange(6, 30) % BIG_BIRD["vocab_size"]
    a, b = model(ids, key=jax.random.key(1)), model(ids, key=jax.random.key(2))
    assert not np.allclose(a, b)  # dropout is off: only the random blocks differ
    np.testing.assert_array_equal(a, model(ids, key=jax.random.key(1)))
    np.testing.assert_array_equal(model(ids), model(ids))


def test_bad_config_values_are_named():
    with pytest.raises(eqx_models.ConfigError, match="attention_type must be"):
        BigBirdConfig.from_hf_config({"model_type": "big_bird", **BIG_BIRD, "attention_type": "sparse"})
    with pytest.raises(eqx_models.ConfigError, match="hidden_size must be divisible by num_attention_heads"):
        BigBirdConfig.from_hf_config({"model_type": "big_bird", **BIG_BIRD, "num_attention_heads": 5})


@pytest.mark.slow
def test_causal_lm_logits_cache_and_greedy_generation_match_hf(tmp_path):
    from oracle import hf_positions, left_padded

    from eqx_models.generation import batched_decode, init_batched_cache

    reference = hf_bird(tmp_path, "BigBirdForCausalLM", seed=7, is_decoder=True, eos_token_id=2, pad_token_id=0)
    model = eqx_models.from_pretrained(tmp_path)
    assert type(model).__name__ == "BigBirdForCausalLM"
    ids, mask = left_padded(np.random.default_rng(7), BIG_BIRD["vocab_size"], [9, 5, 7])
    positions = hf_positions(mask)
    expected = run_torch(reference, input_ids=ids, attention_mask=mask, position_ids=positions).logits.numpy()
    full = jax.vmap(lambda i, m, p: model(i, attention_mask=m, position_ids=p))(ids, mask, positions)
    diff = max_diff_valid(full, expected, mask)
    cache = init_batched_cache(model, 3, 12)
    pieces = []
    for start, stop in [(0, 4), (4, 5), (5, 9)]:
        logits, cache = batched_decode(
            model,
            jax.numpy.asarray(ids[:, start:stop]),
            cache,
            jax.numpy.asarray(mask[:, start:stop], bool),
            jax.numpy.asarray(positions[:, start:stop]),
        )
        pieces.append(np.asarray(logits))
    cached = max_diff_valid(np.concatenate(pieces, 1), np.asarray(full), mask)
    print(f"BigBird causal LM: logits {diff:.2e}, cached vs full {cached:.2e}")
    assert diff < 2e-5 and cached < 1e-5
    first = np.asarray(eqx_models.generate(model, ids, mask, max_new_tokens=3, eos_token_id=None))
    eos = int(first[1, ids.shape[1] + 1])
    ours = np.asarray(eqx_models.generate(model, ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0))
    with torch.no_grad():
        theirs = reference.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        ).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_causal_lm_decode_needs_a_decoder_config(tmp_path):
    hf_bird(tmp_path, "BigBirdForCausalLM", seed=8)
    model = eqx_models.from_pretrained(tmp_path)
    with pytest.raises(eqx_models.InputError, match="is_decoder=True"):
        model.decode(jax.numpy.array([1, 2]), model.init_cache(4))


@pytest.mark.slow
@pytest.mark.parametrize(
    "head", ["BigBirdForPreTraining", "BigBirdForQuestionAnswering", "BigBirdForMultipleChoice", "BigBirdForCausalLM"]
)
def test_cli_verify_works_for_every_kind_of_head(tmp_path, capsys, head):
    from eqx_models.cli import main as cli

    hf_bird(tmp_path, head, seed=11, num_labels=2, is_decoder=head.endswith("CausalLM"))
    assert cli(["verify", str(tmp_path)]) == 0
    assert float(capsys.readouterr().out.split(":")[-1]) < 1e-4
