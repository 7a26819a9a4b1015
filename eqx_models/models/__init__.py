"""The registry of architectures: HF `model_type` and class names to our classes.

Each family file ends with its `Family` (config class and model classes); this registry is
the one list of them. Everything else that needs "every model" or "every head" (the loss
dispatch, training presets, the CLI, docs tables, tests) derives from it.
"""

from typing import Any

from ..errors import ConfigError
from ..validation import show_value
from . import big_bird, gemma, gpt_neo, long_t5, t5, xglm
from ._config import ModelConfig
from ._contract import (
    TASKS,
    Cached,
    CausalLM,
    Decoder,
    EncoderDecoder,
    Family,
    Model,
    Seq2SeqLM,
)
from ._runner import checked_on_host, recording_hidden_states
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
from .t5 import (
    MT5Config,
    MT5EncoderModel,
    MT5ForConditionalGeneration,
    MT5Model,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
    T5Model,
    shift_tokens_right,
)
from .xglm import XGLMConfig, XGLMForCausalLM, XGLMModel

FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        gpt_neo.FAMILY,
        gemma.FAMILY,
        xglm.FAMILY,
        big_bird.FAMILY,
        long_t5.FAMILY,
        t5.FAMILY,
        t5.MT5_FAMILY,
    )
}


def all_classes() -> list[type[Model]]:
    """Every registered model class, family by family."""
    return [cls for family in FAMILIES.values() for cls in family.classes]


def classes_for_task(task: str | None) -> list[type[Model]]:
    """The registered classes whose `task` is `task` (`None`: the base models)."""
    return [cls for cls in all_classes() if cls.task == task]


def registry_table() -> str:
    """The registry as a markdown table (`docs/index.md` holds it verbatim; a test checks)."""
    rows = ["| `model_type` | config | classes (task) |", "|---|---|---|"]
    for model_type, family in FAMILIES.items():
        classes = ", ".join(f"`{cls.__name__}` ({cls.task or 'base'})" for cls in family.classes)
        rows.append(f"| `{model_type}` | `{family.config.__name__}` | {classes} |")
    return "\n".join(rows)


def family_of(model_type: Any) -> Family:
    """The family a `config.json`'s `model_type` names (anything else, a list included, is a
    `ConfigError`)."""
    supported = ", ".join(sorted(FAMILIES))
    if model_type is None:
        raise ConfigError(f"the config has no model_type; supported: {supported}")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ConfigError(f"unknown model_type {show_value(model_type)}; supported: {supported}")
    return FAMILIES[model_type]


def resolve_class(hf_config: dict[str, Any], architecture: str | None = None) -> tuple[Family, type[Model]]:
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


def class_by_name(name: str) -> tuple[Family, type[Model]]:
    for family in FAMILIES.values():
        if isinstance(name, str) and name in family.by_name():
            return family, family.by_name()[name]
    raise ConfigError(f"unknown architecture {show_value(name)}")


__all__ = [
    "FAMILIES",
    "TASKS",
    "BigBirdConfig",
    "BigBirdForCausalLM",
    "BigBirdForMaskedLM",
    "BigBirdForMultipleChoice",
    "BigBirdForPreTraining",
    "BigBirdForQuestionAnswering",
    "BigBirdForSequenceClassification",
    "BigBirdForTokenClassification",
    "BigBirdModel",
    "Cached",
    "CausalLM",
    "Decoder",
    "EncoderDecoder",
    "Family",
    "GPTNeoConfig",
    "GPTNeoForCausalLM",
    "GPTNeoModel",
    "GemmaConfig",
    "GemmaForCausalLM",
    "GemmaModel",
    "LongT5Config",
    "LongT5EncoderModel",
    "LongT5ForConditionalGeneration",
    "LongT5Model",
    "MT5Config",
    "MT5EncoderModel",
    "MT5ForConditionalGeneration",
    "MT5Model",
    "Model",
    "ModelConfig",
    "Seq2SeqLM",
    "T5Config",
    "T5EncoderModel",
    "T5ForConditionalGeneration",
    "T5Model",
    "XGLMConfig",
    "XGLMForCausalLM",
    "XGLMModel",
    "all_classes",
    "class_by_name",
    "classes_for_task",
    "family_of",
    "checked_on_host",
    "recording_hidden_states",
    "registry_table",
    "resolve_class",
    "shift_tokens_right",
]
