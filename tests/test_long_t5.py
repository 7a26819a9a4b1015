"""LongT5 (so far: the encoder with local attention) against transformers 4.57.6 PyTorch."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from cases import LONG_T5, hf_long_t5_encoder, tiered
from oracle import assert_same_tree, max_diff_valid, randomise
from t5_cases import flax_params

import eqx_models
from eqx_models import nn
from eqx_models.models import LongT5Config

ENCODERS = [  # attention type, feed-forward, global block size, layers: scanned, looped or stored separately
    ("local", "relu", 4, "scan"),
    ("local", "gated-gelu", 4, "loop"),
    ("local", "relu", 4, "separate"),
    ("transient-global", "relu", 4, "scan"),
    ("transient-global", "gated-gelu", 3, "scan"),
    ("transient-global", "gated-gelu", 5, "loop"),
    ("transient-global", "gated-gelu", 3, "separate"),
]


@pytest.mark.slow
@pytest.mark.parametrize("attention,feed_forward_proj,global_block_size,layers", ENCODERS)
def test_encoder_matches_hf_on_right_padded_batch(tmp_path, attention, feed_forward_proj, global_block_size, layers):
    reference = hf_long_t5_encoder(
        tmp_path,
        feed_forward_proj=feed_forward_proj,
        encoder_attention_type=attention,
        global_block_size=global_block_size,
    )
    model = eqx_models.from_pretrained(tmp_path, scan_layers=layers != "loop")
    if layers == "separate":
        model = eqx_models.separate_layers(model)
    rng = np.random.default_rng(0)
    lengths = [17, 11, 4]  # not multiples of the block length 3
    ids = rng.integers(2, LONG_T5["vocab_size"], (3, 17))
    mask = (np.arange(17)[None] < np.array(lengths)[:, None]).astype(np.int64)
    with torch.no_grad():
        expected = reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    ours = jax.vmap(lambda i, m: model(i, attention_mask=m))(ids, mask)
    diff = max_diff_valid(ours, expected, mask)
    print(f"LongT5 {attention} encoder {feed_forward_proj} global block {global_block_size} {layers}: {diff:.2e}")
    assert diff < 2e-5


@pytest.mark.parametrize("attention", tiered(["local", "transient-global"], "transient-global"))
@pytest.mark.parametrize("blocks_per_chunk", [1, 2])
def test_chunked_encoder_matches_hf_with_padding_blocks(tmp_path, monkeypatch, attention, blocks_per_chunk):
    """Long inputs run in chunks of query blocks: 20 tokens are 7 blocks of 3, run as 7 chunks
    of one block or 4 chunks of two (one block of padding), with padded sequences in the batch."""
    from eqx_models.models import long_t5

    reference = hf_long_t5_encoder(tmp_path, encoder_attention_type=attention)
    model = eqx_models.from_pretrained(tmp_path)
    globals_ = 20 // LONG_T5["global_block_size"] if attention == "transient-global" else 0
    per_block = LONG_T5["num_heads"] * 3 * (9 + globals_)  # scores of one block of queries
    monkeypatch.setattr(long_t5, "_CHUNK_SCORES", blocks_per_chunk * per_block)
    rng = np.random.default_rng(1)
    lengths = [20, 13, 5]
    ids = rng.integers(2, LONG_T5["vocab_size"], (3, 20))
    mask = (np.arange(20)[None] < np.array(lengths)[:, None]).astype(np.int64)
    with torch.no_grad():
        expected = reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    ours = jax.vmap(lambda i, m: model(i, attention_mask=m))(ids, mask)
    diff = max_diff_valid(ours, expected, mask)
    print(f"LongT5 {attention} encoder in chunks of {blocks_per_chunk} blocks: {diff:.2e}")
    assert diff < 2e-5


@pytest.mark.slow
def test_local_attention_cost_is_linear_in_length(tmp_path):
    """The bias is [heads, block, 3 * block] for any length and the mask (and so the attention)
    [blocks, 1, block, 3 * block]: linear in length."""
    hf_long_t5_encoder(tmp_path)
    model = eqx_models.from_pretrained(tmp_path)
    from eqx_models.models.long_t5 import local_bias

    for length in (30, 3000):
        bias, allowed = local_bias(model.encoder.relative_attention_bias, jnp.ones((length,), bool), model.config)
        assert bias.shape == (LONG_T5["num_heads"], 3, 9)
        assert allowed.shape == (-(-length // 3), 1, 3, 9)


def test_formats_export_and_our_folder(tmp_path):
    reference = hf_long_t5_encoder(tmp_path / "hf", seed=1)
    reference.save_pretrained(tmp_path / "bin", safe_serialization=False)
    model = eqx_models.from_pretrained(tmp_path / "hf")
    assert_same_tree(eqx_models.from_pretrained(tmp_path / "bin"), model)
    eqx_models.export_hf(model, tmp_path / "export")
    reloaded = transformers.LongT5EncoderModel.from_pretrained(tmp_path / "export")
    ours, theirs = reloaded.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)
    eqx_models.save_pretrained(model, tmp_path / "ours")
    assert_same_tree(eqx_models.from_pretrained(tmp_path / "ours"), model)


@pytest.mark.slow
@pytest.mark.parametrize("global_block_size", [2, 3, 4, 7, 16])
def test_global_block_ids_match_hf_including_orphans_and_padding(global_block_size):
    from transformers.models.longt5.modeling_longt5 import _make_global_fixed_block_ids

    from eqx_models.models.long_t5 import global_block_ids

    for length, real in [(50, 50), (50, 37), (200, 131), (16, 3)]:
        mask = (np.arange(length) < real).astype(np.float32)
        ids, segments = _make_global_fixed_block_ids(torch.tensor(mask[None]), global_block_size)
        ours = global_block_ids(jnp.asarray(mask.astype(bool)), global_block_size)
        np.testing.assert_array_equal(ours[0], ids[0].numpy())
        np.testing.assert_array_equal(ours[1], segments[0].numpy())


def test_relative_position_buckets_match_hf():
    from transformers.models.longt5.modeling_longt5 import LongT5Attention

    relative = np.arange(-300, 301)
    for bidirectional in (True, False):
        for buckets, distance in [(32, 128), (16, 40), (8, 20)]:
            theirs = LongT5Attention._relative_position_bucket(
                torch.tensor(relative), bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
            ).numpy()
            ours = nn.relative_position_bucket(
                jnp.asarray(relative), bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
            )
            np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            dict(feed_forward_proj="gated-gelu-fast"),
            "feed_forward_proj must be a string of the form 'ACT' or 'gated-ACT'",
        ),
        (dict(feed_forward_proj="swiglu"), "feed_forward_proj must be .*got 'swiglu'"),
        (dict(encoder_attention_type="sparse"), "must be 'local' or 'transient-global'"),
    ],
)
def test_bad_config_values_are_named(overrides, match):
    with pytest.raises(eqx_models.ConfigError, match=match):
        LongT5Config.from_hf_config({"model_type": "longt5", **LONG_T5, **overrides})


SEQ2SEQ = [  # attention, feed-forward, tied, decoder layers
    ("local", "relu", True, 2),
    ("transient-global", "gated-gelu", False, 4),
]


@pytest.mark.parametrize("attention,feed_forward_proj,tied,decoder_layers", tiered(SEQ2SEQ, SEQ2SEQ[1]))
def test_conditional_generation_logits_match_hf(tmp_path, attention, feed_forward_proj, tied, decoder_layers):
    config = transformers.LongT5Config(
        **{
            **LONG_T5,
            "encoder_attention_type": attention,
            "feed_forward_proj": feed_forward_proj,
            "tie_word_embeddings": tied,
            "num_decoder_layers": decoder_layers,
        }
    )
    torch.manual_seed(0)
    reference = randomise(transformers.LongT5ForConditionalGeneration(config))
    reference.save_pretrained(tmp_path)
    model = eqx_models.from_pretrained(tmp_path)
    rng = np.random.default_rng(1)
    ids = rng.integers(2, LONG_T5["vocab_size"], (2, 19))
    mask = (np.arange(19)[None] < np.array([[19], [12]])).astype(np.int64)
    dec = rng.integers(2, LONG_T5["vocab_size"], (2, 7))
    dec_mask = (np.arange(7)[None] < np.array([[7], [5]])).astype(np.int64)

    def hf_logits(model):
        with torch.no_grad():
            return model(
                input_ids=torch.tensor(ids),
                attention_mask=torch.tensor(mask),
                decoder_input_ids=torch.tensor(dec),
                decoder_attention_mask=torch.tensor(dec_mask),
            ).logits.numpy()

    expected = hf_logits(reference)
    truth = hf_logits(copy.deepcopy(reference).double())  # HF in float64: the exact answer
    ours = jax.vmap(lambda i, m, d, dm: model(i, d, attention_mask=m, decoder_attention_mask=dm))(
        ids, mask, dec, dec_mask
    )
    diff = max_diff_valid(ours, expected, dec_mask)
    ours_error, hf_error = max_diff_valid(ours, truth, dec_mask), max_diff_valid(expected, truth, dec_mask)
    print(
        f"LongT5ForConditionalGeneration {attention} {feed_forward_proj} tied={tied}: |ours - hf32| {diff:.2e}, "
        f"|ours - hf64| {ours_error:.2e}, |hf32 - hf64| {hf_error:.2e}"
    )
    # as close to HF as HF's own float32 rounding allows: within 2e-5, or nearer the float64 truth than HF
    assert diff < 2e-5 or ours_error <= hf_error
    assert diff < 1e-4
    eqx_models.export_hf(model, tmp_path / "export")
    reloaded = transformers.LongT5ForConditionalGeneration.from_pretrained(tmp_path / "export").state_dict()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(reloaded[name], value, rtol=0, atol=0, msg=name)


def test_shift_tokens_right_matches_hf():
    from eqx_models.models import shift_tokens_right

    reference = transformers.LongT5ForConditionalGeneration(
        transformers.LongT5Config(**LONG_T5, decoder_start_token_id=0)
    )
    labels = np.array([[5, 6, -100, -100], [7, 8, 9, 1]])
    expected = reference._shift_right(torch.tensor(labels)).numpy()
    ours = jax.vmap(lambda row: shift_tokens_right(row, 0, 0))(jnp.asarray(labels))
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["local", "transient-global"])
def test_cached_decoding_and_greedy_generation_match_hf(tmp_path, attention):
    from eqx_models.generation._decoding import cache_axes as _cache_axes
    from eqx_models.generation._decoding import init_batched_cache

    config = transformers.LongT5Config(
        **{
            **LONG_T5,
            "encoder_attention_type": attention,
            "num_decoder_layers": 2,
            "decoder_start_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 0,
        }
    )
    torch.manual_seed(3)
    reference = randomise(transformers.LongT5ForConditionalGeneration(config), seed=3)
    reference.save_pretrained(tmp_path)
    model = eqx_models.from_pretrained(tmp_path)
    rng = np.random.default_rng(3)
    ids = rng.integers(2, LONG_T5["vocab_size"], (3, 14))
    mask = (np.arange(14)[None] < np.array([[14], [9], [5]])).astype(np.int64)
    ids = np.where(mask, ids, 0)
    # cached decoding of a decoder sequence equals the full forward
    dec = rng.integers(2, LONG_T5["vocab_size"], (3, 6))
    full = jax.vmap(lambda i, m, d: model(i, d, attention_mask=m))(ids, mask, dec)
    encoded = jax.vmap(lambda i, m: model.encode(i, attention_mask=m))(ids, mask)
    cross = jax.vmap(model.cross_kv)(encoded, mask)
    cache = init_batched_cache(model, 3, 8)
    axes = _cache_axes(cache)
    step = jax.vmap(model.decode, in_axes=(0, axes, 0), out_axes=(0, axes))
    pieces = []
    for start, stop in [(0, 3), (3, 4), (4, 6)]:
        logits, cache = step(jnp.asarray(dec[:, start:stop]), cache, cross)
        pieces.append(np.asarray(logits))
    cached = float(np.abs(np.concatenate(pieces, 1) - np.asarray(full)).max())
    print(f"LongT5 {attention} cached vs full: {cached:.2e}")
    assert cached < 1e-5
    # greedy generation, rows ending at different steps
    first = np.asarray(eqx_models.generate(model, ids, mask, max_new_tokens=4, eos_token_id=None))
    eos = int(first[1, 2])
    ours = np.asarray(eqx_models.generate(model, ids, mask, max_new_tokens=9, eos_token_id=eos))
    with torch.no_grad():
        theirs = reference.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=9,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        ).numpy()
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.slow
def test_flax_msgpack_and_pytorch_bin_give_the_same_tree(tmp_path):
    """Public LongT5 checkpoints often ship only `flax_model.msgpack` and `pytorch_model.bin`.
    HF's Flax LongT5 no longer runs on current JAX, so the msgpack is written here in Flax's
    layout (nested dicts; `kernel` transposed, `embedding`, layer-norm `weight`)."""
    import flax.serialization

    config = transformers.LongT5Config(
        **{**LONG_T5, "encoder_attention_type": "transient-global", "tie_word_embeddings": False}
    )
    torch.manual_seed(4)
    reference = randomise(transformers.LongT5ForConditionalGeneration(config), seed=4)
    reference.save_pretrained(tmp_path / "safetensors")
    reference.save_pretrained(tmp_path / "bin", safe_serialization=False)
    params = flax_params(reference)  # HF Flax LongT5 no longer runs on current JAX
    (tmp_path / "msgpack").mkdir()
    (tmp_path / "msgpack" / "flax_model.msgpack").write_bytes(flax.serialization.msgpack_serialize(params))
    (tmp_path / "msgpack" / "config.json").write_text((tmp_path / "safetensors" / "config.json").read_text())
    expected = eqx_models.from_pretrained(tmp_path / "safetensors")
    assert_same_tree(eqx_models.from_pretrained(tmp_path / "msgpack"), expected)
    assert_same_tree(eqx_models.from_pretrained(tmp_path / "bin"), expected)
