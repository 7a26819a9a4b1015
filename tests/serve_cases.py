"""Tiny random models for the serving tests (JAX only, no torch): a GPT-Neo and a T5, every
parameter drawn at random so that greedy decoding has no near ties to trip on."""

import equinox as eqx
import jax
import jax.numpy as jnp
from cases import GPT_NEO
from t5_cases import COMMON as T5

from eqx_models.models.gpt_neo import GPTNeoConfig, GPTNeoForCausalLM
from eqx_models.models.t5 import T5Config, T5ForConditionalGeneration


def randomised(model: eqx.Module, seed: int = 0, std: float = 1.0) -> eqx.Module:
    """Every floating-point parameter replaced by noise of `std` around its mean where it is
    constant (a fresh norm's 1s), around 0 elsewhere."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    fresh = []
    for key, leaf in zip(keys, leaves, strict=True):
        center = leaf.mean() if leaf.ndim == 1 and bool(jnp.all(leaf == leaf.reshape(-1)[0])) else 0.0
        fresh.append((center + std * jax.random.normal(key, leaf.shape)).astype(leaf.dtype))
    return eqx.combine(jax.tree.unflatten(tree, fresh), static)


def tiny_gpt_neo(seed: int = 0) -> GPTNeoForCausalLM:
    config = GPTNeoConfig(
        **{**GPT_NEO, "num_layers": 2, "attention_types": ((("global", "local"), 1),), "pad_token_id": 0},
        eos_token_id=5,
    )
    return eqx.nn.inference_mode(randomised(GPTNeoForCausalLM(config, key=jax.random.key(seed)), seed))


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    model = T5ForConditionalGeneration(T5Config(**T5), key=jax.random.key(seed))
    return eqx.nn.inference_mode(randomised(model, seed))
