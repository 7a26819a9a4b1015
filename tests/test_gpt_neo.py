import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from cases import GPT_NEO, hf_neo, tiered
from oracle import Float64Throughout, hf_positions, left_padded, max_diff_valid, torch_logits

import eqx_models
from eqx_models import nn
from eqx_models.generation import batched_decode, init_batched_cache
from eqx_models.models import GPTNeoConfig, GPTNeoForCausalLM

# The alternating pattern of tests/cases.py (4 layers, window 3) runs in tests/test_decoders.py's shared cases.
PATTERNS = [
    ([[["local"], 3], [["global"], 1]], 4, 1),
    ([[["global"], 2]], 2, 5),
    ([[["local", "local", "global"], 1]], 3, 20),  # window wider than the sequence
]


@pytest.mark.parametrize("scan_layers", tiered([True, False], True))
@pytest.mark.parametrize("attention_types,num_layers,window_size", tiered(PATTERNS, PATTERNS[0]))
def test_causal_lm_logits_match_hf_on_left_padded_batch(
    tmp_path, attention_types, num_layers, window_size, scan_layers
):
    reference = hf_neo(tmp_path, attention_types=attention_types, num_layers=num_layers, window_size=window_size)
    model = eqx_models.from_pretrained(tmp_path, scan_layers=scan_layers)
    assert nn.run_options(model).scan_layers is scan_layers
    ids, mask = left_padded(np.random.default_rng(1), GPT_NEO["vocab_size"], [13, 9, 4])
    positions = hf_positions(mask)
    expected = torch_logits(reference, ids, mask, positions)
    ours = jax.vmap(lambda i, m, p: model(i, attention_mask=m, position_ids=p))(ids, mask, positions)
    diff = max_diff_valid(ours, expected, mask)
    print(f"GPT-Neo {attention_types} window {window_size} scan={scan_layers}: max |diff| {diff:.2e}")
    assert diff < 2e-5


@pytest.mark.slow
def test_long_left_padded_batch_matches_hf(tmp_path):
    """Lengths past the attention's causal block size and not a multiple of it. Over 600
    positions float32 rounding grows in HF too, so the float64 HF model is the truth and we
    must be at least as close to it as HF's own float32 model. HF's float64 model still
    computes its attention scores in float32 (`_attn` casts queries and keys), which would
    share those roundings with HF's float32 model: `Float64Throughout` keeps them float64."""
    reference = hf_neo(tmp_path, max_position_embeddings=640, window_size=97)
    model = eqx_models.from_pretrained(tmp_path)
    ids, mask = left_padded(np.random.default_rng(9), GPT_NEO["vocab_size"], [601, 515])
    positions = hf_positions(mask)
    hf32 = torch_logits(reference, ids, mask, positions)
    with Float64Throughout():
        truth = torch_logits(reference.double(), ids, mask, positions)
    ours = jax.vmap(lambda i, m, p: model(i, attention_mask=m, position_ids=p))(ids, mask, positions)
    ours_error, hf_error = max_diff_valid(ours, truth, mask), max_diff_valid(hf32, truth, mask)
    print(
        f"GPT-Neo 601 tokens: |ours - hf32| {max_diff_valid(ours, hf32, mask):.2e}, "
        f"|ours - hf64| {ours_error:.2e}, |hf32 - hf64| {hf_error:.2e}"
    )
    assert ours_error <= hf_error
    assert max_diff_valid(ours, hf32, mask) < 1e-4


@pytest.mark.slow
def test_default_positions_are_slots_as_in_hf(tmp_path):
    reference = hf_neo(tmp_path)
    model = eqx_models.from_pretrained(tmp_path)
    ids = np.random.default_rng(3).integers(0, GPT_NEO["vocab_size"], (1, 10))
    mask = np.ones_like(ids)
    expected = torch_logits(reference, ids, mask)
    assert max_diff_valid(model(jnp.asarray(ids[0]))[None], expected, mask) < 2e-5


@pytest.mark.slow
def test_untied_head_matches_hf(tmp_path):
    reference = hf_neo(tmp_path, tie_word_embeddings=False)
    model = eqx_models.from_pretrained(tmp_path)
    assert model.lm_head is not None
    ids, mask = left_padded(np.random.default_rng(4), GPT_NEO["vocab_size"], [8, 5])
    expected = torch_logits(reference, ids, mask, hf_positions(mask))
    ours = jax.vmap(lambda i, m, p: model(i, attention_mask=m, position_ids=p))(ids, mask, hf_positions(mask))
    assert max_diff_valid(ours, expected, mask) < 2e-5


def test_base_checkpoint_loads_into_head_and_head_into_base(tmp_path):
    hf_neo(tmp_path / "base", head=transformers.GPTNeoModel)
    hf_neo(tmp_path / "lm")
    head = eqx_models.from_pretrained(tmp_path / "base", architecture="GPTNeoForCausalLM")
    base = eqx_models.from_pretrained(tmp_path / "base")
    np.testing.assert_array_equal(head.transformer.wte.weight, base.wte.weight)
    base_from_lm, report = eqx_models.load_with_report(tmp_path / "lm", architecture="GPTNeoModel")
    lm = eqx_models.from_pretrained(tmp_path / "lm")
    np.testing.assert_array_equal(base_from_lm.h.layers.mlp.c_fc.weight, lm.transformer.h.layers.mlp.c_fc.weight)


@pytest.mark.slow
def test_cached_decoding_equals_full_forward(tmp_path):
    hf_neo(tmp_path, window_size=2)
    model = eqx_models.from_pretrained(tmp_path)
    ids, mask = left_padded(np.random.default_rng(5), GPT_NEO["vocab_size"], [10, 6])
    positions = hf_positions(mask)
    full = jax.vmap(lambda i, m, p: model(i, attention_mask=m, position_ids=p))(ids, mask, positions)
    cache = init_batched_cache(model, 2, 16)
    chunks = []
    for start, stop in [(0, 5), (5, 6), (6, 9), (9, 10)]:  # a prompt, then pieces of any length
        logits, cache = batched_decode(
            model,
            jnp.asarray(ids[:, start:stop]),
            cache,
            jnp.asarray(mask[:, start:stop], bool),
            jnp.asarray(positions[:, start:stop]),
        )
        chunks.append(np.asarray(logits))
    diff = max_diff_valid(np.concatenate(chunks, 1), np.asarray(full), mask)
    print(f"cached vs full: max |diff| {diff:.2e}")
    assert diff < 1e-5


@pytest.mark.parametrize("eos", tiered([None, "pick"], "pick"))
def test_greedy_generate_matches_hf_token_for_token(tmp_path, eos):
    reference = hf_neo(tmp_path, seed=7)
    model = eqx_models.from_pretrained(tmp_path)
    ids, mask = left_padded(np.random.default_rng(8), GPT_NEO["vocab_size"], [7, 3, 5])
    if eos == "pick":  # an id the model emits early for some row, so rows stop at different steps
        first = eqx_models.generate(model, ids, mask, max_new_tokens=4, eos_token_id=None)
        eos = int(np.asarray(first)[1, ids.shape[1] + 1])
    ours = np.asarray(eqx_models.generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0))
    with torch.no_grad():
        theirs = reference.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        ).numpy()
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.slow
def test_generate_defaults_eos_from_config(tmp_path):
    hf_neo(tmp_path, eos_token_id=5, bos_token_id=5)
    model = eqx_models.from_pretrained(tmp_path)
    out = np.asarray(eqx_models.generate(model, np.array([[1, 2, 3]]), max_new_tokens=30))
    new = out[0, 3:]
    if 5 in new:  # after EOS, only padding (the EOS id itself when no pad id is set)
        assert (new[list(new).index(5) :] == 5).all()
    else:
        assert len(new) == 30


def test_generate_rejects_bad_requests(tmp_path):
    hf_neo(tmp_path)
    model = eqx_models.from_pretrained(tmp_path)
    with pytest.raises(eqx_models.InputError, match="exceeds the model's 64 positions"):
        eqx_models.generate(model, np.ones((1, 60), int), max_new_tokens=10)
    with pytest.raises(eqx_models.InputError, match="outside"):
        eqx_models.generate(model, np.array([[1, 200]]), max_new_tokens=2)
    with pytest.raises(eqx_models.InputError, match=r"\[batch, seq\]"):
        eqx_models.generate(model, np.array([1, 2]), max_new_tokens=2)
    with pytest.raises(eqx_models.InputError, match="attention_mask"):
        eqx_models.generate(model, np.array([[1, 2]]), np.array([[1, 1, 1]]), max_new_tokens=2)


def test_out_of_range_ids_fail_inside_the_model(tmp_path):
    hf_neo(tmp_path)
    model = eqx_models.from_pretrained(tmp_path)
    with pytest.raises(Exception, match="token id outside"):
        jax.block_until_ready(model(jnp.array([1, 500])))


@pytest.mark.slow
def test_wrong_shapes_fail_the_type_check(getkey):
    config = GPTNeoConfig(**GPT_NEO, num_layers=2, attention_types=((("global", "local"), 1),))
    model = GPTNeoForCausalLM(config, key=getkey())
    with pytest.raises(Exception, match="input_ids|seq|shape"):
        model(jnp.ones((2, 5), jnp.int32))


@pytest.mark.slow
def test_dropout_is_active_only_with_a_key(getkey):
    config = GPTNeoConfig(
        **GPT_NEO,
        num_layers=2,
        attention_types=((("global", "local"), 1),),
        resid_dropout=0.5,
        embed_dropout=0.5,
        attention_dropout=0.5,
    )
    model = GPTNeoForCausalLM(config, key=getkey())
    ids = jnp.arange(6, dtype=jnp.int32)
    a, b = model(ids, key=jax.random.key(1)), model(ids, key=jax.random.key(2))
    assert not np.allclose(a, b)
    inference = eqx.nn.inference_mode(model)
    np.testing.assert_array_equal(inference(ids), inference(ids, key=jax.random.key(1)))


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(num_layers=3), r"attention_types must expand to num_layers layers; got .*num_layers=3"),
        (dict(attention_types=[[["global", "sparse"], 2]]), r"attention_types must be .*'global' or 'local'.*sparse"),
        (dict(num_heads=5), "hidden_size must be divisible by num_heads; got hidden_size=32, num_heads=5"),
        (
            dict(activation_function="gelu_quadratic"),
            r"activation_function must be .*supported activation.*'gelu_quadratic'",
        ),
        (dict(window_size=0), "window_size"),
    ],
)
def test_bad_config_values_are_named(overrides, match):
    hf = {
        **GPT_NEO,
        "model_type": "gpt_neo",
        "num_layers": 4,
        "attention_types": [[["global", "local"], 2]],
        **overrides,
    }
    with pytest.raises(eqx_models.ConfigError, match=match):
        GPTNeoConfig.from_hf_config(hf)


def test_config_round_trips_through_hf_dict():
    hf = transformers.GPTNeoConfig(**GPT_NEO, num_layers=2, attention_types=[[["local", "global"], 1]]).to_dict()
    config = GPTNeoConfig.from_hf_config(hf)
    back = config.to_hf_config()
    for key in ("attention_types", "window_size", "hidden_size", "num_heads", "eos_token_id"):
        assert back[key] == hf[key]
    assert transformers.GPTNeoConfig(**back).attention_layers == ["local", "global"]
