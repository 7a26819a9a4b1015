"""Text in, text out: codecs between strings and token ids, and incremental decoding.

A model folder with a `tokenizer.json` (HF's `tokenizers` format) gets a `TokenizerCodec`;
a folder without one gets the `ByteCodec` fallback, where token `i < 256` is byte `i`.
"""

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .errors import CheckpointError, InputError

TOKENIZER_NAME = "tokenizer.json"
_REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


@runtime_checkable
class Codec(Protocol):
    """What generation needs of a tokenizer."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int | np.integer]) -> str: ...


@dataclasses.dataclass(frozen=True)
class ByteCodec:
    """UTF-8 bytes as token ids; ids of 256 and above (EOS, padding) decode to nothing."""

    vocab_size: int

    @classmethod
    def for_model(cls, config) -> "ByteCodec":
        if config.vocab_size < 256:
            raise InputError(f"byte-level prompts need a vocabulary of at least 256 ids, model has {config.vocab_size}")
        return cls(config.vocab_size)

    def encode(self, text: str) -> list[int]:
        ids = list(text.encode("utf-8"))
        if not ids:
            raise InputError("the prompt is empty")
        return ids

    def decode(self, ids: Iterable[int | np.integer]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class TokenizerCodec:
    """A `tokenizers.Tokenizer` (a `tokenizer.json`) as a codec.

    `encode` applies the tokenizer's post-processor, as HF's `tokenizer(text)` does (Gemma's
    adds BOS, T5's appends EOS); padding and truncation saved in the file are switched off,
    so a prompt is never silently cut. `decode` skips special tokens (pad, EOS, BOS...) and
    ids the tokenizer does not know (a model's vocabulary is often padded past the
    tokenizer's).

    **Arguments:**

    - `tokenizer`: a `tokenizers.Tokenizer`.
    - `model_vocab_size`: the model's vocabulary size; `encode` refuses ids at or past it.
    - `source`: where the tokenizer came from, for error messages.
    """

    def __init__(self, tokenizer: Any, *, model_vocab_size: int | None = None, source: str = "the tokenizer"):
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.model_vocab_size = model_vocab_size
        self.source = source

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, model_vocab_size: int | None = None) -> "TokenizerCodec":
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"no tokenizer file at {path}")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare `Exception` for every parse error
            raise CheckpointError(f"cannot read tokenizer file {path}: {err}") from None
        return cls(tokenizer, model_vocab_size=model_vocab_size, source=str(path))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text).ids
        if not ids:
            raise InputError(f"the prompt {text!r} encodes to no tokens")
        limit = self.model_vocab_size
        if limit is not None and max(ids) >= limit:
            raise InputError(
                f"the prompt encodes to id {max(ids)} but the model has only {limit} ids; "
                f"{self.source} does not belong to this model"
            )
        return ids

    def decode(self, ids: Iterable[int | np.integer]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"TokenizerCodec({self.source}, vocab_size={self.vocab_size})"


def load_codec(folder: str | os.PathLike, config: Any) -> TokenizerCodec | ByteCodec:
    """The codec of a model folder: its `tokenizer.json` when it has one, else byte-level ids
    (`ByteCodec.for_model(config)`, which needs a vocabulary of at least 256)."""
    path = Path(folder) / TOKENIZER_NAME
    if path.exists():
        return TokenizerCodec.from_file(path, model_vocab_size=config.vocab_size)
    return ByteCodec.for_model(config)


class StreamDecoder:
    """Turns token ids arriving a few at a time into text that can be printed at once.

    Each `push` decodes every id so far and returns the text not yet returned. A trailing
    U+FFFD (an incomplete UTF-8 sequence: a character split over byte-level or
    byte-fallback tokens) is held back until the next push completes it, so multi-byte
    characters are never broken; `flush` returns whatever is left, even if incomplete.
    The pieces concatenate to `codec.decode(ids)` whenever decoding a prefix of the ids
    gives a prefix of the text (true of byte-level BPE and byte codecs).

    **Arguments:**

    - `codec`: anything with `decode(ids) -> str`.
    - `prefix`: ids already shown (the prompt). They are decoded with the new ids, as
      context, but never returned; this keeps the space between a prompt and its
      continuation under SentencePiece-style decoders, which drop a leading space.
    """

    def __init__(self, codec: Codec, prefix: Iterable[int | np.integer] = ()):
        self.codec = codec
        self._ids = [int(i) for i in prefix]
        self._shown = codec.decode(self._ids) if self._ids else ""

    def push(self, ids: Iterable[int | np.integer]) -> str:
        self._ids.extend(int(i) for i in ids)
        return self._emit(self.codec.decode(self._ids).rstrip(_REPLACEMENT))

    def flush(self) -> str:
        return self._emit(self.codec.decode(self._ids))

    def _emit(self, text: str) -> str:
        # Text already printed cannot be taken back: if a decoder rewrote earlier text
        # (rare cleanup rules), continue after as many characters as were shown.
        if len(text) <= len(self._shown):
            return ""
        new = text[len(self._shown) :]
        self._shown = text
        return new
