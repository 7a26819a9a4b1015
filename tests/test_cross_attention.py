"""Cross-attention decoders (`add_cross_attention=True`) of XGLM and BigBird.

XGLM is checked against transformers 4.57.6 PyTorch. BigBird is checked against 4.57.6
PyTorch's BERT decoder loaded with the same weights (the same architecture, parameter for
parameter) and, in the slow tier, against HF's Flax `FlaxBigBirdForCausalLM` (the reference
implementation); not against PyTorch's `BigBird*`: in 4.57.6 its `BigBirdLayer` also passes
`encoder_hidden_states` to the self-attention, which then attends to the encoder instead of
to the decoder's own tokens (`test_hf_pytorch_big_bird_self_attention_reads_the_encoder`).
"""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from oracle import hf_positions, left_padded, max_diff_valid, randomise

import eqx_models
from eqx_models.checkpoint.keymap import array_leaves
from eqx_models.models import BigBirdConfig

VOCAB = 67
HIDDEN = 32
LENGTHS = [9, 5, 7]  # decoder tokens per row, left-padded
ENCODER_LENGTHS = [7, 3, 6]  # encoder tokens per row, right-padded

XGLM = dict(
    vocab_size=VOCAB,
    d_model=HIDDEN,
    ffn_dim=48,
    num_layers=2,
    attention_heads=4,
    max_position_embeddings=64,
    activation_function="gelu",
    add_cross_attention=True,
)
BIG_BIRD = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=40,
    max_position_embeddings=64,
    type_vocab_size=3,
    hidden_act="gelu_new",
    attention_type="original_full",
    is_decoder=True,
    add_cross_attention=True,
)


def hf_xglm(folder, cls, seed=0, **overrides):
    torch.manual_seed(seed)
    model = randomise(getattr(transformers, cls)(transformers.XGLMConfig(**{**XGLM, **overrides})), seed)
    model.save_pretrained(folder)
    return model


def hf_big_bird(folder, cls, seed=0, **overrides):
    torch.manual_seed(seed)
    model = randomise(getattr(transformers, cls)(transformers.BigBirdConfig(**{**BIG_BIRD, **overrides})), seed)
    model.save_pretrained(folder)
    return model


def bert_twin(big_bird: transformers.BigBirdForCausalLM) -> transformers.BertLMHeadModel:
    """HF PyTorch's BERT decoder with a BigBird causal LM's config and weights: the same
    parameters under the same names (BERT's LM has no pooler)."""
    cfg = big_bird.config
    bert_config = transformers.BertConfig(
        **{k: getattr(cfg, k) for k in BIG_BIRD if k != "attention_type"},
        layer_norm_eps=cfg.layer_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attn_implementation="eager",
    )
    bert = transformers.BertLMHeadModel(bert_config)
    missing, unexpected = bert.load_state_dict(big_bird.state_dict(), strict=False)
    assert not missing and all(re.fullmatch(r"bert\.pooler\..*", k) for k in unexpected), (missing, unexpected)
    return bert.eval()


def batch(seed: int, lengths=LENGTHS, encoder_lengths=ENCODER_LENGTHS):
    """Left-padded decoder ids, their mask and positions, token types, and random encoder
    states (padding rows random too) with a right-padded encoder mask."""
    rng = np.random.default_rng(seed)
    ids, mask = left_padded(rng, VOCAB, lengths)
    encoder = rng.standard_normal((len(lengths), max(encoder_lengths), HIDDEN)).astype(np.float32)
    encoder_mask = (np.arange(max(encoder_lengths))[None, :] < np.array(encoder_lengths)[:, None]).astype(np.int64)
    types = rng.integers(0, BIG_BIRD["type_vocab_size"], ids.shape)
    return dict(
        ids=ids, mask=mask, positions=hf_positions(mask), types=types, encoder=encoder, encoder_mask=encoder_mask
    )


def torch_run(model, b, *, types=False, cross=True):
    inputs = dict(input_ids=b["ids"], attention_mask=b["mask"], position_ids=b["positions"])
    if types:
        inputs["token_type_ids"] = b["types"]
    if cross:
        inputs.update(encoder_hidden_states=b["encoder"], encoder_attention_mask=b["encoder_mask"])
    with torch.no_grad():
        out = model(**{k: torch.tensor(v) for k, v in inputs.items()}, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


@eqx.filter_jit
def _forward(model, ids, mask, positions, types, encoder, encoder_mask):
    def one(ids, mask, positions, types, encoder, encoder_mask):
        extra = {} if types is None else {"token_type_ids": types}
        out = model(
            ids,
            attention_mask=mask,
            position_ids=positions,
            encoder_hidden_states=encoder,
            encoder_attention_mask=encoder_mask,
            **extra,
        )
        return getattr(out, "last_hidden_state", out)

    return jax.vmap(one)(ids, mask, positions, types, encoder, encoder_mask)


def ours_run(model, b, *, types=False, cross=True):
    pick = lambda name, keep: jnp.asarray(b[name]) if keep else None  # noqa: E731
    return np.asarray(
        _forward(
            model,
            pick("ids", True),
            pick("mask", True),
            pick("positions", True),
            pick("types", types),
            pick("encoder", cross),
            pick("encoder_mask", cross),
        )
    )


def assert_close(name, ours, expected, mask):
    diff = max_diff_valid(ours, expected, mask)
    bound = 2e-5 + 1e-4 * float(np.abs(expected)[mask.astype(bool)].max())
    print(f"{name}: max diff {diff:.2e} (bound {bound:.2e})")
    assert diff < bound


@eqx.filter_jit
def _decode_step(model, ids, cache, mask, positions, cross):
    step = lambda i, c, m, p, x: model.decode(i, c, attention_mask=m, position_ids=p, cross=x)  # noqa: E731
    return jax.vmap(step)(ids, cache, mask, positions, cross)


def cached_one_token_at_a_time(model, b, *, slots: int):
    """Logits from `decode`, one token per step, with every layer's cross keys and values
    from `cross_kv` computed once."""
    cross = jax.vmap(model.cross_kv)(jnp.asarray(b["encoder"]), jnp.asarray(b["encoder_mask"]))
    cache = jax.vmap(lambda _: model.init_cache(slots))(jnp.arange(len(b["ids"])))
    pieces = []
    for t in range(b["ids"].shape[1]):
        column = lambda name: jnp.asarray(b[name][:, t : t + 1])  # noqa: E731
        logits, cache = _decode_step(
            model, column("ids"), cache, column("mask").astype(bool), column("positions"), cross
        )
        pieces.append(np.asarray(logits))
    return np.concatenate(pieces, 1)


def hf_round_trip(model, reference, cls, folder):
    """`export_hf`, reloaded by transformers, gives back the reference's weights exactly."""
    eqx_models.export_hf(model, folder)
    reloaded = getattr(transformers, cls).from_pretrained(folder)
    ours, theirs = reloaded.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)


def same_tree(a, b) -> bool:
    la, lb = dict(array_leaves(a)), dict(array_leaves(b))
    return la.keys() == lb.keys() and all(np.array_equal(la[k], lb[k]) for k in la)


@pytest.fixture(scope="module")
def xglm(tmp_path_factory):
    """A random HF `XGLMForCausalLM` with cross-attention, saved (safetensors), and its folder."""
    folder = tmp_path_factory.mktemp("xglm")
    return hf_xglm(folder, "XGLMForCausalLM", seed=1, tie_word_embeddings=False), folder


@pytest.fixture(scope="module")
def big_bird(tmp_path_factory):
    """A random HF `BigBirdForCausalLM` with cross-attention, saved (safetensors), and its folder."""
    folder = tmp_path_factory.mktemp("big_bird")
    return hf_big_bird(folder, "BigBirdForCausalLM", seed=2, tie_word_embeddings=False), folder


@pytest.mark.slow
def test_xglm_cross_attention_matches_hf(xglm):
    reference, folder = xglm
    b = batch(1)
    model = eqx_models.from_pretrained(folder)
    assert type(model).__name__ == "XGLMForCausalLM" and model.config.add_cross_attention
    assert_close("XGLMForCausalLM", ours_run(model, b), torch_run(reference, b), b["mask"])
    # as upstream, the cross-attention block is skipped when no encoder states are given
    assert_close(
        "XGLMForCausalLM, no encoder", ours_run(model, b, cross=False), torch_run(reference, b, cross=False), b["mask"]
    )
    base = eqx_models.from_pretrained(folder, architecture="XGLMModel")
    assert_close("XGLMModel", ours_run(base, b), torch_run(reference.model, b), b["mask"])


@pytest.mark.slow
def test_big_bird_cross_attention_matches_the_bert_decoder(big_bird):
    reference, folder = big_bird
    b = batch(2)
    twin = bert_twin(reference)
    model = eqx_models.from_pretrained(folder)
    assert type(model).__name__ == "BigBirdForCausalLM" and model.config.add_cross_attention
    assert_close("BigBirdForCausalLM", ours_run(model, b, types=True), torch_run(twin, b, types=True), b["mask"])
    base = eqx_models.from_pretrained(folder, architecture="BigBirdModel")
    assert_close("BigBirdModel", ours_run(base, b, types=True), torch_run(twin.bert, b, types=True), b["mask"])
    # without encoder states the layers skip cross-attention, and PyTorch's BigBird is right
    without = ours_run(model, b, types=True, cross=False)
    assert_close("BigBirdForCausalLM, no encoder", without, torch_run(reference, b, types=True, cross=False), b["mask"])


@pytest.mark.slow
def test_hf_pytorch_big_bird_self_attention_reads_the_encoder(big_bird):
    """Why PyTorch's BigBird is not this file's oracle: in transformers 4.57.6 its decoder
    tokens never see each other once encoder states are given (the last token's logits do
    not change with the first token), unlike its BERT twin's and ours."""
    reference, folder = big_bird
    model = eqx_models.from_pretrained(folder)
    b = batch(2)
    changed = {**b, "ids": b["ids"].copy()}
    changed["ids"][0, 0] = (b["ids"][0, 0] + 1) % VOCAB  # row 0 has no padding: its first token
    effect = lambda run, m: float(np.abs(run(m, changed)[0, -1] - run(m, b)[0, -1]).max())  # noqa: E731
    assert effect(torch_run, reference) == 0.0
    assert effect(torch_run, bert_twin(reference)) > 1e-3
    assert effect(ours_run, model) > 1e-3


@pytest.mark.slow
def test_big_bird_cross_attention_matches_hf_flax(big_bird):
    reference, folder = big_bird
    b = batch(2)
    with jax.numpy_dtype_promotion("standard"):  # HF's Flax code relies on implicit promotion
        flax_model = transformers.FlaxBigBirdForCausalLM.from_pretrained(folder, from_pt=True)
        names = ("attention_mask", "token_type_ids", "position_ids", "encoder_hidden_states", "encoder_attention_mask")
        inputs = zip(names, ("mask", "types", "positions", "encoder", "encoder_mask"))
        flax = np.asarray(flax_model(b["ids"], **{name: b[key] for name, key in inputs}).logits)
    model = eqx_models.from_pretrained(folder)
    assert_close("BigBirdForCausalLM vs HF Flax", ours_run(model, b, types=True), flax, b["mask"])


def test_big_bird_cross_attention_decoder_uses_full_attention_even_if_configured_block_sparse(tmp_path):
    """HF's BigBirdModel switches cross-attention decoders to `original_full`; so do we,
    also on inputs long enough for block-sparse attention."""
    reference = hf_big_bird(tmp_path, "BigBirdForCausalLM", seed=3, block_size=2, num_random_blocks=1)
    reference.config.attention_type = "block_sparse"
    reference.save_pretrained(tmp_path)
    model = eqx_models.from_pretrained(tmp_path)
    assert model.config.attention_type == "block_sparse" and not model.config.block_sparse
    b = batch(3, lengths=[17, 15], encoder_lengths=[5, 2])  # longer than (5 + 2 * 1) * 2 = 14 tokens
    assert_close("block_sparse config", ours_run(model, b), torch_run(bert_twin(reference), b), b["mask"])


@pytest.mark.parametrize("family", ["xglm", "big_bird"])
def test_cached_decoding_with_cross_kv_equals_the_full_forward(request, family):
    _, folder = request.getfixturevalue(family)
    model = eqx_models.from_pretrained(folder)
    b = batch(4)
    full = ours_run(model, b)
    cached = cached_one_token_at_a_time(model, b, slots=b["ids"].shape[1] + 2)
    diff = max_diff_valid(cached, full, b["mask"])
    print(f"{family}: cached (one token at a time) vs full forward {diff:.2e}")
    assert diff < 1e-5


@pytest.mark.parametrize("family, cls", [("xglm", "XGLMForCausalLM"), ("big_bird", "BigBirdForCausalLM")])
def test_checkpoint_with_cross_attention_exports_exactly(request, tmp_path, family, cls):
    reference, folder = request.getfixturevalue(family)
    model = eqx_models.from_pretrained(folder)
    hf_round_trip(model, reference, cls, tmp_path / "export")
    eqx_models.save_pretrained(model, tmp_path / "ours")
    assert same_tree(eqx_models.from_pretrained(tmp_path / "ours"), model)


def test_big_bird_base_checkpoint_with_cross_attention_exports_exactly(tmp_path):
    reference = hf_big_bird(tmp_path / "hf", "BigBirdModel", seed=5)
    model = eqx_models.from_pretrained(tmp_path / "hf")
    assert type(model).__name__ == "BigBirdModel" and model.encoder.layers.crossattention is not None
    hf_round_trip(model, reference, "BigBirdModel", tmp_path / "export")


@pytest.mark.parametrize("family, cls", [("xglm", "XGLMForCausalLM"), ("big_bird", "BigBirdForCausalLM")])
def test_checkpoint_without_cross_attention_loads_and_refuses_encoder_states(tmp_path, family, cls):
    make = hf_xglm if family == "xglm" else hf_big_bird
    reference = make(tmp_path / "hf", cls, seed=6, add_cross_attention=False)
    model = eqx_models.from_pretrained(tmp_path / "hf")
    assert not model.config.add_cross_attention
    layers = model.model.layers.layers if family == "xglm" else model.bert.encoder.layers
    assert getattr(layers, "encoder_attn" if family == "xglm" else "crossattention") is None
    b = batch(6)
    ours = ours_run(model, b, cross=False)
    assert_close(f"{cls} without cross-attention", ours, torch_run(reference, b, cross=False), b["mask"])
    hf_round_trip(model, reference, cls, tmp_path / "export")
    with pytest.raises(eqx_models.InputError, match="add_cross_attention=False"):
        model(jnp.asarray(b["ids"][0]), encoder_hidden_states=jnp.asarray(b["encoder"][0]))
    with pytest.raises(eqx_models.InputError, match="add_cross_attention=False"):
        model.cross_kv(jnp.asarray(b["encoder"][0]))


def test_big_bird_cross_attention_needs_a_decoder():
    with pytest.raises(eqx_models.ConfigError, match="add_cross_attention=True needs is_decoder=True"):
        BigBirdConfig(add_cross_attention=True)
    with pytest.raises(eqx_models.ConfigError, match="is_decoder"):
        BigBirdConfig.from_hf_config({**BIG_BIRD, "model_type": "big_bird", "is_decoder": False})


def test_encoder_mask_without_encoder_states_is_refused(xglm):
    model = eqx_models.from_pretrained(xglm[1])
    with pytest.raises(eqx_models.InputError, match="without encoder_hidden_states"):
        model(jnp.arange(4), encoder_attention_mask=jnp.ones(3, bool))


def test_float32_encoder_states_feed_a_bfloat16_decoder(xglm):
    """Encoder states are cast to the decoder's dtype (a float32 encoder, a bfloat16 decoder)."""
    folder = xglm[1]
    b = batch(9)
    half = eqx_models.from_pretrained(folder, dtype="bfloat16")
    assert jax.eval_shape(half.cross_kv, jnp.asarray(b["encoder"][0])).keys.dtype == jnp.bfloat16
    ours, full = ours_run(half, b), ours_run(eqx_models.from_pretrained(folder), b)
    assert ours.dtype == np.float32
    valid = b["mask"].astype(bool)
    assert np.abs(ours - full)[valid].max() < 0.05 * np.abs(full)[valid].max()  # bfloat16 rounding only
