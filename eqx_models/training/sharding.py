"""Data, FSDP and tensor parallelism with JAX's own SPMD (`jax.sharding`), no `pmap`.

One mesh with three named axes:

- `data`: the batch is split over it, parameters are replicated along it;
- `fsdp`: the batch is split over it too, and so are the parameters and the optimizer
  state (ZeRO-3 style: XLA gathers a weight where it is used and reduce-scatters its
  gradient);
- `tensor`: `Linear` weights are split along their output axis (column parallel).

Shardings are attached to the arrays (`shard_state`, `shard_batch`) and the ordinary
`make_train_step` runs unchanged: `jit` propagates the shardings of committed inputs.
`make_sharded_train_step` additionally pins the output state to the same shardings.

The same script runs on every host of a multi-host job: call `initialize_distributed()`
first, then build the mesh from all (global) devices; each process passes its own slice
of the batch to `shard_batch`. Single-host runs need nothing more than a mesh.
"""

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float, PyTree

from .. import nn
from ..errors import InputError
from ..nn import Stacked
from .step import Batch, TrainState, make_train_step

AXES = ("data", "fsdp", "tensor")
MIN_SHARDED_SIZE = 2**12
"""Arrays with fewer elements are replicated: splitting them saves little memory and
costs a collective each."""


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A `data x fsdp x tensor` device mesh with axis names `("data", "fsdp", "tensor")`.

    **Arguments:**

    - `data`, `fsdp`, `tensor`: the axis sizes; one of them may be `-1`, meaning all the
      devices the other two leave.
    - `devices`: the devices to use (by default `jax.devices()`, every device of every
      process).

    **Returns:** a `jax.sharding.Mesh` with automatic (propagated) axis types.

    Raises `InputError` when the sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    sizes = [data, fsdp, tensor]
    shown = "x".join(str(size) for size in sizes)
    if sum(size == -1 for size in sizes) > 1 or any(size == 0 or size < -1 for size in sizes):
        raise InputError(f"mesh shape data x fsdp x tensor = {shown}: sizes must be positive, at most one may be -1")
    if -1 in sizes:
        known = math.prod(size for size in sizes if size != -1)
        if count % known:
            raise InputError(
                f"mesh shape data x fsdp x tensor = {shown} does not fit {count} devices: "
                f"{count} is not divisible by {known}"
            )
        sizes[sizes.index(-1)] = count // known
    if math.prod(sizes) != count:
        raise InputError(
            f"mesh shape data x fsdp x tensor = {shown} has {math.prod(sizes)} devices, but there are {count}; "
            "the product must equal the device count (use -1 for 'the rest')"
        )
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _spec(shape: tuple[int, ...], fsdp: int, *, stacked: bool, tensor_axis: int | None, min_size: int) -> PartitionSpec:
    """The partition of one array: `tensor_axis` over "tensor" (when given), then the
    largest remaining axis divisible by `fsdp` over "fsdp" (not the stacked-layer axis 0
    if another axis qualifies)."""
    spec: list[str | None] = [None] * len(shape)
    if tensor_axis is not None:
        spec[tensor_axis] = "tensor"
    if fsdp > 1 and math.prod(shape) >= min_size:
        candidates = [i for i, n in enumerate(shape) if spec[i] is None and n % fsdp == 0]
        if stacked and len(candidates) > 1:
            candidates = [i for i in candidates if i != 0]
        if candidates:
            spec[max(candidates, key=lambda i: (shape[i], -i))] = "fsdp"
    return PartitionSpec(*spec)


def param_sharding(tree: PyTree, mesh: Mesh, *, min_size: int = MIN_SHARDED_SIZE) -> PyTree:
    """The `NamedSharding` of every array of `tree` (a model, its optimizer state, a whole
    `TrainState`); `None` at non-array leaves.

    The rules, applied to each array on its own:

    1. `tensor`: when the mesh's "tensor" axis is larger than 1, the weight `[out, in]`
       of every `nn.Linear` (`[layers, out, in]` when stacked) is split along `out` if
       `out` is divisible by it (column parallel). Everything else is replicated along
       "tensor".
    2. `fsdp`: an array with at least `min_size` elements is split over "fsdp" along its
       largest axis divisible by the fsdp size that rule 1 did not take (ties: the first
       such axis). Inside `Stacked` layers the leading `layers` axis is skipped when
       another axis qualifies. Small arrays and arrays with no divisible axis are
       replicated.
    3. Nothing is split over "data": parameters are replicated along it.

    Optax states mirror the parameter tree (Adam's `mu` and `nu` keep the model's
    modules), so the same rules shard them alike; step counts are scalars and replicated.
    Layouts stay correct whatever the rules pick: XLA inserts the collectives.
    """
    fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]

    def leaf(x: Any, *, stacked: bool, linear_weight: bool = False) -> NamedSharding | None:
        if not eqx.is_array(x):
            return None
        shape = tuple(x.shape)
        tensor_axis = None
        if linear_weight and tensor > 1 and len(shape) >= 2 and shape[-2] % tensor == 0:
            tensor_axis = len(shape) - 2
        spec = _spec(shape, fsdp, stacked=stacked, tensor_axis=tensor_axis, min_size=min_size)
        return NamedSharding(mesh, spec)

    def visit(node: Any, stacked: bool) -> Any:
        if isinstance(node, Stacked):
            return eqx.tree_at(
                lambda s: s.layers, node, walk(node.layers, not node.separate), is_leaf=lambda x: x is None
            )
        if isinstance(node, nn.Linear):
            shardings = jax.tree.map(lambda x: leaf(x, stacked=stacked), node)
            if eqx.is_array(node.weight):
                weight = leaf(node.weight, stacked=stacked, linear_weight=True)
                shardings = eqx.tree_at(lambda linear: linear.weight, shardings, weight, is_leaf=lambda x: x is None)
            return shardings
        return leaf(node, stacked=stacked)

    def walk(subtree: Any, stacked: bool) -> Any:
        return jax.tree.map(
            lambda node: visit(node, stacked), subtree, is_leaf=lambda x: isinstance(x, (Stacked, nn.Linear))
        )

    return walk(tree, False)


def _place(tree: PyTree, shardings: PyTree, put: Callable[[Any, Any], Any]) -> PyTree:
    arrays, static = eqx.partition(tree, eqx.is_array)
    placed = jax.tree.map(put, arrays, shardings)  # both hold None at the non-array leaves
    return eqx.combine(placed, static)


def put_global(value: Any, sharding: jax.sharding.Sharding) -> Array:
    """`jax.device_put(value, sharding)`, also when `sharding` spans several processes: then
    every process must hold the same whole `value` and places its own shards (typed PRNG
    keys included)."""
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(
            put_global(jax.random.key_data(value), sharding), impl=jax.random.key_impl(value)
        )
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_state(state: TrainState, mesh: Mesh, *, min_size: int = MIN_SHARDED_SIZE) -> TrainState:
    """`state` with its model, optimizer state, step and key placed on `mesh` by
    `param_sharding` (`jax.device_put`, or `put_global` when the mesh spans several
    processes; non-array leaves are kept as they are)."""
    return _place(state, param_sharding(state, mesh, min_size=min_size), put_global)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over `("data", "fsdp")`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def _check_batch(batch: dict[str, Any], mesh: Mesh, processes: int = 1) -> None:
    """Every entry's (global) batch size divisible by `data * fsdp`."""
    parts = mesh.shape["data"] * mesh.shape["fsdp"]
    for name, value in batch.items():
        if value is None:
            continue
        size = np.shape(value)[0] * processes if np.ndim(value) else None
        if size is None or size % parts:
            raise InputError(
                f"batch entry {name!r} has batch size {size}, which must be divisible by data x fsdp = "
                f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {parts}"
            )


def shard_batch(batch: dict[str, Any], mesh: Mesh) -> Batch:
    """`batch` (a dict of arrays, NumPy or JAX, with a leading batch axis) placed by
    `batch_sharding`; `None` entries stay `None`.

    In a multi-process job each process passes its own slice (equal sizes; the global
    batch is their concatenation in process order, `jax.make_array_from_process_local_data`).

    Raises `InputError`, before anything is compiled, when the (global) batch size is not
    divisible by `data * fsdp`.
    """
    sharding = batch_sharding(mesh)
    processes = jax.process_count()
    _check_batch(batch, mesh, processes)

    def put(value: Any) -> Array:
        if processes > 1:  # each process holds its own slice of the global batch
            return jax.make_array_from_process_local_data(sharding, np.asarray(value))
        return jax.device_put(value, sharding)

    return {name: None if value is None else put(value) for name, value in batch.items()}


def make_sharded_train_step(
    optimizer: optax.GradientTransformation, mesh: Mesh, *, min_size: int = MIN_SHARDED_SIZE, **step_options: Any
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Float[Array, ""]]]]:
    """`make_train_step(optimizer, **step_options)` with its shardings pinned: the batch
    is constrained to `batch_sharding(mesh)` and the returned state to
    `param_sharding(state, mesh)`, so the layout cannot drift from step to step whatever
    XLA's propagation picks. Takes a state from `shard_state` and a batch (sharded or
    not; its size is checked before compiling). The state is donated."""
    inner = make_train_step(optimizer, **step_options)
    batch_spec = batch_sharding(mesh)

    @eqx.filter_jit(donate="all")
    def constrained(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Float[Array, ""]]]:
        batch = {k: None if v is None else jax.lax.with_sharding_constraint(v, batch_spec) for k, v in batch.items()}
        state, metrics = inner(state, batch)
        state = _place(state, param_sharding(state, mesh, min_size=min_size), jax.lax.with_sharding_constraint)
        return state, metrics

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Float[Array, ""]]]:
        _check_batch(batch, mesh)
        return constrained(state, batch)

    return step


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Joins a multi-process (multi-host) job: a thin wrapper over
    `jax.distributed.initialize`. Run the same script on every host; afterwards
    `jax.devices()` lists every host's devices and `make_mesh()` spans them all.

    Unset arguments come from the standard variables `JAX_COORDINATOR_ADDRESS`
    (`host:port` of process 0), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`; once at least
    one of the three is known, JAX's cluster auto-detection (SLURM, Open MPI, Cloud
    TPU...) fills the others. To rely on auto-detection alone, call
    `jax.distributed.initialize()` directly.

    A single process is a no-op: nothing given and no coordinator in the environment, or
    `num_processes == 1`. Calling it again once initialised is a no-op too.

    **Returns:** whether the distributed runtime is (now) initialised.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if num_processes == 1 or (coordinator_address is None and num_processes is None and process_id is None):
        return False
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
