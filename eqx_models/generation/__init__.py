"""Cached, compiled generation: greedy, sampling and beam search with HF's logits processors."""

from ._config import GenerationConfig as GenerationConfig
from ._decoding import batched_decode as batched_decode
from ._decoding import hf_positions as hf_positions
from ._decoding import init_batched_cache as init_batched_cache
from ._generate import GenerateOutput as GenerateOutput
from ._generate import generate as generate
from ._generate import stream as stream
from ._processors import BadWords as BadWords
from ._processors import ForcedBOS as ForcedBOS
from ._processors import ForcedEOS as ForcedEOS
from ._processors import LogitsProcessor as LogitsProcessor
from ._processors import MinLength as MinLength
from ._processors import MinNewTokens as MinNewTokens
from ._processors import MinP as MinP
from ._processors import NoRepeatNGram as NoRepeatNGram
from ._processors import RepetitionPenalty as RepetitionPenalty
from ._processors import StepContext as StepContext
from ._processors import SuppressTokens as SuppressTokens
from ._processors import SuppressTokensAtBegin as SuppressTokensAtBegin
from ._processors import Temperature as Temperature
from ._processors import TopK as TopK
from ._processors import TopP as TopP
from ._slots import SlotEngine as SlotEngine
from ._slots import SlotRequest as SlotRequest
from ._slots import Token as Token

__all__ = [
    "BadWords",
    "ForcedBOS",
    "ForcedEOS",
    "GenerateOutput",
    "GenerationConfig",
    "LogitsProcessor",
    "MinLength",
    "MinNewTokens",
    "MinP",
    "NoRepeatNGram",
    "RepetitionPenalty",
    "StepContext",
    "SuppressTokens",
    "SlotEngine",
    "SlotRequest",
    "SuppressTokensAtBegin",
    "Temperature",
    "TopK",
    "Token",
    "TopP",
    "hf_positions",
    "batched_decode",
    "generate",
    "init_batched_cache",
    "stream",
]
