"""Activation functions by their HuggingFace names (`ACT2FN`)."""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ..errors import ConfigError


def _gelu_tanh(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    return jax.nn.gelu(x, approximate=True)


def _gelu_exact(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    return jax.nn.gelu(x, approximate=False)


def _quick_gelu(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    return x * jax.nn.sigmoid(1.702 * x)


def _gelu_fast(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    c = math.sqrt(2.0 / math.pi)
    return 0.5 * x * (1.0 + jnp.tanh(c * x * (1.0 + 0.044715 * x * x)))


def _relu2(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    return jnp.square(jax.nn.relu(x))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": _gelu_exact,
    "gelu_python": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_fast": _gelu_fast,
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "relu2": _relu2,
    "relu6": jax.nn.relu6,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "linear": lambda x: x,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation HF calls `name`; a `ConfigError` lists the known names otherwise."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"unsupported activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}") from None
