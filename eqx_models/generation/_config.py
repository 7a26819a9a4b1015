"""What to generate: strategy, budget and logits processors, checked before anything compiles."""

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from ..errors import InputError

#: Sentinel default meaning "take the value from the model's config".
FROM_CONFIG: Any = type("FromConfig", (), {"__repr__": lambda self: "<from config>"})()


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """HF `GenerationConfig`'s decoding options, resolved against a model config.

    Hashable: everything here is static to the compiled loop except `max_new_tokens`, which
    is passed as a traced number so that a new budget within the cache's capacity does not
    recompile.
    """

    max_new_tokens: int
    min_length: int = 0
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    num_return_sequences: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    forced_bos_token_id: int | None = None
    forced_eos_token_id: tuple[int, ...] = ()
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int = 0
    decoder_start_token_id: int | None = None
    output_scores: bool = False

    @property
    def is_beam_search(self) -> bool:
        return self.num_beams > 1

    def static(self) -> "GenerationConfig":
        """This config with the budget zeroed: the part that keys compilation."""
        return dataclasses.replace(self, max_new_tokens=0)


def _ids(value: Any, name: str, vocab_size: int | None) -> tuple[int, ...]:
    if value is None:
        return ()
    ids = tuple(int(i) for i in np.atleast_1d(np.asarray(value)).ravel())
    bad = [i for i in ids if i < 0 or (vocab_size is not None and i >= vocab_size)]
    if bad:
        raise InputError(f"{name} holds ids outside [0, {vocab_size}): {bad}")
    return ids


def _bad_words(value: Any, vocab_size: int) -> tuple[tuple[int, ...], ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise InputError(f"bad_words_ids must be a non-empty list of lists of token ids, got {value!r}")
    words = []
    for word in value:
        if isinstance(word, (int, np.integer)) or not len(word):
            raise InputError(f"bad_words_ids must be a list of non-empty lists of token ids; got the entry {word!r}")
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
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    eos_token_id: Any = FROM_CONFIG,
    pad_token_id: Any = FROM_CONFIG,
    forced_eos_token_id: Any = None,
    bad_words_ids: Any = None,
    suppress_tokens: Any = None,
    begin_suppress_tokens: Any = None,
    forced_bos_token_id: int | None = None,
    **options: Any,
) -> GenerationConfig:
    """Fills defaults from the model config and checks every option, naming the culprit."""
    vocab = model_config.vocab_size
    if (max_new_tokens is None) == (max_length is None):
        raise InputError("pass exactly one of max_new_tokens and max_length")
    if max_new_tokens is None:
        max_new_tokens = max_length - prompt_length
        if max_new_tokens < 1:
            raise InputError(f"max_length={max_length} leaves no room after the {prompt_length}-token prompt")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")

    # EOS ids are not range-checked: HF's tiny test configs carry ids beyond their vocabulary,
    # which simply never stop a row.
    eos = _ids(model_config.eos_token_id if eos_token_id is FROM_CONFIG else eos_token_id, "eos_token_id", None)
    pad = model_config.pad_token_id if pad_token_id is FROM_CONFIG else pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    if options.get("early_stopping", False) not in (True, False, "never"):
        raise InputError(f"early_stopping must be True, False or 'never', got {options['early_stopping']!r}")
    if forced_bos_token_id is not None:
        _ids(forced_bos_token_id, "forced_bos_token_id", vocab)
    config = GenerationConfig(
        max_new_tokens=int(max_new_tokens),
        eos_token_id=eos,
        pad_token_id=int(pad),
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
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise InputError(message)

    need(c.min_length >= 0 and c.min_new_tokens >= 0, "min_length and min_new_tokens must be >= 0")
    need(c.temperature > 0, f"temperature must be > 0, got {c.temperature} (use do_sample=False for greedy)")
    need(c.top_k is None or c.top_k >= 0, f"top_k must be >= 0, got {c.top_k}")
    need(c.top_p is None or 0 <= c.top_p <= 1, f"top_p must be in [0, 1], got {c.top_p}")
    need(c.min_p is None or 0 <= c.min_p <= 1, f"min_p must be in [0, 1], got {c.min_p}")
    need(c.repetition_penalty > 0, f"repetition_penalty must be > 0, got {c.repetition_penalty}")
    need(c.no_repeat_ngram_size >= 0, f"no_repeat_ngram_size must be >= 0, got {c.no_repeat_ngram_size}")
    need(c.num_beams >= 1, f"num_beams must be >= 1, got {c.num_beams}")
    need(c.num_return_sequences >= 1, f"num_return_sequences must be >= 1, got {c.num_return_sequences}")
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
    need(c.pad_token_id >= 0, f"pad_token_id must be >= 0, got {c.pad_token_id}")
    if c.top_k:
        need(c.do_sample, "top_k only applies when do_sample=True")
    if c.top_p is not None and c.top_p < 1 or c.min_p is not None or c.temperature != 1.0:
        need(c.do_sample, "temperature, top_p and min_p only apply when do_sample=True")
