"""Models from parameter dicts already in memory, and back: a PyTorch `state_dict()` or the
`params` of an HF Flax model, without writing files.

Loading goes through the same strict loader as folders (`pretrained.load_state`), so the
checks and messages are the same; the HF Flax layout is `checkpoint.layout`'s.
"""

import sys
from collections.abc import Mapping
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import nn
from .checkpoint._lazy import LazyTensor
from .checkpoint.keymap import KeyMap, array_leaves, tree_to_state
from .checkpoint.layout import flatten_params, flax_layout, tree_to_flax, unwrap_params
from .errors import CheckpointError, ConfigError, InputError
from .models import Family, Model, ModelConfig, class_by_name, family_of, resolve_class
from .pretrained import load_state
from .validation import show_value

Layout = Literal["pytorch", "flax"]


def from_state_dict(
    state: Mapping[str, Any],
    config: Any,
    *,
    architecture: str | None = None,
    dtype: Any = None,
    strict: bool = False,
    key: jax.Array | None = None,
    **options: Any,
) -> Model:
    """A model from parameters in memory, in inference mode.

    **Arguments:**

    - `state`: either a flat PyTorch state dict (`torch_model.state_dict()`; values torch
      tensors, numpy or JAX arrays) or the nested params of an HF Flax model
      (`flax_model.params`; a dict or flax `FrozenDict`, possibly wrapped as
      `{"params": ...}`). The layout is detected: nested means Flax.
    - `config`: a transformers config object (anything with `.to_dict()`), the dict of a
      `config.json`, or our config (`GPTNeoConfig`...).
    - `architecture`: the class to build (`"GPTNeoForCausalLM"`). Default: the config's
      `architectures`, else the family's class whose parameters the state holds (the text
      head when several fit, as a tied T5 head adds none).
    - `dtype`, `strict`, `key`, `options`: as `from_pretrained` (float32 by default; NaN or
      Inf weights an error when `strict`; `key` initialises heads the state lacks).

    Strict as loading a folder: a missing or unexpected key or a wrong shape is a
    `CheckpointError` naming the key; a base-model state loads into a head (the head
    initialised) and a head's state into the base model. Tied copies PyTorch keeps
    (`lm_head.weight`, T5's `embed_tokens`) are read and dropped.
    """
    hf_config = _config_dict(config)
    flat, layout = _normalise_state(state)
    if architecture is None and not hf_config.get("architectures"):
        architecture = _infer_architecture(family_of(hf_config.get("model_type")), hf_config, flat, layout)
    model, _ = load_state(
        hf_config,
        lambda cls, config, skeleton: (flat, cls.key_map(config), layout),
        label=f"{layout} state dict",
        dtype=dtype,
        architecture=architecture,
        key=key,
        strict=strict,
        **options,
    )
    return model


def to_state_dict(model: Model, *, layout: Layout = "pytorch") -> dict[str, Any]:
    """The parameters of `model` under HF's names.

    - `layout="pytorch"`: a flat dict of numpy arrays under PyTorch's names, tied copies
      included, which `torch_model.load_state_dict({k: torch.from_numpy(v) ...},
      strict=True)` accepts (bfloat16 arrays are `ml_dtypes.bfloat16`; convert them with
      `torch.from_numpy(v.view(np.int16)).view(torch.bfloat16)`).
    - `layout="flax"`: the nested dict HF's Flax class of the same architecture holds as
      `.params` (same keys, shapes, dtypes and values; JAX arrays), built by
      `checkpoint.layout.tree_to_flax`, which also runs under `jax.jit`.
    """
    class_by_name(type(model).__name__)  # an unregistered class fails by name
    model = nn.stack_layers(model)  # HF's names index the stacked layers
    key_map = type(model).key_map(model.config)
    if layout == "pytorch":
        return tree_to_state(model, key_map, tied=True)
    if layout == "flax":
        return tree_to_flax(model, key_map)
    raise InputError(f"layout must be 'pytorch' or 'flax', got {show_value(layout)}")


# --------------------------------------------------------------------------- inputs


def _config_dict(config: Any) -> dict[str, Any]:
    """A `config.json`-style dict from our config, a dict, or a transformers config."""
    if isinstance(config, ModelConfig):
        out = config.to_hf_config()
    elif isinstance(config, Mapping):
        out = dict(config)
    elif callable(getattr(config, "to_dict", None)):
        out = config.to_dict()
        if not isinstance(out, dict):
            raise ConfigError(f"config.to_dict() returned {type(out).__name__}, not a dict")
    else:
        raise ConfigError(
            "config must be a transformers config, a config.json dict or an eqx_models config, "
            f"got {show_value(config)}"
        )
    out.pop("eqx_models", None)  # our folders' metadata: the caller chooses architecture and dtype here
    return out


def _normalise_state(state: Any) -> tuple[dict[str, LazyTensor], Layout]:
    """The state as `{name: LazyTensor}` (nothing converted yet) and its layout: a nested
    mapping is HF Flax params (names `.`-joined), a flat one a PyTorch state dict."""
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"state must be a PyTorch state dict or HF Flax params (a mapping), got {type(state).__name__}"
        )
    state = unwrap_params(state)
    if not state:
        raise CheckpointError("state is empty: no parameters to load")
    if any(isinstance(value, Mapping) for value in state.values()):
        flat, layout = flatten_params(state, "."), "flax"
    else:
        flat, layout = dict(state), "pytorch"
        bad = [k for k in flat if not isinstance(k, str)]
        if bad:
            raise CheckpointError(f"state dict keys must be strings, got {bad[0]!r}")
    return {name: _lazy(value, name, layout) for name, value in flat.items()}, layout


def _lazy(value: Any, name: str, layout: str) -> LazyTensor:
    """`value` (a numpy or JAX array, or a torch tensor, never imported here) as a
    `LazyTensor`: shape and dtype now, the values converted only when the loader reads them."""
    if isinstance(value, LazyTensor):
        return value
    if isinstance(value, np.ndarray | jax.Array):
        return LazyTensor(f"state entry {name}", value.dtype, value.shape, lambda: np.asarray(value))
    if type(value).__module__.split(".")[0] == "torch" and callable(getattr(value, "detach", None)):
        torch = sys.modules["torch"]
        dtype_name = str(value.dtype).removeprefix("torch.")
        try:
            dtype = jnp.dtype(dtype_name)
        except TypeError:
            raise CheckpointError(
                f"state entry {name} has the torch dtype {value.dtype}, which is not supported"
            ) from None

        def read() -> np.ndarray:
            tensor = value.detach().cpu()
            if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
                return tensor.view(torch.int16).numpy().view(jnp.bfloat16)
            return tensor.numpy()

        return LazyTensor(f"state entry {name}", dtype, tuple(value.shape), read)
    kind = "a nested Flax params dict" if layout == "flax" else "a flat PyTorch state dict"
    raise CheckpointError(
        f"state entry {name} is a {type(value).__name__}, not an array: the state is neither a flat PyTorch "
        f"state dict nor nested Flax params (read as {kind})"
    )


def _entries(cls: type[Model], hf_config: dict[str, Any], layout: Layout) -> set[tuple[str, tuple[int, ...]]]:
    """The `(name, shape)` pairs a `layout` state of `cls` holds, tied copies included."""
    family, _ = resolve_class(hf_config, cls.__name__)
    config = family.config.from_hf_config(hf_config)
    skeleton = eqx.filter_eval_shape(cls, config, key=jax.random.key(0))
    key_map: KeyMap = cls.key_map(config)
    out: set[tuple[str, tuple[int, ...]]] = set()
    if layout == "flax":
        for _, spec, leaf in flax_layout(skeleton, key_map):
            if spec is not None:
                shape = tuple(leaf.shape[1:] if spec.stacked else leaf.shape)
                shape = shape[::-1] if spec.transpose else shape
                for i in range(leaf.shape[0]) if spec.stacked else [None]:
                    out.add((".".join(spec.flax_path(i)), shape))
        return out
    shapes: dict[str, tuple[int, ...]] = {}
    for path, leaf in array_leaves(skeleton):
        names, stacked = key_map.hf_names(path, leaf.shape[0] if leaf.ndim else None)
        for name in names:
            shapes[name] = tuple(leaf.shape[1:] if stacked else leaf.shape)
    shapes.update({copy: shapes[source] for copy, source in key_map.tied if source in shapes})
    return set(shapes.items())


def _infer_architecture(family: Family, hf_config: dict[str, Any], state: dict[str, LazyTensor], layout: Layout) -> str:
    """The family's class whose parameters (names and shapes) are closest to the state's:
    an exact fit wins; among equals the text head (causal or seq2seq LM); a tie between
    other classes is an error asking for `architecture`. The loader then reports any
    difference by key."""
    have = {(name, tensor.shape) for name, tensor in state.items()}
    distance = {cls: len(have ^ _entries(cls, hf_config, layout)) for cls in family.classes}
    best = min(distance.values())
    fitting = [cls for cls in family.classes if distance[cls] == best]
    if len(fitting) == 1:
        return fitting[0].__name__
    text = [cls for cls in fitting if cls.task in ("causal_lm", "seq2seq_lm")]
    if len(text) == 1:
        return text[0].__name__
    names = ", ".join(cls.__name__ for cls in fitting)
    raise ConfigError(f"the state fits {names} equally well: pass architecture= to choose one")
