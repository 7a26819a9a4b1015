"""XGLM: sinusoidal positions offset by 2 (fairseq's padding convention), scaled token
embeddings, pre-LayerNorm blocks with biased projections, a final LayerNorm and a tied
LM head. With `add_cross_attention=True` each layer also attends to encoder states
(`encoder_attn`, between self-attention and the feed-forward block), as upstream.

Reference: HF `modeling_flax_xglm.py` and `modeling_xglm.py` (4.57.6).
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
    NonNegativeFloat,
    Note,
    Probability,
    Range,
    Size,
    TokenId,
    TokenIds,
    divisible,
)
from ._config import Activation, ModelConfig
from ._contract import Family
from ._decoder import (
    CrossAttention,
    DecoderLM,
    DecoderModel,
    LayerContext,
    SelfAttention,
    make_lm_head,
    no_cross_attention,
)

# Position p reads row p + 2 of the sinusoid table; row `padding_idx` is all zeros.
POSITION_OFFSET = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class XGLMConfig(ModelConfig):
    """HF's `XGLMConfig` fields (same names and defaults)."""

    model_type: ClassVar[str] = "xglm"
    vocab_size: Size = 256008
    max_position_embeddings: Size = 2048  # sinusoids extend past it, as upstream
    d_model: Annotated[int, Range(4, MAX_INT32), Note("sinusoidal positions need at least 4")] = 1024
    ffn_dim: Size = 4096
    num_layers: Layers = 24
    attention_heads: Size = 16
    activation_function: Activation = "gelu"
    dropout: Probability = 0.1
    attention_dropout: Probability = 0.1
    activation_dropout: Probability = 0.0
    layerdrop: Probability = 0.0  # training-time layer skipping; not applied (inference is unaffected)
    init_std: NonNegativeFloat = 0.02
    scale_embedding: bool = True
    decoder_start_token_id: TokenId | None = 2
    pad_token_id: TokenId | None = 1
    bos_token_id: TokenId | None = 0
    eos_token_id: TokenIds | None = 2
    tie_word_embeddings: bool = True
    add_cross_attention: bool = False  # layers also attend to `encoder_hidden_states` (`encoder_attn`)

    RELATIONS: ClassVar = (divisible("d_model", "attention_heads"),)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.attention_heads


class XGLMDecoderLayer(eqx.Module):
    """`x + attn(ln(x))`, then (with cross-attention and encoder states) `x +
    encoder_attn(ln(x), encoder)`, then `x + fc2(act(fc1(ln(x))))`, with dropouts."""

    self_attn_layer_norm: nn.LayerNorm
    self_attn: SelfAttention
    encoder_attn_layer_norm: nn.LayerNorm | None  # `None` without add_cross_attention
    encoder_attn: CrossAttention | None
    final_layer_norm: nn.LayerNorm
    fc1: nn.Linear
    fc2: nn.Linear
    dropout: eqx.nn.Dropout
    activation_dropout: eqx.nn.Dropout
    activation_function: str = eqx.field(static=True)

    def __init__(self, config: XGLMConfig, *, dtype: DTypeLike, key: PRNGKeyArray):
        k_attn, k1, k2, k_cross = jax.random.split(key, 4)
        dim, std = config.d_model, config.init_std
        attention = dict(qkv_bias=True, scale=None, dropout=config.attention_dropout, init_std=std, dtype=dtype)
        self.self_attn_layer_norm = nn.LayerNorm(dim, dtype=dtype)
        self.self_attn = SelfAttention(dim, config.attention_heads, **attention, key=k_attn)
        if config.add_cross_attention:
            self.encoder_attn_layer_norm = nn.LayerNorm(dim, dtype=dtype)
            self.encoder_attn = CrossAttention(dim, config.attention_heads, **attention, key=k_cross)
        else:
            self.encoder_attn_layer_norm = self.encoder_attn = None
        self.final_layer_norm = nn.LayerNorm(dim, dtype=dtype)
        self.fc1 = nn.Linear(dim, config.ffn_dim, init_std=std, dtype=dtype, key=k1)
        self.fc2 = nn.Linear(config.ffn_dim, dim, init_std=std, dtype=dtype, key=k2)
        self.dropout = eqx.nn.Dropout(config.dropout)
        self.activation_dropout = eqx.nn.Dropout(config.activation_dropout)
        self.activation_function = config.activation_function

    def __call__(
        self, x: Float[Array, "seq dim"], ctx: LayerContext, *, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, "seq dim"], nn.LayerWrite | None]:
        k_attn, k_drop1, k_act, k_drop2, k_cross, k_drop_cross = nn.split_key(key, 6)
        h, write = self.self_attn(self.self_attn_layer_norm(x), ctx, key=k_attn)
        x = x + self.dropout(h, key=k_drop1)
        if ctx.cross is not None:  # without encoder states HF skips the block
            h = self._encoder_attn()(self.encoder_attn_layer_norm(x), ctx.cross, key=k_cross)
            x = x + self.dropout(h, key=k_drop_cross)
        h = nn.activation(self.activation_function)(self.fc1(self.final_layer_norm(x)))
        h = self.fc2(self.activation_dropout(h, key=k_act))
        return x + self.dropout(h, key=k_drop2), write

    def cross_kv(
        self, encoded: Float[Array, "src dim"]
    ) -> tuple[Float[Array, "heads src head_dim"], Float[Array, "heads src head_dim"]]:
        """This layer's cross-attention keys and values (heads first), computed once per input."""
        return self._encoder_attn().cross_kv(encoded)

    def _encoder_attn(self) -> CrossAttention:
        if self.encoder_attn is None:
            raise no_cross_attention("XGLM")
        return self.encoder_attn


class XGLMModel(DecoderModel):
    """The XGLM decoder stack; `model(input_ids)` returns hidden states `[seq, d_model]`."""

    embed_tokens: nn.Embedding
    dropout: eqx.nn.Dropout
    layers: nn.Stacked[XGLMDecoderLayer]
    layer_norm: nn.LayerNorm
    config: XGLMConfig = eqx.field(static=True)

    def __init__(self, config: XGLMConfig, *, dtype: DTypeLike = jnp.float32, key: PRNGKeyArray):
        k_embed, k_layers = jax.random.split(key)
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.d_model, init_std=config.init_std, dtype=dtype, key=k_embed
        )
        self.dropout = eqx.nn.Dropout(config.dropout)
        self.layers = nn.Stacked.build(
            lambda k: XGLMDecoderLayer(config, dtype=dtype, key=k), config.num_layers, key=k_layers
        )
        self.layer_norm = nn.LayerNorm(config.d_model, dtype=dtype)
        self.config = config

    def embed(
        self, input_ids: Int[Array, " seq"], positions: Int[Array, " seq"], *, key: PRNGKeyArray | None
    ) -> Float[Array, "seq hidden"]:
        cfg = self.config
        x = self.embed_tokens(input_ids)
        if cfg.scale_embedding:
            x = x * jnp.asarray(cfg.d_model**0.5, x.dtype)
        rows = positions + POSITION_OFFSET
        sinusoids = nn.sinusoidal_embedding(rows, cfg.d_model, padding_idx=cfg.pad_token_id).astype(x.dtype)
        return self.dropout(x + sinusoids, key=key)

    @property
    def stack(self) -> nn.Stacked:
        return self.layers

    def final_norm(self, x: Float[Array, "seq hidden"]) -> Float[Array, "seq hidden"]:
        return self.layer_norm(x)

    @property
    def kv_shape(self) -> tuple[int, int]:
        return self.config.attention_heads, self.config.head_dim

    @property
    def input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    @classmethod
    def key_map(cls, config: XGLMConfig) -> KeyMap:
        return KeyMap(
            rules=(("layers.{i}.", "layers.layers."), ("", "")),
            ignore=(r"embed_positions\.(weights|_float_tensor)",),  # buffers some savers kept
            prefix="model",
            embedding="embed_tokens.weight",
        )


class XGLMForCausalLM(DecoderLM):
    """XGLM with its language-model head (tied to `embed_tokens` by default)."""

    model: XGLMModel
    lm_head: nn.Linear | None
    base_name: ClassVar[str] = "model"
    base_class: ClassVar[type] = XGLMModel

    def __init__(self, config: XGLMConfig, *, dtype: DTypeLike = jnp.float32, key: PRNGKeyArray):
        k_model, k_head = jax.random.split(key)
        self.model = XGLMModel(config, dtype=dtype, key=k_model)
        self.lm_head = make_lm_head(config, config.d_model, config.init_std, dtype, k_head)


FAMILY = Family(XGLMConfig, (XGLMModel, XGLMForCausalLM))
