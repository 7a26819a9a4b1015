"""Layers shared by every architecture."""

from ._activations import activation
from ._attention import NO_WINDOW, causal_mask, dot_product_attention, heads_first, padding_mask
from ._cache import KVCache, LayerWrite, cached_kv
from ._linear import Embedding, Linear, fused_projections
from ._norm import LayerNorm, RMSNorm
from ._positions import apply_rotary, relative_position_bucket, rotary_angles, sinusoidal_embedding
from ._stack import Stacked

__all__ = [
    "NO_WINDOW",
    "Embedding",
    "KVCache",
    "LayerNorm",
    "LayerWrite",
    "RMSNorm",
    "Linear",
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
    "sinusoidal_embedding",
]
