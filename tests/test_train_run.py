"""`eqx-models train` end to end on tiny presets: outputs, every family, resuming, sharding,
fine-tuning, config files, and bad settings failing before anything is compiled."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import eqx_models
from eqx_models import train as run
from eqx_models.cli import EXIT_BAD_INPUT, main
from eqx_models.training.presets import PRESETS


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few of the standard library's own files: present wherever Python is."""
    folder = tmp_path_factory.mktemp("corpus")
    for file in sorted(Path(json.__file__).parent.glob("*.py")):
        shutil.copy(file, folder / file.name)
    return folder


def tiny_flags(corpus, output, **changes):
    settings = {
        "family": "gpt_neo",
        "size": "tiny",
        "data": str(corpus),
        "tokenizer": "bytes",
        "eval_fraction": 0.2,
        "seq_len": 32,
        "batch_size": 4,
        "steps": 6,
        "warmup_steps": 2,
        "learning_rate": 3e-3,
        "eval_every": 3,
        "eval_batches": 2,
        "checkpoint_every": 3,
        "output": str(output),
        "sample_prompt": "",
        **changes,
    }
    flags = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return ["train", "--no-progress", *flags]


def metrics(output):
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    output = tmp_path_factory.mktemp("run") / "neo"
    assert main(tiny_flags(corpus, output, tokenizer="bpe:300")) == 0
    return output


@pytest.mark.slow
def test_a_run_writes_everything_and_the_model_loads_in_transformers(trained):
    for name in ("train_config.json", "tokenizer.json", "metrics.jsonl", "loss.png", "summary.json"):
        assert (trained / name).is_file(), name
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    records = metrics(trained)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["eval_loss"] == records[-1]["eval_loss"]
    assert 0 < summary["eval_bits_per_byte"] < 20 and 0 < summary["unigram_bits_per_byte"] < 20

    folder = trained / "model"
    assert (folder / "tokenizer.json").is_file()
    ours = eqx_models.from_pretrained(folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = jnp.arange(3, 20, dtype=jnp.int32)
    with torch.no_grad():
        expected = theirs(torch.tensor(np.asarray(ids)[None], dtype=torch.long)).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(ours(ids)), expected, atol=2e-5)
    # The BPE has <pad> = 0 and <eos> = 1, which the config carries.
    config = json.loads((folder / "config.json").read_text())
    assert (config["pad_token_id"], config["eos_token_id"], config["vocab_size"]) == (0, 1, 300)


# gpt_neo stays in the fast tier; the other families' runs are slow
@pytest.mark.slow
@pytest.mark.parametrize(
    "family", [f if f == "gpt_neo" else pytest.param(f, marks=pytest.mark.slow) for f in sorted(PRESETS)]
)
def test_every_family_trains_from_its_tiny_preset(corpus, tmp_path, family):
    output = tmp_path / family
    assert main(tiny_flags(corpus, output, family=family, steps=4, eval_every=0, checkpoint_every=4)) == 0
    losses = [r["loss"] for r in metrics(output) if "loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    model = eqx_models.from_pretrained(output / "model")
    assert type(model).__name__ == run.TEXT_HEADS[family]


def losses(output):
    return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in metrics(output)]


@pytest.mark.slow
def test_resuming_continues_exactly_and_cuts_the_metrics_back_to_the_checkpoint(corpus, trained, tmp_path, capsys):
    # A run killed after writing step 6's records but before its checkpoint: metrics.jsonl
    # holds steps 4-6, which the resumed run writes again; each step must appear once.
    resumed = tmp_path / "neo"
    shutil.copytree(trained, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    assert main([*tiny_flags(corpus, resumed, tokenizer="bpe:300"), "--resume"]) == 0
    assert "resumed from step 3 of 6; dropped 4 metrics.jsonl records written after it" in capsys.readouterr().out
    assert losses(resumed) == losses(trained)


@pytest.mark.slow
def test_resume_skips_a_corrupt_newest_checkpoint_and_a_torn_metrics_line(corpus, trained, tmp_path, capsys):
    resumed = tmp_path / "neo"
    shutil.copytree(trained, resumed)
    newest = resumed / "checkpoints" / "step_00000006" / "state.eqx"
    newest.write_bytes(newest.read_bytes()[:100])
    with open(resumed / "metrics.jsonl", "a") as log:
        log.write('{"step": 7, "lo')  # cut short by a kill
    assert main([*tiny_flags(corpus, resumed, tokenizer="bpe:300"), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "warning: skipped " in out and "step_00000006: cannot read" in out
    assert "resumed from step 3 of 6" in out
    assert losses(resumed) == losses(trained)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]


@pytest.mark.slow
def test_a_run_refuses_to_overwrite_or_resume_with_other_settings(corpus, trained, capsys):
    assert main(tiny_flags(corpus, trained, tokenizer="bpe:300")) == EXIT_BAD_INPUT
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main([*tiny_flags(corpus, trained, tokenizer="bpe:300", seq_len=16), "--resume"]) == EXIT_BAD_INPUT
    assert "seq_len: 32 -> 16" in capsys.readouterr().err


@pytest.mark.slow
def test_fine_tuning_starts_from_a_checkpoint_and_keeps_its_tokenizer(corpus, trained, tmp_path):
    output = tmp_path / "tuned"
    flags = tiny_flags(corpus, output, steps=3, eval_every=0, checkpoint_every=3, size="ignored")
    assert main([*flags, "--init-from", str(trained / "model")]) == 0
    assert (output / "model" / "tokenizer.json").read_bytes() == (trained / "tokenizer.json").read_bytes()
    start = eqx_models.from_pretrained(trained / "model")
    tuned = eqx_models.from_pretrained(output / "model")
    ids = jnp.arange(3, 20, dtype=jnp.int32)
    assert 0 < np.abs(np.asarray(tuned(ids)) - np.asarray(start(ids))).max() < 1.0


@pytest.mark.slow
def test_an_hf_config_json_trains_from_scratch_and_must_fit_the_tokenizer(corpus, tmp_path, capsys):
    config = transformers.XGLMConfig(d_model=32, ffn_dim=64, num_layers=2, attention_heads=4, vocab_size=300)
    config.to_json_file(tmp_path / "config.json")
    output = tmp_path / "xglm"
    flags = tiny_flags(corpus, output, steps=2, warmup_steps=1, eval_every=0, checkpoint_every=2, family="ignored")
    assert main([*flags, "--model-config", str(tmp_path / "config.json")]) == 0
    model = eqx_models.from_pretrained(output / "model")
    assert type(model).__name__ == "XGLMForCausalLM"
    assert (model.config.d_model, model.config.vocab_size, model.config.eos_token_id) == (32, 300, 256)

    transformers.XGLMConfig(d_model=32, num_layers=1, attention_heads=4, vocab_size=200).to_json_file(
        tmp_path / "small.json"
    )
    flags = tiny_flags(corpus, tmp_path / "small", steps=2, warmup_steps=1)
    assert main([*flags, "--model-config", str(tmp_path / "small.json")]) == EXIT_BAD_INPUT
    assert "has vocab_size 200 but the tokenizer has 258 ids" in capsys.readouterr().err


def test_a_config_file_sets_values_and_flags_override_it(corpus, tmp_path):
    file = tmp_path / "run.toml"
    file.write_text(f'family = "xglm"\nsize = "tiny"\ndata = ["{corpus}"]\nsteps = 9\nwarmup_steps = 2\nseq_len = 48\n')
    config = run.TrainConfig.from_file(file, steps=4)
    assert (config.family, config.steps, config.seq_len, config.data) == ("xglm", 4, 48, (str(corpus),))
    (tmp_path / "bad.toml").write_text('family = "xglm"\nlearning_rat = 1.0\n')
    with pytest.raises(eqx_models.errors.InputError, match="unknown setting.*learning_rat"):
        run.TrainConfig.from_file(tmp_path / "bad.toml")


BAD = [
    ({"family": "gpt_j"}, "unknown model family 'gpt_j'"),
    ({"size": "huge"}, "no preset 'huge' for gpt_neo"),
    ({"data": "/no/such/folder"}, "/no/such/folder"),
    ({"mesh": "2x1x1"}, "has 2 devices, but there are 1"),
    ({"mesh": "2x2"}, "DATAxFSDPxTENSOR"),
    ({"tokenizer": "sentencepiece"}, "tokenizer must be"),
    ({"seq_len": 300}, "longer than the model's 256 positions"),
    ({"warmup_steps": 6}, "warmup_steps"),
    ({"accumulate": 0}, "accumulate must be an integer in [1, 2**31 - 1], got 0"),
    ({"model_config": "/no/config.json"}, "no model config at /no/config.json"),
]


@pytest.mark.parametrize("changes, message", BAD, ids=[next(iter(c)) for c, _ in BAD])
def test_bad_settings_fail_clearly_before_compiling(corpus, tmp_path, monkeypatch, capsys, changes, message):
    def reached(*args, **kwargs):
        raise AssertionError("the run got as far as building the train state")

    monkeypatch.setattr(run, "init_state", reached)
    assert main(tiny_flags(corpus, tmp_path / "out", **changes)) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


SHARDED = textwrap.dedent(
    """
    import sys
    from eqx_models.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_a_sharded_run_matches_one_device_and_a_batch_must_divide_the_mesh(corpus, trained, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}

    def cli(*args):
        return subprocess.run([sys.executable, "-c", SHARDED, *args], env=env, capture_output=True, text=True)

    flags = tiny_flags(corpus, tmp_path / "sharded", tokenizer=str(trained / "tokenizer.json"), mesh="2x2x1")
    single = tiny_flags(corpus, tmp_path / "single", tokenizer=str(trained / "tokenizer.json"))
    done = cli(*flags)
    assert done.returncode == 0, done.stderr
    assert main(single) == 0
    sharded_losses = [r["loss"] for r in metrics(tmp_path / "sharded") if "loss" in r]
    single_losses = [r["loss"] for r in metrics(tmp_path / "single") if "loss" in r]
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)

    refused = cli(*tiny_flags(corpus, tmp_path / "odd", mesh="4x1x1", batch_size=6))
    assert refused.returncode == EXIT_BAD_INPUT
    assert "batch_size 6 does not divide over the mesh's data x fsdp = 4 devices" in refused.stderr


def _two_processes(flags, timeout=240):
    """Runs the CLI as a 2-process JAX job on this host (2 CPU devices each); returns the
    exit codes and outputs, killing both on a hang."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    procs = []
    for index in range(2):
        env = {
            **os.environ,
            "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(index),
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", SHARDED, *flags],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [proc.returncode for proc in procs], outputs


@pytest.mark.slow
def test_a_two_process_run_matches_one_device_and_resumes(corpus, trained, tmp_path):
    output = tmp_path / "two"
    flags = tiny_flags(corpus, output, tokenizer="bpe:300", mesh="2x2x1")
    codes, outputs = _two_processes(flags)
    assert codes == [0, 0], "\n".join(outputs)
    assert "model written to" in outputs[0] and "model written to" not in outputs[1]
    # Process 0 trained the same BPE; the losses are the single-device run's.
    assert (output / "tokenizer.json").read_bytes() == (trained / "tokenizer.json").read_bytes()
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]

    def losses(folder, name):
        return [(r["step"], r[name]) for r in metrics(folder) if name in r]

    for name in ("loss", "eval_loss"):
        ours, theirs = losses(output, name), losses(trained, name)
        assert [s for s, _ in ours] == [s for s, _ in theirs]
        np.testing.assert_allclose([v for _, v in ours], [v for _, v in theirs], rtol=1e-5)
    single = eqx_models.from_pretrained(trained / "model")
    ours = eqx_models.from_pretrained(output / "model")
    ids = jnp.arange(3, 20, dtype=jnp.int32)
    np.testing.assert_allclose(np.asarray(ours(ids)), np.asarray(single(ids)), rtol=1e-4, atol=1e-4)

    # Resuming from step 3 in the same 2-process setting continues the same way.
    resumed = tmp_path / "resumed"
    shutil.copytree(output, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    kept = [r for r in metrics(output) if r["step"] <= 3]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    codes, outputs = _two_processes([*tiny_flags(corpus, resumed, tokenizer="bpe:300", mesh="2x2x1"), "--resume"])
    assert codes == [0, 0], "\n".join(outputs)
    assert "resumed from step 3 of 6" in outputs[0]
    for name in ("loss", "eval_loss"):
        np.testing.assert_allclose(
            [v for _, v in losses(resumed, name)], [v for _, v in losses(output, name)], rtol=1e-5
        )
    assert [s for s, _ in losses(resumed, "loss")] == [1, 2, 3, 4, 5, 6]
