"""eqx_models: GPT-Neo, Gemma, XGLM, BigBird and LongT5 as Equinox modules, with HF
checkpoint conversion, cached generation and optax training; LoRA adapters in HF PEFT's
format are the `lora` submodule (`add_lora`, `merge_lora`, `save_adapter`, `load_adapter`)."""

from . import hub, lora
from .errors import CheckpointError, ConfigError, EqxModelsError, HubError, InputError
from .generation import generate
from .models import FAMILIES
from .nn import separate_layers, stack_layers, with_run_options
from .pretrained import export_hf, from_pretrained, load_with_report, save_pretrained
from .quantize import dequantize, quantize
from .state_dict import from_state_dict, to_state_dict
from .text import load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "CheckpointError",
    "ConfigError",
    "EqxModelsError",
    "HubError",
    "InputError",
    "export_hf",
    "from_pretrained",
    "from_state_dict",
    "generate",
    "hub",
    "load_tokenizer",
    "load_with_report",
    "lora",
    "dequantize",
    "quantize",
    "save_pretrained",
    "separate_layers",
    "stack_layers",
    "to_state_dict",
    "with_run_options",
]
