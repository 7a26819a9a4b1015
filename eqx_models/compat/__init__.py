"""Drop-in replacements for transformers' removed Flax classes.

Change `from transformers import FlaxGPTNeoForCausalLM` to
`from eqx_models.compat import FlaxGPTNeoForCausalLM`: `from_pretrained`, `params`,
`__call__` (with `params=`, `dropout_rng=`, `train=`), `generate` and `save_pretrained`
behave as HF 4.57's Flax classes, on our Equinox models, without transformers.

There is one class per registered model class (`eqx_models.models.FAMILIES`), named
`"Flax" + ` its name and derived here from the registry: the base class
(`FlaxPreTrainedModel`, or `FlaxSeq2SeqModel` for encoder-decoders) does the work; the
table below only records HF's positional order of each class's `__call__` arguments.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from ..models import FAMILIES, EncoderDecoder, Family, Model
from ..models import shift_tokens_right as _shift_one
from . import _outputs
from ._config import Config, GenerationConfig
from ._model import FlaxPreTrainedModel, FlaxSeq2SeqModel
from ._outputs import ModelOutput

_CONTROL_DECODER = ("params", "past_key_values", "dropout_rng", "train", "output_attentions")
_DECODER = ("input_ids", "attention_mask", "position_ids", *_CONTROL_DECODER, "output_hidden_states", "return_dict")
_XGLM = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "train",
    "params",
    "past_key_values",
    "dropout_rng",
)
_BIG_BIRD_CONTROL = ("params", "dropout_rng", "indices_rng", "train", "output_attentions", "output_hidden_states")
_BIG_BIRD = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "position_ids",
    "head_mask",
    "encoder_hidden_states",
    "encoder_attention_mask",
    *_BIG_BIRD_CONTROL,
    "return_dict",
    "past_key_values",
)
_BIG_BIRD_QA = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "position_ids",
    "head_mask",
    "question_lengths",
    *_BIG_BIRD_CONTROL,
    "return_dict",
)
_T5_CONTROL = ("output_attentions", "output_hidden_states", "return_dict", "train", "params", "dropout_rng")
_SEQ2SEQ = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", *_T5_CONTROL)
_ENCODER = ("input_ids", "attention_mask", *_T5_CONTROL)

#: HF's positional order of `__call__`'s arguments: per family, and for the classes that
#: differ from their family's, per class.
CALL_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "gpt_neo": _DECODER,
    "gemma": _DECODER,
    "xglm": _XGLM,
    "big_bird": _BIG_BIRD,
    "longt5": _SEQ2SEQ,
    "t5": _SEQ2SEQ,
    "mt5": _SEQ2SEQ,
    "BigBirdForQuestionAnswering": _BIG_BIRD_QA,
    "T5EncoderModel": _ENCODER,
    "MT5EncoderModel": _ENCODER,
    "LongT5EncoderModel": _ENCODER,
}


def _drop_in(family: Family, cls: type[Model]) -> type[FlaxPreTrainedModel]:
    base = FlaxSeq2SeqModel if issubclass(cls, EncoderDecoder) else FlaxPreTrainedModel
    name = "Flax" + cls.__name__
    arguments = CALL_ARGUMENTS.get(cls.__name__, CALL_ARGUMENTS[family.model_type])
    doc = f"Drop-in for transformers' `{name}`, backed by `eqx_models.models.{cls.__name__}`."
    attributes = {"model_class": cls, "family": family, "call_arguments": arguments, "__doc__": doc}
    return type(name, (base,), {**attributes, "__module__": __name__, "__qualname__": name})


#: Every drop-in class by name, derived from the registry.
CLASSES: dict[str, type[FlaxPreTrainedModel]] = {
    "Flax" + cls.__name__: _drop_in(family, cls) for family in FAMILIES.values() for cls in family.classes
}
globals().update(CLASSES)


def shift_tokens_right(
    input_ids: Int[Array | np.ndarray, "batch seq"], pad_token_id: int, decoder_start_token_id: int
) -> Int[Array, "batch seq"]:
    """HF Flax's batched `shift_tokens_right(input_ids, pad_token_id, decoder_start_token_id)`
    (HF's example scripts look it up in the model class's module): labels shifted right
    behind the start token, -100 replaced by the pad id."""
    return jax.vmap(lambda row: _shift_one(row, decoder_start_token_id, pad_token_id))(jnp.asarray(input_ids))


__all__ = [
    "CALL_ARGUMENTS",
    "CLASSES",
    "Config",
    "FlaxPreTrainedModel",
    "FlaxSeq2SeqModel",
    "GenerationConfig",
    "ModelOutput",
    "shift_tokens_right",
    *CLASSES,
    *(name for name in dir(_outputs) if name.startswith("Flax")),
]
globals().update({name: getattr(_outputs, name) for name in dir(_outputs) if name.startswith("Flax")})
