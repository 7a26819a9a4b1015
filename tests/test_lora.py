"""LoRA (`eqx_models.lora`) against HF PEFT: adapters written by `peft` load here with PEFT's
logits, merged or not; ours load in `peft`; LoRA training moves the adapters alone; the
`eqx-models train --lora-rank` run writes a PEFT adapter and resumes exactly."""

import copy
import dataclasses
import json
import math
import operator
import shutil
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from hub_server import HubServer, use_hub
from lora_cases import CASES, LoraCase, float64_logits, hf_logits, load_base, our_logits, peft_adapter, tolerance
from oracle import assert_same_tree, max_diff_valid
from safetensors.numpy import load_file, save_file

from eqx_models import CheckpointError, ConfigError, InputError, from_pretrained, lora, quantize
from eqx_models.cli import EXIT_BAD_INPUT, main
from eqx_models.models import GPTNeoConfig, GPTNeoForCausalLM
from eqx_models.train import TrainConfig
from eqx_models.training import adamw, head_loss, init_state, make_train_step


@dataclasses.dataclass
class Made:
    case: LoraCase
    folder: Path
    fresh: torch.nn.Module  # the HF base without adapters
    batch: dict
    expected: np.ndarray  # PEFT's logits
    truth: np.ndarray | None  # PEFT's logits in float64 (`float64_logits`), where HF's code runs in float64


@pytest.fixture(scope="module", params=list(CASES))
def made(request, tmp_path_factory) -> Made:
    """Each family's base and random PEFT adapter, saved once for the tests below."""
    case = CASES[request.param]
    folder = tmp_path_factory.mktemp(case.id)
    adapted, fresh = peft_adapter(case, folder)
    batch = case.batch(np.random.default_rng(0))
    return Made(case, folder, fresh, batch, hf_logits(adapted, batch), float64_logits(adapted, batch))


@pytest.mark.slow
def test_peft_adapters_load_and_give_peft_logits_merged_or_not(made):
    case, batch, expected = made.case, made.batch, made.expected
    base = load_base(made.folder)
    model = lora.load_adapter(base, made.folder / "adapter")
    mask = case.mask(batch, expected)
    # against PEFT's float64 logits where they exist; PEFT's float32 ones are printed beside them
    reference = expected if made.truth is None else made.truth
    diff = max_diff_valid(our_logits(case, model, batch), reference, mask)
    float32_diff = max_diff_valid(our_logits(case, model, batch), expected, mask)
    merged = lora.merge_lora(model)
    merged_diff = max_diff_valid(our_logits(case, merged, batch), our_logits(case, model, batch), mask)
    moved = max_diff_valid(our_logits(case, base, batch), expected, mask)
    print(
        f"{case.id}: |ours - peft {'float32' if made.truth is None else 'float64'}| {diff:.2e} "
        f"(float32 peft: {float32_diff:.2e}), "
        f"|merged - unmerged| {merged_diff:.2e}, "
        f"bound {tolerance(expected):.2e} (the adapters move the logits by {moved:.2f})"
    )
    assert diff < tolerance(expected) and merged_diff < tolerance(expected)
    assert moved > 100 * tolerance(expected)  # the adapters matter: the test can fail
    assert not lora.lora_layers(merged) and type(merged) is type(base)


def test_our_saved_adapters_load_in_peft_with_the_same_logits(made, tmp_path):
    case, batch, expected = made.case, made.batch, made.expected
    model = lora.load_adapter(load_base(made.folder), made.folder / "adapter")
    lora.save_adapter(model, tmp_path / "ours", base_model_name_or_path=str(made.folder / "base"))
    assert load_file(tmp_path / "ours" / "adapter_model.safetensors").keys() == (
        load_file(made.folder / "adapter" / "adapter_model.safetensors").keys()
    )
    theirs = json.loads((made.folder / "adapter" / "adapter_config.json").read_text())
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for name in ("peft_type", "r", "lora_alpha", "use_rslora", "lora_dropout", "bias", "fan_in_fan_out"):
        assert ours[name] == theirs[name], name
    targets = theirs["target_modules"]
    assert (
        (ours["target_modules"] == targets)
        if isinstance(targets, str)
        else (set(ours["target_modules"]) == set(targets))
    )
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(made.fresh), tmp_path / "ours").eval()
    diff = max_diff_valid(hf_logits(reloaded, batch), expected, case.mask(batch, expected))
    print(f"{case.id}: |peft(our adapter) - peft(its own)| {diff:.2e}")
    assert diff < tolerance(expected)


# --------------------------------------------------------------------------- building


def tiny_neo(key, dtype=jnp.float32, hidden=64) -> GPTNeoForCausalLM:
    config = GPTNeoConfig(
        vocab_size=64,
        hidden_size=hidden,
        num_layers=2,
        attention_types=((("global", "local"), 1),),
        num_heads=4,
        max_position_embeddings=32,
        window_size=8,
    )
    return GPTNeoForCausalLM(config, dtype=dtype, key=key)


@pytest.mark.slow
def test_add_lora_starts_where_the_model_was_with_peft_init_stacked_over_layers(getkey):
    base = tiny_neo(getkey())
    model = lora.add_lora(base, rank=4, alpha=8, target_modules=["q_proj", "c_fc"], key=getkey())
    layers = dict(lora.lora_layers(model))
    assert sorted(layers) == ["transformer.h.layers.attn.q_proj", "transformer.h.layers.mlp.c_fc"]
    fc = layers["transformer.h.layers.mlp.c_fc"]
    assert fc.lora_A.shape == (2, 4, 64) and fc.lora_B.shape == (2, 256, 4) and fc.scale == 2.0
    assert not np.asarray(fc.lora_B).any()  # B starts at zero...
    a = np.asarray(fc.lora_A)
    assert 0.9 / 8 < np.abs(a).max() <= 1 / 8 and a.std() > 0.05  # ...A kaiming-uniform, bound 1/sqrt(d_in)
    ids = jnp.arange(12, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(forward(model, ids)), np.asarray(forward(base, ids)))
    targets = r"transformer\.h\.\d+\.attn\.attention\.q_proj|.*c_fc"  # one expression, as PEFT takes it
    rs = lora.add_lora(base, rank=4, alpha=8, target_modules=targets, use_rslora=True, key=getkey())
    assert [layer.scale for _, layer in lora.lora_layers(rs)] == [4.0, 4.0]


@pytest.mark.parametrize(
    "options, match",
    [
        ({"target_modules": ["q_proj", "query"]}, "target.*'query' match no linear layer.*c_fc, c_proj"),
        ({"target_modules": ["wte"]}, "selects transformer.wte, an embedding"),
        ({"target_modules": r"transformer\.h\.0\.attn\.attention\.q_proj"}, "in some layers only"),
        ({"target_modules": []}, "target_modules must be module names"),
        ({"rank": 0}, "rank must be a positive integer, got 0"),
        ({"alpha": -1.0}, "alpha must be a positive number"),
        ({"dropout": 1.0}, r"dropout must be a probability in \[0, 1\)"),
    ],
)
def test_bad_lora_settings_are_named(getkey, options, match):
    settings = {"rank": 4, "alpha": 8, "target_modules": ["q_proj"], "key": getkey(), **options}
    with pytest.raises(ConfigError, match=match):
        lora.add_lora(tiny_neo(getkey()), **settings)


@pytest.mark.slow
def test_adapters_do_not_stack_on_adapters(getkey):
    model = lora.add_lora(tiny_neo(getkey()), rank=2, alpha=2, target_modules=["q_proj"], key=getkey())
    with pytest.raises(ConfigError, match="needs a model without LoRA adapters"):
        lora.add_lora(model, rank=2, alpha=2, target_modules=["v_proj"], key=getkey())


@eqx.filter_jit
def forward(model, ids):
    return model(ids)


@pytest.mark.slow
def test_adapter_dropout_applies_only_in_training(getkey):
    model = lora.add_lora(tiny_neo(getkey()), rank=4, alpha=8, target_modules=["q_proj"], dropout=0.5, key=getkey())
    model = eqx.tree_at(lambda m: m.transformer.h.layers.attn.q_proj.lora_B, model, jnp.full((2, 64, 4), 0.1))
    ids = jnp.arange(12, dtype=jnp.int32)
    training = eqx.nn.inference_mode(model, value=False)
    keyed = lora.with_dropout_keys(training, getkey())
    ((_, layer),) = lora.lora_layers(keyed)
    assert layer.dropout_key.shape == (2,)  # one key per layer of the stack
    assert np.abs(np.asarray(forward(keyed, ids)) - np.asarray(forward(model, ids))).max() > 1e-3
    unkeyed = lora.with_dropout_keys(keyed, None)
    assert lora.lora_layers(unkeyed)[0][1].dropout_key is None
    np.testing.assert_array_equal(np.asarray(forward(unkeyed, ids)), np.asarray(forward(model, ids)))
    inference = lora.with_dropout_keys(eqx.nn.inference_mode(model), getkey())  # keys, but no dropout
    np.testing.assert_array_equal(np.asarray(forward(inference, ids)), np.asarray(forward(model, ids)))
    # New adapters follow the model's mode (from_pretrained returns models in inference mode).
    again = lora.add_lora(
        eqx.nn.inference_mode(tiny_neo(getkey())), rank=2, alpha=2, target_modules=["c_fc"], key=getkey()
    )
    assert lora.lora_layers(again)[0][1].dropout.inference


# --------------------------------------------------------------------------- training


def bytes_of(tree) -> int:
    """The bytes of the arrays (or abstract arrays) of `tree`."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


@pytest.mark.slow
@pytest.mark.parametrize("base_kind", ["float32", "bfloat16", "int8"])
def test_lora_training_lowers_the_loss_and_leaves_the_base_bit_identical(getkey, base_kind):
    """LoRA over a float32, bfloat16 or int8 base (QLoRA-style: the int8 weights stay int8)."""
    base = tiny_neo(getkey(), jnp.bfloat16 if base_kind == "bfloat16" else jnp.float32)
    if base_kind == "int8":
        base = quantize(base, "int8")
    model = lora.add_lora(base, rank=4, alpha=8, target_modules=["q_proj", "v_proj"], dropout=0.1, key=getkey())
    spec = lora.adapter_filter(model)
    optimizer = adamw(3e-2, eqx.filter(model, spec), weight_decay=0.01, clip_norm=1.0)
    state = init_state(model, optimizer, key=getkey(), trainable=lora.adapter_filter)
    step = make_train_step(optimizer, trainable=lora.adapter_filter, loss_fn=lora.with_adapter_dropout(head_loss))
    ids = jax.random.randint(getkey(), (4, 16), 0, 64)
    batch = {"input_ids": ids, "labels": ids}
    losses = []
    for _ in range(10):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    print(f"{base_kind} base: LoRA losses {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < losses[0] - 0.05
    frozen = jax.tree.map(operator.not_, spec)
    assert_same_tree(eqx.filter(state.model, frozen), eqx.filter(model, frozen))
    (_, trained), *_ = lora.lora_layers(state.model)
    assert trained.lora_A.dtype == jnp.float32 and np.asarray(trained.lora_B).any()


def test_lora_gradient_and_optimizer_memory_is_a_small_fraction_of_full_fine_tuning(getkey):
    """Trainable parameters (their gradients have the same bytes) plus AdamW's state, LoRA
    against full fine-tuning, measured on the abstract shapes of GPT-Neo-125M (nothing is
    allocated) and on a tiny model's real arrays."""
    gpt_neo_125m = GPTNeoConfig(
        vocab_size=50257, hidden_size=768, num_layers=12, attention_types=((("global", "local"), 6),), num_heads=12
    )

    def measure(make):
        def trained_parts(key):
            base = make(key)
            model = lora.add_lora(base, rank=8, alpha=16, target_modules=["q_proj", "v_proj"], key=key)
            adapters = eqx.filter(model, lora.adapter_filter(model))
            full = eqx.filter(base, eqx.is_inexact_array)
            with jax.numpy_dtype_promotion("standard"):
                return adapters, adamw(1e-3, adapters).init(adapters), full, adamw(1e-3, full).init(full)

        adapters, lora_state, full, full_state = eqx.filter_eval_shape(trained_parts, getkey())
        return 2 * bytes_of(adapters) + bytes_of(lora_state), 2 * bytes_of(full) + bytes_of(full_state)

    for name, make in (
        ("GPT-Neo-125M", lambda key: GPTNeoForCausalLM(gpt_neo_125m, key=key)),
        ("tiny", lambda key: tiny_neo(key)),
    ):
        lora_bytes, full_bytes = measure(make)
        print(
            f"{name}: gradients + AdamW state {lora_bytes / 2**20:.2f} MiB with LoRA r=8 on q_proj,v_proj, "
            f"{full_bytes / 2**20:.1f} MiB full: {lora_bytes / full_bytes:.3%}"
        )
        assert lora_bytes / full_bytes < (0.005 if name == "GPT-Neo-125M" else 0.05)


# --------------------------------------------------------------------------- loading errors


@pytest.fixture
def saved(getkey, tmp_path):
    base = tiny_neo(getkey(), hidden=32)
    model = lora.add_lora(base, rank=2, alpha=4, target_modules=["q_proj", "c_fc"], key=getkey())
    lora.save_adapter(model, tmp_path / "adapter", task_type="CAUSAL_LM")
    return base, tmp_path / "adapter"


def rewrite(folder: Path, change_tensors=None, change_config=None) -> None:
    weights = folder / "adapter_model.safetensors"
    if change_tensors is not None:
        tensors = load_file(weights)
        change_tensors(tensors)
        save_file(tensors, weights, metadata={"format": "pt"})
    if change_config is not None:
        config = json.loads((folder / "adapter_config.json").read_text())
        change_config(config)
        (folder / "adapter_config.json").write_text(json.dumps(config))


KEY = "base_model.model.transformer.h.{}.attn.attention.q_proj.lora_{}.weight"


@pytest.mark.parametrize(
    "tensors, config, match",
    [
        (
            lambda t: t.update({KEY.format(0, "A").replace("q_proj", "x_proj"): t[KEY.format(0, "A")]}),
            None,
            "1 key.* does not have:.*h.0.attn.attention.x_proj.lora_A.weight",
        ),
        (
            lambda t: t.update({KEY.format(0, "A").replace("q_proj", "k_proj"): t[KEY.format(0, "A")]}),
            None,
            r"missing 3 key\(s\): .*h.0.attn.attention.k_proj.lora_B.weight",
        ),
        (lambda t: t.pop(KEY.format(1, "B")), None, r"missing 1 key\(s\): .*h.1.attn.attention.q_proj.lora_B.weight"),
        (
            lambda t: t.update({KEY.format(1, "A"): np.zeros((3, 32), np.float32)}),
            None,
            r"shape mismatch for .*h.1.*q_proj.lora_A.weight: adapter has \(3, 32\), model expects \(2, 32\)",
        ),
        (
            lambda t: t.update({"base_model.model.lm_head.weight": np.zeros((2, 2), np.float32)}),
            None,
            "lm_head.weight is not a LoRA matrix",
        ),
        (
            lambda t: t.update({"base_model.model.transformer.wte.lora_A.weight": t[KEY.format(0, "A")]}),
            None,
            "transformer.wte, an embedding; only linear adapters load here",
        ),
        (None, lambda c: c.update(use_dora=True), "sets use_dora=True, which eqx_models' LoRA does not support"),
        (None, lambda c: c.update(peft_type="IA3"), "is a 'IA3' adapter; only LORA adapters load here"),
        (None, lambda c: c.update(modules_to_save=["classifier"]), "sets modules_to_save"),
        (
            None,
            lambda c: c.update(alpha_pattern={r"h\.0\.attn\.attention\.q_proj": 2}),
            "different values across layers",
        ),
    ],
)
def test_bad_adapter_folders_fail_with_one_line(saved, tensors, config, match):
    base, folder = saved
    rewrite(folder, tensors, config)
    with pytest.raises(CheckpointError, match=match) as raised:
        lora.load_adapter(base, folder)
    assert "\n" not in str(raised.value)


def test_an_adapter_loads_from_a_hub_id_and_patterns_round_trip(saved, monkeypatch, tmp_path):
    base, folder = saved
    rewrite(folder, change_config=lambda c: c.update(alpha_pattern={r"h\.\d+\.mlp\.c_fc": 3}))
    server = HubServer()
    server.add("tiny/neo-lora", folder)
    server.start()
    try:
        use_hub(monkeypatch, server, tmp_path / "hf")
        model = lora.load_adapter(base, "tiny/neo-lora")
    finally:
        server.stop()
    assert sorted(layer.alpha for _, layer in lora.lora_layers(model)) == [3.0, 4.0]
    assert_same_tree(model, lora.load_adapter(base, folder))
    lora.save_adapter(model, tmp_path / "again")
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert config["alpha_pattern"] in (
        {r"transformer\.h\.\d+\.mlp\.c_fc": 3},
        {r"transformer\.h\.\d+\.attn\.attention\.q_proj": 4},
    )
    assert_same_tree(lora.load_adapter(base, tmp_path / "again"), model)


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A tiny HF GPT-Neo whose vocabulary holds the byte tokenizer's 258 ids."""
    folder = tmp_path_factory.mktemp("base")
    config = transformers.GPTNeoConfig(
        vocab_size=260,
        hidden_size=32,
        num_layers=2,
        attention_types=[[["global", "local"], 1]],
        num_heads=4,
        max_position_embeddings=64,
        window_size=8,
        bos_token_id=256,
        eos_token_id=256,
    )
    torch.manual_seed(0)
    transformers.GPTNeoForCausalLM(config).save_pretrained(folder)
    return folder


def lora_flags(base, output, *extra):
    data = Path(lora.__file__).parent / "nn"  # a few small Python files
    return [
        "train",
        "--no-progress",
        "--init-from",
        str(base),
        "--data",
        str(data),
        "--tokenizer",
        "bytes",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--steps",
        "4",
        "--warmup-steps",
        "1",
        "--learning-rate",
        "1e-2",
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
        "--checkpoint-every",
        "2",
        "--output",
        str(output),
        "--sample-prompt",
        "",
        "--lora-rank",
        "4",
        "--lora-targets",
        "q_proj,v_proj,c_fc",
        "--lora-dropout",
        "0.1",
        *extra,
    ]


def losses(output):
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.slow
def test_train_with_lora_writes_a_peft_adapter_and_resumes_exactly(hf_base, tmp_path, capsys):
    output = tmp_path / "run"
    assert main(lora_flags(hf_base, output, "--lora-merge")) == 0
    assert "of the parameters train" in capsys.readouterr().out
    summary = json.loads((output / "summary.json").read_text())
    assert summary["trainable_parameters"] < summary["parameters"] / 10
    config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["task_type"], config["base_model_name_or_path"]) == (4, "CAUSAL_LM", str(hf_base))

    ours = lora.load_adapter(from_pretrained(hf_base), output / "adapter")
    theirs = peft.PeftModel.from_pretrained(transformers.GPTNeoForCausalLM.from_pretrained(hf_base), output / "adapter")
    ids = np.arange(3, 30)[None]
    expected = hf_logits(theirs.eval(), {"input_ids": ids})
    assert np.abs(np.asarray(ours(jnp.asarray(ids[0]))) - expected[0]).max() < tolerance(expected)
    merged = from_pretrained(output / "model")
    assert np.abs(np.asarray(merged(jnp.asarray(ids[0]))) - expected[0]).max() < tolerance(expected)

    resumed = tmp_path / "resumed"
    shutil.copytree(output, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    assert main([*lora_flags(hf_base, resumed, "--lora-merge"), "--resume"]) == 0
    assert losses(resumed) == losses(output)
    assert_same_tree(
        load_file(resumed / "adapter" / "adapter_model.safetensors"),
        load_file(output / "adapter" / "adapter_model.safetensors"),
    )


@pytest.mark.slow
def test_train_with_lora_over_an_int8_base_merges_into_the_weights_it_stands_for(hf_base, tmp_path):
    """`--lora-quantize int8`: the base trains int8 (QLoRA-style); the adapters, loaded over
    the same int8 base, give the logits of the merged model written to OUTPUT/model (the
    dequantised base plus the adapters), which differ from merging into the float base."""
    output = tmp_path / "run"
    assert main(lora_flags(hf_base, output, "--lora-merge", "--lora-quantize", "int8")) == 0
    assert json.loads((output / "train_config.json").read_text())["lora_quantize"] == "int8"
    trained = lora.load_adapter(from_pretrained(hf_base, quantize="int8"), output / "adapter")
    merged = from_pretrained(output / "model")
    ids = jnp.asarray(np.arange(3, 30))
    expected = np.asarray(trained(ids))
    assert np.abs(np.asarray(merged(ids)) - expected).max() < tolerance(expected)
    over_float = np.asarray(lora.merge_lora(lora.load_adapter(from_pretrained(hf_base), output / "adapter"))(ids))
    assert np.abs(over_float - expected).max() > tolerance(expected)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"lora_rank": 4}, "give init_from with lora_rank"),
        ({"lora_rank": 4, "init_from": "x"}, "lora_targets names the layers LoRA adapts"),
        ({"lora_targets": "q_proj", "init_from": "x"}, "lora_targets names the layers LoRA adapts"),
        ({"lora_rank": 4, "init_from": "x", "lora_targets": "q_proj,,v_proj"}, "comma-separated module names"),
        ({"lora_merge": True}, "lora_merge applies to LoRA runs"),
        ({"lora_rank": 4, "init_from": "x", "lora_targets": "q", "lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_quantize": "int8"}, "lora_quantize stores a LoRA run's frozen base quantised; give lora_rank too"),
        ({"lora_rank": 4, "init_from": "x", "lora_targets": "q", "lora_quantize": "int4"}, "lora_quantize"),
    ],
)
def test_bad_lora_run_settings_fail_clearly(changes, match):
    with pytest.raises(InputError, match=match):
        TrainConfig(**changes)


def test_a_lora_target_the_model_lacks_fails_before_training(hf_base, tmp_path, capsys):
    flags = lora_flags(hf_base, tmp_path / "run")
    flags[flags.index("q_proj,v_proj,c_fc")] = "q_proj,query"
    assert main(flags) == EXIT_BAD_INPUT
    assert "'query' match no linear layer of GPTNeoForCausalLM" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()
