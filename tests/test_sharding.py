"""Sharded training (data, FSDP and tensor parallel) matches one device.

The test process has one CPU device, so the multi-device checks run in a subprocess with
8 fake CPU devices (`--xla_force_host_platform_device_count=8`) that reports JSON.

Tolerances (float32, 5 steps, batch 8 x 12, a tiny random GPT-Neo):

- losses: `rtol 1e-5` (sharding only reorders the reductions; observed ~3e-7);
- parameters after SGD: `max |diff| <= 1e-4 * max |update|` (observed ~1e-6 relative);
- parameters after AdamW (lr 1e-2): `atol 5e-4`, 5% of one step's largest move
  (observed ~1e-4). Adam divides each gradient entry by its own RMS, so the float32
  rounding of an entry near zero can move that entry by up to the learning rate.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from cases import hf_neo

import eqx_models
from eqx_models.training import sharding

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    from jaxtyping import install_import_hook

    with install_import_hook("eqx_models", "beartype.beartype"):
        import eqx_models
        from eqx_models.training import sharding
        from eqx_models.training.optim import adamw
        from eqx_models.training.step import init_state, make_train_step
    import equinox as eqx
    import jax.numpy as jnp
    import numpy as np
    import optax

    folder = sys.argv[1]
    model = eqx_models.from_pretrained(folder)
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(5):
        ids = rng.integers(0, vocab, (8, 12)).astype(np.int32)
        batches.append({"input_ids": ids, "labels": ids})
    out = {"devices": jax.device_count()}

    def params(state):
        return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(state.model, eqx.is_inexact_array))]

    def spec(x):
        names = [None if a is None else str(a) for a in x.sharding.spec]
        return names + [None] * (x.ndim - len(names))

    def run(optimizer, mesh=None, pinned=True):
        state = init_state(model, optimizer, key=jax.random.key(0))
        if mesh is None:
            step = make_train_step(optimizer)
        else:
            state = sharding.shard_state(state, mesh)
            wanted = sharding.param_sharding(state, mesh)
            step = sharding.make_sharded_train_step(optimizer, mesh) if pinned else make_train_step(optimizer)
        losses = []
        for batch in batches:
            batch = {k: jnp.asarray(v) for k, v in batch.items()} if mesh is None else sharding.shard_batch(batch, mesh)
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        result = {"losses": losses, "params": params(state)}
        if mesh is not None:
            arrays = jax.tree.leaves(eqx.filter(state, eqx.is_array))
            specs = jax.tree.leaves(wanted)
            result["kept"] = all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(arrays, specs))
        return state, result

    def compare(reference, other, initial):
        diffs = [float(np.max(np.abs(a - b))) for a, b in zip(reference["params"], other["params"])]
        moved = [float(np.max(np.abs(a - b))) for a, b in zip(reference["params"], initial)]
        losses = np.asarray(other["losses"]), np.asarray(reference["losses"])
        return {
            "losses": other["losses"],
            "loss_rel": float(np.max(np.abs(losses[0] - losses[1]) / np.abs(losses[1]))),
            "param_diff": max(diffs),
            "moved": max(moved),
            "kept": other.get("kept"),
        }

    initial = [np.asarray(x) for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))]
    meshes = {"data2_fsdp4": (2, 4, 1), "data4_tensor2": (4, 1, 2)}
    for name, make in {"adamw": lambda: adamw(1e-2, model), "sgd": lambda: optax.sgd(0.1)}.items():
        _, reference = run(make())
        out[name] = {"reference": reference["losses"]}
        for mesh_name, shape in meshes.items():
            mesh = sharding.make_mesh(*shape)
            state, result = run(make(), mesh)
            out[name][mesh_name] = compare(reference, result, initial)
            if name == "adamw":
                mlp = state.model.transformer.h.layers.mlp.c_fc.weight
                mu = state.opt_state[1][0].mu.transformer.h.layers.mlp.c_fc.weight
                out[name][mesh_name]["c_fc"] = {
                    "shape": list(mlp.shape),
                    "spec": spec(mlp),
                    "mu_spec": spec(mu),
                    "shards": sorted({tuple(s.data.shape) for s in mlp.addressable_shards}),
                    "n_shards": len(mlp.addressable_shards),
                    "ln_f": spec(state.model.transformer.ln_f.weight),
                }
        if name == "adamw":  # the unchanged step also runs on sharded inputs
            _, result = run(make(), sharding.make_mesh(2, 4, 1), pinned=False)
            out[name]["unpinned"] = compare(reference, result, initial)

    errors = {}
    try:
        sharding.make_mesh(3, 3)
    except eqx_models.InputError as error:
        errors["mesh"] = str(error)
    mesh = sharding.make_mesh(2, 4)
    bad = {"input_ids": np.zeros((6, 12), np.int32), "labels": np.zeros((6, 12), np.int32)}
    try:
        sharding.shard_batch(bad, mesh)
    except eqx_models.InputError as error:
        errors["batch"] = str(error)
    optimizer = adamw(1e-2, model)
    step = sharding.make_sharded_train_step(optimizer, mesh)
    state = sharding.shard_state(init_state(model, optimizer, key=jax.random.key(0)), mesh)
    try:
        step(state, {k: jnp.asarray(v) for k, v in bad.items()})
    except eqx_models.InputError as error:
        errors["step"] = str(error)
    out["errors"] = errors
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def multi_device(tmp_path_factory):
    folder = tmp_path_factory.mktemp("neo")
    hf_neo(folder)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data2_fsdp4", "data4_tensor2"])
def test_sharded_adamw_training_matches_one_device(multi_device, mesh):
    assert multi_device["devices"] == 8
    result = multi_device["adamw"][mesh]
    print(
        f"AdamW {mesh}: max rel loss diff {result['loss_rel']:.1e}, max |param diff| {result['param_diff']:.1e} "
        f"(params moved up to {result['moved']:.1e})"
    )
    np.testing.assert_allclose(result["losses"], multi_device["adamw"]["reference"], rtol=1e-5)
    assert result["param_diff"] < 5e-4
    assert result["kept"]  # the pinned step returns the state in the layout it was given
    assert result["losses"][-1] < result["losses"][0]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data2_fsdp4", "data4_tensor2"])
def test_sharded_sgd_training_matches_one_device(multi_device, mesh):
    result = multi_device["sgd"][mesh]
    print(
        f"SGD {mesh}: max rel loss diff {result['loss_rel']:.1e}, max |param diff| {result['param_diff']:.1e} "
        f"(params moved up to {result['moved']:.1e})"
    )
    np.testing.assert_allclose(result["losses"], multi_device["sgd"]["reference"], rtol=1e-5)
    assert result["param_diff"] <= 1e-4 * result["moved"]
    assert result["kept"]


@pytest.mark.slow
def test_the_plain_train_step_runs_on_sharded_inputs(multi_device):
    result = multi_device["adamw"]["unpinned"]
    print(f"plain step, data2_fsdp4: max rel loss diff {result['loss_rel']:.1e}, kept layout {result['kept']}")
    np.testing.assert_allclose(result["losses"], multi_device["adamw"]["reference"], rtol=1e-5)
    assert result["param_diff"] < 5e-4


@pytest.mark.slow
def test_parameters_and_optimizer_state_are_really_split(multi_device):
    fsdp = multi_device["adamw"]["data2_fsdp4"]["c_fc"]
    assert fsdp["shape"] == [4, 128, 32]  # [layers, out, in]
    assert fsdp["spec"] == [None, "fsdp", None] and fsdp["mu_spec"] == fsdp["spec"]
    assert fsdp["n_shards"] == 8 and fsdp["shards"] == [[4, 32, 32]]  # a quarter each, twice (data)
    assert fsdp["ln_f"] == [None]  # small: replicated
    tensor = multi_device["adamw"]["data4_tensor2"]["c_fc"]
    assert tensor["spec"] == [None, "tensor", None] and tensor["mu_spec"] == tensor["spec"]
    assert tensor["shards"] == [[4, 64, 32]]


@pytest.mark.slow
def test_bad_mesh_and_batch_are_named(multi_device):
    errors = multi_device["errors"]
    assert "3x3x1" in errors["mesh"] and "8" in errors["mesh"]
    assert "6" in errors["batch"] and "8" in errors["batch"]
    assert "6" in errors["step"] and "8" in errors["step"]


def test_mesh_sizes_are_checked_without_devices():
    fake = [object()] * 8
    with pytest.raises(eqx_models.InputError, match=r"3x3x1 has 9 devices, but there are 8"):
        sharding.make_mesh(3, 3, devices=fake)
    with pytest.raises(eqx_models.InputError, match="not divisible by 3"):
        sharding.make_mesh(-1, 3, devices=fake)
    with pytest.raises(eqx_models.InputError, match="at most one may be -1"):
        sharding.make_mesh(-1, -1, devices=fake)


def test_param_sharding_rules():
    mesh = jax.make_mesh((1, 1, 1), sharding.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    spec = sharding._spec
    assert spec((4, 128, 32), 4, stacked=True, tensor_axis=None, min_size=1) == jax.P(None, "fsdp", None)
    assert spec((4, 6, 6), 4, stacked=True, tensor_axis=None, min_size=1) == jax.P("fsdp", None, None)
    assert spec((4, 128, 32), 4, stacked=True, tensor_axis=1, min_size=1) == jax.P(None, "tensor", "fsdp")
    assert spec((97, 32), 4, stacked=False, tensor_axis=None, min_size=1) == jax.P(None, "fsdp")
    assert spec((97, 32), 4, stacked=False, tensor_axis=None, min_size=2**12) == jax.P(None, None)
    assert spec((97,), 4, stacked=False, tensor_axis=None, min_size=1) == jax.P(None)
    tree = {"w": np.zeros((8, 8), np.float32), "n": 3}
    shardings = sharding.param_sharding(tree, mesh)
    assert shardings["n"] is None and shardings["w"].mesh is mesh
    assert sharding.batch_sharding(mesh).spec == jax.P(("data", "fsdp"))


def test_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert sharding.initialize_distributed() is False
    assert sharding.initialize_distributed(num_processes=1) is False
    assert not jax.distributed.is_initialized()
