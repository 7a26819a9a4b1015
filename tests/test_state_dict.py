"""In-memory parameter dicts (issue 15): `from_state_dict` / `to_state_dict` against
transformers 4.57.6, for every registered class, in PyTorch's layout and (where HF has the
class) in HF Flax's; and `tree_from_flax` / `tree_to_flax` under `jax.grad` and `jax.jit`.

The reference tree of each class is the one `from_pretrained` loads from the folder HF's
PyTorch class saved, which the family tests already hold to HF's logits."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.core import FrozenDict
from flax.traverse_util import flatten_dict
from oracle import assert_same_tree
from state_cases import CLASSES, FLAX_CLASSES, flax_twin, hf_config, legacy_clip, torch_model

import eqx_models
from eqx_models import CheckpointError, ConfigError
from eqx_models.checkpoint import tree_from_flax, tree_to_flax
from eqx_models.checkpoint.keymap import NonFiniteWeightsWarning, array_leaves


def _torch(state: dict) -> dict:
    return {name: torch.from_numpy(np.array(value)) for name, value in state.items()}


@pytest.fixture
def neo(tmp_path):
    """A random tiny GPT-Neo LM with an untied head, its folder and the tree loaded from it."""
    reference = torch_model("GPTNeoForCausalLM", tie_word_embeddings=False)
    reference.save_pretrained(tmp_path / "neo")
    return reference, eqx_models.from_pretrained(tmp_path / "neo")


@pytest.mark.slow
@pytest.mark.parametrize("name", CLASSES)
def test_torch_state_dict_loads_as_the_folder_does_and_goes_back(name, tmp_path):
    reference = torch_model(name)
    reference.save_pretrained(tmp_path)
    expected = eqx_models.from_pretrained(tmp_path)
    assert type(expected).__name__ == name
    state = reference.state_dict()
    # the config as transformers' object, as the folder's config.json and as ours
    assert_same_tree(eqx_models.from_state_dict(state, reference.config), expected)
    config_json = json.loads((tmp_path / "config.json").read_text())
    assert_same_tree(eqx_models.from_state_dict(state, config_json), expected)
    assert_same_tree(eqx_models.from_state_dict(state, expected.config, architecture=name), expected)
    # numpy values, and back into a fresh HF model with strict=True: the very same tensors
    exported = eqx_models.to_state_dict(expected)
    assert all(isinstance(v, np.ndarray) for v in exported.values())
    fresh = torch_model(name, seed=1)
    fresh.load_state_dict(_torch(exported), strict=True)
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.slow  # HF's Flax classes compile their random init first: several seconds each
@pytest.mark.parametrize("name", FLAX_CLASSES)
def test_flax_params_load_as_the_folder_does_and_go_back_exactly(name, tmp_path, monkeypatch):
    """HF's Flax class built from the PyTorch folder by transformers' own conversion. HF's
    Flax T5 and LongT5 pass `jnp.clip` the `a_max` keyword current JAX removed: the test
    process restores it (`legacy_clip`) so they run."""
    monkeypatch.setattr(jnp, "clip", legacy_clip)
    reference = torch_model(name)
    reference.save_pretrained(tmp_path)
    expected = eqx_models.from_pretrained(tmp_path)
    flax_model = flax_twin(name, tmp_path)
    fresh = type(expected).key_map(expected.config).not_in_flax  # BigBird's unused pooler: a new init
    for params in (flax_model.params, {"params": FrozenDict(flax_model.params)}):
        ours = eqx_models.from_state_dict(params, flax_model.config)
        kept = {p: v for p, v in array_leaves(expected) if not p.startswith(fresh or ("\0",))}
        got = dict(array_leaves(ours))
        assert got.keys() == dict(array_leaves(expected)).keys()
        for path, value in kept.items():
            assert got[path].dtype == value.dtype, path
            np.testing.assert_array_equal(got[path], value, err_msg=path)
    exported = flatten_dict(eqx_models.to_state_dict(expected, layout="flax"), sep="/")
    theirs = flatten_dict(flax_model.params, sep="/")
    assert exported.keys() == theirs.keys()
    for path, value in theirs.items():
        assert (exported[path].shape, exported[path].dtype) == (value.shape, value.dtype), path
        np.testing.assert_array_equal(exported[path], value, err_msg=path)


@pytest.mark.parametrize("name", ["GPTNeoForCausalLM", "T5ForConditionalGeneration", "BigBirdForMaskedLM"])
def test_flax_layout_round_trips_through_our_tree(name, tmp_path):
    """The fast tier's Flax check (without HF's Flax classes): our Flax layout loads back
    into the same tree, and a base model's Flax params load into its head."""
    model = eqx_models.from_state_dict(torch_model(name).state_dict(), hf_config(name), architecture=name)
    params = eqx_models.to_state_dict(model, layout="flax")
    key_map = type(model).key_map(model.config)
    assert_same_tree(tree_from_flax(model, params, key_map), model)
    loaded = eqx_models.from_state_dict(params, model.config, architecture=name)
    skip = key_map.not_in_flax or ("\0",)
    for (path, a), (_, b) in zip(array_leaves(loaded), array_leaves(model)):
        if not path.startswith(skip):
            np.testing.assert_array_equal(a, b, err_msg=path)


@pytest.mark.parametrize("name", ["GemmaForCausalLM"])
def test_tree_from_flax_differentiates_and_compiles(name):
    """The mapping alone, cheaply: for a loss weighing every parameter of the tree, the
    gradient with respect to Flax-layout params (jit-compiled through `tree_from_flax`) is
    the tree's gradient mapped by `tree_to_flax`: layers unstacked, kernels transposed."""
    model = eqx_models.from_state_dict(torch_model(name).state_dict(), hf_config(name), architecture=name)
    key_map = type(model).key_map(model.config)

    def loss(tree):
        leaves = [leaf for _, leaf in array_leaves(tree)]
        return sum(jnp.sum(jnp.sin(leaf * (i + 1))) for i, leaf in enumerate(leaves))

    params = tree_to_flax(model, key_map)
    via_params = jax.jit(jax.grad(lambda p: loss(tree_from_flax(model, p, key_map))))(params)
    via_tree = tree_to_flax(eqx.filter_jit(eqx.filter_grad(loss))(model), key_map)
    a, b = flatten_dict(via_params, sep="/"), flatten_dict(via_tree, sep="/")
    assert a.keys() == b.keys() == flatten_dict(params, sep="/").keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)


@pytest.mark.slow  # two compilations of a model's backward pass: about 15 s
def test_grad_through_tree_from_flax_is_the_trees_gradient_in_flax_layout():
    """What `eqx_models.compat` builds on: a loss of HF-Flax-layout params, through
    `tree_from_flax`, differentiates and compiles; its gradient is our tree's gradient
    mapped by `tree_to_flax`."""
    name = "GPTNeoForCausalLM"
    model = eqx_models.from_state_dict(torch_model(name).state_dict(), hf_config(name), architecture=name)
    key_map = type(model).key_map(model.config)
    ids = jnp.arange(9) % model.config.vocab_size

    def loss(tree):
        return jnp.mean(jax.nn.log_softmax(tree(ids))[:, 3])

    params = eqx.filter_jit(tree_to_flax)(model, key_map)
    via_params = jax.jit(jax.grad(lambda p: loss(tree_from_flax(model, p, key_map))))(params)
    via_tree = tree_to_flax(eqx.filter_jit(eqx.filter_grad(loss))(model), key_map)
    a, b = flatten_dict(via_params, sep="/"), flatten_dict(via_tree, sep="/")
    assert a.keys() == b.keys() == flatten_dict(params, sep="/").keys()
    scale = max(float(np.abs(b[path]).max()) for path in b)
    worst = max(float(np.abs(a[path] - b[path]).max()) for path in a)
    print(f"max |gradient difference| {worst:.2e} (largest gradient {scale:.2e})")
    assert scale > 0 and worst <= 1e-6 * scale


@pytest.mark.slow
def test_architecture_is_inferred_from_the_state_when_the_config_names_none():
    cases = {
        "GPTNeoModel": "GPTNeoModel",
        "GPTNeoForCausalLM": "GPTNeoForCausalLM",
        "BigBirdForSequenceClassification": "BigBirdForSequenceClassification",
        "BigBirdForTokenClassification": "BigBirdForTokenClassification",
        "BigBirdForMultipleChoice": "BigBirdForMultipleChoice",
        # the same parameters as the base model or the MLM head: the text head is chosen
        "T5ForConditionalGeneration": "T5ForConditionalGeneration",
        "BigBirdForMaskedLM": "BigBirdForCausalLM",
    }
    for source, built in cases.items():
        config = hf_config(source)
        assert not config.architectures
        model = eqx_models.from_state_dict(torch_model(source).state_dict(), config)
        assert type(model).__name__ == built, source


def test_base_state_loads_into_its_head_and_head_state_into_its_base(neo):
    reference, expected = neo
    state = reference.state_dict()
    base = eqx_models.from_state_dict(state, reference.config, architecture="GPTNeoModel")
    assert_same_tree(base, expected.transformer)
    for layout in ("pytorch", "flax"):
        head = eqx_models.from_state_dict(
            eqx_models.to_state_dict(base, layout=layout), reference.config, architecture="GPTNeoForCausalLM"
        )
        assert_same_tree(head.transformer, expected.transformer)
        assert head.lm_head is not None and np.isfinite(np.asarray(head.lm_head.weight)).all()  # freshly initialised


def test_torch_bfloat16_state_and_back(neo):
    reference, _ = neo
    half = reference.to(torch.bfloat16)
    model = eqx_models.from_state_dict(half.state_dict(), reference.config, dtype="bfloat16")
    exported = eqx_models.to_state_dict(model)
    back = {k: torch.from_numpy(v.view(np.int16).copy()).view(torch.bfloat16) for k, v in exported.items()}
    for key, value in half.state_dict().items():
        assert torch.equal(back[key], value), key


def test_bad_states_and_configs_fail_in_one_line(neo):
    reference, model = neo
    config = reference.config
    state = {k: v.numpy() for k, v in reference.state_dict().items()}

    def fails(error, match, state=state, config=config, **kwargs):
        with pytest.raises(error, match=match) as info:
            eqx_models.from_state_dict(state, config, **kwargs)
        assert "\n" not in str(info.value)

    fails(CheckpointError, "state is empty", state={})
    fails(CheckpointError, "state entry w is a str, not an array: the state is neither", state={"w": "text"})
    fails(CheckpointError, "state entry a.b is a int, not an array", state={"a": {"b": 3}})
    fails(ConfigError, "unknown model_type 'bert'", config={"model_type": "bert"})
    fails(ConfigError, "config must be a transformers config", config=42)
    fails(ConfigError, "architecture 'T5Model' is not supported for model_type 'gpt_neo'", architecture="T5Model")
    missing = {k: v for k, v in state.items() if k != "transformer.h.1.mlp.c_fc.weight"}
    fails(CheckpointError, r"missing 1 key\(s\): transformer.h.1.mlp.c_fc.weight", state=missing)
    fails(
        CheckpointError,
        r"1 unexpected key\(s\) for this model: transformer.extra",
        state={**state, "transformer.extra": state["transformer.wte.weight"]},
    )
    wrong = {**state, "transformer.ln_f.bias": np.zeros(5, np.float32)}
    fails(
        CheckpointError,
        r"shape mismatch for transformer.ln_f.bias: checkpoint has \(5,\), model expects \(32,\)",
        state=wrong,
    )
    poisoned = {**state, "transformer.wpe.weight": np.full_like(state["transformer.wpe.weight"], np.nan)}
    with pytest.warns(NonFiniteWeightsWarning, match="transformer.wpe.weight"):
        eqx_models.from_state_dict(poisoned, config)
    fails(CheckpointError, r"hold NaN or Inf: transformer.wpe.weight \(strict", state=poisoned, strict=True)
    params = eqx_models.to_state_dict(model, layout="flax")
    del params["transformer"]["ln_f"]["scale"]
    fails(CheckpointError, r"missing 1 key\(s\): transformer.ln_f.weight", state=params)


def test_tree_from_flax_is_strict_by_structure(neo):
    _, model = neo
    key_map = type(model).key_map(model.config)
    params = tree_to_flax(model, key_map)
    flat = flatten_dict(params, sep="/")

    def fails(match, changed):
        from flax.traverse_util import unflatten_dict

        with pytest.raises(CheckpointError, match=match):
            tree_from_flax(model, unflatten_dict(changed, sep="/"), key_map)

    fails(
        r"missing transformer/h/1/mlp/c_fc/kernel \(parameter transformer.h.layers.mlp.c_fc.weight\)",
        {k: v for k, v in flat.items() if k != "transformer/h/1/mlp/c_fc/kernel"},
    )
    fails(
        r"1 unexpected entr\(ies\) for this model: transformer/h/2/ln_1/scale",
        {**flat, "transformer/h/2/ln_1/scale": flat["transformer/h/1/ln_1/scale"]},
    )
    kernel = flat["lm_head/kernel"]
    fails(
        r"shape mismatch for lm_head/kernel: Flax params have \(97, 32\), model expects \(32, 97\)",
        {**flat, "lm_head/kernel": kernel.T},
    )
    # BigBird's masked-LM head in Flax has no pooler: a model keeps its own, a skeleton has none
    name = "BigBirdForMaskedLM"
    bird = eqx_models.from_state_dict(torch_model(name).state_dict(), hf_config(name), architecture=name)
    bird_map = type(bird).key_map(bird.config)
    bird_params = tree_to_flax(bird, bird_map)
    assert "pooler" not in bird_params["bert"]
    assert_same_tree(tree_from_flax(bird, bird_params, bird_map), bird)
    skeleton = eqx.filter_eval_shape(type(bird), bird.config, key=jax.random.key(0))
    with pytest.raises(CheckpointError, match="do not hold the parameter bert.pooler.weight: pass a model"):
        tree_from_flax(skeleton, bird_params, bird_map)
