"""Layers shared by every architecture."""

from ._activations import ACTIVATIONS, activation
from ._attention import (
    BIGBIRD_ADD,
    LONGT5_ADD,
    NO_WINDOW,
    REPLACE_WITH_MIN,
    T5_ADD_MIN,
    Masking,
    causal_mask,
    dot_product_attention,
    heads_first,
    masked_softmax,
    padding_mask,
)
from ._cache import CrossKV, KVCache, LayerWrite, cached_kv
from ._linear import AbstractLinear, Adapter, Embedding, Linear, fused_projections
from ._norm import LayerNorm, RMSNorm
from ._positions import apply_rotary, relative_position_bucket, rotary_angles, sinusoidal_embedding
from ._quantized import QuantizedWeight
from ._stack import (
    RunOptions,
    Stacked,
    has_separate_layers,
    run_options,
    separate_layers,
    split_key,
    stack_layers,
    with_run_options,
)

__all__ = [
    "ACTIVATIONS",
    "AbstractLinear",
    "Adapter",
    "BIGBIRD_ADD",
    "LONGT5_ADD",
    "NO_WINDOW",
    "REPLACE_WITH_MIN",
    "T5_ADD_MIN",
    "Masking",
    "masked_softmax",
    "CrossKV",
    "Embedding",
    "QuantizedWeight",
    "KVCache",
    "LayerNorm",
    "LayerWrite",
    "RMSNorm",
    "Linear",
    "RunOptions",
    "Stacked",
    "activation",
    "apply_rotary",
    "cached_kv",
    "causal_mask",
    "dot_product_attention",
    "heads_first",
    "fused_projections",
    "padding_mask",
    "relative_position_bucket",
    "rotary_angles",
    "run_options",
    "sinusoidal_embedding",
    "split_key",
    "with_run_options",
    "separate_layers",
    "stack_layers",
    "has_separate_layers",
]
