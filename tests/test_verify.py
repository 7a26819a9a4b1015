"""`verify` (our logits against transformers' PyTorch model): no temporary folder left behind,
non-finite weights named, NaN never hidden from the maximum difference."""

import tempfile

import numpy as np
import pytest
import torch
import transformers
from oracle import randomise

import eqx_models
from eqx_models.verify import _difference, verify

CONFIG = dict(
    vocab_size=61, hidden_size=16, num_heads=2, max_position_embeddings=32, window_size=3, num_layers=2,
    attention_types=[[["global", "local"], 1]],
)  # fmt: skip


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("verify") / "hf"
    randomise(transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(**CONFIG))).save_pretrained(folder)
    return folder


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Where `tempfile` creates folders during the test."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.mark.slow
def test_verify_our_folder_leaves_no_temporary_folder(hf_folder, tmp_path, private_tmp):
    """Issue 13, defect 8: each `verify` on our folder leaked a /tmp/eqx-verify-* folder."""
    eqx_models.save_pretrained(eqx_models.from_pretrained(hf_folder), tmp_path / "ours")
    assert verify(tmp_path / "ours") < 1e-4
    assert list(private_tmp.iterdir()) == []


def test_verify_names_nonfinite_weights(hf_folder, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "nan"
    folder.mkdir()
    for name in ("config.json",):
        (folder / name).write_bytes((hf_folder / name).read_bytes())
    state = load_file(hf_folder / "model.safetensors")
    state["transformer.h.0.mlp.c_proj.bias"][2] = np.nan
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    difference = verify(folder)
    err = capsys.readouterr().err
    assert "warning: 1 tensor(s) hold NaN or Inf:" in err and "transformer.h.0.mlp.c_proj.bias" in err
    assert difference == 0.0  # both models are NaN at the same places: the conversion is faithful


def test_difference_never_hides_nan():
    """`max(0.0, nan)` is 0.0: a NaN on one side only used to vanish from the reported maximum."""
    mine = np.array([np.nan, 1.0, np.inf, np.nan, 2.0], np.float32)
    theirs = np.array([np.nan, 1.0, np.inf, 0.0, np.nan], np.float32)
    np.testing.assert_array_equal(_difference(mine, theirs), [0.0, 0.0, 0.0, np.inf, np.inf])
    np.testing.assert_array_equal(_difference(np.array([-np.inf]), np.array([np.inf])), [np.inf])
