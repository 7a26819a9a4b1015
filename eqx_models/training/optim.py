"""Optimisers: AdamW whose weight decay skips biases, norms and embeddings, gradient
clipping, warmup + cosine schedules and gradient accumulation, all from optax."""

import equinox as eqx
import jax
import optax
from jaxtyping import PyTree

from .. import nn
from ..errors import InputError


def decay_mask(params: PyTree) -> PyTree:
    """`True` for the parameters AdamW should decay: the weight matrices of `Linear`
    layers and every parameter an `Adapter` adds to its base (LoRA's matrices, as HF's
    Trainer decays them). Biases, norm scales, embeddings and position tables are not
    decayed.

    `params` is the model (or its `eqx.filter(model, eqx.is_inexact_array)` part, or the
    trainable part of it); the result has the same structure with booleans at the arrays.
    """

    def mark(node):
        if isinstance(node, nn.Linear) and node.weight is not None:
            return eqx.tree_at(lambda linear: linear.weight, jax.tree.map(lambda _: False, node), True)
        if isinstance(node, nn.Adapter):
            base, base_mask = node.base, decay_mask(node.base)
            return jax.tree.map(lambda sub: base_mask if sub is base else True, node, is_leaf=lambda sub: sub is base)
        return jax.tree.map(lambda _: False, node)

    return jax.tree.map(mark, params, is_leaf=lambda x: isinstance(x, (nn.Linear, nn.Adapter)))


def warmup_cosine(peak: float, *, warmup_steps: int, total_steps: int, end_fraction: float = 0.1) -> optax.Schedule:
    """Linear warmup from 0 to `peak` over `warmup_steps`, then cosine decay to
    `end_fraction * peak` at `total_steps`."""
    if not 0 <= warmup_steps < total_steps:
        raise InputError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}")
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, total_steps, end_value=peak * end_fraction)


def adamw(
    learning_rate: float | optax.Schedule,
    params: PyTree,
    *,
    weight_decay: float = 0.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = 1.0,
    accumulate: int = 1,
) -> optax.GradientTransformation:
    """AdamW (HF Trainer's defaults) with `decay_mask(params)`, global-norm clipping
    (`clip_norm=None` turns it off) and, with `accumulate > 1`, gradient accumulation:
    the update is applied every `accumulate` calls with the mean of their gradients."""
    if accumulate < 1:
        raise InputError(f"accumulate must be at least 1, got {accumulate}")
    mask = decay_mask(eqx.filter(params, eqx.is_inexact_array))
    chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    chain.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask))
    optimizer = optax.chain(*chain)
    return optax.MultiSteps(optimizer, every_k_schedule=accumulate) if accumulate > 1 else optimizer
