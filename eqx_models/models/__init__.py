"""The registry of architectures: HF `model_type` and class names to our classes."""

import dataclasses
from typing import Any

from ..errors import ConfigError
from ._config import ModelConfig, show_value
from .big_bird import (
    BigBirdConfig,
    BigBirdForCausalLM,
    BigBirdForMaskedLM,
    BigBirdForMultipleChoice,
    BigBirdForPreTraining,
    BigBirdForQuestionAnswering,
    BigBirdForSequenceClassification,
    BigBirdForTokenClassification,
    BigBirdModel,
)
from .gemma import GemmaConfig, GemmaForCausalLM, GemmaModel
from .gpt_neo import GPTNeoConfig, GPTNeoForCausalLM, GPTNeoModel
from .long_t5 import LongT5Config, LongT5EncoderModel, LongT5ForConditionalGeneration, LongT5Model
from .xglm import XGLMConfig, XGLMForCausalLM, XGLMModel


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture: its config class, base model and every head, by HF class name."""

    config: type[ModelConfig]
    base: type
    classes: tuple[type, ...]

    def by_name(self) -> dict[str, type]:
        return {cls.__name__: cls for cls in self.classes}


FAMILIES: dict[str, Family] = {
    "gpt_neo": Family(GPTNeoConfig, GPTNeoModel, (GPTNeoModel, GPTNeoForCausalLM)),
    "gemma": Family(GemmaConfig, GemmaModel, (GemmaModel, GemmaForCausalLM)),
    "xglm": Family(XGLMConfig, XGLMModel, (XGLMModel, XGLMForCausalLM)),
    "longt5": Family(LongT5Config, LongT5Model, (LongT5Model, LongT5ForConditionalGeneration, LongT5EncoderModel)),
    "big_bird": Family(
        BigBirdConfig,
        BigBirdModel,
        (
            BigBirdModel,
            BigBirdForPreTraining,
            BigBirdForMaskedLM,
            BigBirdForCausalLM,
            BigBirdForSequenceClassification,
            BigBirdForMultipleChoice,
            BigBirdForTokenClassification,
            BigBirdForQuestionAnswering,
        ),
    ),
}


def family_of(model_type: Any) -> Family:
    """The family a `config.json`'s `model_type` names (anything else, a list included, is a
    `ConfigError`)."""
    supported = ", ".join(sorted(FAMILIES))
    if model_type is None:
        raise ConfigError(f"the config has no model_type; supported: {supported}")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ConfigError(f"unknown model_type {show_value(model_type)}; supported: {supported}")
    return FAMILIES[model_type]


def resolve_class(hf_config: dict[str, Any], architecture: str | None = None) -> tuple[Family, type]:
    """The class a `config.json` asks for: `architecture` if given, else the first of its
    `architectures` (HF's `Flax`/`TF` prefixes dropped), else the base model."""
    if not isinstance(hf_config, dict):
        raise ConfigError(f"a config must be a JSON object of settings, got {show_value(hf_config)}")
    family = family_of(hf_config.get("model_type"))
    names = family.by_name()
    if architecture is None:
        listed = hf_config.get("architectures")
        if listed is not None and not (isinstance(listed, list) and all(isinstance(n, str) for n in listed)):
            raise ConfigError(
                f"architectures must be a list of class names such as [{family.base.__name__!r}], "
                f"got {show_value(listed)}"
            )
        architecture = listed[0] if listed else family.base.__name__
    if not isinstance(architecture, str):
        raise ConfigError(
            f"architecture must be a class name such as {family.base.__name__!r}, got {show_value(architecture)}"
        )
    for prefix in ("Flax", "TF"):
        if architecture.startswith(prefix) and architecture[len(prefix) :] in names:
            architecture = architecture[len(prefix) :]
    if architecture not in names:
        raise ConfigError(
            f"architecture {show_value(architecture)} is not supported for model_type {family.config.model_type!r}; "
            f"supported: {', '.join(names)}"
        )
    return family, names[architecture]


def class_by_name(name: str) -> tuple[Family, type]:
    for family in FAMILIES.values():
        if isinstance(name, str) and name in family.by_name():
            return family, family.by_name()[name]
    raise ConfigError(f"unknown architecture {show_value(name)}")


__all__ = [
    "FAMILIES",
    "Family",
    "GPTNeoConfig",
    "GPTNeoForCausalLM",
    "GPTNeoModel",
    "class_by_name",
    "family_of",
    "resolve_class",
]
