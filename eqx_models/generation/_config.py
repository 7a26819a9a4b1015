"""What to generate: strategy, budget and logits processors, checked before anything compiles."""

import dataclasses
from typing import Annotated, Any, Literal

import jax
import numpy as np

from ..errors import InputError
from ..validation import (
    MAX_INT32,
    Count,
    PositiveFloat,
    Probability,
    Range,
    Size,
    TokenId,
    check_fields,
    check_values,
    show_value,
)

#: Sentinel default meaning "take the value from the model's config".
FROM_CONFIG: Any = type("FromConfig", (), {"__repr__": lambda self: "<from config>"})()


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """HF `GenerationConfig`'s decoding options, resolved against a model config.

    Hashable: everything here is static to the compiled loop except `max_new_tokens`, which
    is passed as a traced number so that a new budget within the cache's capacity does not
    recompile.
    """

    max_new_tokens: Count  # 0 in `static()`; `resolve` asks for at least 1
    min_length: Count = 0
    min_new_tokens: Count = 0
    do_sample: bool = False
    temperature: PositiveFloat = 1.0
    top_k: Count | None = None
    top_p: Probability | None = None
    min_p: Probability | None = None
    num_beams: Size = 1
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    num_return_sequences: Size = 1
    repetition_penalty: PositiveFloat = 1.0
    no_repeat_ngram_size: Count = 0
    bad_words_ids: tuple[tuple[TokenId, ...], ...] = ()
    forced_bos_token_id: TokenId | None = None
    forced_eos_token_id: tuple[TokenId, ...] = ()
    suppress_tokens: tuple[TokenId, ...] = ()
    begin_suppress_tokens: tuple[TokenId, ...] = ()
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: TokenId = 0
    decoder_start_token_id: TokenId | None = None
    output_scores: bool = False

    # Checked by `check_fields` below, with our messages; jaxtyping's import hook (on in the
    # tests) would otherwise check `__init__`'s arguments first, with beartype's.
    __no_type_check__ = True

    def __post_init__(self) -> None:
        check_fields(self, error=InputError)

    @property
    def is_beam_search(self) -> bool:
        return self.num_beams > 1

    def static(self) -> "GenerationConfig":
        """This config with the budget zeroed: the part that keys compilation."""
        return dataclasses.replace(self, max_new_tokens=0)


def _ids(value: Any, name: str, vocab_size: int | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, np.ndarray | jax.Array):
        value = np.asarray(value).ravel().tolist()
    ids = check_values({name: value}, {name: int | tuple[int, ...]}, error=InputError)[name]
    ids = (ids,) if isinstance(ids, int) else ids
    bad = [i for i in ids if i < 0 or (vocab_size is not None and i >= vocab_size)]
    if bad:
        raise InputError(f"{name} holds ids outside [0, {vocab_size}): {show_value(bad)}")
    return ids


def _bad_words(value: Any, vocab_size: int) -> tuple[tuple[int, ...], ...]:
    if value is None:
        return ()
    if isinstance(value, np.ndarray | jax.Array):
        value = np.asarray(value).tolist()
    if not isinstance(value, list | tuple) or not value:
        raise InputError(f"bad_words_ids must be a non-empty list of lists of token ids, got {show_value(value)}")
    words = []
    for word in value:
        if isinstance(word, np.ndarray | jax.Array):
            word = np.asarray(word).tolist()
        if not isinstance(word, list | tuple) or not word:
            raise InputError(
                f"bad_words_ids must be a list of non-empty lists of token ids; got the entry {show_value(word)}"
            )
        words.append(_ids(word, "bad_words_ids", vocab_size))
    return tuple(words)


def _start_token(model_config: Any) -> int:
    start = getattr(model_config, "decoder_start_token_id", None)
    if start is None:
        raise InputError("the config has no decoder_start_token_id; set it (LongT5 uses the pad id, 0)")
    return int(start)


def resolve(
    model_config: Any,
    *,
    prompt_length: int,
    seq2seq: bool,
    max_new_tokens: Any = None,  # user input: checked here, with messages naming it
    max_length: Any = None,
    eos_token_id: Any = FROM_CONFIG,
    pad_token_id: Any = FROM_CONFIG,
    forced_eos_token_id: Any = None,
    bad_words_ids: Any = None,
    suppress_tokens: Any = None,
    begin_suppress_tokens: Any = None,
    forced_bos_token_id: Any = None,
    **options: Any,
) -> GenerationConfig:
    """Fills defaults from the model config and checks every option, naming the culprit."""
    vocab = model_config.vocab_size
    if (max_new_tokens is None) == (max_length is None):
        raise InputError("pass exactly one of max_new_tokens and max_length")
    budget = Annotated[int, Range(1, MAX_INT32)] | None
    lengths = {"max_new_tokens": max_new_tokens, "max_length": max_length}
    check_values(lengths, dict.fromkeys(lengths, budget), error=InputError)
    if max_new_tokens is None:
        max_new_tokens = max_length - prompt_length
        if max_new_tokens < 1:
            raise InputError(f"max_length={max_length} leaves no room after the {prompt_length}-token prompt")

    # EOS ids are not range-checked: HF's tiny test configs carry ids beyond their vocabulary,
    # which simply never stop a row.
    eos = _ids(model_config.eos_token_id if eos_token_id is FROM_CONFIG else eos_token_id, "eos_token_id", None)
    pad = model_config.pad_token_id if pad_token_id is FROM_CONFIG else pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    if forced_bos_token_id is not None:
        _ids(forced_bos_token_id, "forced_bos_token_id", vocab)
    config = GenerationConfig(
        max_new_tokens=int(max_new_tokens),
        eos_token_id=eos,
        pad_token_id=pad,
        decoder_start_token_id=_start_token(model_config) if seq2seq else None,
        forced_eos_token_id=_ids(forced_eos_token_id, "forced_eos_token_id", vocab),
        bad_words_ids=_bad_words(bad_words_ids, vocab),
        suppress_tokens=_ids(suppress_tokens, "suppress_tokens", vocab),
        begin_suppress_tokens=_ids(begin_suppress_tokens, "begin_suppress_tokens", vocab),
        forced_bos_token_id=forced_bos_token_id,
        **options,
    )
    _check(config, vocab)
    return config


def _check(c: GenerationConfig, vocab: int) -> None:
    """The conditions between options (each option on its own is checked on creation)."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise InputError(message)

    if c.is_beam_search:
        need(
            c.num_return_sequences <= c.num_beams,
            f"num_return_sequences={c.num_return_sequences} cannot exceed num_beams={c.num_beams}",
        )
    else:
        need(
            c.num_return_sequences == 1 or c.do_sample,
            "greedy decoding returns one sequence per prompt; num_return_sequences > 1 needs do_sample or num_beams",
        )
    need(
        not (c.do_sample and c.is_beam_search),
        "do_sample=True with num_beams > 1 (beam sampling) is not offered; use one or the other",
    )
    if c.top_k:
        need(c.do_sample, "top_k only applies when do_sample=True")
    if c.top_p is not None and c.top_p < 1 or c.min_p is not None or c.temperature != 1.0:
        need(c.do_sample, "temperature, top_p and min_p only apply when do_sample=True")
