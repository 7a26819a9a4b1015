"""GPT-Neo: learned positions, alternating global / sliding-window attention, no
score scaling, tied LM head.

Reference: HF `modeling_flax_gpt_neo.py` and `modeling_gpt_neo.py` (4.57.6).
"""

import dataclasses
from typing import Annotated, ClassVar, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .. import nn
from ..checkpoint.keymap import KeyMap
from ..validation import (
    MAX_LAYERS,
    Example,
    Layers,
    NonNegativeFloat,
    PositiveFloat,
    Probability,
    Range,
    Relation,
    Size,
    TokenId,
    TokenIds,
    divisible,
)
from ._config import Activation, ModelConfig
from ._contract import Family
from ._decoder import DecoderLM, DecoderModel, LayerContext, SelfAttention, make_lm_head

# [[pattern, repeats], ...]: each pattern of "global"/"local" repeated, e.g. [[["global", "local"], 12]]
AttentionTypes = Annotated[
    tuple[tuple[tuple[Literal["global", "local"], ...], Annotated[int, Range(0, MAX_LAYERS)]], ...],
    Example("[[['global', 'local'], 12]] ('global' or 'local' entries, each pattern repeated)"),
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTNeoConfig(ModelConfig):
    """HF's `GPTNeoConfig` fields (same names and defaults)."""

    model_type: ClassVar[str] = "gpt_neo"
    vocab_size: Size = 50257
    max_position_embeddings: Size = 2048
    hidden_size: Size = 2048
    num_layers: Layers = 24
    # [[pattern, repeats], ...]; e.g. [[["global", "local"], 12]] alternates over 24 layers
    attention_types: AttentionTypes = ((("global", "local"), 12),)
    num_heads: Size = 16
    intermediate_size: Size | None = None  # None means 4 * hidden_size
    window_size: Size = 256
    activation_function: Activation = "gelu_new"
    resid_dropout: Probability = 0.0
    embed_dropout: Probability = 0.0
    attention_dropout: Probability = 0.0
    classifier_dropout: Probability = 0.1
    layer_norm_epsilon: PositiveFloat = 1e-5
    initializer_range: NonNegativeFloat = 0.02
    bos_token_id: TokenId | None = 50256
    eos_token_id: TokenIds | None = 50256
    pad_token_id: TokenId | None = None
    tie_word_embeddings: bool = True

    RELATIONS: ClassVar = (
        divisible("hidden_size", "num_heads"),
        Relation(
            ("attention_types", "num_layers"),
            lambda types, layers: sum(len(pattern) * repeats for pattern, repeats in types) == layers,
            "attention_types must expand to num_layers layers",
        ),
    )

    @property
    def attention_layers(self) -> tuple[str, ...]:
        """One entry per layer, `"global"` or `"local"`."""
        return tuple(kind for pattern, repeats in self.attention_types for _ in range(repeats) for kind in pattern)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_limit(self) -> int:
        return self.max_position_embeddings

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Sliding-window width per layer (`NO_WINDOW` for global layers)."""
        return tuple(self.window_size if t == "local" else nn.NO_WINDOW for t in self.attention_layers)


class GPTNeoMLP(eqx.Module):
    c_fc: nn.Linear
    c_proj: nn.Linear
    dropout: eqx.nn.Dropout
    activation_function: str = eqx.field(static=True)

    def __init__(self, config: GPTNeoConfig, *, dtype: DTypeLike, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        inner = config.intermediate_size or 4 * config.hidden_size
        std = config.initializer_range
        self.c_fc = nn.Linear(config.hidden_size, inner, init_std=std, dtype=dtype, key=k1)
        self.c_proj = nn.Linear(inner, config.hidden_size, init_std=std, dtype=dtype, key=k2)
        self.dropout = eqx.nn.Dropout(config.resid_dropout)
        self.activation_function = config.activation_function

    def __call__(self, x: Float[Array, "seq dim"], *, key: PRNGKeyArray | None = None) -> Float[Array, "seq dim"]:
        h = nn.activation(self.activation_function)(self.c_fc(x))
        return self.dropout(self.c_proj(h), key=key)


class GPTNeoBlock(eqx.Module):
    """Pre-LayerNorm block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`."""

    ln_1: nn.LayerNorm
    attn: SelfAttention
    resid_dropout: eqx.nn.Dropout
    ln_2: nn.LayerNorm
    mlp: GPTNeoMLP

    def __init__(self, config: GPTNeoConfig, *, dtype: DTypeLike, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=eps, dtype=dtype)
        # GPT-Neo does not scale attention scores by head_dim ** -0.5.
        self.attn = SelfAttention(
            config.hidden_size,
            config.num_heads,
            qkv_bias=False,
            scale=1.0,
            dropout=config.attention_dropout,
            init_std=config.initializer_range,
            dtype=dtype,
            key=k1,
        )
        self.resid_dropout = eqx.nn.Dropout(config.resid_dropout)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.mlp = GPTNeoMLP(config, dtype=dtype, key=k2)

    def __call__(
        self, x: Float[Array, "seq dim"], ctx: LayerContext, *, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, "seq dim"], nn.LayerWrite | None]:
        attn_key, resid_key, mlp_key = nn.split_key(key, 3)
        h, write = self.attn(self.ln_1(x), ctx, key=attn_key)
        x = x + self.resid_dropout(h, key=resid_key)
        return x + self.mlp(self.ln_2(x), key=mlp_key), write


class GPTNeoModel(DecoderModel):
    """The GPT-Neo decoder stack; `model(input_ids)` returns hidden states `[seq, hidden]`
    (see `DecoderModel` for the call, `decode` and `init_cache`)."""

    wte: nn.Embedding
    wpe: nn.Embedding
    drop: eqx.nn.Dropout
    h: nn.Stacked[GPTNeoBlock]
    ln_f: nn.LayerNorm
    config: GPTNeoConfig = eqx.field(static=True)

    def __init__(self, config: GPTNeoConfig, *, dtype: DTypeLike = jnp.float32, key: PRNGKeyArray):
        k_wte, k_wpe, k_h = jax.random.split(key, 3)
        std = config.initializer_range
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size, init_std=std, dtype=dtype, key=k_wte)
        self.wpe = nn.Embedding(
            config.max_position_embeddings, config.hidden_size, init_std=std, dtype=dtype, key=k_wpe
        )
        self.drop = eqx.nn.Dropout(config.embed_dropout)
        self.h = nn.Stacked.build(lambda k: GPTNeoBlock(config, dtype=dtype, key=k), config.num_layers, key=k_h)
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon, dtype=dtype)
        self.config = config

    def embed(
        self, input_ids: Int[Array, " seq"], positions: Int[Array, " seq"], *, key: PRNGKeyArray | None
    ) -> Float[Array, "seq hidden"]:
        return self.drop(self.wte(input_ids) + self.wpe(positions), key=key)

    @property
    def stack(self) -> nn.Stacked:
        return self.h

    def final_norm(self, x: Float[Array, "seq hidden"]) -> Float[Array, "seq hidden"]:
        return self.ln_f(x)

    @property
    def layer_windows(self) -> tuple[int, ...]:
        return self.config.layer_windows

    @property
    def kv_shape(self) -> tuple[int, int]:
        return self.config.num_heads, self.config.head_dim

    @property
    def input_embeddings(self) -> nn.Embedding:
        return self.wte

    @classmethod
    def key_map(cls, config: GPTNeoConfig) -> KeyMap:
        return KeyMap(
            rules=(
                ("h.{i}.attn.attention.", "h.layers.attn."),
                ("h.{i}.", "h.layers."),
                ("", ""),
            ),
            ignore=(r"h\.\d+\.attn\.attention\.(bias|masked_bias)",),  # causal-mask buffers of old saves
            prefix="transformer",
            embedding="wte.weight",
        )


class GPTNeoForCausalLM(DecoderLM):
    """GPT-Neo with a language-model head (tied to `wte` unless `tie_word_embeddings=False`);
    `model(input_ids)` returns float32 logits `[seq, vocab]`."""

    transformer: GPTNeoModel
    lm_head: nn.Linear | None
    base_name: ClassVar[str] = "transformer"
    base_class: ClassVar[type] = GPTNeoModel

    def __init__(self, config: GPTNeoConfig, *, dtype: DTypeLike = jnp.float32, key: PRNGKeyArray):
        k_model, k_head = jax.random.split(key)
        self.transformer = GPTNeoModel(config, dtype=dtype, key=k_model)
        self.lm_head = make_lm_head(config, config.hidden_size, config.initializer_range, dtype, k_head)


FAMILY = Family(GPTNeoConfig, (GPTNeoModel, GPTNeoForCausalLM))
