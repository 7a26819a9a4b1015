"""One compiled training step: gradients of the trainable part of the model (by default
every inexact array; LoRA: the adapters alone), the optax update, `apply_updates`; dropout
keys derived from the step; optional bfloat16 compute over float32 master weights."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.typing import DTypeLike
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from .losses import head_loss

Batch = dict[str, Array]
LossFn = Callable[..., tuple[Float[Array, ""], dict[str, Float[Array, ""]]]]
#: Given the model, the `eqx.partition` filter spec of its trainable arrays (a callable per
#: leaf, or a tree of booleans like `eqx_models.lora.adapter_filter(model)`).
Trainable = Callable[[PyTree], Any]


def all_inexact(model: PyTree) -> Any:
    """Full training: every floating-point array is trainable."""
    return eqx.is_inexact_array


class TrainState(eqx.Module):
    """Everything a run carries from step to step (and saves in a checkpoint)."""

    model: PyTree
    opt_state: PyTree
    step: Int[Array, ""]
    key: PRNGKeyArray


def init_state(
    model: PyTree, optimizer: optax.GradientTransformation, *, key: PRNGKeyArray, trainable: Trainable = all_inexact
) -> TrainState:
    """A fresh state: a copy of `model` in training mode (dropout on), optimizer state for
    its trainable arrays (`trainable(model)`, by default every inexact array), step 0.
    `key` seeds every step's dropout. The state owns its arrays (the train step donates
    them), so `model` stays usable."""
    model = eqx.nn.inference_mode(model, value=False)
    model = jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, model)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(eqx.filter(model, trainable(model)))
    return TrainState(model, opt_state, jnp.zeros((), jnp.int32), key)


def cast_floating(tree: PyTree, dtype: DTypeLike) -> PyTree:
    """Every floating array of `tree` in `dtype` (mixed precision: the compute copy)."""
    return jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree)


def make_train_step(
    optimizer: optax.GradientTransformation,
    *,
    loss_fn: LossFn = head_loss,
    compute_dtype: DTypeLike | None = None,
    trainable: Trainable = all_inexact,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Float[Array, ""]]]]:
    """`step(state, batch) -> (state, metrics)`, compiled once per batch shape.

    - `loss_fn(model, batch, key=...) -> (loss, metrics)`; by default `head_loss`.
    - `compute_dtype`: e.g. `jnp.bfloat16` runs the forward and backward passes in that
      dtype while the parameters and optimizer state stay float32 (gradients flow back
      through the cast, so updates land on the float32 master weights).
    - `trainable(model)`: the filter spec of the arrays that get gradients and updates (as
      given to `init_state`); the rest of the model is frozen, bit for bit.

    Dropout uses `fold_in(state.key, state.step)`, so a resumed run draws the same masks
    as an uninterrupted one. The state is donated: do not reuse the one passed in.
    """

    @eqx.filter_jit(donate="all")
    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Float[Array, ""]]]:
        params, static = eqx.partition(state.model, trainable(state.model))
        dropout_key = jax.random.fold_in(state.key, state.step)

        def loss(params: PyTree) -> tuple[Float[Array, ""], Any]:
            model = eqx.combine(params, static)
            if compute_dtype is not None:
                model = cast_floating(model, compute_dtype)
            return loss_fn(model, batch, key=dropout_key)

        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int step counts with floats
            updates, opt_state = optimizer.update(grads, state.opt_state, params)
        model = eqx.apply_updates(state.model, updates)
        metrics = {**metrics, "loss": value, "grad_norm": optax.tree.norm(grads)}
        return TrainState(model, opt_state, state.step + 1, state.key), metrics

    return step
