"""Weight-only quantisation (int8, or bfloat16 weights), as a transformation of any model tree.

`quantize(model, "int8")` stores the weight of every `nn.Linear` (and, with `embeddings`,
every `nn.Embedding`: the input embedding, which is also the tied LM head, position tables
and T5's relative-bias tables) as int8 rows with one float scale per row (`nn.QuantizedWeight`:
per output channel for a `Linear`, per token for an `Embedding`); `quantize(model,
"bfloat16")` rounds them to bfloat16, stored in a form this CPU multiplies at the speed of
its bytes (float16 rows times a power-of-two scale, exact: see `nn.QuantizedWeight`).
Activations stay in the model's float dtype either way (`dtype="bfloat16"` is the other
thing: everything computed in bfloat16). The layers stay
`nn.Linear` and `nn.Embedding` and compute in float, so everything that runs a model
(generation, streaming, the layer scan over stacked layers, wrappers of a `Linear`) runs a
quantised one unchanged. Stacked layers keep their leading `layers` axis on the stored values
and on the scales.

Norms, biases and everything else stay in float. Our folders store the values and
scales as they are (`save_pretrained`), and record the scheme in `config.json`'s
`eqx_models` entry (`quantization`), from which `from_pretrained` rebuilds the same tree.
"""

import functools
from typing import Any, Literal, TypeVar, get_args

import equinox as eqx
import jax

from . import nn
from .errors import CheckpointError, InputError
from .validation import show_value

Scheme = Literal["int8", "bfloat16"]
#: The quantisation schemes `quantize` knows.
SCHEMES: tuple[str, ...] = get_args(Scheme)

Tree = TypeVar("Tree")
# One compiled rounding per scheme and weight shape (eagerly, each operation would compile on its own).
_QUANTIZE_WEIGHT = {
    scheme: jax.jit(functools.partial(nn.QuantizedWeight.quantize, scheme=scheme)) for scheme in SCHEMES
}


def _is_layer(node: Any) -> bool:
    return isinstance(node, nn.Linear | nn.Embedding)


def check_scheme(scheme: Any) -> str:
    """`scheme` if it is one of `SCHEMES`, else a one-line `InputError`."""
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise InputError(f"unknown quantisation scheme {show_value(scheme)}; choose one of {', '.join(SCHEMES)}")
    return scheme


def quantize(model: Tree, scheme: str = "int8", *, embeddings: bool = True) -> Tree:
    """`model` with quantised weights (see the module docstring).

    **Arguments:**

    - `model`: any tree holding `nn.Linear` / `nn.Embedding` layers (every registered model).
    - `scheme`: `"int8"`: symmetric, one scale per row (`scale = max|row| / 127`), a quarter
      of float32's bytes; `"bfloat16"`: each weight rounded to bfloat16, half the bytes.
    - `embeddings`: also quantise `nn.Embedding` tables (default). With `False` they stay in
      float, and so does a tied LM head.

    **Returns:** the same tree with those weights as `nn.QuantizedWeight`. Layers already
    quantised the same way are left as they are (another scheme is refused: `dequantize`
    first); everything else is shared with `model`, not copied.
    Traceable (`eqx.filter_eval_shape(quantize, skeleton)` gives the skeleton of a
    quantised model).
    """
    check_scheme(scheme)
    layers = [node for node in jax.tree.leaves(model, is_leaf=_is_layer) if _is_layer(node)]
    if not any(isinstance(node, nn.Linear) for node in layers):
        raise InputError(f"quantize: {type(model).__name__} holds no nn.Linear layer to quantise")

    other = {node.weight.scheme for node in layers if isinstance(node.weight, nn.QuantizedWeight)} - {scheme}
    if other:
        raise InputError(f"quantize: the model is already quantised {other.pop()}; dequantize it first")

    def convert(node: Any) -> Any:
        wanted = isinstance(node, nn.Linear) or (embeddings and isinstance(node, nn.Embedding))
        if not wanted or isinstance(node.weight, nn.QuantizedWeight):
            return node
        return eqx.tree_at(lambda layer: layer.weight, node, _QUANTIZE_WEIGHT[scheme](node.weight))

    return jax.tree.map(convert, model, is_leaf=_is_layer)


def dequantize(model: Tree) -> Tree:
    """`model` with every `nn.QuantizedWeight` replaced by the float weight it stands for
    (`values * scale`): a plain float model, e.g. to export to HF."""
    is_quantised = lambda node: isinstance(node, nn.QuantizedWeight)  # noqa: E731
    return jax.tree.map(lambda node: node.dequantize() if is_quantised(node) else node, model, is_leaf=is_quantised)


def quantization_of(tree: Any) -> dict[str, Any] | None:
    """What `quantize` did to `tree`, as our folders record it (`{"scheme": "int8",
    "embeddings": bool}`), or `None` for a float tree."""
    layers = [node for node in jax.tree.leaves(tree, is_leaf=_is_layer) if _is_layer(node)]
    quantised = [node for node in layers if isinstance(node.weight, nn.QuantizedWeight)]
    if not quantised:
        return None
    embeddings = any(isinstance(node, nn.Embedding) for node in quantised)
    return {"scheme": quantised[0].weight.scheme, "embeddings": embeddings}


def apply_recorded(model: Tree, record: Any, *, label: str) -> Tree:
    """`model` quantised as `record` (a folder's `quantization` entry) says; `label` names
    the folder in the error for an entry of the wrong shape."""
    if (
        not isinstance(record, dict)
        or set(record) != {"scheme", "embeddings"}
        or not isinstance(record["embeddings"], bool)
        or record["scheme"] not in SCHEMES
    ):
        raise CheckpointError(
            f"{label}: the eqx_models quantization entry must be {{'scheme': one of {', '.join(SCHEMES)}, "
            f"'embeddings': true or false}}, got {show_value(record)}"
        )
    return quantize(model, record["scheme"], embeddings=record["embeddings"])
