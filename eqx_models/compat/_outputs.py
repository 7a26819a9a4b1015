"""HF's Flax output classes: named fields, indexable as HF's `ModelOutput`, pytrees.

HF's `ModelOutput` is an ordered dict whose `None` fields are left out: `outputs[0]` is the
first field that is set, `outputs["logits"]` and `outputs.logits` name one, `to_tuple()`
lists the set ones in declaration order (what `return_dict=False` returns). Each class here
declares its HF name and its fields in HF's order, once; instances are JAX pytrees, so they
come back from `jax.jit` and `jax.grad(has_aux=True)`.
"""

from collections.abc import Iterator
from typing import Any, ClassVar

import jax


class ModelOutput:
    """The fields of one output; `fields` (a class attribute) gives names and order."""

    fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **values: Any):
        unknown = sorted(set(values) - set(self.fields))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {unknown}; its fields: {', '.join(self.fields)}")
        object.__setattr__(self, "_values", {name: values.get(name) for name in self.fields})

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_pytree_with_keys(
            cls,
            lambda out: ([(jax.tree_util.GetAttrKey(n), out._values[n]) for n in cls.fields], None),
            lambda _, children: cls(**dict(zip(cls.fields, children))),
            lambda out: ([out._values[n] for n in cls.fields], None),
        )

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("_values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __setitem__(self, name: str, value: Any) -> None:
        if name not in self.fields:
            raise KeyError(f"{type(self).__name__} has no field {name!r}; its fields: {', '.join(self.fields)}")
        self._values[name] = value

    def keys(self) -> list[str]:
        """The names of the fields that are set (not `None`), in order."""
        return [name for name in self.fields if self._values[name] is not None]

    def values(self) -> list[Any]:
        return [self._values[name] for name in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(name, self._values[name]) for name in self.keys()]

    def to_tuple(self) -> tuple[Any, ...]:
        """The set fields in order: what HF returns with `return_dict=False`."""
        return tuple(self.values())

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return self._values[key]
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._values == self._values  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={_describe(value)}" for name, value in self.items())
        return f"{type(self).__name__}({shown})"


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{type(value).__name__}{list(shape)}"
    if isinstance(value, tuple):
        return f"tuple[{len(value)}]"
    return repr(value)


def output_class(name: str, *fields: str) -> type[ModelOutput]:
    """A `ModelOutput` subclass named as HF's, with HF's fields in HF's order."""
    return type(name, (ModelOutput,), {"fields": fields, "__module__": __name__, "__doc__": f"HF's `{name}`."})


_ATTENTIONS = ("hidden_states", "attentions")
_SEQ2SEQ = (
    "past_key_values",
    "decoder_hidden_states",
    "decoder_attentions",
    "cross_attentions",
    "encoder_last_hidden_state",
    "encoder_hidden_states",
    "encoder_attentions",
)

FlaxBaseModelOutput = output_class("FlaxBaseModelOutput", "last_hidden_state", *_ATTENTIONS)
FlaxBaseModelOutputWithPastAndCrossAttentions = output_class(
    "FlaxBaseModelOutputWithPastAndCrossAttentions",
    "last_hidden_state",
    "past_key_values",
    *_ATTENTIONS,
    "cross_attentions",
)
FlaxBaseModelOutputWithPoolingAndCrossAttentions = output_class(
    "FlaxBaseModelOutputWithPoolingAndCrossAttentions",
    "last_hidden_state",
    "pooler_output",
    "hidden_states",
    "past_key_values",
    "attentions",
    "cross_attentions",
)
FlaxCausalLMOutput = output_class("FlaxCausalLMOutput", "logits", *_ATTENTIONS)
FlaxCausalLMOutputWithCrossAttentions = output_class(
    "FlaxCausalLMOutputWithCrossAttentions", "logits", "past_key_values", *_ATTENTIONS, "cross_attentions"
)
FlaxMaskedLMOutput = output_class("FlaxMaskedLMOutput", "logits", *_ATTENTIONS)
FlaxSequenceClassifierOutput = output_class("FlaxSequenceClassifierOutput", "logits", *_ATTENTIONS)
FlaxMultipleChoiceModelOutput = output_class("FlaxMultipleChoiceModelOutput", "logits", *_ATTENTIONS)
FlaxTokenClassifierOutput = output_class("FlaxTokenClassifierOutput", "logits", *_ATTENTIONS)
FlaxBigBirdForPreTrainingOutput = output_class(
    "FlaxBigBirdForPreTrainingOutput", "prediction_logits", "seq_relationship_logits", *_ATTENTIONS
)
FlaxBigBirdForQuestionAnsweringModelOutput = output_class(
    "FlaxBigBirdForQuestionAnsweringModelOutput", "start_logits", "end_logits", "pooled_output", *_ATTENTIONS
)
FlaxSeq2SeqModelOutput = output_class("FlaxSeq2SeqModelOutput", "last_hidden_state", *_SEQ2SEQ)
FlaxSeq2SeqLMOutput = output_class("FlaxSeq2SeqLMOutput", "logits", *_SEQ2SEQ)
FlaxGreedySearchOutput = output_class("FlaxGreedySearchOutput", "sequences")
FlaxSampleOutput = output_class("FlaxSampleOutput", "sequences")
FlaxBeamSearchOutput = output_class("FlaxBeamSearchOutput", "sequences", "scores")
