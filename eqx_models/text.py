"""A byte-level codec for models without a tokenizer file: token `i < 256` is byte `i`."""

import dataclasses

from .errors import InputError


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

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
