"""The model contract: what a model is, declared once, for everything built on top.

Generation, training, the CLI and `verify` never ask a model what it is
(`hasattr(model, "encode")`, `model_type == ...`): they dispatch on these classes.

```
Model                    config, key_map, task (its loss), outputs (their names)
├── Cached               a KV cache over a decoder stack: cache_shape -> init_cache
│   ├── Decoder          decode(input_ids, cache, ...) left to right
│   │   └── CausalLM     ... returning next-token logits; task "causal_lm"
│   └── EncoderDecoder   encode(...), cross_kv(...), decode(decoder_ids, cache, cross)
│       └── Seq2SeqLM    ... returning logits; task "seq2seq_lm"
└── (encoders and encoder heads are plain Models with a task)
```

A family is one file: its config, its layers and its final model classes, listed in a
`Family` that the registry (`eqx_models.models.FAMILIES`) collects. Each model class names
its `task`: the loss that trains it (`eqx_models.training.losses.LOSSES` is keyed by it)
and so the presets and tests that cover it.
"""

import abc
import dataclasses
from typing import ClassVar

import equinox as eqx
import jax
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .. import nn
from ..checkpoint.keymap import KeyMap
from ._config import ModelConfig

#: Every task a model class may declare, with the batch keys its loss reads.
TASKS: dict[str, tuple[str, ...]] = {
    "causal_lm": ("input_ids", "labels"),
    "masked_lm": ("input_ids", "labels"),
    "pretraining": ("input_ids", "labels"),
    "sequence_classification": ("input_ids", "labels"),
    "multiple_choice": ("input_ids", "labels"),
    "token_classification": ("input_ids", "labels"),
    "question_answering": ("input_ids", "start_positions", "end_positions"),
    "seq2seq_lm": ("input_ids", "labels"),
}


class Model(eqx.Module):
    """Every model: a config, a key map to HF names, and what it computes.

    - `config`: the family's frozen config (HF fields).
    - `task`: the task its loss trains (a key of `TASKS`); `None` for base models.
    - `outputs`: the names of its outputs, as HF's output classes call them.
    """

    config: eqx.AbstractVar[ModelConfig]
    task: ClassVar[str | None] = None
    outputs: ClassVar[tuple[str, ...]] = ("last_hidden_state",)

    @classmethod
    @abc.abstractmethod
    def key_map(cls, config: ModelConfig) -> KeyMap:
        """HF parameter names <-> paths in this class's tree (import and export)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.task is not None and cls.task not in TASKS:
            raise TypeError(f"{cls.__name__}.task {cls.task!r} is not one of {sorted(TASKS)}")

    @property
    def dtype(self) -> DTypeLike:
        """The dtype the model computes in: its first floating-point parameter's, a quantised
        weight counting by its scale (a bfloat16-quantised one stores float16 values)."""
        is_quantised = lambda node: isinstance(node, nn.QuantizedWeight)  # noqa: E731
        tree = jax.tree.map(lambda node: node.scale if is_quantised(node) else node, self, is_leaf=is_quantised)
        return jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))[0].dtype


class Cached(Model):
    """A model with a decoder stack that keeps a KV cache."""

    @property
    @abc.abstractmethod
    def cache_shape(self) -> tuple[int, int, int]:
        """`(layers, kv_heads, head_dim)` of the decoder's self-attention cache."""

    def init_cache(self, max_len: int, dtype: DTypeLike | None = None) -> nn.KVCache:
        """An empty cache of `max_len` slots (prompt plus new tokens), in the parameters'
        dtype unless `dtype` is given."""
        layers, kv_heads, head_dim = self.cache_shape
        return nn.KVCache.empty(layers, max_len, kv_heads, head_dim, self.dtype if dtype is None else dtype)


class Decoder(Cached):
    """Reads tokens left to right; `decode` runs new tokens against the cache."""

    @abc.abstractmethod
    def decode(
        self,
        input_ids: Int[Array, " new"],
        cache: nn.KVCache,
        *,
        attention_mask: Int[Array, " new"] | Bool[Array, " new"] | None = None,
        position_ids: Int[Array, " new"] | None = None,
    ) -> tuple[Float[Array, "new out"], nn.KVCache]:
        """Outputs of the `new` tokens (a prompt, or one token at a time) and the cache
        with them appended."""


class CausalLM(Decoder):
    """A decoder with next-token logits: `model(input_ids)` is `[seq, vocab]` float32."""

    task: ClassVar[str | None] = "causal_lm"
    outputs: ClassVar[tuple[str, ...]] = ("logits",)

    @abc.abstractmethod
    def decode(
        self,
        input_ids: Int[Array, " new"],
        cache: nn.KVCache,
        *,
        attention_mask: Int[Array, " new"] | Bool[Array, " new"] | None = None,
        position_ids: Int[Array, " new"] | None = None,
        last_only: bool = False,
    ) -> tuple[Float[Array, "out vocab"], nn.KVCache]:
        """Logits of the `new` tokens (only the last one's with `last_only`, which spares
        a prompt's LM head) and the updated cache."""


class EncoderDecoder(Cached):
    """Encodes an input once, then decodes a target against it with a cache."""

    @abc.abstractmethod
    def encode(
        self,
        input_ids: Int[Array, " src"],
        *,
        attention_mask: Int[Array, " src"] | Bool[Array, " src"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "src hidden"]:
        """The encoder's hidden states of one input sequence."""

    @abc.abstractmethod
    def cross_kv(
        self,
        encoded: Float[Array, "src hidden"],
        attention_mask: Int[Array, " src"] | Bool[Array, " src"] | None = None,
    ) -> nn.CrossKV:
        """Every decoder layer's cross-attention keys and values, computed once per input."""

    @abc.abstractmethod
    def decode(
        self, decoder_input_ids: Int[Array, " new"], cache: nn.KVCache, cross: nn.CrossKV
    ) -> tuple[Float[Array, "new out"], nn.KVCache]:
        """Outputs of the `new` decoder tokens and the updated cache."""

    @abc.abstractmethod
    def decode_full(
        self,
        decoder_input_ids: Int[Array, " tgt"],
        encoded: Float[Array, "src hidden"],
        *,
        attention_mask: Int[Array, " src"] | Bool[Array, " src"] | None = None,
        decoder_attention_mask: Int[Array, " tgt"] | Bool[Array, " tgt"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "tgt out"]:
        """Outputs of a whole target sequence against `encode`'s output, without a cache
        (`model(input_ids, decoder_input_ids)` is `decode_full(decoder_input_ids,
        encode(input_ids))`)."""


class Seq2SeqLM(EncoderDecoder):
    """An encoder-decoder with logits: `model(input_ids, decoder_input_ids)` is
    `[tgt, vocab]` float32; decoding starts from `config.decoder_start_token_id`."""

    task: ClassVar[str | None] = "seq2seq_lm"
    outputs: ClassVar[tuple[str, ...]] = ("logits",)


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture: its config class and its model classes, the base model first."""

    config: type[ModelConfig]
    classes: tuple[type[Model], ...]

    def __post_init__(self):
        for cls in self.classes:
            if not issubclass(cls, Model):
                raise TypeError(f"{cls.__name__} does not implement the model contract (eqx_models Model)")

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def base(self) -> type[Model]:
        return self.classes[0]

    def by_name(self) -> dict[str, type[Model]]:
        return {cls.__name__: cls for cls in self.classes}
