"""Layers shared by every architecture."""

from ._activations import activation as activation
from ._attention import (
    NO_WINDOW as NO_WINDOW,
    causal_mask as causal_mask,
    dot_product_attention as dot_product_attention,
    padding_mask as padding_mask,
)
from ._cache import KVCache as KVCache, LayerWrite as LayerWrite, cached_kv as cached_kv
from ._linear import Embedding as Embedding, Linear as Linear
from ._norm import LayerNorm as LayerNorm
from ._stack import Stacked as Stacked
