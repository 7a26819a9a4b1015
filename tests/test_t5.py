"""T5 (original), the FLAN-T5 / T5 v1.1 layout and mT5 against transformers 4.57.6 PyTorch:
logits on right-padded batches, the base and encoder models, cached decoding, greedy and beam
generation, every checkpoint format, export, the seq2seq loss and `eqx-models verify`."""

import copy
import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from cases import tiered
from oracle import assert_same_tree, hf_generate, max_diff_valid
from t5_cases import CASES, right_padded, write_flax_msgpack

import eqx_models
from eqx_models.cli import main as cli
from eqx_models.models import MT5Config, T5Config
from eqx_models.training.losses import head_loss

VOCAB = CASES["t5"].config["vocab_size"]
MAX_DISTANCE = CASES["t5"].config["relative_attention_max_distance"]
ENCODER_LENGTHS = [17, 11, 4]  # the longest beyond max_distance: the last bucket is used
DECODER_LENGTHS = [15, 9, 15]


def cases(*slow: str) -> list:
    """The case ids for the `loaded` fixture, those in `slow` marked slow (the fast tier keeps
    one case of each code path)."""
    return [pytest.param(case, marks=pytest.mark.slow) if case in slow else case for case in CASES]


def tolerance(expected: np.ndarray) -> float:
    return 2e-5 + 1e-4 * float(np.abs(expected).max())


def padded_batch(seed: int):
    rng = np.random.default_rng(seed)
    ids, mask = right_padded(rng, VOCAB, ENCODER_LENGTHS)
    dec, dec_mask = right_padded(rng, VOCAB, DECODER_LENGTHS)
    assert ids.shape[1] > MAX_DISTANCE and dec.shape[1] > MAX_DISTANCE
    return ids, mask, dec, dec_mask


def hf_outputs(reference, ids, mask, dec=None, dec_mask=None):
    inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if dec is not None:
        inputs.update(decoder_input_ids=torch.tensor(dec), decoder_attention_mask=torch.tensor(dec_mask))
    with torch.no_grad():
        return reference(**inputs)


@dataclasses.dataclass(frozen=True)
class Loaded:
    case: str
    reference: torch.nn.Module  # HF's `...ForConditionalGeneration`
    model: eqx_models.models.Seq2SeqLM


@pytest.fixture(scope="module", params=tiered(list(CASES), "t5"))
def loaded(request, tmp_path_factory) -> Loaded:
    """Each case's conditional-generation model, saved and loaded once for the tests below."""
    folder = tmp_path_factory.mktemp(request.param)
    reference = CASES[request.param].save(folder, seed=1)
    return Loaded(request.param, reference, eqx_models.from_pretrained(folder))


@eqx.filter_jit
def seq2seq_forward(model, ids, mask, dec, dec_mask):
    return jax.vmap(lambda i, m, d, dm: model(i, d, attention_mask=m, decoder_attention_mask=dm))(
        ids, mask, dec, dec_mask
    )


def test_conditional_generation_logits_match_hf_on_right_padded_batches(loaded):
    reference, model = loaded.reference, loaded.model
    assert type(model).__name__ == type(reference).__name__
    ids, mask, dec, dec_mask = padded_batch(seed=1)
    expected = hf_outputs(reference, ids, mask, dec, dec_mask).logits.numpy()
    truth = hf_outputs(copy.deepcopy(reference).double(), ids, mask, dec, dec_mask).logits.numpy()
    ours = seq2seq_forward(model, ids, mask, dec, dec_mask)
    assert ours.dtype == jnp.float32
    diff = max_diff_valid(ours, expected, dec_mask)
    print(
        f"{loaded.case} logits: |ours - hf32| {diff:.2e} (max |ref| {np.abs(expected).max():.2f}), "
        f"|ours - hf64| {max_diff_valid(ours, truth, dec_mask):.2e}, "
        f"|hf32 - hf64| {max_diff_valid(expected, truth, dec_mask):.2e}"
    )
    assert diff < tolerance(expected)


@eqx.filter_jit
def encoder_forward(model, ids, mask):
    return jax.vmap(lambda i, m: model(i, attention_mask=m))(ids, mask)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_base_and_encoder_models_match_hf_without_scan(tmp_path, case):
    ids, mask, dec, dec_mask = padded_batch(seed=2)
    base = CASES[case].save(tmp_path / "base", "Model", seed=2)
    model = eqx_models.from_pretrained(tmp_path / "base", scan_layers=False)  # the unscanned loop too
    assert type(model).__name__ == type(base).__name__
    expected = hf_outputs(base, ids, mask, dec, dec_mask).last_hidden_state.numpy()
    diff = max_diff_valid(seq2seq_forward(model, ids, mask, dec, dec_mask), expected, dec_mask)
    print(f"{case} {type(model).__name__} last_hidden_state: {diff:.2e} (max |ref| {np.abs(expected).max():.2f})")
    assert diff < tolerance(expected)

    encoder = CASES[case].save(tmp_path / "encoder", "EncoderModel", seed=3)
    model = eqx_models.from_pretrained(tmp_path / "encoder", scan_layers=False)
    assert type(model).__name__ == type(encoder).__name__
    expected = hf_outputs(encoder, ids, mask).last_hidden_state.numpy()
    diff = max_diff_valid(encoder_forward(model, ids, mask), expected, mask)  # padding positions excluded
    print(f"{case} {type(model).__name__} hidden states: {diff:.2e} (max |ref| {np.abs(expected).max():.2f})")
    assert diff < tolerance(expected)


@eqx.filter_jit
def decode_step(model, token, cache, cross):
    return model.decode(token, cache, cross)


@eqx.filter_jit
def encode_once(model, ids, mask):
    return model.cross_kv(model.encode(ids, attention_mask=mask), mask)


@pytest.mark.slow
@pytest.mark.parametrize("loaded", cases("mt5"), indirect=True)
def test_cached_decoding_one_token_at_a_time_equals_the_full_forward(loaded):
    model = loaded.model
    ids, mask, dec, _ = (jnp.asarray(a) for a in padded_batch(seed=4))
    full = np.asarray(seq2seq_forward(model, ids, mask, dec, jnp.ones_like(dec)))
    worst = 0.0
    for row in range(len(ids)):
        cross = encode_once(model, ids[row], mask[row])
        cache = model.init_cache(dec.shape[1] + 3)  # slots left over: unused slots must not count
        pieces = []
        for t in range(dec.shape[1]):
            logits, cache = decode_step(model, dec[row, t : t + 1], cache, cross)
            pieces.append(np.asarray(logits))
        assert int(cache.index) == dec.shape[1]
        worst = max(worst, float(np.abs(np.concatenate(pieces) - full[row]).max()))
    bound = 1e-5 * max(1.0, float(np.abs(full).max()))
    print(f"{loaded.case} cached vs full decoding: {worst:.2e} (bound {bound:.2e})")
    # float32 reordering only, relative to the largest logit: on the gated cases cached logits
    # are 3.9e-5 / 3.6e-5 from HF's float64 result, HF's own float32 ones 4.1e-5 / 5.3e-5
    assert worst < bound


STRATEGIES = {
    "greedy": dict(),
    "beam": dict(num_beams=3, num_return_sequences=2, length_penalty=0.8),
}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_greedy_and_beam_generation_match_hf_token_for_token(loaded, strategy):
    reference, model = loaded.reference, loaded.model
    ids, mask, _, _ = padded_batch(seed=5)
    # an id the model emits early in one row, so that rows (and beams) end at different steps
    first = np.asarray(eqx_models.generate(model, ids, mask, max_new_tokens=3, eos_token_id=None))
    eos = int(first[1, 2])
    options = dict(max_new_tokens=14, eos_token_id=eos, pad_token_id=0, **STRATEGIES[strategy])
    ours = eqx_models.generate(model, ids, mask, output_scores=True, **options)
    theirs = hf_generate(reference, ids, mask, do_sample=False, output_scores=True, **options)
    sequences = np.asarray(ours.sequences)
    np.testing.assert_array_equal(sequences, theirs.sequences.numpy())
    ended = [int(np.argmax(row[1:] == eos)) + 1 if (row[1:] == eos).any() else None for row in sequences]
    print(f"{loaded.case} {strategy}: rows end at steps {ended} of {options['max_new_tokens']}")
    assert any(step is not None for step in ended) and len(set(ended)) > 1, "rows must end at different steps"
    if strategy == "greedy":  # the step logits, within the logits tolerance
        expected = torch.stack(theirs.scores, 1).numpy()
        diff = float(np.abs(np.asarray(ours.scores) - expected).max())
        print(f"{loaded.case} greedy scores: {diff:.2e} (max |ref| {np.abs(expected).max():.2f})")
        assert diff < tolerance(expected)
    else:
        np.testing.assert_allclose(np.asarray(ours.sequences_scores), theirs.sequences_scores.numpy(), atol=2e-5)


@pytest.mark.parametrize("loaded", cases("mt5"), indirect=True)
def test_every_checkpoint_format_export_and_our_folder_give_the_same_tree(loaded, tmp_path):
    reference, model = loaded.reference, loaded.model
    reference.save_pretrained(tmp_path / "sharded_safetensors", max_shard_size="20KB")
    reference.save_pretrained(tmp_path / "bin", safe_serialization=False)
    reference.save_pretrained(tmp_path / "sharded_bin", safe_serialization=False, max_shard_size="20KB")
    write_flax_msgpack(reference, tmp_path / "msgpack")
    write_flax_msgpack(reference, tmp_path / "sharded_msgpack", max_shard_size="20KB")
    for sharded in ("sharded_safetensors", "sharded_bin", "sharded_msgpack"):
        assert any(p.name.endswith(".index.json") for p in (tmp_path / sharded).iterdir()), sharded
    for fmt in ("sharded_safetensors", "bin", "sharded_bin", "msgpack", "sharded_msgpack"):
        assert_same_tree(eqx_models.from_pretrained(tmp_path / fmt), model)

    eqx_models.export_hf(model, tmp_path / "export")
    reloaded = type(reference).from_pretrained(tmp_path / "export").state_dict()
    theirs = reference.state_dict()
    assert reloaded.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(reloaded[name], theirs[name], rtol=0, atol=0, msg=name)
    eqx_models.save_pretrained(model, tmp_path / "ours")
    assert_same_tree(eqx_models.from_pretrained(tmp_path / "ours"), model)
    assert_same_tree(eqx_models.from_pretrained(tmp_path / "export"), model)


@pytest.mark.slow
@pytest.mark.parametrize("loaded", cases("t5", "mt5"), indirect=True)
def test_seq2seq_loss_matches_hf_with_padded_labels(loaded):
    ids, mask, labels, label_mask = padded_batch(seed=7)
    labels = np.where(label_mask, labels, -100)
    labels[0, 3] = -100  # an ignored label inside a row
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        expected = float(loaded.reference(**{k: torch.tensor(v) for k, v in batch.items()}).loss)
    loss, metrics = eqx.filter_jit(head_loss)(loaded.model, {k: jnp.asarray(v) for k, v in batch.items()})
    diff = abs(float(loss) - expected)
    print(f"{loaded.case} seq2seq loss: ours {float(loss):.6f}, HF {expected:.6f}, |diff| {diff:.2e}")
    assert diff < 1e-5 * max(1.0, abs(expected))
    assert int(metrics["tokens"]) == int((labels != -100).sum())


VERIFIED = [("t5", "ForConditionalGeneration"), ("flan-t5", "Model"), ("mt5", "EncoderModel")]


@pytest.mark.slow
@pytest.mark.parametrize("case,head", VERIFIED)
def test_cli_verify_on_a_t5_folder_and_on_our_own_folder(tmp_path, capsys, case, head):
    CASES[case].save(tmp_path / "hf", head, seed=8)
    assert cli(["verify", str(tmp_path / "hf")]) == 0
    diff = float(capsys.readouterr().out.split(":")[-1])
    eqx_models.save_pretrained(eqx_models.from_pretrained(tmp_path / "hf"), tmp_path / "ours")
    assert cli(["verify", str(tmp_path / "ours")]) == 0
    ours_diff = float(capsys.readouterr().out.split(":")[-1])
    print(f"{case} {head} verify: {diff:.2e}, from our folder {ours_diff:.2e}")
    assert diff < 1e-4 and ours_diff == diff


def test_configs_parse_hf_fields_and_round_trip():
    t5 = T5Config.from_hf_config(CASES["flan-t5"].hf_config().to_dict())
    assert t5.activation == ("gelu_new", True) and t5.decoder_layers == 2 and not t5.tie_word_embeddings
    assert T5Config.from_hf_config(CASES["t5"].hf_config().to_dict()).activation == ("relu", False)
    mt5 = MT5Config.from_hf_config(CASES["mt5"].hf_config().to_dict())
    assert mt5.to_hf_config()["model_type"] == "mt5" and mt5.activation == ("gelu_new", True)
    for case in CASES.values():  # every HF field we keep survives the round trip
        hf = case.hf_config().to_dict()
        ours = (MT5Config if case.prefix == "MT5" else T5Config).from_hf_config(hf).to_hf_config()
        assert {k: v for k, v in ours.items() if k in hf} == {k: hf[k] for k in ours if k in hf}


BAD_FEED_FORWARD = [
    ("gated-gelu-fast", r"feed_forward_proj must be a string of the form 'ACT' or 'gated-ACT' .*got 'gated-gelu-fast'"),
    ("relu-gated", r"feed_forward_proj must be a string of the form 'ACT' or 'gated-ACT' .*got 'relu-gated'"),
    ("swiglu", r"feed_forward_proj must be .*ACT one of .*got 'swiglu'"),
]


@pytest.mark.parametrize("value,match", BAD_FEED_FORWARD)
def test_bad_feed_forward_proj_is_named(value, match):
    with pytest.raises(eqx_models.ConfigError, match=match):
        T5Config.from_hf_config({"model_type": "t5", **CASES["t5"].config, "feed_forward_proj": value})
