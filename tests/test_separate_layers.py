"""Layers stored separately (`eqx_models.separate_layers`, the faster decoding layout on
XLA:CPU) against transformers 4.57.6 PyTorch for every family (LongT5's encoder: in
tests/test_long_t5.py): logits on padded batches, greedy generation token for token; and the
conversions around it (back to stacked, saving, exporting, quantised weights, adapters,
gradients, what refuses it)."""

from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from cases import hf_bird, tiered
from cases import right_padded as bird_padded
from decoder_cases import CASES as DECODERS
from oracle import (
    assert_same_tree,
    float64_truth,
    hf_generate,
    hf_positions,
    left_padded,
    max_diff_valid,
    torch_logits,
)
from t5_cases import CASES as T5_CASES
from t5_cases import right_padded

import eqx_models
from eqx_models import lora, nn
from eqx_models.errors import ConfigError


def separate(folder, **options):
    model = eqx_models.separate_layers(eqx_models.from_pretrained(folder, **options))
    assert nn.has_separate_layers(model)
    return model


def assert_same_greedy(model, stacked, case, *, seed, lengths):
    """Greedy tokens of `model` equal `stacked`'s on a left-padded batch; returns the batch."""
    ids, mask = left_padded(np.random.default_rng(seed), case.config["vocab_size"], lengths)
    ids = np.where(mask, ids, case.config["pad_token_id"])
    np.testing.assert_array_equal(
        np.asarray(eqx_models.generate(model, ids, mask, max_new_tokens=8, eos_token_id=None)),
        np.asarray(eqx_models.generate(stacked, ids, mask, max_new_tokens=8, eos_token_id=None)),
    )
    return ids, mask


@pytest.mark.parametrize("case", tiered(list(DECODERS), "gpt-neo"))
def test_decoder_logits_and_greedy_generation_match_hf(tmp_path, case):
    case = DECODERS[case]
    reference = case.save(tmp_path, seed=3)
    model = separate(tmp_path)
    ids, mask = left_padded(np.random.default_rng(1), case.config["vocab_size"], [11, 7, 3])
    positions = hf_positions(mask)
    ours = jax.vmap(lambda i, m, p: model(i, attention_mask=m, position_ids=p))(ids, mask, positions)
    # against HF's float64 logits where its code runs in float64 (`oracle.float64_truth`)
    hf32 = torch_logits(reference, ids, mask, positions)
    exact = float64_truth(torch_logits, reference, ids, mask, positions)
    diff = max_diff_valid(ours, hf32 if exact is None else exact, mask)
    print(
        f"{case.id} separate layers: max |logits diff| {diff:.2e} against HF's "
        f"{'float32' if exact is None else 'float64'} logits (against its float32 logits "
        f"{max_diff_valid(ours, hf32, mask):.2e})"
    )
    assert diff < 2e-5

    ids = np.where(mask, ids, case.config["pad_token_id"])
    first = np.asarray(eqx_models.generate(model, ids, mask, max_new_tokens=3, eos_token_id=None))
    eos = int(first[0, ids.shape[1] + 1])  # stops row 0 early, the others run on
    ours = np.asarray(eqx_models.generate(model, ids, mask, max_new_tokens=10, eos_token_id=eos))
    theirs = hf_generate(
        reference,
        ids,
        mask,
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=case.config["pad_token_id"],
    )
    np.testing.assert_array_equal(ours, theirs.sequences.numpy())


def test_t5_greedy_generation_matches_hf_with_a_deeper_encoder(tmp_path):
    case = T5_CASES["flan-t5"]  # 3 encoder layers, 2 decoder layers, untied head
    reference = case.save(tmp_path, seed=5)
    model = separate(tmp_path)
    ids, mask = right_padded(np.random.default_rng(5), case.config["vocab_size"], [9, 4, 6])
    first = np.asarray(eqx_models.generate(model, ids, mask, max_new_tokens=3, eos_token_id=None))
    eos = int(first[1, 2])
    options = dict(max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    ours = eqx_models.generate(model, ids, mask, output_scores=True, **options)
    theirs = hf_generate(reference, ids, mask, do_sample=False, output_scores=True, **options)
    np.testing.assert_array_equal(np.asarray(ours.sequences), theirs.sequences.numpy())
    expected = torch.stack(theirs.scores, 1).numpy()
    diff = float(np.abs(np.asarray(ours.scores) - expected).max())
    print(f"flan-t5 separate layers: greedy scores max diff {diff:.2e} (max |ref| {np.abs(expected).max():.2f})")
    assert diff < 2e-5 + 1e-4 * np.abs(expected).max()


def test_big_bird_block_sparse_masked_lm_matches_hf(tmp_path):
    config = dict(attention_type="block_sparse", block_size=4, num_random_blocks=2)
    reference = hf_bird(tmp_path, "BigBirdForMaskedLM", seed=4, **config)
    model = separate(tmp_path)
    ids, mask, types = bird_padded(np.random.default_rng(4), [45, 39, 41])
    assert ids.shape[1] > model.config.max_full_attention_tokens  # really sparse
    with torch.no_grad():
        expected = reference(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)
        ).logits.numpy()
    ours = jax.vmap(lambda i, m, t: model(i, attention_mask=m, token_type_ids=t))(ids, mask, types)
    diff = max_diff_valid(ours, expected, mask)
    print(f"BigBird block-sparse MLM, separate layers: {diff:.2e}")
    assert diff < 2e-5


def test_stacking_again_saving_and_exporting_give_the_stacked_model(tmp_path):
    DECODERS["gpt-neo"].save(tmp_path / "hf")
    stacked = eqx_models.from_pretrained(tmp_path / "hf")
    model = eqx_models.separate_layers(stacked)
    assert model.transformer.h.separate and model.transformer.h.num_layers == stacked.transformer.h.num_layers
    assert_same_tree(eqx_models.stack_layers(model), stacked)
    assert eqx_models.separate_layers(model) is model and eqx_models.stack_layers(stacked) is stacked
    ours, theirs = eqx_models.to_state_dict(model), eqx_models.to_state_dict(stacked)
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    eqx_models.save_pretrained(model, tmp_path / "own")
    assert_same_tree(eqx_models.from_pretrained(tmp_path / "own"), stacked)
    eqx_models.export_hf(model, tmp_path / "exported")
    assert_same_tree(eqx_models.from_pretrained(tmp_path / "exported"), stacked)


def test_quantised_weights_generate_as_they_do_stacked(tmp_path):
    case = DECODERS["gpt-neo"]
    case.save(tmp_path, seed=4)
    stacked = eqx_models.quantize(eqx_models.from_pretrained(tmp_path), "int8")
    model = eqx_models.separate_layers(stacked)
    # weights without a layers axis are pinned in loops, as quantize pins them (and unpinned again when stacked)
    leaves = jax.tree.leaves(model, is_leaf=lambda x: isinstance(x, nn.QuantizedWeight))
    weights = [leaf for leaf in leaves if isinstance(leaf, nn.QuantizedWeight)]
    assert weights and all(w.pinned for w in weights)
    assert_same_tree(eqx_models.stack_layers(model), stacked)
    assert_same_greedy(model, stacked, case, seed=4, lengths=[8, 5])


def test_lora_refuses_separate_layers_in_one_line(tmp_path):
    DECODERS["gpt-neo"].save(tmp_path)
    model = separate(tmp_path)
    with pytest.raises(ConfigError, match="stores them separately") as error:
        lora.add_lora(model, rank=2, alpha=4, target_modules=["q_proj"], key=jax.random.PRNGKey(0))
    assert "\n" not in str(error.value)


def test_adapters_added_before_separating_and_gradients_match_the_stacked_model(tmp_path, getkey):
    import equinox as eqx

    case = DECODERS["gemma-mqa"]
    case.save(tmp_path, seed=6)
    stacked = lora.add_lora(
        eqx_models.from_pretrained(tmp_path), rank=2, alpha=4, target_modules=["q_proj", "down_proj"], key=getkey()
    )
    stacked = jax.tree.map(lambda x: x + 0.01 if eqx.is_inexact_array(x) else x, stacked)  # B non-zero
    model = eqx_models.separate_layers(stacked)
    ids, mask = assert_same_greedy(model, stacked, case, seed=6, lengths=[9, 6])

    def loss(m):
        logits = jax.vmap(lambda i, k: m(i, attention_mask=k))(ids, mask)
        return (jax.nn.log_softmax(logits) * mask[..., None].astype(logits.dtype)).mean()

    for remat in (False, True):
        ours = eqx.filter_grad(loss)(eqx_models.with_run_options(model, remat=remat))
        theirs = eqx.filter_grad(loss)(eqx_models.with_run_options(stacked, remat=remat))
        ours, theirs = eqx_models.stack_layers(ours), theirs
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_cli_generate_with_separate_layers_prints_the_same_text(capsys):
    from eqx_models import cli

    example = Path(__file__).resolve().parents[1] / "examples" / "stdlib-gpt-neo"
    texts = []
    for flags in ([], ["--separate-layers"]):
        assert cli.main(["generate", str(example), "--prompt", "def ", "--max-new-tokens", "12", *flags]) == 0
        out = capsys.readouterr()
        assert "12 new tokens" in out.err
        texts.append(out.out)
    assert texts[0] == texts[1] and texts[0].startswith("def ")
