"""`model.config` and `model.generation_config` as HF's classes present them: attribute
objects over a `config.json` / `generation_config.json` dict, without transformers.

`Config` answers HF's field names (everything the file holds, our config's values for
the fields we model, and the few `PretrainedConfig` defaults HF code reads, such as
`return_dict`). `GenerationConfig` holds HF's `GenerationConfig` defaults overridden by
`generation_config.json` or, without one, by the generation fields of the model config
(HF's `GenerationConfig.from_model_config`); `update(**kw)` returns the unused keywords.
"""

import copy
import json
from collections.abc import Mapping
from typing import Any

from ..errors import InputError
from ..validation import show_value

#: `PretrainedConfig` attributes HF's Flax classes read, with their defaults.
PRETRAINED_DEFAULTS: dict[str, Any] = {
    "return_dict": True,
    "output_hidden_states": False,
    "output_attentions": False,
    "is_encoder_decoder": False,
    "is_decoder": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "decoder_start_token_id": None,
}

#: HF `GenerationConfig`'s fields (the ones its Flax `generate` reads) and their defaults.
GENERATION_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "max_new_tokens": None,
    "min_length": 0,
    "min_new_tokens": None,
    "early_stopping": False,
    "do_sample": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": None,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "num_return_sequences": 1,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "decoder_start_token_id": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "output_scores": False,
    "return_dict_in_generate": False,
}


class AttributeConfig:
    """Settings read and written as attributes; `to_dict()` gives them all."""

    _kind = "config"

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("_values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"this {self._kind} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        self._values[name] = value

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._values == self._values  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]

    def __deepcopy__(self, memo: dict) -> "AttributeConfig":
        new = object.__new__(type(self))
        object.__setattr__(new, "_values", copy.deepcopy(self._values, memo))
        return new

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._values)

    def to_json_string(self) -> str:
        return json.dumps(self._values, indent=2, sort_keys=True) + "\n"

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


class Config(AttributeConfig):
    """A model's HF config (`model.config`): `config.vocab_size`, `config.to_dict()`."""

    _kind = "config"


class GenerationConfig(AttributeConfig):
    """HF's `GenerationConfig` fields as attributes: `GenerationConfig(max_length=32,
    num_beams=4)`; `update(**kw)` sets known fields and returns the others."""

    _kind = "generation config"

    def __init__(self, **values: Any):
        super().__init__({**GENERATION_DEFAULTS, **values})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "GenerationConfig":
        """From a `generation_config.json` dict (bookkeeping such as
        `transformers_version` kept, harmless)."""
        if not isinstance(values, Mapping):
            raise InputError(f"a generation config must be a JSON object, got {show_value(values)}")
        return cls(**values)

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any]) -> "GenerationConfig":
        """The generation fields a model config sets (not `None`), over the defaults."""
        return cls(**{k: v for k, v in config.items() if k in GENERATION_DEFAULTS and v is not None})

    @classmethod
    def coerce(cls, value: Any) -> "GenerationConfig":
        """Ours, or anything with `to_dict()` (transformers' own `GenerationConfig`)."""
        if isinstance(value, GenerationConfig):
            return copy.deepcopy(value)
        to_dict = getattr(type(value), "to_dict", None)
        if to_dict is None:
            raise InputError(
                f"generation_config must be a GenerationConfig (or have to_dict()), got {type(value).__name__}"
            )
        return cls.from_dict(to_dict(value))

    def update(self, **values: Any) -> dict[str, Any]:
        """Sets the given fields that a generation config has; returns the others (model
        keyword arguments such as `attention_mask`), as HF's `update`."""
        unused = {}
        for name, value in values.items():
            if name in GENERATION_DEFAULTS or name in self._values:
                self._values[name] = value
            else:
                unused[name] = value
        return unused


def model_config(hf: Mapping[str, Any], *, is_encoder_decoder: bool) -> Config:
    """`model.config` from a `config.json` dict (ours written back by `to_hf_config`, over
    what the file held), with HF's `PretrainedConfig` defaults for what neither sets."""
    values = {**PRETRAINED_DEFAULTS, "is_encoder_decoder": is_encoder_decoder, **hf}
    values["use_return_dict"] = values["return_dict"]
    return Config(values)
