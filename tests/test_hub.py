"""Hub ids: the real huggingface_hub client against a hub on 127.0.0.1 (tests/hub_server.py)
serving folders that transformers wrote. Nothing reaches the internet: each test has its own
HF_HOME under tmp_path, and HF_HUB_OFFLINE (set for the session by the conftest) is unset
only where a test talks to its local server."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from cases import hf_neo
from hub_server import HubServer, subprocess_env, use_hub
from oracle import assert_same_tree
from tokenizer_cases import TEXTS, build_folders

import eqx_models
from eqx_models import hub
from eqx_models.errors import CheckpointError, HubError, InputError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "stdlib-gpt-neo"
TOKEN = "hf_test_token_for_the_gated_repo"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Folders written by transformers: two GPT-Neo weights, in several formats."""
    root = tmp_path_factory.mktemp("repos")
    first = hf_neo(root / "first", seed=0, vocab_size=300)  # byte-level ids fit, for training
    hf_neo(root / "second", seed=1, vocab_size=300)
    first.save_pretrained(root / "sharded", max_shard_size="10KB")
    first.save_pretrained(root / "sharded_bin", safe_serialization=False, max_shard_size="10KB")
    shutil.copytree(root / "first", root / "both")  # safetensors and a .bin: only the first is fetched
    first.save_pretrained(root / "bin_only", safe_serialization=False)
    shutil.copy(root / "bin_only" / "pytorch_model.bin", root / "both")
    for name in ("first", "sharded"):
        shutil.copy(EXAMPLE / "tokenizer.json", root / name)
    return root


@pytest.fixture
def server(folders):
    hub_server = HubServer(tokens=(TOKEN,))
    hub_server.add("tiny/neo", folders / "first")
    hub_server.add("tiny/neo", folders / "second", branch="v2", tags=("v2.0",))
    hub_server.add("tiny/neo-sharded", folders / "sharded")
    hub_server.add("tiny/neo-sharded-bin", folders / "sharded_bin")
    hub_server.add("tiny/neo-both", folders / "both")
    hub_server.add("gpt2-like", folders / "first")  # a single-name id, as "gpt2"
    hub_server.add("tiny/gated", folders / "first", gated=True)
    hub_server.add("tiny/private", folders / "first", private=True)
    hub_server.add("tiny/no-weights", folders / "first", drop=("model.safetensors",))
    hub_server.add("tiny/no-config", folders / "first", drop=("config.json",))
    hub_server.add("eqx/stdlib-gpt-neo", EXAMPLE)
    hub_server.start()
    yield hub_server
    hub_server.stop()


@pytest.fixture
def online(server, monkeypatch, tmp_path):
    use_hub(monkeypatch, server, tmp_path / "hf")
    return server


def cached_snapshot(home: Path, repo_id: str, revision: str = "main") -> Path:
    storage = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    return storage / "snapshots" / (storage / "refs" / revision).read_text()


# --------------------------------------------------------------------------- downloads


def test_hub_id_loads_the_same_tree_as_its_folder(online, folders, tmp_path):
    model = eqx_models.from_pretrained("tiny/neo")
    assert_same_tree(model, eqx_models.from_pretrained(folders / "first"))
    snapshot = hub.folder("tiny/neo")
    assert snapshot == cached_snapshot(tmp_path / "hf", "tiny/neo")  # huggingface_hub's standard cache
    assert sorted(p.name for p in snapshot.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert [r for r in online.requests if r.method == "GET" and r.path.startswith("/api/")][-1].authorization is None


def test_revisions_branch_tag_and_commit(online, folders):
    main, v2 = online.repos["tiny/neo"].refs["main"], online.repos["tiny/neo"].refs["v2"]
    assert main != v2
    first, second = eqx_models.from_pretrained(folders / "first"), eqx_models.from_pretrained(folders / "second")
    assert_same_tree(eqx_models.from_pretrained("tiny/neo", revision="v2"), second)
    assert_same_tree(eqx_models.from_pretrained("tiny/neo", revision="v2.0"), second)
    assert_same_tree(eqx_models.from_pretrained("tiny/neo", revision=main), first)
    assert hub.folder("tiny/neo", revision="v2").name == v2
    assert hub.folder("tiny/neo", revision=main).name == main


def test_single_name_id(online, folders):
    assert_same_tree(eqx_models.from_pretrained("gpt2-like"), eqx_models.from_pretrained(folders / "first"))


@pytest.mark.parametrize("repo_id", ["tiny/neo-sharded", "tiny/neo-sharded-bin"])
def test_sharded_weights_are_fetched_with_their_index(online, folders, repo_id):
    model = eqx_models.from_pretrained(repo_id)
    assert_same_tree(model, eqx_models.from_pretrained(folders / "first"))
    files = online.repos[repo_id].commits[online.repos[repo_id].refs["main"]]
    shards = [name for name in files if name.startswith(("model-", "pytorch_model-"))]
    assert len(shards) > 2
    assert set(shards) <= set(online.files_fetched())


def test_only_the_preferred_format_is_downloaded(online):
    eqx_models.from_pretrained("tiny/neo-both")
    fetched = online.files_fetched()
    assert "model.safetensors" in fetched and "pytorch_model.bin" not in fetched


def test_tokenizer_mode_fetches_no_weights(online):
    snapshot = hub.folder("tiny/neo", want="tokenizer")
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "generation_config.json", "tokenizer.json"]
    assert not any(name.endswith(".safetensors") for name in online.files_fetched())


@pytest.mark.parametrize("case", ["gemma_slow", "longt5_only_spiece", "gpt_neo_slow"])
def test_tokenizer_of_an_id_equals_its_folder(server, monkeypatch, tmp_path, case):
    """`load_tokenizer` of an id: only config and tokenizer files fetched (into the standard
    cache), the same ids and text as the folder it was served from."""
    folder = build_folders(tmp_path / "tokenizers")[case]
    server.add(f"tok/{case}", folder)
    use_hub(monkeypatch, server, tmp_path / "hf")
    ours, local = eqx_models.load_tokenizer(f"tok/{case}"), eqx_models.load_tokenizer(folder)
    for text in TEXTS:
        assert ours.encode(text) == local.encode(text)
        assert ours.decode(local.encode(text)) == local.decode(local.encode(text))
    fetched = set(server.files_fetched())
    assert fetched and fetched <= set(hub.TOKENIZER_FILES) | {"config.json"}
    assert cached_snapshot(tmp_path / "hf", f"tok/{case}").is_dir()


def test_a_second_load_downloads_nothing(online):
    hub.folder("tiny/neo")
    before = len(online.files_fetched())
    hub.folder("tiny/neo")
    assert len(online.files_fetched()) == before


def test_offline_reuses_the_cache_without_traffic(online, folders, monkeypatch):
    expected = eqx_models.from_pretrained(folders / "first")
    main = hub.folder("tiny/neo")
    online.stop()  # no server: any request would fail
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.folder("tiny/neo") == main
    assert_same_tree(eqx_models.from_pretrained("tiny/neo"), expected)
    assert_same_tree(eqx_models.from_pretrained("tiny/neo", revision=main.name), expected)
    with pytest.raises(HubError, match=r"HF_HUB_OFFLINE is set, and the cache .* holds no copy of tiny/neo@v2"):
        hub.folder("tiny/neo", revision="v2")


def test_offline_after_a_tokenizer_only_download_names_what_is_missing(online, monkeypatch):
    hub.folder("tiny/neo", want="tokenizer")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (hub.folder("tiny/neo", want="tokenizer") / "tokenizer.json").is_file()
    with pytest.raises(HubError, match="cached copy of tiny/neo@main .* lacks its weights"):
        hub.folder("tiny/neo")


def test_no_network_uses_the_cache_with_a_warning(online, monkeypatch, tmp_path):
    main = hub.folder("tiny/neo")
    online.stop()
    with pytest.warns(hub.CachedCopyWarning, match="cannot reach http://127.0.0.1"):
        assert hub.folder("tiny/neo") == main


def test_gated_repo_with_token(online, monkeypatch, folders):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert_same_tree(eqx_models.from_pretrained("tiny/gated"), eqx_models.from_pretrained(folders / "first"))
    assert_same_tree(eqx_models.from_pretrained("tiny/private"), eqx_models.from_pretrained(folders / "first"))
    sent = {r.authorization for r in online.requests}
    assert sent == {f"Bearer {TOKEN}"}


def test_compat_from_pretrained_takes_hfs_download_options(online, folders, monkeypatch, tmp_path):
    """`cache_dir`, `token` (and `token=False`), `force_download`, `local_files_only` as in HF 4.57."""
    from eqx_models.compat import FlaxGPTNeoForCausalLM

    expected = eqx_models.from_pretrained(folders / "first")
    cache = tmp_path / "elsewhere"
    model = FlaxGPTNeoForCausalLM.from_pretrained("tiny/gated", cache_dir=cache, token=TOKEN)
    assert_same_tree(model.eqx_model, expected)
    assert (cache / "models--tiny--gated").is_dir() and not (tmp_path / "hf" / "hub" / "models--tiny--gated").exists()
    fetched = len(online.files_fetched())
    FlaxGPTNeoForCausalLM.from_pretrained("tiny/gated", cache_dir=cache, token=TOKEN)
    assert len(online.files_fetched()) == fetched
    FlaxGPTNeoForCausalLM.from_pretrained("tiny/gated", cache_dir=cache, token=TOKEN, force_download=True)
    assert len(online.files_fetched()) > fetched
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    online.requests.clear()
    FlaxGPTNeoForCausalLM.from_pretrained("tiny/neo", token=False)
    assert {r.authorization for r in online.requests} == {None}
    online.stop()
    offline = FlaxGPTNeoForCausalLM.from_pretrained("tiny/gated", cache_dir=cache, local_files_only=True)
    assert_same_tree(offline.eqx_model, expected)
    with pytest.raises(InputError, match="subfolder= is not supported"):
        FlaxGPTNeoForCausalLM.from_pretrained("tiny/neo", subfolder="flax")


# --------------------------------------------------------------------------- errors


ERRORS = [
    (["nobody/nothing"], "no folder nobody/nothing here and no repository nobody/nothing on http://"),
    (["tiny/private"], r"no repository tiny/private on .* \(if it is private, set HF_TOKEN\)"),
    (["tiny/neo", "--revision", "v3"], "revision 'v3' not found in tiny/neo on http://"),
    (["tiny/gated"], "tiny/gated is gated: accept its conditions at http://.*/tiny/gated, then set HF_TOKEN"),
    (
        ["tiny/no-weights"],
        "tiny/no-weights@main has no supported weight file \\(looked for model.safetensors, .*flax_model.msgpack.index"
        ".json\\); it has: config.json, generation_config.json, tokenizer.json",
    ),
    (["tiny/no-config"], "tiny/no-config@main has no config.json, so it is not a model we can load; it has: "),
]


def _api_call(argv):
    revision = argv[argv.index("--revision") + 1] if "--revision" in argv else None
    return lambda: eqx_models.from_pretrained(argv[0], revision=revision)


@pytest.mark.parametrize(("argv", "message"), ERRORS)
def test_errors(online, argv, message):
    with pytest.raises(HubError, match=message) as caught:
        _api_call(argv)()
    assert "\n" not in str(caught.value)


def test_gated_with_a_token_without_access(online, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_someone_else")
    with pytest.raises(HubError, match="tiny/gated is gated and the token in HF_TOKEN has no access"):
        eqx_models.from_pretrained("tiny/gated")


def test_no_network_and_nothing_cached(server, monkeypatch, tmp_path):
    server.stop()
    use_hub(monkeypatch, "http://127.0.0.1:9", tmp_path / "hf")  # the discard port: nothing listens
    with pytest.raises(HubError, match=r"cannot reach http://127.0.0.1:9 \(.*\), and the cache .* holds no copy of"):
        eqx_models.from_pretrained("tiny/neo")


def test_offline_and_nothing_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="no folder tiny/neo here, HF_HUB_OFFLINE is set, and the cache"):
        eqx_models.from_pretrained("tiny/neo")


def test_paths_are_never_hub_ids(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is not a folder \\(a file"):
        hub.folder(str(tmp_path / "file"))
    with pytest.raises(CheckpointError, match="is not a folder \\(it does not exist\\)"):
        hub.folder("./tiny/neo")
    with pytest.raises(CheckpointError, match="revision 'v2' applies to hub ids"):
        hub.folder(EXAMPLE, revision="v2")
    with pytest.raises(HubError, match="neither a local folder nor a valid hub id"):
        hub.folder("not an id")


# --------------------------------------------------------------------------- transformers and the CLI


TRANSFORMERS_LOAD = """
import sys, transformers
model = transformers.GPTNeoForCausalLM.from_pretrained(sys.argv[1], revision=sys.argv[2])
print(float(sum(p.detach().double().sum() for p in model.parameters())))
if sys.argv[1] == "tiny/neo-sharded":
    tokenizer = transformers.AutoTokenizer.from_pretrained(sys.argv[1], revision=sys.argv[2])
    print(tokenizer("def f():")["input_ids"])
"""


@pytest.mark.slow  # subprocesses importing torch or jax, or a compiled training run
@pytest.mark.parametrize(
    ("repo_id", "revision", "folder"), [("tiny/neo-sharded", "main", "first"), ("tiny/neo", "v2.0", "second")]
)
def test_transformers_loads_from_the_server(server, folders, tmp_path, monkeypatch, repo_id, revision, folder):
    env = subprocess_env(server, tmp_path / "hf")
    done = subprocess.run(
        [sys.executable, "-c", TRANSFORMERS_LOAD, repo_id, revision], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    expected = transformers.GPTNeoForCausalLM.from_pretrained(folders / folder)
    lines = done.stdout.splitlines()
    assert float(lines[0]) == float(sum(p.detach().double().sum() for p in expected.parameters()))
    if repo_id == "tiny/neo-sharded":
        local = transformers.AutoTokenizer.from_pretrained(folders / "sharded")
        assert lines[1] == str(local("def f():")["input_ids"])
    # The cache is shared: eqx_models loads what transformers downloaded, offline.
    server.stop()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_same_tree(
        eqx_models.from_pretrained(repo_id, revision=revision), eqx_models.from_pretrained(folders / folder)
    )


def cli(argv, env, cwd):
    return subprocess.run(
        [sys.executable, "-m", "eqx_models", *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow  # subprocesses importing torch or jax, or a compiled training run
def test_cli_convert_and_generate_from_an_id(server, tmp_path):
    env = subprocess_env(server, tmp_path / "hf")
    done = cli(["convert", "eqx/stdlib-gpt-neo", str(tmp_path / "out")], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".eqx_models.json",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (EXAMPLE / "tokenizer.json").read_bytes()
    assert not (tmp_path / "out" / "tokenizer.json").is_symlink()
    offline = subprocess_env(server, tmp_path / "hf", HF_HUB_OFFLINE="1")
    done = cli(["generate", "eqx/stdlib-gpt-neo", "--prompt", "def ", "--max-new-tokens", "8"], offline, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("def ") and len(done.stdout) > len("def \n")


@pytest.mark.slow
@pytest.mark.parametrize(("argv", "message"), ERRORS[:4] + ERRORS[5:])
def test_cli_errors(server, tmp_path, argv, message):
    done = cli(["convert", *argv, str(tmp_path / "out")], subprocess_env(server, tmp_path / "hf"), tmp_path)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    import re

    assert re.search(message, done.stderr), done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # subprocesses importing torch or jax, or a compiled training run
def test_cli_verify_an_id(server, tmp_path):
    pytest.importorskip("torch")
    done = cli(["verify", "tiny/neo", "--revision", "v2"], subprocess_env(server, tmp_path / "hf"), tmp_path)
    assert done.returncode == 0, done.stderr
    assert "max |logits difference|" in done.stdout


@pytest.mark.slow  # subprocesses importing torch or jax, or a compiled training run
def test_train_init_from_an_id(online, folders, tmp_path):
    from eqx_models.train import TrainConfig, train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("def f(x):\n    return x + 1\n" * 40)
    config = TrainConfig(
        init_from="tiny/neo",
        revision="v2",
        data=(str(corpus),),
        tokenizer="bytes",
        eval_fraction=0.0,
        seq_len=16,
        batch_size=2,
        steps=2,
        warmup_steps=1,
        eval_every=0,
        checkpoint_every=2,
        output=str(tmp_path / "run"),
        sample_prompt="",
        progress=False,
    )
    train(config, log=lambda line: None)
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["revision"] == "v2"
    start = eqx_models.from_pretrained(folders / "second")
    tuned = eqx_models.from_pretrained(tmp_path / "run" / "model")
    ids = jnp.arange(3, 20, dtype=jnp.int32)
    assert 0 < np.abs(np.asarray(tuned(ids)) - np.asarray(start(ids))).max() < 1.0
