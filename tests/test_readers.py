"""Tests of eqx_models.checkpoint.readers: fixtures are written with torch, safetensors, flax and
transformers, then read back without them and compared."""

import builtins
import collections
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from eqx_models.checkpoint import readers
from eqx_models.errors import CheckpointError

LAYOUTS = ["zip", "legacy"]


def _torch_save(obj, path: Path, layout: str, protocol: int = 2) -> Path:
    torch.save(obj, path, pickle_protocol=protocol, _use_new_zipfile_serialization=layout == "zip")
    return path


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().resolve_neg().resolve_conj()
    if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.uint16):
        return tensor.float().numpy()
    return tensor.numpy()


def _assert_same(arrays: dict[str, np.ndarray], tensors: dict[str, torch.Tensor]) -> None:
    assert sorted(arrays) == sorted(tensors)
    for name, tensor in tensors.items():
        expected, got = _as_numpy(tensor), arrays[name]
        assert got.shape == tuple(tensor.shape), name
        if tensor.dtype == torch.bfloat16:
            assert got.dtype == ml_dtypes.bfloat16, name
        elif tensor.dtype not in (torch.float8_e4m3fn, torch.uint16):
            assert got.dtype == expected.dtype, name
        np.testing.assert_array_equal(got.astype(expected.dtype), expected, err_msg=name)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


GARBAGE = np.random.default_rng(0).bytes(3000)


# --------------------------------------------------------------------------- torch .bin


def _mixed_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    base = torch.randn(3, 4)
    return collections.OrderedDict(
        f32=torch.randn(2, 3),
        f16=torch.randn(5).half(),
        bf16=torch.randn(2, 2).bfloat16(),
        i64=torch.arange(6).reshape(2, 3),
        i32=torch.tensor([-1, 2, 3], dtype=torch.int32),
        boolean=torch.tensor([True, False, True]),
        u8=torch.tensor([0, 7, 255], dtype=torch.uint8),
        base=base,
        transposed=base.t(),  # non-contiguous view of `base`'s storage
        row=base[1],  # shares `base`'s storage, with an offset
        bf16_transposed=torch.randn(3, 2).bfloat16().t(),
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 3),
    )


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_bin_dtypes_views_and_shared_storage(tmp_path, layout, protocol):
    state = _mixed_state_dict()
    arrays = readers.read_torch_bin(_torch_save(state, tmp_path / "w.bin", layout, protocol))
    _assert_same(arrays, state)
    assert arrays["scalar"].ndim == 0 and arrays["transposed"].flags.c_contiguous
    arrays["base"][0, 0] = 123.0  # arrays own their memory even when storages were shared
    assert arrays["transposed"][0, 0] != 123.0 and arrays["row"][0] != 123.0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_bin_newer_dtypes_flags_parameters_and_nesting(tmp_path, layout):
    torch.manual_seed(1)
    inner = {
        "param": torch.nn.Parameter(torch.randn(2, 2)),
        "u16": torch.tensor([1, 2, 65535]).to(torch.uint16),  # pickled with _rebuild_tensor_v3
        "f8": torch.randn(4).to(torch.float8_e4m3fn),
        "neg": torch.randn(3)._neg_view(),
        "conj": torch.randn(2, dtype=torch.complex64).conj(),
    }
    path = _torch_save({"model": inner, "epoch": 3, "note": "skipped"}, tmp_path / "w.bin", layout)
    arrays = readers.read_torch_bin(path)
    _assert_same(arrays, {f"model.{k}": v for k, v in inner.items()})
    assert arrays["model.u16"].dtype == np.uint16 and arrays["model.f8"].dtype == ml_dtypes.float8_e4m3fn


class _Exploit:
    """Pickles to `function(*args)`; a regular unpickler would run it."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _exploits(target: Path) -> list[tuple[_Exploit, str]]:
    code = f"__import__('os').system('touch {target}')"
    return [
        (_Exploit(os.system, f"touch {target}"), f"'{os.system.__module__}.system'"),
        (_Exploit(builtins.eval, code), r"'__builtin__\.eval' \(Python 3: 'builtins\.eval'\)"),
        (_Exploit(subprocess.Popen, ["touch", str(target)]), r"\(Python 3: 'subprocess\.Popen'\)"),
    ]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_bin_malicious_pickle_is_refused_before_running(tmp_path, layout):
    target = tmp_path / "pwned"
    for i, (exploit, refused) in enumerate(_exploits(target)):
        path = _torch_save({"w": torch.ones(2), "x": exploit}, tmp_path / f"evil{i}.bin", layout)
        with pytest.raises(CheckpointError, match=refused) as info:
            readers.read_torch_bin(path)
        assert str(path) in str(info.value)
        assert not target.exists()
    # The fixture really is an exploit: a regular, unrestricted load runs it.
    torch.load(tmp_path / "evil0.bin", weights_only=False)
    assert target.exists()


def test_torch_bin_handmade_malicious_files_are_refused(tmp_path):
    target = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(os.system, f"touch {target}"), protocol=2)
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")
    refused = r"refused to unpickle the global '(posix|nt|os)\.system'"
    with pytest.raises(CheckpointError, match=refused):
        readers.read_state_dict(tmp_path)
    path.write_bytes(payload)  # a bare pickle is tried as the legacy layout, whose first pickle is refused
    with pytest.raises(CheckpointError, match=refused):
        readers.read_state_dict(tmp_path)
    assert not target.exists()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_bin_whole_module_is_refused(tmp_path, layout):
    path = _torch_save(torch.nn.Linear(2, 2), tmp_path / "module.bin", layout)
    with pytest.raises(CheckpointError, match="torch.nn.modules.linear.Linear"):
        readers.read_torch_bin(path)


def test_torch_bin_rejects_tensor_rebuilt_from_non_storage(tmp_path):
    class Fake:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, ("not a storage", 0, (2,), (1,), False, None)

    path = tmp_path / "w.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": Fake()}, protocol=2))
    with pytest.raises(CheckpointError, match="not a storage"):
        readers.read_torch_bin(path)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("keep", [0.0, 0.05, 0.5, 0.97])
def test_torch_bin_truncated(tmp_path, layout, keep):
    good = _torch_save(_mixed_state_dict(), tmp_path / "good.bin", layout).read_bytes()
    path = _write(tmp_path / "cut.bin", good[: int(len(good) * keep)])
    with pytest.raises(CheckpointError, match="cut.bin"):
        readers.read_torch_bin(path)


def test_torch_bin_garbage(tmp_path):
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        readers.read_torch_bin(_write(tmp_path / "garbage.bin", GARBAGE))


def test_torch_bin_corrupt_zip_member_and_missing_storage(tmp_path):
    good = _torch_save({"w": torch.full((64,), 7.0)}, tmp_path / "good.bin", "zip").read_bytes()
    at = good.find(np.full(64, 7.0, np.float32).tobytes())
    corrupt = good[:at] + b"\xff" + good[at + 1 :]  # fails the zip CRC check
    with pytest.raises(CheckpointError, match="corrupt zip archive"):
        readers.read_torch_bin(_write(tmp_path / "corrupt.bin", corrupt))
    with zipfile.ZipFile(io.BytesIO(good)) as src, zipfile.ZipFile(tmp_path / "nodata.bin", "w") as dst:
        for name in src.namelist():
            if not name.endswith("/data/0"):
                dst.writestr(name, src.read(name))
    with pytest.raises(CheckpointError, match="storage record 'data/0' is missing"):
        readers.read_torch_bin(tmp_path / "nodata.bin")


# --------------------------------------------------------------------------- safetensors


def _safetensors_fixture(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    from safetensors.torch import save_file

    torch.manual_seed(2)
    tensors = {
        "f32": torch.randn(3, 2),
        "f16": torch.randn(4).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "i64": torch.arange(4),
        "boolean": torch.tensor([True, False]),
        "u8": torch.tensor([1, 255], dtype=torch.uint8),
        "scalar": torch.tensor(2.0),
        "empty": torch.zeros(0, 2),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path, tensors


def test_safetensors_all_dtypes(tmp_path):
    path, tensors = _safetensors_fixture(tmp_path)
    _assert_same(readers.read_safetensors(path), tensors)


def test_safetensors_numpy_only_fallback(tmp_path, monkeypatch):
    path, tensors = _safetensors_fixture(tmp_path)

    def unsupported(*args, **kwargs):
        raise TypeError("data type 'bfloat16' not understood")

    monkeypatch.setattr(readers, "safe_open", unsupported)
    arrays = readers.read_safetensors(path)
    _assert_same(arrays, tensors)
    assert arrays["bf16"].flags.writeable


@pytest.mark.parametrize("keep", [0, 4, 8, 40, -1])
def test_safetensors_truncated(tmp_path, keep):
    path, _ = _safetensors_fixture(tmp_path)
    good = path.read_bytes()
    cut = _write(tmp_path / "cut.safetensors", good[: len(good) + keep if keep < 0 else keep])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        readers.read_safetensors(cut)


def test_safetensors_garbage_and_bad_entries(tmp_path):
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        readers.read_safetensors(_write(tmp_path / "garbage.safetensors", GARBAGE))
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    bad = _write(tmp_path / "bad.safetensors", len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(CheckpointError, match="do not fit its shape"):
        readers.read_safetensors(bad)


# --------------------------------------------------------------------------- flax msgpack


def _flax_reference(path: Path) -> dict[str, np.ndarray]:
    from flax.serialization import msgpack_restore
    from flax.traverse_util import flatten_dict

    return flatten_dict(msgpack_restore(path.read_bytes()), sep=".")


def _assert_same_arrays(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        value = np.asarray(value)
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_msgpack_chunked_arrays_scalars_and_bf16(tmp_path, monkeypatch):
    import flax.serialization

    monkeypatch.setattr(flax.serialization, "MAX_CHUNK_SIZE", 64)
    rng = np.random.default_rng(3)
    tree = {
        "layer": {
            "big": rng.standard_normal((10, 7)).astype(np.float32),  # 280 bytes: written in 5 chunks
            "big_bf16": rng.standard_normal((9, 11)).astype(ml_dtypes.bfloat16),
            "small": np.arange(3, dtype=np.int32),
        },
        "step": np.int64(7),  # numpy scalar (extension type 3)
        "flag": np.array(True),
        "native": 1.5 + 2j,  # Python complex (extension type 2): not an array, skipped
    }
    data = flax.serialization.msgpack_serialize(tree)
    assert b"__msgpack_chunked_array__" in data
    path = _write(tmp_path / "flax_model.msgpack", data)
    arrays = readers.read_msgpack(path)
    expected = {k: v for k, v in _flax_reference(path).items() if k != "native"}
    _assert_same_arrays(arrays, expected)
    assert arrays["layer.big_bf16"].dtype == ml_dtypes.bfloat16 and arrays["step"].shape == ()


@pytest.mark.parametrize("keep", [0.0, 0.01, 0.5, 0.99])
def test_msgpack_truncated(tmp_path, keep):
    import flax.serialization

    good = flax.serialization.msgpack_serialize({"a": {"w": np.ones((8, 8), np.float32)}, "b": np.zeros(3)})
    path = _write(tmp_path / "cut.msgpack", good[: int(len(good) * keep)])
    with pytest.raises(CheckpointError, match="cut.msgpack"):
        readers.read_msgpack(path)


def test_msgpack_garbage_and_wrong_content(tmp_path):
    import msgpack

    with pytest.raises(CheckpointError, match="garbage.msgpack"):
        readers.read_msgpack(_write(tmp_path / "garbage.msgpack", GARBAGE))
    with pytest.raises(CheckpointError, match="expected a map"):
        readers.read_msgpack(_write(tmp_path / "list.msgpack", msgpack.packb([1, 2])))
    unknown = msgpack.packb({"w": msgpack.ExtType(9, b"xx")})
    with pytest.raises(CheckpointError, match="unknown msgpack extension type 9"):
        readers.read_msgpack(_write(tmp_path / "ext.msgpack", unknown))
    short = msgpack.packb({"w": msgpack.ExtType(1, msgpack.packb([[4], "float32", b"\0" * 8]))})
    with pytest.raises(CheckpointError, match="has 8 bytes"):
        readers.read_msgpack(_write(tmp_path / "short.msgpack", short))


# --------------------------------------------------------------------------- HF folders


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A tiny GPT-Neo saved as safetensors / .bin, whole and sharded, plus its state dict."""
    import transformers

    config = transformers.GPTNeoConfig(
        vocab_size=64, hidden_size=16, num_layers=2, num_heads=2,
        attention_types=[[["global", "local"], 1]], max_position_embeddings=32, window_size=4,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPTNeoForCausalLM(config)
    root = tmp_path_factory.mktemp("hf")
    model.save_pretrained(root / "st")
    model.save_pretrained(root / "st_sharded", max_shard_size="20KB")
    model.save_pretrained(root / "bin", safe_serialization=False)
    model.save_pretrained(root / "bin_sharded", max_shard_size="20KB", safe_serialization=False)
    return root, model.state_dict()


@pytest.fixture(scope="module")
def flax_dirs(hf_dirs):
    """The same model converted to Flax and saved as msgpack (whole, sharded, bf16) and safetensors."""
    import jax
    import transformers

    root, _ = hf_dirs
    with jax.numpy_dtype_promotion("standard"):  # HF's Flax code relies on implicit promotion
        model = transformers.FlaxGPTNeoForCausalLM.from_pretrained(root / "bin", from_pt=True)
        model.save_pretrained(root / "flax")
        model.save_pretrained(root / "flax_sharded", max_shard_size="20KB")
        model.save_pretrained(root / "flax_bf16", params=model.to_bf16(model.params))
        model.save_pretrained(root / "flax_st", safe_serialization=True)
    return root


def _torch_reference(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in files:
        out.update(load_file(f) if f.suffix == ".safetensors" else torch.load(f, weights_only=True))
    return out


@pytest.mark.parametrize("name", ["st", "st_sharded", "bin", "bin_sharded"])
def test_hf_pytorch_folders(hf_dirs, name):
    root, state = hf_dirs
    files, source = readers.find_checkpoint_files(root / name)
    assert source == "pytorch" and len(files) == (2 if name.endswith("sharded") else 1)
    arrays, source = readers.read_state_dict(root / name)
    assert source == "pytorch"
    _assert_same(arrays, _torch_reference(files))
    _assert_same(arrays, {k: state[k] for k in arrays})
    assert "transformer.h.0.attn.attention.q_proj.weight" in arrays


@pytest.mark.parametrize("name", ["flax", "flax_sharded", "flax_bf16"])
def test_hf_flax_folders(flax_dirs, name):
    files, source = readers.find_checkpoint_files(flax_dirs / name)
    assert source == "flax" and len(files) == (2 if name == "flax_sharded" else 1)
    arrays, source = readers.read_state_dict(flax_dirs / name)
    assert source == "flax"
    expected = {}
    for f in files:
        expected.update(_flax_reference(f))
    _assert_same_arrays(arrays, expected)
    kernel = arrays["transformer.h.0.attn.attention.q_proj.kernel"]
    assert kernel.dtype == (ml_dtypes.bfloat16 if name == "flax_bf16" else np.float32)


def test_hf_flax_safetensors_is_reported_as_flax(flax_dirs):
    arrays, source = readers.read_state_dict(flax_dirs / "flax_st")
    assert source == "flax"
    _assert_same_arrays(arrays, readers.read_state_dict(flax_dirs / "flax")[0])


def test_preference_order(hf_dirs, flax_dirs, tmp_path):
    root, _ = hf_dirs
    for src in ["flax_sharded", "flax", "bin_sharded", "bin", "st_sharded", "st"]:
        for f in (root / src).iterdir():
            shutil.copy(f, tmp_path / f.name)
    shards = [f"-0000{i}-of-00002" for i in (1, 2)]
    expected = [
        ("model.safetensors", ["model.safetensors"], "pytorch"),
        ("model.safetensors.index.json", [f"model{s}.safetensors" for s in shards], "pytorch"),
        ("pytorch_model.bin", ["pytorch_model.bin"], "pytorch"),
        ("pytorch_model.bin.index.json", [f"pytorch_model{s}.bin" for s in shards], "pytorch"),
        ("flax_model.msgpack", ["flax_model.msgpack"], "flax"),
        ("flax_model.msgpack.index.json", [f"flax_model{s}.msgpack" for s in shards], "flax"),
    ]
    for preferred, names, source in expected:
        files, found_source = readers.find_checkpoint_files(tmp_path)
        assert ([f.name for f in files], found_source) == (names, source)
        (tmp_path / preferred).unlink()
    with pytest.raises(CheckpointError, match="no checkpoint file found"):
        readers.find_checkpoint_files(tmp_path)


def test_missing_shard_and_incomplete_shard(hf_dirs, tmp_path):
    root, _ = hf_dirs
    shutil.copytree(root / "st_sharded", tmp_path / "a")
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    first = index["weight_map"]["transformer.wte.weight"]
    other = next(f for f in set(index["weight_map"].values()) if f != first)
    shutil.copy(tmp_path / "a" / other, tmp_path / "a" / first)  # a shard holding the wrong tensors
    message = rf"{first}: lacks \d+ weight\(s\) that model.safetensors.index.json lists"
    with pytest.raises(CheckpointError, match=message):
        readers.read_state_dict(tmp_path / "a")
    (tmp_path / "a" / first).unlink()
    with pytest.raises(CheckpointError, match=f"missing shard file.*{first}"):
        readers.read_state_dict(tmp_path / "a")


@pytest.mark.parametrize(
    "content",
    ["{not json", "[1, 2]", '{"metadata": {}}', '{"weight_map": {}}', '{"weight_map": {"w": 3}}',
     '{"weight_map": {"w": "../outside.bin"}}'],
)  # fmt: skip
def test_malformed_index(tmp_path, content):
    (tmp_path / "pytorch_model.bin.index.json").write_text(content)
    with pytest.raises(CheckpointError, match="pytorch_model.bin.index.json: malformed index json"):
        readers.read_state_dict(tmp_path)


def test_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        readers.read_state_dict(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a folder"):
        readers.read_state_dict(_write(tmp_path / "file", b""))
    with pytest.raises(CheckpointError, match=r"no checkpoint file found \(looked for model.safetensors, .*"
                       r"flax_model.msgpack.index.json\)"):  # fmt: skip
        readers.read_state_dict(tmp_path)
    with pytest.raises(CheckpointError, match="file does not exist"):
        readers.read_safetensors(tmp_path / "missing.safetensors")


def test_folder_with_garbage_checkpoints(tmp_path):
    for name in ["model.safetensors", "pytorch_model.bin", "flax_model.msgpack"]:
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        _write(folder / name, GARBAGE)
        with pytest.raises(CheckpointError, match=name):
            readers.read_state_dict(folder)


def test_readers_import_neither_torch_nor_flax(hf_dirs, flax_dirs):
    root, _ = hf_dirs
    script = (
        "import sys\n"
        "from eqx_models.checkpoint.readers import read_state_dict\n"
        f"for name in ['st_sharded', 'bin', 'flax_sharded']: read_state_dict({str(root)!r} + '/' + name)\n"
        "print(sorted(m for m in ('torch', 'flax', 'transformers', 'tensorflow') if m in sys.modules))\n"
    )
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=repo)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
