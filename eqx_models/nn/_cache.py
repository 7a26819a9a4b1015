"""A preallocated key/value cache for every layer of a decoder stack."""

from typing import NamedTuple

import equinox as eqx
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, Int


class KVCache(eqx.Module):
    """Keys and values of all layers, written in place at `index`.

    Heads come before slots, the layout attention reads, so a decode step uses a layer's
    buffer without copying it into another layout. `valid` marks slots holding real tokens
    (left padding of a prompt is not valid); it is shared by all layers. Unbatched:
    `jax.vmap` it along with the model.
    """

    keys: Float[Array, "layers kv_heads max_len head_dim"]
    values: Float[Array, "layers kv_heads max_len head_dim"]
    valid: Bool[Array, " max_len"]
    index: Int[Array, ""]

    @classmethod
    def empty(
        cls, num_layers: int, max_len: int, kv_heads: int, head_dim: int, dtype: DTypeLike = jnp.float32
    ) -> "KVCache":
        shape = (num_layers, kv_heads, max_len, head_dim)
        return cls(
            keys=jnp.zeros(shape, dtype),
            values=jnp.zeros(shape, dtype),
            valid=jnp.zeros((max_len,), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]

    def slots(self, length: int) -> Int[Array, " length"]:
        """Slot indices that the next `length` tokens will occupy."""
        return self.index + jnp.arange(length, dtype=jnp.int32)

    def with_tokens(self, token_valid: Bool[Array, " new"]) -> "KVCache":
        """Marks the next slots valid (or padding) and advances `index` past them.

        Called once per decode step, before the layers write their keys and values.
        """
        valid = lax.dynamic_update_slice(self.valid, token_valid, (self.index,))
        return KVCache(self.keys, self.values, valid, self.index + token_valid.shape[0])


class LayerWrite(NamedTuple):
    """What a layer needs to write into the cache inside a scan: the stacked buffers
    (carried, so XLA updates them in place) and the first slot to write."""

    keys: Float[Array, "layers kv_heads max_len head_dim"]
    values: Float[Array, "layers kv_heads max_len head_dim"]
    start: Int[Array, ""]


def cached_kv(
    write: LayerWrite | None,
    layer: Int[Array, ""],
    k: Float[Array, "new kv_heads head_dim"],
    v: Float[Array, "new kv_heads head_dim"],
) -> tuple[LayerWrite | None, Float[Array, "kv_heads kv head_dim"], Float[Array, "kv_heads kv head_dim"]]:
    """Keys/values a layer attends over, heads first. Without a cache, the new ones; with
    one, the new ones are written at `write.start` and the layer's whole buffer is returned."""
    k, v = jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)
    if write is None:
        return None, k, v
    zero = jnp.zeros((), jnp.int32)
    at = (layer.astype(jnp.int32), zero, write.start, zero)
    keys = lax.dynamic_update_slice(write.keys, k[None].astype(write.keys.dtype), at)
    values = lax.dynamic_update_slice(write.values, v[None].astype(write.values.dtype), at)
    layer_k = lax.dynamic_index_in_dim(keys, layer, keepdims=False)
    layer_v = lax.dynamic_index_in_dim(values, layer, keepdims=False)
    return LayerWrite(keys, values, write.start), layer_k, layer_v


class CrossKV(eqx.Module):
    """Every decoder layer's cross-attention keys and values (heads first) for one encoded
    input, and which input tokens are real. Computed once per input, read by every step."""

    keys: Float[Array, "layers kv_heads src head_dim"]
    values: Float[Array, "layers kv_heads src head_dim"]
    valid: Bool[Array, " src"]
