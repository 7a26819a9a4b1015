"""Gemma: RMSNorm scaled by `1 + weight`, rotary positions, grouped or multi-query KV
heads, a gated GELU MLP and `sqrt(hidden)`-scaled embeddings.

Reference: HF `modeling_flax_gemma.py` and `modeling_gemma.py` (4.57.6). Where the two
differ we follow the PyTorch classes, our numerical oracle: the MLP activation is
`hidden_act` (HF Flax read `hidden_activation`, defaulting to tanh GELU) and rotary
frequencies use `rope_theta` (HF Flax always used 10000).
"""

import dataclasses
from typing import Annotated, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .. import nn
from ..checkpoint.keymap import KeyMap
from ..validation import (
    MAX_INT32,
    Layers,
    MultipleOf,
    NonNegativeFloat,
    Note,
    PositiveFloat,
    Probability,
    Range,
    Size,
    TokenId,
    TokenIds,
    divisible,
)
from ._config import Activation, ModelConfig
from ._contract import Family
from ._decoder import DecoderLM, DecoderModel, LayerContext, make_lm_head


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaConfig(ModelConfig):
    """HF's `GemmaConfig` fields (same names and defaults)."""

    model_type: ClassVar[str] = "gemma"
    vocab_size: Size = 256000
    hidden_size: Size = 3072
    intermediate_size: Size = 24576
    num_hidden_layers: Layers = 28
    num_attention_heads: Size = 16
    num_key_value_heads: Size = 16  # 1 is multi-query (gemma-2b); < heads is grouped
    # independent of hidden_size / num_attention_heads; rotary embeddings turn pairs of dimensions
    head_dim: Annotated[int, Range(2, MAX_INT32), MultipleOf(2)] = 256
    hidden_act: Activation = "gelu_pytorch_tanh"
    hidden_activation: str | None = None  # kept for export; HF PyTorch uses `hidden_act`
    max_position_embeddings: Size = 8192
    initializer_range: NonNegativeFloat = 0.02
    rms_norm_eps: PositiveFloat = 1e-6
    pad_token_id: TokenId | None = 0
    eos_token_id: TokenIds | None = 1
    bos_token_id: TokenId | None = 2
    tie_word_embeddings: bool = True
    rope_theta: PositiveFloat = 10000.0
    rope_scaling: Annotated[None, Note("Gemma has plain rotary embeddings only")] = None
    attention_bias: bool = False
    attention_dropout: Probability = 0.0

    RELATIONS: ClassVar = (divisible("num_attention_heads", "num_key_value_heads"),)

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers


class GemmaAttention(eqx.Module):
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    dropout: eqx.nn.Dropout
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    rope_theta: float = eqx.field(static=True)

    def __init__(self, config: GemmaConfig, *, dtype: DTypeLike, key: PRNGKeyArray):
        kq, kk, kv, ko = jax.random.split(key, 4)
        hidden, head_dim, std = config.hidden_size, config.head_dim, config.initializer_range
        q_dim, kv_dim = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        linear = lambda i, o, k: nn.Linear(i, o, use_bias=config.attention_bias, init_std=std, dtype=dtype, key=k)  # noqa: E731
        self.q_proj, self.k_proj = linear(hidden, q_dim, kq), linear(hidden, kv_dim, kk)
        self.v_proj, self.o_proj = linear(hidden, kv_dim, kv), linear(q_dim, hidden, ko)
        self.dropout = eqx.nn.Dropout(config.attention_dropout)
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.rope_theta = head_dim, config.rope_theta

    def __call__(
        self, x: Float[Array, "seq hidden"], ctx: LayerContext, *, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, "seq hidden"], nn.LayerWrite | None]:
        seq = x.shape[0]
        q, k, v = nn.fused_projections(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.reshape(seq, self.num_heads, self.head_dim)
        k, v = (t.reshape(seq, self.num_kv_heads, self.head_dim) for t in (k, v))
        cos, sin = nn.rotary_angles(ctx.positions, self.head_dim, self.rope_theta)
        q, k = nn.apply_rotary(q, cos, sin), nn.apply_rotary(k, cos, sin)
        write, k, v = nn.cached_kv(ctx.write, ctx.layer, k, v)
        out = nn.dot_product_attention(q, k, v, ctx.mask, dropout=self.dropout, key=key, causal=ctx.causal)
        return self.o_proj(out.reshape(seq, -1)), write


class GemmaMLP(eqx.Module):
    """`down(act(gate(x)) * up(x))`."""

    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear
    hidden_act: str = eqx.field(static=True)

    def __init__(self, config: GemmaConfig, *, dtype: DTypeLike, key: PRNGKeyArray):
        kg, ku, kd = jax.random.split(key, 3)
        hidden, inner, std = config.hidden_size, config.intermediate_size, config.initializer_range
        self.gate_proj = nn.Linear(hidden, inner, use_bias=False, init_std=std, dtype=dtype, key=kg)
        self.up_proj = nn.Linear(hidden, inner, use_bias=False, init_std=std, dtype=dtype, key=ku)
        self.down_proj = nn.Linear(inner, hidden, use_bias=False, init_std=std, dtype=dtype, key=kd)
        self.hidden_act = config.hidden_act

    def __call__(self, x: Float[Array, "seq hidden"]) -> Float[Array, "seq hidden"]:
        # Two matmuls: concatenating these large weights to fuse them costs more than it saves.
        return self.down_proj(nn.activation(self.hidden_act)(self.gate_proj(x)) * self.up_proj(x))


class GemmaDecoderLayer(eqx.Module):
    input_layernorm: nn.RMSNorm
    self_attn: GemmaAttention
    post_attention_layernorm: nn.RMSNorm
    mlp: GemmaMLP

    def __init__(self, config: GemmaConfig, *, dtype: DTypeLike, key: PRNGKeyArray):
        k_attn, k_mlp = jax.random.split(key)
        norm = lambda: nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, offset=1.0, dtype=dtype)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.self_attn = GemmaAttention(config, dtype=dtype, key=k_attn)
        self.mlp = GemmaMLP(config, dtype=dtype, key=k_mlp)

    def __call__(
        self, x: Float[Array, "seq hidden"], ctx: LayerContext, *, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, "seq hidden"], nn.LayerWrite | None]:
        h, write = self.self_attn(self.input_layernorm(x), ctx, key=key)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), write


class GemmaModel(DecoderModel):
    """The Gemma decoder stack; `model(input_ids)` returns hidden states `[seq, hidden]`."""

    embed_tokens: nn.Embedding
    layers: nn.Stacked[GemmaDecoderLayer]
    norm: nn.RMSNorm
    config: GemmaConfig = eqx.field(static=True)

    def __init__(self, config: GemmaConfig, *, dtype: DTypeLike = jnp.float32, key: PRNGKeyArray):
        k_embed, k_layers = jax.random.split(key)
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, init_std=config.initializer_range, dtype=dtype, key=k_embed
        )
        self.layers = nn.Stacked.build(
            lambda k: GemmaDecoderLayer(config, dtype=dtype, key=k), config.num_hidden_layers, key=k_layers
        )
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, offset=1.0, dtype=dtype)
        self.config = config

    def embed(
        self, input_ids: Int[Array, " seq"], positions: Int[Array, " seq"], *, key: PRNGKeyArray | None
    ) -> Float[Array, "seq hidden"]:
        x = self.embed_tokens(input_ids)
        # sqrt(hidden) rounded to the activation dtype first, as upstream
        return x * jnp.asarray(self.config.hidden_size**0.5, x.dtype)

    @property
    def stack(self) -> nn.Stacked:
        return self.layers

    def final_norm(self, x: Float[Array, "seq hidden"]) -> Float[Array, "seq hidden"]:
        return self.norm(x)

    @property
    def kv_shape(self) -> tuple[int, int]:
        return self.config.num_key_value_heads, self.config.head_dim

    @property
    def input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    @classmethod
    def key_map(cls, config: GemmaConfig) -> KeyMap:
        return KeyMap(
            rules=(("layers.{i}.", "layers.layers."), ("", "")),
            ignore=(r"rotary_emb\.inv_freq", r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
            prefix="model",
            embedding="embed_tokens.weight",
        )


class GemmaForCausalLM(DecoderLM):
    """Gemma with a language-model head (tied to `embed_tokens` by default)."""

    model: GemmaModel
    lm_head: nn.Linear | None
    base_name: ClassVar[str] = "model"
    base_class: ClassVar[type] = GemmaModel

    def __init__(self, config: GemmaConfig, *, dtype: DTypeLike = jnp.float32, key: PRNGKeyArray):
        k_model, k_head = jax.random.split(key)
        self.model = GemmaModel(config, dtype=dtype, key=k_model)
        self.lm_head = make_lm_head(config, config.hidden_size, config.initializer_range, dtype, k_head)


FAMILY = Family(GemmaConfig, (GemmaModel, GemmaForCausalLM))
