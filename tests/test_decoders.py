"""Gemma, XGLM and GPT-Neo against transformers 4.57.6 PyTorch: logits on left-padded batches,
cached decoding, greedy generation, every checkpoint format, export and bad configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from cases import tiered
from decoder_cases import CASES
from oracle import assert_same_tree, hf_positions, left_padded, max_diff_valid, torch_logits

import eqx_models
from eqx_models.generation import batched_decode, init_batched_cache
from eqx_models.models import GemmaConfig


def batched(model, ids, mask, positions):
    return jax.vmap(lambda i, m, p: model(i, attention_mask=m, position_ids=p))(ids, mask, positions)


@pytest.mark.parametrize("scan_layers", tiered([True, False], True))
@pytest.mark.parametrize("case", tiered(list(CASES), "gemma-gqa3", "xglm"))
def test_logits_match_hf_on_left_padded_batch(tmp_path, case, scan_layers):
    case = CASES[case]
    reference = case.save(tmp_path)
    model = eqx_models.from_pretrained(tmp_path, scan_layers=scan_layers)
    ids, mask = left_padded(np.random.default_rng(1), case.config["vocab_size"], [11, 7, 3])
    positions = hf_positions(mask)
    diff = max_diff_valid(batched(model, ids, mask, positions), torch_logits(reference, ids, mask, positions), mask)
    print(f"{case.id} scan={scan_layers}: max |logits diff| {diff:.2e}")
    assert diff < 2e-5


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gemma-gqa3", "xglm", "gpt-neo"])
def test_base_model_matches_hf(tmp_path, case):
    case = CASES[case]
    reference = case.save(tmp_path, head=False)
    model = eqx_models.from_pretrained(tmp_path)
    assert type(model).__name__ == case.base_class
    ids, mask = left_padded(np.random.default_rng(2), case.config["vocab_size"], [9, 5])
    positions = hf_positions(mask)
    diff = max_diff_valid(batched(model, ids, mask, positions), torch_logits(reference, ids, mask, positions), mask)
    assert diff < 1e-5


@pytest.mark.parametrize("case", tiered(["gemma-gqa2", "xglm", "gpt-neo"], "gemma-gqa2"))
def test_cached_decoding_equals_full_forward(tmp_path, case):
    case = CASES[case]
    case.save(tmp_path)
    model = eqx_models.from_pretrained(tmp_path)
    ids, mask = left_padded(np.random.default_rng(3), case.config["vocab_size"], [10, 4])
    positions = hf_positions(mask)
    full = batched(model, ids, mask, positions)
    cache = init_batched_cache(model, 2, 14)
    pieces = []
    for start, stop in [(0, 6), (6, 7), (7, 10)]:
        logits, cache = batched_decode(
            model,
            jnp.asarray(ids[:, start:stop]),
            cache,
            jnp.asarray(mask[:, start:stop], bool),
            jnp.asarray(positions[:, start:stop]),
        )
        pieces.append(np.asarray(logits))
    diff = max_diff_valid(np.concatenate(pieces, 1), np.asarray(full), mask)
    print(f"{case.id} cached vs full: {diff:.2e}")
    assert diff < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gemma-mqa", "gemma-mha-bias", "xglm-unscaled", "gpt-neo"])
def test_greedy_generate_matches_hf_token_for_token(tmp_path, case):
    case = CASES[case]
    reference = case.save(tmp_path, seed=5)
    model = eqx_models.from_pretrained(tmp_path)
    ids, mask = left_padded(np.random.default_rng(6), case.config["vocab_size"], [6, 2, 4])
    ids = np.where(mask, ids, case.config["pad_token_id"])
    first = np.asarray(eqx_models.generate(model, ids, mask, max_new_tokens=3, eos_token_id=None))
    eos = int(first[0, ids.shape[1] + 1])  # stops row 0 early, the others run on
    ours = np.asarray(eqx_models.generate(model, ids, mask, max_new_tokens=10, eos_token_id=eos))
    with torch.no_grad():
        theirs = reference.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=case.config["pad_token_id"],
        )
    np.testing.assert_array_equal(ours, theirs.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gemma-gqa2", "xglm", "gpt-neo"])
def test_every_checkpoint_format_gives_the_same_tree(tmp_path, case):
    case = CASES[case]
    reference = case.save(tmp_path / "safetensors")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    reference.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with jax.numpy_dtype_promotion("standard"):  # HF's Flax code relies on implicit promotion
        flax_model = getattr(transformers, case.flax_class).from_pretrained(tmp_path / "safetensors", from_pt=True)
        flax_model.save_pretrained(tmp_path / "msgpack")
    expected = eqx_models.from_pretrained(tmp_path / "safetensors")
    for fmt in ("sharded", "bin", "msgpack"):
        assert_same_tree(eqx_models.from_pretrained(tmp_path / fmt), expected)


@pytest.mark.parametrize("case", ["gemma-mha-bias", "xglm", "gpt-neo"])
def test_export_hf_reloads_with_identical_weights_and_our_folder_round_trips(tmp_path, case):
    case = CASES[case]
    reference = case.save(tmp_path / "hf")
    model = eqx_models.from_pretrained(tmp_path / "hf")
    eqx_models.export_hf(model, tmp_path / "export")
    reloaded = getattr(transformers, case.lm_class).from_pretrained(tmp_path / "export")
    ours, theirs = reloaded.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)
    eqx_models.save_pretrained(model, tmp_path / "ours")
    assert_same_tree(eqx_models.from_pretrained(tmp_path / "ours"), model)


def test_gemma_activation_is_resolved_as_hf_pytorch_does(tmp_path):
    """HF PyTorch 4.57 reads `hidden_act` and ignores `hidden_activation`; so do we."""
    case = CASES["gemma-mqa"]
    reference = case.save(tmp_path, hidden_act="gelu", hidden_activation="gelu_pytorch_tanh")
    model = eqx_models.from_pretrained(tmp_path)
    assert model.config.hidden_activation == "gelu_pytorch_tanh"
    ids, mask = left_padded(np.random.default_rng(7), case.config["vocab_size"], [8])
    positions = hf_positions(mask)
    assert (
        max_diff_valid(batched(model, ids, mask, positions), torch_logits(reference, ids, mask, positions), mask) < 2e-5
    )
    eqx_models.export_hf(model, tmp_path / "out")
    assert transformers.GemmaConfig.from_pretrained(tmp_path / "out").hidden_activation == "gelu_pytorch_tanh"


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            dict(num_attention_heads=4, num_key_value_heads=3),
            "num_attention_heads must be divisible by num_key_value_heads",
        ),
        (dict(head_dim=7), "head_dim must be an integer .* and even, got 7"),
        (dict(hidden_act="gelu_quadratic"), "hidden_act must be .*supported activation.*'gelu_quadratic'"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    ],
)
def test_gemma_bad_config_values_are_named(overrides, match):
    with pytest.raises(eqx_models.ConfigError, match=match):
        GemmaConfig.from_hf_config({"model_type": "gemma", **CASES["gemma-mqa"].config, **overrides})


def test_xglm_bad_config_values_are_named():
    from eqx_models.models import XGLMConfig

    base = {"model_type": "xglm", **CASES["xglm"].config}
    with pytest.raises(
        eqx_models.ConfigError, match="d_model must be divisible by attention_heads; got d_model=30, attention_heads=4"
    ):
        XGLMConfig.from_hf_config({**base, "d_model": 30})
    with pytest.raises(eqx_models.ConfigError, match="activation_function must be .*supported activation.*'swiglu2'"):
        XGLMConfig.from_hf_config({**base, "activation_function": "swiglu2"})


def test_sinusoidal_positions_match_hf_table_including_padding_row():
    from transformers.models.xglm.modeling_xglm import XGLMSinusoidalPositionalEmbedding

    from eqx_models import nn

    for dim in (16, 17):
        table = XGLMSinusoidalPositionalEmbedding.get_embedding(300, dim, padding_idx=1).numpy()
        ours = nn.sinusoidal_embedding(jnp.arange(300), dim, padding_idx=1)
        np.testing.assert_allclose(ours, table, atol=2e-5)
        assert not np.asarray(ours[1]).any()
