"""Layers shared by every architecture."""

from ._activations import activation as activation
from ._attention import (
    NO_WINDOW as NO_WINDOW,
)
from ._attention import (
    causal_mask as causal_mask,
)
from ._attention import (
    dot_product_attention as dot_product_attention,
)
from ._attention import (
    padding_mask as padding_mask,
)
from ._cache import KVCache as KVCache
from ._cache import LayerWrite as LayerWrite
from ._cache import cached_kv as cached_kv
from ._linear import Embedding as Embedding
from ._linear import Linear as Linear
from ._norm import LayerNorm as LayerNorm
from ._stack import Stacked as Stacked
