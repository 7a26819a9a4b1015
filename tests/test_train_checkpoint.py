"""Training checkpoints: a resumed run equals an uninterrupted one bit for bit, saves are
atomic, bad checkpoints fail clearly, and the manager keeps the newest few."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cases import GPT_NEO, hf_neo

import eqx_models
from eqx_models.errors import CheckpointError, InputError
from eqx_models.training.checkpoint import (
    CheckpointManager,
    latest_checkpoint,
    load_train_state,
    save_train_state,
)
from eqx_models.training.data import PackedBatches
from eqx_models.training.optim import adamw
from eqx_models.training.step import init_state, make_train_step

DROPOUT = dict(embed_dropout=0.1, resid_dropout=0.1, attention_dropout=0.1)


@pytest.fixture(scope="module")
def neo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("neo")
    hf_neo(folder, **DROPOUT)
    return eqx_models.from_pretrained(folder)


def make_batches():
    tokens = np.random.default_rng(3).integers(0, GPT_NEO["vocab_size"], 20 * 16 + 7).astype(np.int32)
    return PackedBatches(tokens, seq_len=16, batch_size=4, seed=1)  # 5 batches/epoch: 6 steps cross one


def to_device(batch):
    ids = jnp.asarray(batch["input_ids"])
    return {"input_ids": ids, "attention_mask": jnp.asarray(batch["attention_mask"]), "labels": ids}


def setup(model):
    optimizer = adamw(1e-2, model, weight_decay=0.01)
    return optimizer, make_train_step(optimizer)


def run(step, state, batches, steps):
    losses = []
    for _ in range(steps):
        state, metrics = step(state, to_device(batches.next_batch()))
        losses.append(np.asarray(metrics["loss"]))
    return state, losses


def assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten(eqx.filter(a, eqx.is_array))
    leaves_b, tree_b = jax.tree_util.tree_flatten(eqx.filter(b, eqx.is_array))
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_bit_for_bit(neo, tmp_path):
    optimizer, step = setup(neo)
    batches = make_batches()
    assert batches.batches_per_epoch >= 2
    full, full_losses = run(step, init_state(neo, optimizer, key=jax.random.key(42)), batches, 6)

    batches = make_batches()
    state, first_losses = run(step, init_state(neo, optimizer, key=jax.random.key(42)), batches, 3)
    save_train_state(tmp_path / "ckpt", state, data_position=batches.position, extra={"note": "half way"})
    del state  # the next step would donate it; resume only from disk

    like = eqx.filter_eval_shape(init_state, neo, optimizer, key=jax.random.key(0))
    state, meta = load_train_state(tmp_path / "ckpt", like)
    assert meta["step"] == 3 and meta["extra"] == {"note": "half way"}
    assert meta["key"]["impl"] == "threefry2x32"
    assert jnp.issubdtype(state.key.dtype, jax.dtypes.prng_key)
    resumed_batches = make_batches()
    resumed_batches.restore(meta["data_position"])
    state, last_losses = run(step, state, resumed_batches, 3)

    np.testing.assert_array_equal(np.stack(full_losses), np.stack(first_losses + last_losses))
    assert len(set(float(x) for x in full_losses)) > 1
    assert int(state.step) == int(full.step) == 6
    assert_trees_equal(state.model, full.model)
    assert_trees_equal(state.opt_state, full.opt_state)
    assert_trees_equal(state.key, full.key)


@pytest.mark.slow
def test_dropout_key_matters(neo):
    """Sanity check that the bit-for-bit test would notice a wrong key."""
    optimizer, step = setup(neo)
    batch = to_device(make_batches().batch_at(0, 0))
    _, a = step(init_state(neo, optimizer, key=jax.random.key(1)), batch)
    _, b = step(init_state(neo, optimizer, key=jax.random.key(2)), batch)
    assert float(a["loss"]) != float(b["loss"])


def test_raw_uint32_key_round_trips(neo, tmp_path):
    optimizer, _ = setup(neo)
    state = init_state(neo, optimizer, key=jax.random.PRNGKey(7))
    save_train_state(tmp_path / "raw", state)
    loaded, meta = load_train_state(tmp_path / "raw", init_state(neo, optimizer, key=jax.random.PRNGKey(0)))
    assert meta["key"]["typed"] is False and meta["data_position"] is None
    np.testing.assert_array_equal(np.asarray(loaded.key), np.asarray(jax.random.PRNGKey(7)))
    # ... and into a typed skeleton, as a typed key with the same data
    typed, _ = load_train_state(tmp_path / "raw", init_state(neo, optimizer, key=jax.random.key(0)))
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(typed.key)), np.asarray(jax.random.PRNGKey(7)))


def test_failed_save_keeps_previous_checkpoint_and_leaves_no_temporary(neo, tmp_path, monkeypatch):
    optimizer, _ = setup(neo)
    first = init_state(neo, optimizer, key=jax.random.key(5))
    folder = tmp_path / "ckpt"
    save_train_state(folder, first, extra={"version": 1})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    real = eqx.tree_serialise_leaves

    def half_then_fail(path, tree):
        real(path, jax.tree.leaves(tree)[:2])  # a partial file is on disk
        raise OSError("disk full")

    monkeypatch.setattr(eqx, "tree_serialise_leaves", half_then_fail)
    second = init_state(neo, optimizer, key=jax.random.key(6))
    with pytest.raises(OSError, match="disk full"):
        save_train_state(folder, second, extra={"version": 2}, overwrite=True)
    monkeypatch.undo()

    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    loaded, meta = load_train_state(folder, first)
    assert meta["extra"] == {"version": 1}
    assert_trees_equal(loaded, first)


def test_save_replaces_an_existing_checkpoint_only_when_asked(neo, tmp_path):
    optimizer, _ = setup(neo)
    save_train_state(tmp_path / "c", init_state(neo, optimizer, key=jax.random.key(1)), extra={"n": 1})
    with pytest.raises(InputError, match="c is not empty; pass --overwrite"):
        save_train_state(tmp_path / "c", init_state(neo, optimizer, key=jax.random.key(2)), extra={"n": 2})
    save_train_state(tmp_path / "c", init_state(neo, optimizer, key=jax.random.key(2)), extra={"n": 2}, overwrite=True)
    like = init_state(neo, optimizer, key=jax.random.key(0))
    loaded, meta = load_train_state(tmp_path / "c", like)
    assert meta["extra"] == {"n": 2}
    assert_trees_equal(loaded.key, jax.random.key(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c"]
    # A folder someone else wrote is never replaced, even when asked.
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not written by eqx_models"):
        save_train_state(tmp_path / "theirs", like, overwrite=True)
    assert [p.name for p in (tmp_path / "theirs").iterdir()] == ["notes.txt"]


def test_loading_into_a_different_model_fails_clearly(neo, tmp_path):
    optimizer, _ = setup(neo)
    save_train_state(tmp_path / "ckpt", init_state(neo, optimizer, key=jax.random.key(0)))
    hf_neo(tmp_path / "wide", **{**DROPOUT, "hidden_size": 48})
    wide = eqx_models.from_pretrained(tmp_path / "wide")
    wide_optimizer = adamw(1e-2, wide)
    like = eqx.filter_eval_shape(init_state, wide, wide_optimizer, key=jax.random.key(0))
    with pytest.raises(CheckpointError, match=r"state\.eqx.*does not fit.*shape \(97, 32\).*shape \(97, 48\)"):
        load_train_state(tmp_path / "ckpt", like)

    hf_neo(tmp_path / "deep", **{**DROPOUT, "num_layers": 2, "attention_types": [[["global"], 2]]})
    deep = eqx_models.from_pretrained(tmp_path / "deep", scan_layers=False)
    like = eqx.filter_eval_shape(init_state, deep, adamw(1e-2, deep), key=jax.random.key(0))
    with pytest.raises(CheckpointError, match=r"state\.eqx"):
        load_train_state(tmp_path / "ckpt", like)

    like = eqx.filter_eval_shape(init_state, neo, optax.sgd(0.1), key=jax.random.key(0))
    with pytest.raises(CheckpointError, match=r"state\.eqx has a different structure.*not in `like`: .opt_state"):
        load_train_state(tmp_path / "ckpt", like)


def test_missing_or_bad_checkpoints_fail_clearly(neo, tmp_path):
    optimizer, _ = setup(neo)
    like = init_state(neo, optimizer, key=jax.random.key(0))
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        load_train_state(tmp_path / "nowhere", like)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="trainer.json"):
        load_train_state(tmp_path / "empty", like)

    folder = tmp_path / "ckpt"
    save_train_state(folder, like)
    meta = json.loads((folder / "trainer.json").read_text())
    (folder / "trainer.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="trainer.json has format_version 99"):
        load_train_state(folder, like)
    (folder / "trainer.json").write_text(json.dumps(meta))

    data = (folder / "state.eqx").read_bytes()
    (folder / "state.eqx").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read .*state.eqx"):
        load_train_state(folder, like)
    (folder / "state.eqx").unlink()
    with pytest.raises(CheckpointError, match="no state.eqx"):
        load_train_state(folder, like)

    with pytest.raises(CheckpointError, match="JSON-serialisable"):
        save_train_state(tmp_path / "bad", like, extra={"x": object()})
    assert not (tmp_path / "bad").exists()


def test_manager_keeps_the_newest_and_finds_the_latest(neo, tmp_path):
    optimizer, _ = setup(neo)
    state = init_state(neo, optimizer, key=jax.random.key(0))
    manager = CheckpointManager(tmp_path / "run", keep=2)
    assert manager.latest() is None and latest_checkpoint(tmp_path / "run") is None
    for step in (3, 10, 7, 12):
        manager.save(step, state, {"epoch": 0, "index": step}, {"step": step})
    assert manager.steps() == [10, 12]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["step_00000010", "step_00000012"]
    assert manager.latest() == tmp_path / "run" / "step_00000012"
    (tmp_path / "run" / ".step_00000099.tmp-abc").mkdir()  # an interrupted save is ignored
    assert latest_checkpoint(tmp_path / "run") == tmp_path / "run" / "step_00000012"
    _, meta = manager.restore_latest(state)
    assert meta["data_position"] == {"epoch": 0, "index": 12} and meta["extra"] == {"step": 12}
    with pytest.raises(CheckpointError, match="keep"):
        CheckpointManager(tmp_path, keep=0)


def test_restore_skips_corrupt_newest_checkpoints_for_an_older_intact_one(neo, tmp_path):
    optimizer, _ = setup(neo)
    manager = CheckpointManager(tmp_path / "run", keep=None)
    for step in (1, 2, 3):
        manager.save(step, init_state(neo, optimizer, key=jax.random.key(step)), {"index": step}, {"step": step})
    newest = tmp_path / "run" / "step_00000003"
    (newest / "state.eqx").write_bytes((newest / "state.eqx").read_bytes()[:64])
    (tmp_path / "run" / "step_00000002" / "trainer.json").write_text("{not json")
    like = eqx.filter_eval_shape(init_state, neo, optimizer, key=jax.random.key(0))
    skipped = []
    state, meta = manager.restore_latest(like, on_skip=lambda path, err: skipped.append((path.name, str(err))))
    assert meta["extra"] == {"step": 1} and meta["data_position"] == {"index": 1}
    assert_trees_equal(state.key, jax.random.key(1))
    assert [name for name, _ in skipped] == ["step_00000003", "step_00000002"]
    assert "cannot read" in skipped[0][1] and "not valid JSON" in skipped[1][1]
    with pytest.warns(UserWarning) as caught:
        manager.restore_latest(like)
    assert [str(w.message).split(",")[0].rsplit("/", 1)[-1] for w in caught] == ["step_00000003", "step_00000002"]
    assert all(str(w.message).startswith("skipped the checkpoint ") for w in caught)
    # The corrupt ones stay for inspection, and a save at their step replaces them.
    assert manager.steps() == [1, 2, 3]
    manager.save(3, state, {"index": 3})
    assert manager.restore_latest(like)[1]["data_position"] == {"index": 3}

    (tmp_path / "run" / "step_00000001" / "state.eqx").write_bytes(b"")
    (tmp_path / "run" / "step_00000003" / "state.eqx").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint in .*run could be loaded.*step_00000003.*step_00000001"):
        manager.restore_latest(like, on_skip=lambda path, err: None)
