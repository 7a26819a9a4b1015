"""Every checkpoint format gives the same tree; export and our own folders round-trip;
bad checkpoints fail with errors that name the problem; nothing is half-written."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from oracle import assert_same_tree, randomise

import eqx_models
from eqx_models import nn
from eqx_models.checkpoint.keymap import array_leaves
from eqx_models.cli import EXIT_BAD_INPUT
from eqx_models.cli import main as cli

CONFIG = dict(
    vocab_size=61,
    hidden_size=16,
    num_heads=2,
    max_position_embeddings=32,
    window_size=3,
    num_layers=2,
    attention_types=[[["global", "local"], 1]],
)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return randomise(transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(**CONFIG)))


@pytest.fixture(scope="module")
def checkpoints(reference, tmp_path_factory):
    """The same weights in every format HF writes."""
    root = tmp_path_factory.mktemp("formats")
    reference.save_pretrained(root / "safetensors")
    reference.save_pretrained(root / "sharded_safetensors", max_shard_size="10KB")
    reference.save_pretrained(root / "bin", safe_serialization=False)
    reference.save_pretrained(root / "sharded_bin", safe_serialization=False, max_shard_size="10KB")
    with jax.numpy_dtype_promotion("standard"):  # HF's Flax code relies on implicit promotion
        flax_model = transformers.FlaxGPTNeoForCausalLM.from_pretrained(root / "safetensors", from_pt=True)
        flax_model.save_pretrained(root / "msgpack")
        flax_model.save_pretrained(root / "sharded_msgpack", max_shard_size="10KB")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["sharded_safetensors", "bin", "sharded_bin", "msgpack", "sharded_msgpack"])
def test_every_format_gives_the_same_tree(checkpoints, fmt):
    files = {p.name for p in (checkpoints / fmt).iterdir()}
    if fmt.startswith("sharded"):
        assert any(name.endswith(".index.json") for name in files), files
    assert_same_tree(
        eqx_models.from_pretrained(checkpoints / fmt), eqx_models.from_pretrained(checkpoints / "safetensors")
    )


def test_loaded_weights_equal_torch_weights(checkpoints, reference):
    model = eqx_models.from_pretrained(checkpoints / "safetensors")
    state = reference.state_dict()
    np.testing.assert_array_equal(
        model.transformer.h.layers.attn.q_proj.weight[1], state["transformer.h.1.attn.attention.q_proj.weight"].numpy()
    )
    np.testing.assert_array_equal(model.transformer.wte.weight, state["transformer.wte.weight"].numpy())


def test_export_hf_reloads_in_transformers_with_identical_weights(checkpoints, reference, tmp_path):
    model = eqx_models.from_pretrained(checkpoints / "bin")
    eqx_models.export_hf(model, tmp_path / "hf")
    reloaded = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path / "hf")
    ours, theirs = reloaded.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)
    assert_same_tree(eqx_models.from_pretrained(tmp_path / "hf"), model)


def test_own_folder_round_trips_and_keeps_run_options(checkpoints, tmp_path):
    model = eqx_models.from_pretrained(checkpoints / "safetensors", scan_layers=False)
    eqx_models.save_pretrained(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["eqx_models"]["architecture"] == "GPTNeoForCausalLM"
    assert config["eqx_models"]["layout"] == "stacked"
    again = eqx_models.from_pretrained(tmp_path / "ours")
    assert nn.run_options(again).scan_layers is False
    assert again.config == model.config
    assert_same_tree(again, model)


def test_written_folders_get_the_usual_permissions(checkpoints, tmp_path):
    # The atomic write builds in a private temporary folder; the result must not stay private.
    import os

    model = eqx_models.from_pretrained(checkpoints / "safetensors")
    old = os.umask(0o022)
    try:
        eqx_models.export_hf(model, tmp_path / "hf")
    finally:
        os.umask(old)
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o755
    assert {(p.name, p.stat().st_mode & 0o777) for p in (tmp_path / "hf").iterdir()} == {
        (".eqx_models.json", 0o644),  # our marker: `--overwrite` may replace this folder
        ("config.json", 0o644),
        ("model.safetensors", 0o644),
    }


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_casts_on_load_and_survives_our_folder(checkpoints, tmp_path, dtype):
    model = eqx_models.from_pretrained(checkpoints / "safetensors", dtype=dtype)
    assert {leaf.dtype.name for _, leaf in array_leaves(model)} == {dtype}
    logits = model(jax.numpy.arange(5))
    assert logits.dtype == np.float32 and np.isfinite(np.asarray(logits)).all()
    eqx_models.save_pretrained(model, tmp_path / "ours")
    assert_same_tree(eqx_models.from_pretrained(tmp_path / "ours", dtype=dtype), model)


def _broken_copy(checkpoints, tmp_path, edit):
    folder = tmp_path / "broken"
    shutil.copytree(checkpoints / "safetensors", folder)
    from safetensors.numpy import load_file, save_file

    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_missing_key_is_named(checkpoints, tmp_path):
    folder = _broken_copy(checkpoints, tmp_path, lambda s: s.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(eqx_models.CheckpointError, match=r"missing 1 key\(s\): transformer.h.1.mlp.c_fc.bias"):
        eqx_models.from_pretrained(folder)


def test_unexpected_key_is_named(checkpoints, tmp_path):
    folder = _broken_copy(checkpoints, tmp_path, lambda s: s.update({"transformer.h.0.extra": np.zeros(2, np.float32)}))
    with pytest.raises(eqx_models.CheckpointError, match="unexpected key.*transformer.h.0.extra"):
        eqx_models.from_pretrained(folder)


def test_shape_mismatch_names_key_and_both_shapes(checkpoints, tmp_path):
    folder = _broken_copy(
        checkpoints, tmp_path, lambda s: s.update({"transformer.wpe.weight": np.zeros((31, 16), np.float32)})
    )
    with pytest.raises(eqx_models.CheckpointError, match=r"transformer.wpe.weight.*\(31, 16\).*\(32, 16\)"):
        eqx_models.from_pretrained(folder)


def test_unknown_model_type_and_architecture(checkpoints, tmp_path):
    folder = tmp_path / "odd"
    shutil.copytree(checkpoints / "safetensors", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_tree"}))
    with pytest.raises(eqx_models.ConfigError, match="unknown model_type 'gpt_tree'"):
        eqx_models.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPTNeoForPoetry"]}))
    with pytest.raises(eqx_models.ConfigError, match="GPTNeoForPoetry"):
        eqx_models.from_pretrained(folder)


def test_unsupported_config_value_is_named(checkpoints, tmp_path):
    folder = tmp_path / "odd"
    shutil.copytree(checkpoints / "safetensors", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "activation_function": "gelu_quadratic"}))
    with pytest.raises(
        eqx_models.ConfigError, match="activation_function must be .*supported activation.*got 'gelu_quadratic'"
    ):
        eqx_models.from_pretrained(folder)


def test_cli_convert_both_ways(checkpoints, tmp_path, capsys):
    assert cli(["convert", str(checkpoints / "msgpack"), str(tmp_path / "eqx"), "--dtype", "bfloat16"]) == 0
    assert cli(["convert", str(tmp_path / "eqx"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    reloaded = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto")
    assert reloaded.transformer.wte.weight.dtype == torch.bfloat16
    assert "converted" in capsys.readouterr().out


def test_cli_convert_failure_leaves_nothing_and_prints_one_line(checkpoints, tmp_path, capsys):
    folder = _broken_copy(checkpoints, tmp_path, lambda s: s.pop("transformer.wte.weight"))
    assert cli(["convert", str(folder), str(tmp_path / "out")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint is missing") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]  # no temporary folder left


def test_cli_convert_failure_keeps_existing_output(checkpoints, tmp_path):
    assert cli(["convert", str(checkpoints / "safetensors"), str(tmp_path / "out")]) == 0
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "config.json").write_text((checkpoints / "safetensors" / "config.json").read_text())
    (tmp_path / "garbage" / "model.safetensors").write_bytes(b"\x00not a safetensors file")
    assert cli(["convert", str(tmp_path / "garbage"), str(tmp_path / "out"), "--overwrite"]) == EXIT_BAD_INPUT
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage", "out"]


def test_cli_errors_on_missing_folder(tmp_path, capsys):
    assert cli(["convert", str(tmp_path / "nope"), str(tmp_path / "out")]) == EXIT_BAD_INPUT
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_verify_reports_difference(checkpoints, capsys):
    assert cli(["verify", str(checkpoints / "safetensors")]) == 0
    out = capsys.readouterr().out
    diff = float(out.split(":")[-1])
    assert diff < 1e-4


@pytest.mark.slow
def test_cli_generate_prints_byte_level_text(tmp_path, capsys):
    torch.manual_seed(0)
    config = transformers.GPTNeoConfig(**{**CONFIG, "vocab_size": 260, "eos_token_id": 259, "bos_token_id": 259})
    randomise(transformers.GPTNeoForCausalLM(config)).save_pretrained(tmp_path / "bytes")
    assert cli(["generate", str(tmp_path / "bytes"), "--prompt", "def f", "--max-new-tokens", "4"]) == 0
    model = eqx_models.from_pretrained(tmp_path / "bytes")
    new = np.asarray(eqx_models.generate(model, np.array([list(b"def f")]), max_new_tokens=4))[0, 5:]
    out = capsys.readouterr()
    assert out.out == "def f" + bytes(i for i in new.tolist() if i < 256).decode("utf-8", "replace") + "\n"
    assert "new tokens in" in out.err


def test_nonfinite_weights_warn_by_name_and_fail_when_strict(checkpoints, tmp_path):
    """Issue 13: NaN/Inf weights loaded without a word."""
    from eqx_models.checkpoint.keymap import NonFiniteWeightsWarning

    def poison(state):
        state["transformer.h.1.mlp.c_fc.weight"][0, 0] = np.nan
        state["transformer.wpe.weight"][3, 1] = -np.inf

    folder = _broken_copy(checkpoints, tmp_path, poison)
    names = ["transformer.h.1.mlp.c_fc.weight", "transformer.wpe.weight"]
    with pytest.warns(NonFiniteWeightsWarning, match=r"2 tensor\(s\) hold NaN or Inf: ") as caught:
        _, report = eqx_models.load_with_report(folder)
    assert sorted(report.nonfinite) == names and all(name in str(caught[0].message) for name in names)
    with pytest.raises(eqx_models.CheckpointError, match=r"hold NaN or Inf: .*transformer.wpe.weight.*\(strict"):
        eqx_models.from_pretrained(folder, strict=True)
    assert cli(["convert", str(folder), str(tmp_path / "out")]) == 0  # a warning, not an error, by default
    assert cli(["convert", str(folder), str(tmp_path / "strict"), "--strict"]) == EXIT_BAD_INPUT
    assert not (tmp_path / "strict").exists()


def test_finite_weights_load_silently_even_when_strict(checkpoints):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = eqx_models.load_with_report(checkpoints / "safetensors", strict=True)
    assert report.nonfinite == []


def test_overflow_on_the_cast_is_reported(checkpoints, tmp_path):
    """The check runs on the loaded values, after the cast to the model's dtype: 1e6 is finite in
    float32 and inf in float16."""
    folder = _broken_copy(checkpoints, tmp_path, lambda s: s["transformer.ln_f.bias"].__setitem__(0, 1e6))
    assert eqx_models.load_with_report(folder)[1].nonfinite == []
    with pytest.raises(eqx_models.CheckpointError, match=r"1 tensor\(s\) hold NaN or Inf: transformer.ln_f.bias"):
        eqx_models.from_pretrained(folder, dtype="float16", strict=True)
