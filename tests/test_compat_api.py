"""Our side of `eqx_models.compat`: the registry-derived classes, `params=` overrides under
jit and grad, dropout, output objects, generate's shapes (also under jit), save/load, errors,
and that none of it needs transformers. (Differential tests against HF's own Flax classes
are `tests/test_compat.py`.)"""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_models
from eqx_models import compat
from eqx_models.checkpoint import decode_flax_msgpack, encode_flax_msgpack
from eqx_models.errors import CheckpointError, InputError
from eqx_models.models import FAMILIES, EncoderDecoder

NEO = dict(
    model_type="gpt_neo",
    vocab_size=61,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    attention_types=[[["global", "local"], 1]],
    max_position_embeddings=64,
    window_size=4,
    resid_dropout=0.3,
    eos_token_id=60,
    bos_token_id=60,
)
T5 = dict(
    model_type="t5",
    vocab_size=53,
    d_model=32,
    d_kv=8,
    d_ff=40,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    eos_token_id=1,
    pad_token_id=0,
    decoder_start_token_id=0,
)
ISSUE_CLASSES = """FlaxGPTNeoModel FlaxGPTNeoForCausalLM FlaxGemmaModel FlaxGemmaForCausalLM FlaxXGLMModel
FlaxXGLMForCausalLM FlaxBigBirdModel FlaxBigBirdForPreTraining FlaxBigBirdForMaskedLM FlaxBigBirdForCausalLM
FlaxBigBirdForSequenceClassification FlaxBigBirdForMultipleChoice FlaxBigBirdForTokenClassification
FlaxBigBirdForQuestionAnswering FlaxLongT5Model FlaxLongT5ForConditionalGeneration FlaxT5Model
FlaxT5ForConditionalGeneration FlaxT5EncoderModel FlaxMT5Model FlaxMT5ForConditionalGeneration
FlaxMT5EncoderModel""".split()


@pytest.fixture(scope="module")
def neo():
    return compat.FlaxGPTNeoForCausalLM(NEO, seed=0)


@pytest.fixture(scope="module")
def t5():
    return compat.FlaxT5ForConditionalGeneration(T5, seed=0)


def batch(vocab=61, shape=(2, 7), seed=0):
    ids = np.random.default_rng(seed).integers(0, vocab - 1, shape)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding
    return ids, mask


def test_one_class_per_registered_model_and_every_class_of_the_issue():
    registered = {"Flax" + cls.__name__ for family in FAMILIES.values() for cls in family.classes}
    assert set(compat.CLASSES) == registered
    assert set(ISSUE_CLASSES) <= registered
    for name, cls in compat.CLASSES.items():
        assert getattr(compat, name) is cls and cls.__name__ == name and cls.model_class.__name__ == name[4:]
        assert issubclass(cls, compat.FlaxSeq2SeqModel) == issubclass(cls.model_class, EncoderDecoder)


@pytest.mark.slow
def test_params_are_hf_layout_and_override_the_weights(neo):
    params = neo.params
    assert params["transformer"]["wte"]["embedding"].shape == (61, 32)
    assert params["transformer"]["h"]["1"]["attn"]["attention"]["q_proj"]["kernel"].shape == (32, 32)
    ids, mask = batch()
    base = neo(ids, attention_mask=mask).logits
    changed = jax.tree.map(lambda x: x, params)
    changed["transformer"]["ln_f"]["bias"] = params["transformer"]["ln_f"]["bias"] + 1.0
    overridden = neo(ids, attention_mask=mask, params=changed).logits
    assert not np.allclose(base, overridden)
    again = compat.FlaxGPTNeoForCausalLM(NEO, seed=0)
    again.params = changed
    np.testing.assert_array_equal(again(ids, attention_mask=mask).logits, overridden)
    del changed["transformer"]["ln_f"]["bias"]
    with pytest.raises(CheckpointError, match="missing transformer/ln_f/bias"):
        neo(ids, params=changed)


@pytest.mark.slow
def test_jit_grad_and_dropout(neo):
    ids, mask = batch()
    labels = jnp.asarray(ids)

    def loss(params, rng=None, train=False):
        logits = neo(input_ids=ids, attention_mask=mask, params=params, dropout_rng=rng, train=train)[0]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1).mean()

    params = neo.params
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(value, loss(params), rtol=1e-6)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert float(jnp.abs(grads["transformer"]["wte"]["embedding"]).sum()) > 0
    one, two = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    assert loss(params, one, True) != loss(params, two, True) != value  # resid_dropout=0.3 applies
    assert loss(params, one, True) == loss(params, one, True)
    with pytest.raises(InputError, match="needs dropout_rng"):
        loss(params, None, True)


def test_outputs_index_like_hf_and_come_back_from_jit(neo):
    ids, mask = batch()
    out = jax.jit(lambda i, m: neo(i, m, output_hidden_states=True))(ids, mask)
    assert type(out).__name__ == "FlaxCausalLMOutput" and list(out.keys()) == ["logits", "hidden_states"]
    assert out[0] is out["logits"] is out.logits and out.logits.shape == (2, 7, 61)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 7, 32)
    plain = neo(ids, mask, return_dict=False)
    assert isinstance(plain, tuple) and len(plain) == 1
    np.testing.assert_allclose(plain[0], out.logits, atol=1e-6)
    with pytest.raises(KeyError):
        out["attentions"]


@pytest.mark.slow
def test_generate_shape_padding_and_jit(neo):
    ids, mask = batch()
    neo.generation_config.pad_token_id = 59
    try:
        eager = neo.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=7)
        traced = jax.jit(lambda i, m: neo.generate(i, attention_mask=m, max_new_tokens=5, eos_token_id=7))(ids, mask)
    finally:
        neo.generation_config.pad_token_id = None
    assert type(eager).__name__ == "FlaxGreedySearchOutput" and eager.sequences.shape == (2, 12)
    np.testing.assert_array_equal(eager.sequences, traced.sequences)
    np.testing.assert_array_equal(eager.sequences[:, :7], ids)
    for row in np.asarray(eager.sequences[:, 7:]):  # the pad id after a row's first EOS
        if 7 in row:
            assert (row[list(row).index(7) + 1 :] == 59).all()
    default = neo.generate(ids, attention_mask=mask)  # HF's default: max_length 20 in total
    assert default.sequences.shape == (2, 20)
    beams = neo.generate(ids, attention_mask=mask, max_length=10, num_beams=3, num_return_sequences=2)
    assert type(beams).__name__ == "FlaxBeamSearchOutput"
    assert beams.sequences.shape == (4, 10) and beams.scores.shape == (4,)


@pytest.mark.slow
def test_seq2seq_call_encode_decode_and_generate(t5):
    ids = np.random.default_rng(1).integers(2, 53, (2, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    dec = np.random.default_rng(2).integers(2, 53, (2, 4))
    out = t5(ids, mask, dec, output_hidden_states=True)
    assert list(out.keys()) == [
        "logits",
        "decoder_hidden_states",
        "encoder_last_hidden_state",
        "encoder_hidden_states",
    ]
    encoded = t5.encode(ids, mask)
    np.testing.assert_allclose(encoded.last_hidden_state, out.encoder_last_hidden_state, atol=1e-6)
    decoded = t5.decode(dec, encoded, encoder_attention_mask=mask)
    np.testing.assert_allclose(decoded.logits, out.logits, atol=1e-5)
    generated = jax.jit(lambda i, m: t5.generate(i, attention_mask=m, max_length=6))(ids, mask)
    assert generated.sequences.shape == (2, 6) and (generated.sequences[:, 0] == 0).all()
    with pytest.raises(InputError, match="decoder_input_ids is missing"):
        t5(ids, mask)


def test_save_pretrained_round_trip_and_existing_folders(neo, tmp_path):
    neo.save_pretrained(tmp_path / "new")
    loaded = compat.FlaxGPTNeoForCausalLM.from_pretrained(tmp_path / "new")
    for a, b in zip(jax.tree.leaves(neo.params), jax.tree.leaves(loaded.params)):
        np.testing.assert_array_equal(a, b)
    assert loaded.config.window_size == 4 and loaded.config.to_dict()["architectures"] == ["GPTNeoForCausalLM"]
    native = eqx_models.from_pretrained(tmp_path / "new")
    assert type(native) is type(neo.eqx_model)
    existing = tmp_path / "existing"  # as HF: written into a folder that holds a tokenizer
    existing.mkdir()
    (existing / "tokenizer.json").write_text("{}")
    neo.save_pretrained(existing)
    assert sorted(p.name for p in existing.iterdir()) == [
        "config.json",
        "flax_model.msgpack",
        "generation_config.json",
        "tokenizer.json",
    ]


def test_msgpack_writer_matches_the_reader(monkeypatch):
    from eqx_models.checkpoint import _msgpack  # its chunk size, made small here

    params = {"a": {"kernel": np.arange(12, dtype=np.float32).reshape(3, 4)}, "b": jnp.ones(5, jnp.bfloat16)}
    monkeypatch.setattr(_msgpack, "MAX_CHUNK_SIZE", 16)  # the kernel (48 bytes) is written in chunks
    flat = decode_flax_msgpack(encode_flax_msgpack(params), "test")
    np.testing.assert_array_equal(flat["a.kernel"], params["a"]["kernel"])
    assert flat["b"].dtype == jnp.bfloat16 and flat["b"].shape == (5,)
    with pytest.raises(CheckpointError, match="not an array"):
        encode_flax_msgpack({"a": "text"})


def test_bad_calls_are_named(neo, tmp_path):
    ids, mask = batch()
    with pytest.raises(InputError, match="unexpected arguments \\['labels'\\]"):
        neo(ids, labels=ids)
    with pytest.raises(InputError, match="output_attentions"):
        neo(ids, output_attentions=True)
    with pytest.raises(CheckpointError, match="revision"):
        compat.FlaxGPTNeoForCausalLM.from_pretrained(tmp_path, revision="v2")
    with pytest.raises(InputError, match="neither generation options nor inputs"):
        neo.generate(ids, max_new_tokens=2, foo=1)
    with pytest.raises(InputError, match="cannot generate"):
        compat.FlaxGPTNeoModel(NEO).generate(ids)


@pytest.mark.slow
def test_everything_runs_without_transformers(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["transformers"] = None  # any import of it fails
        import numpy as np
        from eqx_models.compat import FlaxGPTNeoForCausalLM, FlaxT5ForConditionalGeneration
        model = FlaxGPTNeoForCausalLM({NEO!r}, seed=0)
        ids = np.ones((1, 3), np.int32)
        assert model(ids).logits.shape == (1, 3, 61)
        assert model.generate(ids, max_new_tokens=2).sequences.shape == (1, 5)
        model.save_pretrained({str(tmp_path / "saved")!r})
        FlaxGPTNeoForCausalLM.from_pretrained({str(tmp_path / "saved")!r})
        t5 = FlaxT5ForConditionalGeneration({T5!r})
        assert t5.generate(ids, max_length=3).sequences.shape == (1, 3)
        assert "transformers" not in [m for m in sys.modules if sys.modules[m] is not None]
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_generate_traced_prompt_returns_the_whole_budget(neo):
    ids, mask = batch()
    model = neo.eqx_model
    eager = eqx_models.generate(model, ids, mask, max_new_tokens=4, pad_token_id=0)
    traced = jax.jit(lambda i, m: eqx_models.generate(model, i, m, max_new_tokens=4, pad_token_id=0))(ids, mask)
    assert traced.shape == (2, 11)
    np.testing.assert_array_equal(traced[:, : eager.shape[1]], eager)
    assert (traced[:, eager.shape[1] :] == 0).all()
