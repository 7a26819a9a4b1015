"""Tests of eqx_models.checkpoint.readers: fixtures are written with torch, safetensors, flax and
transformers, then read back without them and compared."""

import builtins
import collections
import io
import itertools
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import hostile
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


def _library_refuses(path: Path) -> bool:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as file:
            list(file.keys())
    except SafetensorError:
        return True
    return False


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
HOSTILE_SAFETENSORS = {
    # name: (header, data, expected error); the library refuses each one, and so must we.
    "overlap": (
        {"a": F32_2, "b": {**F32_2, "data_offsets": [4, 12]}}, bytes(12), "'b' overlaps another tensor"
    ),
    "overlap_same_range": ({"a": F32_2, "b": F32_2}, bytes(8), "'b' overlaps another tensor"),
    "duplicate": (
        b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
        b'"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}',
        hostile.float_bytes([1, 2]) + bytes(8),
        "names 'w' twice",
    ),
    "trailing_garbage": ({"a": F32_2}, bytes(8) + b"garbage", "trailing bytes after the last tensor"),
    "gap": ({"a": {**F32_2, "data_offsets": [4, 12]}}, bytes(12), "'a' leaves a gap"),
}  # fmt: skip


@pytest.mark.parametrize("case", HOSTILE_SAFETENSORS)
def test_safetensors_library_refusals_are_never_bypassed(tmp_path, case):
    """Issue 13, defect 6: when safe_open refused a file, a raw fallback reader accepted it
    (overlapping offsets, a duplicate key whose second, zeroed copy won, trailing garbage)."""
    header, data, message = HOSTILE_SAFETENSORS[case]
    path = _write(tmp_path / f"{case}.safetensors", hostile.safetensors_bytes(header, data))
    assert _library_refuses(path)
    with pytest.raises(CheckpointError, match=f"{case}.safetensors: .*{message}"):
        readers.read_safetensors(path)
    with pytest.raises(CheckpointError, match=message):
        readers.lazy_safetensors(path)


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


@pytest.mark.slow
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


# --------------------------------------------------------------------------- hostile checkpoints (issue 13)


def _benign_bin(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(5)
    state = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    return _torch_save(state, tmp_path / "benign.bin", "zip"), state


def _build_on(target: bytes, state: bytes) -> bytes:
    """A pickle that pushes `target` and BUILDs it with `state`."""
    return hostile.proto(2) + target + state + pickle.BUILD + pickle.STOP


_POISONS = {
    # The attack of the issue: slot state on the allowed function sets its __defaults__, after which
    # every tensor pickled without explicit metadata came back negated.
    "defaults": hostile.tuple_(
        pickle.NONE,
        hostile.dict_(
            (
                hostile.text("__defaults__"),
                hostile.tuple_(pickle.NEWFALSE, pickle.NONE, hostile.dict_((hostile.text("neg"), pickle.NEWTRUE))),
            )
        ),
    ),
    "dict_state": hostile.dict_((hostile.text("__kwdefaults__"), hostile.dict_())),
    "slot_dtype": hostile.tuple_(pickle.NONE, hostile.dict_((hostile.text("dtype"), hostile.text("int8")))),
}
_BUILD_TARGETS = {
    "_rebuild_tensor_v2": hostile.global_("torch._utils", "_rebuild_tensor_v2"),
    "_rebuild_parameter": hostile.stack_global("torch._utils", "_rebuild_parameter"),
    "OrderedDict_class": hostile.global_("collections", "OrderedDict"),
    "FloatStorage": hostile.global_("torch", "FloatStorage"),
    "float32": hostile.global_("torch", "float32"),
    "Parameter": hostile.global_("torch.nn.parameter", "Parameter"),
    "storage": hostile.storage("0", 4),
    "tensor": hostile.tensor("0", 4, (4,), (1,)),
}


def test_build_cannot_poison_later_loads(tmp_path):
    """Issue 13, defect 2: BUILD only applies to the OrderedDicts the reader itself created;
    on an allowed global, a storage or a tensor it is refused and changes nothing."""
    benign, state = _benign_bin(tmp_path)
    before = hostile.reader_state()
    errors = []
    for (target_name, target), (poison_name, poison) in itertools.product(_BUILD_TARGETS.items(), _POISONS.items()):
        path = hostile.torch_zip(tmp_path / f"{target_name}-{poison_name}.bin", _build_on(target, poison), {})
        with pytest.raises(CheckpointError) as info:
            readers.read_torch_bin(path)
        errors.append(str(info.value))
    arrays = readers.read_torch_bin(benign)
    expected = torch.load(benign, weights_only=True)
    for name in state:
        np.testing.assert_array_equal(arrays[name], expected[name].numpy(), err_msg=name)
    assert hostile.reader_state() == before
    assert all("only the OrderedDicts it creates may have one" in error for error in errors), errors


@pytest.mark.slow
def test_build_poisoning_then_benign_load_in_a_fresh_process(tmp_path):
    """The issue's sequence, without pytest's jaxtyping import hook (whose wrappers hide the
    poisoned defaults): poison, then load a benign .bin and compare with torch's own load."""
    benign, _ = _benign_bin(tmp_path)
    poison = hostile.torch_zip(
        tmp_path / "poison.bin", _build_on(_BUILD_TARGETS["_rebuild_tensor_v2"], _POISONS["defaults"]), {}
    )
    script = f"""
import numpy as np, torch
from eqx_models.checkpoint import readers
from eqx_models.errors import CheckpointError
try:
    readers.read_torch_bin({str(poison)!r})
except CheckpointError as err:
    print("refused:", err)
arrays = readers.read_torch_bin({str(benign)!r})
expected = torch.load({str(benign)!r}, weights_only=True)
print("max difference:", max(float(np.abs(arrays[k] - expected[k].numpy()).max()) for k in expected))
"""
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=repo)
    assert result.returncode == 0, result.stderr
    assert "only the OrderedDicts it creates may have one" in result.stdout
    assert result.stdout.strip().endswith("max difference: 0.0"), result.stdout


def test_build_of_an_ordered_dict_state_is_allowed(tmp_path):
    """What torch writes: a state dict is an OrderedDict whose `_metadata` comes by BUILD."""
    metadata = hostile.dict_((hostile.text("_metadata"), hostile.dict_()))
    data = (
        hostile.proto(2)
        + hostile.ordered_dict()
        + pickle.MARK
        + hostile.text("w")
        + hostile.tensor("0", 2, (2,), (1,))
        + pickle.SETITEMS
        + metadata
        + pickle.BUILD
        + pickle.STOP
    )
    path = hostile.torch_zip(tmp_path / "w.bin", data, {"0": hostile.float_bytes([1.5, -2])})
    np.testing.assert_array_equal(readers.read_torch_bin(path)["w"], [1.5, -2])


def _nested_shared(depth: int) -> dict:
    level = {"w": torch.ones(2)}
    for _ in range(depth):
        level = {"a": level, "b": level}  # the pickle memo stores each level once
    return level


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("depth", [22, 40])
def test_shared_memo_dicts_are_walked_once(tmp_path, layout, depth):
    """Issue 13, defect 3: dicts shared through the memo were walked once per path (2**40
    paths at depth 40, with one array copy each); a state dict never shares a sub-dict."""
    path = _torch_save({"root": _nested_shared(depth)}, tmp_path / "shared.bin", layout)
    assert path.stat().st_size < 20_000
    with hostile.time_limit(5), pytest.raises(CheckpointError, match="is also reached as"):
        readers.read_torch_bin(path)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_deep_nesting_is_refused_without_recursion(tmp_path, layout):
    """Dicts nested past 64 levels are refused; deeper tuples (skipped leaves) cost nothing."""
    tensor = hostile.tensor("0", 2, (2,), (1,))
    for depth, error in [(64, None), (65, "nested more than 64 levels"), (10_000, "nested more than 64 levels")]:
        obj = hostile.proto(2) + hostile.nested_dicts(depth, tensor) + pickle.STOP
        path = (hostile.torch_zip if layout == "zip" else hostile.torch_legacy)(
            tmp_path / f"deep{depth}.bin", obj, {"0": hostile.float_bytes([1, 2])}
        )
        if error is None:
            assert list(readers.read_torch_bin(path)) == [".".join(["d"] * depth)]
        else:
            with pytest.raises(CheckpointError, match=error):
                readers.read_torch_bin(path)
    obj = hostile.state_pickle({"t": hostile.nested_tuples(100_000)})
    assert readers.read_torch_bin(hostile.torch_zip(tmp_path / "tuples.bin", obj, {})) == {}


def test_a_dict_containing_itself_is_refused(tmp_path):
    data = hostile.proto(2) + hostile.dict_() + hostile.put(0) + hostile.text("me") + hostile.get(0)
    data += pickle.SETITEM + pickle.STOP
    with pytest.raises(CheckpointError, match="is also reached as 'the top-level dict'"):
        readers.read_torch_bin(hostile.torch_zip(tmp_path / "loop.bin", data, {}))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stride_zero_tensor_over_tiny_storage_is_refused_before_allocating(tmp_path, layout):
    """Issue 13, defect 4: a (16384, 16384) stride-0 view of a 16-byte storage (a ~650-byte file)
    cost 1.3 GB when read."""
    view = torch.zeros(4).as_strided((16384, 16384), (0, 0))
    path = _torch_save({"w": view}, tmp_path / "w.bin", layout)
    assert path.stat().st_size < 1500
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"would take 1073741824 bytes.*'w'.*\(16384, 16384\)"):
            readers.read_torch_bin(path)
        lazy = readers.lazy_torch_bin(path)["w"]  # described, not read
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert lazy.shape == (16384, 16384) and peak < 5_000_000, peak


@pytest.mark.parametrize("index", [2**26, 2**32 - 1])
def test_pickle_memo_index_costs_nothing(tmp_path, index):
    """A 9-byte pickle naming memo entry 2**26 made `pickle.Unpickler` allocate 1 GB (its memo
    is an array sized by the largest index; 2**32 - 1 gave a bare `MemoryError`); ours is a dict."""
    data = hostile.proto(2) + pickle.NONE + hostile.put(index) + pickle.STOP
    path = hostile.torch_zip(tmp_path / "memo.bin", data, {})
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="expected a dict of tensors, found None"):
            readers.read_torch_bin(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, peak


def test_deflated_pickle_bomb_is_refused_unread(tmp_path):
    """Issue 13, defect 4: a deflated data.pkl of 150 MB of repeated opcodes (about 150 KB on
    disk) cost 9.4 GB and 74 s; torch.save never compresses, and a member may inflate at most
    16 times."""
    path = hostile.deflated_member_zip(
        tmp_path / "bomb.bin", "archive/data.pkl", b"]" * (1 << 20), 150, {"archive/byteorder": b"little"}
    )
    assert path.stat().st_size < 1_000_000
    tracemalloc.start()
    try:
        with hostile.time_limit(5), pytest.raises(CheckpointError, match="'archive/data.pkl' would inflate"):
            readers.read_torch_bin(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, peak


def test_deflated_storage_bomb_is_refused_unread(tmp_path):
    """Issue 13, defect 4: a deflated 1 GiB storage record cost 2.25 GB (here 256 MiB)."""
    numel = 1 << 26
    data = hostile.state_pickle({"w": hostile.tensor("0", numel, (numel,), (1,))})
    others = {"archive/data.pkl": data, "archive/byteorder": b"little"}
    path = hostile.deflated_member_zip(tmp_path / "bomb.bin", "archive/data/0", bytes(1 << 20), 256, others)
    assert path.stat().st_size < 2_000_000
    tracemalloc.start()
    try:
        with hostile.time_limit(5), pytest.raises(CheckpointError, match="'archive/data/0' would inflate"):
            readers.lazy_torch_bin(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, peak


def test_deflated_member_inflates_no_further_than_declared(tmp_path):
    """A deflated data.pkl that declares 0 bytes (so the inflation ratio looks fine) but holds
    16 MiB of opcodes: inflating stops at the declared size."""
    path = tmp_path / "lying.bin"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"}" * (16 << 20))
    raw = bytearray(path.read_bytes())
    central = raw.index(b"PK\x01\x02")
    raw[central + 24 : central + 28] = bytes(4)  # the uncompressed size, in the central directory
    path.write_bytes(bytes(raw))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="does not inflate"):
            readers.read_torch_bin(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, peak


def test_a_small_deflated_archive_still_reads(tmp_path):
    """Compression itself is fine (torch.load reads it): only inflation beyond 16x is refused."""
    values = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    data = hostile.state_pickle({"w": hostile.tensor("0", 64, (8, 8), (8, 1))})
    path = hostile.torch_zip(tmp_path / "w.bin", data, {"0": values.tobytes()}, zipfile.ZIP_DEFLATED)
    np.testing.assert_array_equal(readers.read_torch_bin(path)["w"], values.reshape(8, 8))
    np.testing.assert_array_equal(torch.load(path, weights_only=True)["w"].numpy(), values.reshape(8, 8))


def test_overlapping_zip_members_are_refused(tmp_path):
    """A zip bomb's members share bytes: each read would cost the whole shared region again."""
    data = hostile.state_pickle({"w": hostile.tensor("0", 2, (2,), (1,))})
    path = hostile.torch_zip(tmp_path / "w.bin", data, {"0": hostile.float_bytes([1, 2])})
    raw = bytearray(path.read_bytes())
    central = raw.index(b"PK\x01\x02")
    second = raw.index(b"PK\x01\x02", central + 4)
    raw[second + 42 : second + 46] = raw[central + 42 : central + 46]  # same local header offset
    with pytest.raises(CheckpointError, match="overlap|corrupt zip"):
        readers.read_torch_bin(_write(tmp_path / "overlap.bin", bytes(raw)))


@pytest.mark.parametrize(
    "shape, stride, message",
    [
        ((2**70,), (1,), "below 2\\*\\*63"),
        ((2**62,), (0,), "would take"),
        ((2**31, 2**31), (0, 0), "would take"),
        ((2,) * 65, (0,) * 65, "at most 64"),
        ((3,), (2**62,), "does not fit storage"),
    ],
)  # fmt: skip
def test_huge_ints_in_tensor_sizes_name_the_problem(tmp_path, shape, stride, message):
    """Issue 13, defect 9: huge ints in tensor sizes gave a generic OverflowError/MemoryError."""
    data = hostile.state_pickle({"w": hostile.tensor("0", 4, shape, stride)})
    path = hostile.torch_zip(tmp_path / "w.bin", data, {"0": bytes(16)})
    with pytest.raises(CheckpointError, match=message):
        readers.read_torch_bin(path)


def test_huge_ints_in_safetensors_and_msgpack_shapes(tmp_path):
    import msgpack

    header = {"w": {"dtype": "F32", "shape": [2**70], "data_offsets": [0, 4]}}
    path = _write(tmp_path / "w.safetensors", hostile.safetensors_bytes(header, bytes(4)))
    with pytest.raises(CheckpointError, match="malformed shape"):
        readers.read_safetensors(path)
    header = {"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}
    path = _write(tmp_path / "w.safetensors", hostile.safetensors_bytes(header, bytes(4)))
    with pytest.raises(CheckpointError, match="impossibly large shape"):
        readers.read_safetensors(path)
    header = {"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}  # an unhashable dtype
    path = _write(tmp_path / "w.safetensors", hostile.safetensors_bytes(header, bytes(4)))
    with pytest.raises(CheckpointError, match="malformed entry or unsupported dtype"):
        readers.read_safetensors(path)
    array = msgpack.ExtType(1, msgpack.packb([[2**63 + 5], "float32", b""]))
    with pytest.raises(CheckpointError, match="malformed array shape"):
        readers.read_msgpack(_write(tmp_path / "w.msgpack", msgpack.packb({"w": array})))


def test_refused_opcodes_name_themselves(tmp_path):
    cases = {
        "NEWOBJ": hostile.global_("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.NEWOBJ,
        "EXT1": pickle.EXT1 + b"\x01",
        "EMPTY_SET": pickle.EMPTY_SET,
        "INST": pickle.MARK + pickle.INST + b"collections\nOrderedDict\n",
    }
    for name, body in cases.items():
        path = hostile.torch_zip(tmp_path / f"{name}.bin", hostile.proto(4) + body + pickle.STOP, {})
        with pytest.raises(CheckpointError, match=f"unsupported pickle opcode {name}"):
            readers.read_torch_bin(path)


def test_pickle_dict_keys_must_be_cheap_to_hash(tmp_path):
    key = hostile.tuple_(*[hostile.integer(i) for i in range(10)])
    data = hostile.proto(2) + hostile.dict_((key, pickle.NONE)) + pickle.STOP
    with pytest.raises(CheckpointError, match="unsupported dict key a tuple of 10 items"):
        readers.read_torch_bin(hostile.torch_zip(tmp_path / "w.bin", data, {}))


def test_legacy_layout_hand_made(tmp_path):
    obj = hostile.state_pickle({"w": hostile.tensor("0", 3, (3,), (1,))})
    path = hostile.torch_legacy(tmp_path / "w.bin", obj, {"0": hostile.float_bytes([1, 2, 3])})
    np.testing.assert_array_equal(readers.read_torch_bin(path)["w"], [1, 2, 3])
    path = hostile.torch_legacy(tmp_path / "short.bin", obj, {"0": hostile.float_bytes([1, 2])})
    with pytest.raises(CheckpointError, match="wrong size header|truncated"):
        readers.read_torch_bin(path)


def test_shard_with_an_extra_copy_of_a_key_is_ambiguous(hf_dirs, tmp_path):
    """Issue 13, defect 11: a later shard's extra copy of a key silently overrode the shard the
    index assigns it to."""
    from safetensors.numpy import load_file, save_file

    root, _ = hf_dirs
    folder = tmp_path / "st_sharded"
    shutil.copytree(root / "st_sharded", folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    first, last = sorted(set(index.values()))
    key = next(name for name, shard in index.items() if shard == first)
    tensors = load_file(folder / last)
    tensors[key] = np.zeros_like(load_file(folder / first)[key])
    save_file(tensors, folder / last, metadata={"format": "pt"})
    message = rf"{last}: holds '{re.escape(key)}', which model.safetensors.index.json assigns to {first}"
    with pytest.raises(CheckpointError, match=message):
        readers.read_state_dict(folder)
    # A key the index does not list, in two shards, is just as ambiguous.
    contents = {first: load_file(folder / first), last: load_file(folder / last)}
    contents[last].pop(key)  # back to what the index says
    for shard, content in contents.items():
        content["extra"] = np.zeros(2, np.float32)
        save_file(content, folder / shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"'extra' is in both {first} and {last}"):
        readers.read_state_dict(folder)


@pytest.mark.slow
def test_msgpack_embedding_and_weight_collide(flax_dirs, tmp_path):
    """Issue 13, defect 11: `embedding` and `weight` under one Flax module both become `weight`
    in PyTorch names, and the last one silently won."""
    import flax.serialization
    import msgpack

    import eqx_models

    folder = tmp_path / "flax"
    shutil.copytree(flax_dirs / "flax", folder)
    tree = msgpack.unpackb((folder / "flax_model.msgpack").read_bytes(), raw=False)
    wte = tree["transformer"]["wte"]
    wte["weight"] = wte["embedding"]  # an identical copy: ambiguous all the same
    (folder / "flax_model.msgpack").write_bytes(msgpack.packb(tree))
    assert (
        "weight"
        in flax.serialization.msgpack_restore((folder / "flax_model.msgpack").read_bytes())["transformer"]["wte"]
    )
    message = "has both transformer.wte.embedding and transformer.wte.weight, which are both transformer.wte.weight"
    with pytest.raises(CheckpointError, match=message):
        eqx_models.from_pretrained(folder)


def test_absurd_layer_count_fails_early_and_cheaply(hf_dirs, tmp_path):
    """Issue 13, defect 10: `num_layers: 10**6` built 13M key strings (1.6 GB) before failing.
    The config now refuses more than `MAX_LAYERS` layers outright; at that maximum, against a
    2-layer checkpoint, the key match still fails early and cheaply."""
    import eqx_models
    from eqx_models.validation import MAX_LAYERS

    folder = tmp_path / "deep"
    shutil.copytree(hf_dirs[0] / "st", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(num_layers=10**6, attention_types=[[["global", "local"], 5 * 10**5]])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(eqx_models.ConfigError, match=r"num_layers must be an integer in \[1, 10000\]"):
        eqx_models.from_pretrained(folder)
    config.update(num_layers=MAX_LAYERS, attention_types=[[["global", "local"], MAX_LAYERS // 2]])
    (folder / "config.json").write_text(json.dumps(config))
    tracemalloc.start()
    try:
        with hostile.time_limit(60), pytest.raises(CheckpointError, match=r"missing \d+ key\(s\)") as info:
            eqx_models.from_pretrained(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "transformer.h.2." in str(info.value) and "more" in str(info.value)
    assert peak < 200_000_000, peak
