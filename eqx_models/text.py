"""Text in, text out: tokenizers of every format real checkpoints ship, and incremental decoding.

`load_tokenizer(folder)` gives the `Tokenizer` that `transformers.AutoTokenizer` would: the
folder's `tokenizer.json` when it has one, else a fast pipeline built from the slow files
(`vocab.json` + `merges.txt`, or a SentencePiece model; see `_slow_tokenizers`), with the
special and added tokens of `tokenizer_config.json` / `special_tokens_map.json` /
`added_tokens.json` applied as transformers' fast tokenizer classes apply them. A `ByteCodec`
(token `i < 256` is byte `i`) is used only when asked for or when the model's vocabulary is
the byte vocabulary.
"""

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from jaxtyping import Int

from . import _slow_tokenizers
from .errors import CheckpointError, InputError

TOKENIZER_NAME = "tokenizer.json"
_REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to
#: The special-token settings of a tokenizer, in transformers' order.
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
#: A model whose vocabulary has at most this many ids and no tokenizer files reads byte ids
#: (256 bytes and a few specials, as `eqx-models train --tokenizer bytes` makes them).
BYTE_VOCAB_MAX = 260
#: Which family's conventions apply, from `tokenizer_config.json`'s `tokenizer_class`...
_CLASS_FAMILY = {
    "GPT2Tokenizer": "gpt2",
    "XGLMTokenizer": "xglm",
    "T5Tokenizer": "t5",
    "MT5Tokenizer": "t5",
    "BigBirdTokenizer": "big_bird",
    "GemmaTokenizer": "gemma",
}
#: ... or, failing that, from `config.json`'s `model_type` (transformers' AutoTokenizer mapping).
_MODEL_FAMILY = {
    "gpt2": "gpt2",
    "gpt_neo": "gpt2",
    "xglm": "xglm",
    "t5": "t5",
    "mt5": "t5",
    "umt5": "t5",
    "longt5": "t5",
    "big_bird": "big_bird",
    "gemma": "gemma",
    "gemma2": "gemma",
}
#: Each family's default special tokens (its slow class's keyword defaults).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
    "xglm": {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "sep_token": "</s>",
        "cls_token": "<s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
    },
    "t5": {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
    "big_bird": {
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
        "cls_token": "[CLS]",
    },
    "gemma": {"unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
}
_PLAIN = {"lstrip": False, "rstrip": False}
#: How each slow class wraps a special token given as a string (the `AddedToken` it makes).
#: Only BigBird's fast class wraps them too, so only it applies when reading a tokenizer.json.
_SLOW_WRAP: dict[str, dict[str, dict[str, bool]]] = {
    "gpt2": {key: _PLAIN for key in ("bos_token", "eos_token", "unk_token", "pad_token")},
    "t5": {key: {"special": True} for key in ("pad_token", "unk_token", "eos_token")},
    "big_bird": {
        **{key: _PLAIN for key in ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token")},
        "mask_token": {"lstrip": True, "rstrip": False},  # the mask takes the space before it
    },
    "gemma": {
        key: {"normalized": False, "special": True} for key in ("bos_token", "eos_token", "unk_token", "pad_token")
    },
}
_FAST_WRAP = {"big_bird": _SLOW_WRAP["big_bird"]}


@runtime_checkable
class Codec(Protocol):
    """What generation needs of a tokenizer (`Tokenizer` and `ByteCodec` both are one)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Iterable[int | np.integer], skip_special_tokens: bool = True) -> str: ...


class ByteCodec:
    """UTF-8 bytes as token ids; ids of 256 and above (EOS, padding) decode to nothing.

    **Arguments:**

    - `vocab_size`: the model's vocabulary size, at least 256.
    """

    source = "byte-level ids"

    def __init__(self, vocab_size: int):
        if vocab_size < 256:
            raise InputError(f"byte-level ids need a vocabulary of at least 256 ids, the model has {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int | np.integer], skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteCodec) and other.vocab_size == self.vocab_size

    def __hash__(self) -> int:
        return hash(("ByteCodec", self.vocab_size))

    def __repr__(self) -> str:
        return f"ByteCodec(vocab_size={self.vocab_size})"


class Tokenizer:
    """A `tokenizers.Tokenizer` with its special tokens and chat template: what
    `transformers.AutoTokenizer` gives for the same folder, without transformers.

    Build one with `load_tokenizer(folder)` (every format) or `Tokenizer.from_file(path)` (a bare
    `tokenizer.json`, no special tokens). Padding and truncation saved in a file are switched
    off, as transformers does per call unless asked: a text is never silently cut.

    **Arguments:**

    - `backend`: the `tokenizers.Tokenizer`.
    - `special_tokens`: `SPECIAL_KEYS` -> token text (or None), plus `additional_special_tokens`.
    - `chat_template`: the jinja template of `tokenizer_config.json`, if any.
    - `clean_up_tokenization_spaces`: `decode` removes spaces before punctuation, as
      transformers does when this setting is on.
    - `source`: where the tokenizer came from, for error messages.
    """

    def __init__(
        self,
        backend: Any,
        *,
        special_tokens: dict[str, Any] | None = None,
        chat_template: str | None = None,
        clean_up_tokenization_spaces: bool = False,
        source: str = "the tokenizer",
    ):
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.source = source

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """A bare `tokenizer.json`: its pipeline and added tokens, no special-token names."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"no tokenizer file at {path}")
        return cls(_read_tokenizer_json(path), source=str(path))

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows, added tokens included (`len(hf_tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        return self.backend.id_to_token(index)

    def _special_id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        if token is None:
            return None
        found = self.backend.token_to_id(token)  # like transformers: an unknown token is the unknown id
        unk = self.special_tokens.get("unk_token")
        return found if found is not None or unk is None else self.backend.token_to_id(unk)

    bos_token = property(lambda self: self.special_tokens.get("bos_token"))
    eos_token = property(lambda self: self.special_tokens.get("eos_token"))
    pad_token = property(lambda self: self.special_tokens.get("pad_token"))
    unk_token = property(lambda self: self.special_tokens.get("unk_token"))
    bos_token_id = property(lambda self: self._special_id("bos_token"))
    eos_token_id = property(lambda self: self._special_id("eos_token"))
    pad_token_id = property(lambda self: self._special_id("pad_token"))
    unk_token_id = property(lambda self: self._special_id("unk_token"))

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`tokenizer(text)["input_ids"]`: special-token text inside `text` maps to its id;
        `add_special_tokens` adds the family's BOS/EOS/[CLS]... around the text."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        add_special_tokens: bool = True,
        padding_side: Literal["left", "right"] = "right",
        pad_id: int | None = None,
    ) -> tuple[Int[np.ndarray, "batch seq"], Int[np.ndarray, "batch seq"]]:
        """Encode several texts and pad them to the longest.

        **Arguments:**

        - `texts`: the texts.
        - `add_special_tokens`: as in `encode`.
        - `padding_side`: `"left"` for prompts to continue (generation), `"right"` otherwise.
        - `pad_id`: the padding id; default the tokenizer's `pad_token_id`.

        **Returns:**

        `(ids, mask)`, int32 arrays of shape `[len(texts), longest]`; `mask` is 1 on real tokens.
        """
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        pad = self.pad_token_id if pad_id is None else pad_id
        if pad is None:
            raise InputError(f"{self.source} has no pad token; pass pad_id to pad a batch")
        encoded = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        longest = max((len(ids) for ids in encoded), default=0)
        ids = np.full((len(encoded), longest), pad, np.int32)
        mask = np.zeros((len(encoded), longest), np.int32)
        for row, seq in enumerate(encoded):
            where = slice(longest - len(seq), longest) if padding_side == "left" else slice(0, len(seq))
            ids[row, where] = seq
            mask[row, where] = 1
        return ids, mask

    def decode(self, ids: Iterable[int | np.integer], skip_special_tokens: bool = True) -> str:
        """`tokenizer.decode(ids, skip_special_tokens=...)`. Ids the tokenizer does not know (a
        model's vocabulary is often padded past the tokenizer's) decode to nothing."""
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:  # transformers' `clean_up_tokenization`
            for before, after in _CLEAN_UP:
                text = text.replace(before, after)
        return text

    # ------------------------------------------------------------------ chat

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        chat_template: str | None = None,
        **variables: Any,
    ) -> list[int] | str:
        """Render a conversation with the tokenizer's chat template, as transformers does.

        **Arguments:**

        - `messages`: `[{"role": "user", "content": "..."}, ...]`.
        - `add_generation_prompt`: end with the header of the model's turn.
        - `tokenize`: return ids (the text encoded without adding special tokens: the template
          writes them) rather than the text.
        - `chat_template`: a template to use instead of the tokenizer's.
        - `variables`: more template variables (they win over the special tokens' names).
        """
        template = self.chat_template if chat_template is None else chat_template
        if template is None:
            raise InputError(f"{self.source} has no chat template (tokenizer_config.json has no chat_template)")
        names = {key: value for key, value in self.special_tokens.items() if value is not None}
        text = _render_chat(template, list(messages), add_generation_prompt, {**names, **variables})
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self) -> str:
        return f"Tokenizer({self.source}, vocab_size={self.vocab_size})"


_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"))
_CLEAN_UP += ((" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _render_chat(template: str, messages: list, add_generation_prompt: bool, variables: dict[str, Any]) -> str:
    """transformers' chat rendering: a sandboxed jinja2 environment with `trim_blocks` and
    `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps
    non-ASCII text, and the `{% generation %}` block (rendered as its body)."""
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's text; render the body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    context = {"tools": None, "documents": None, **variables}
    try:
        return env.from_string(template).render(
            **{**context, "messages": messages, "add_generation_prompt": add_generation_prompt}
        )
    except jinja2.exceptions.TemplateError as err:
        raise InputError(f"the chat template refused the conversation: {err}") from None


def prompt_ids(codec: Codec, text: str, *, vocab_size: int, chat: bool = False) -> list[int]:
    """The ids of a prompt for a model of `vocab_size` ids, checked: not empty, none past the
    model's vocabulary. With `chat`, the text is one user message in the chat template."""
    if chat:
        if not isinstance(codec, Tokenizer):
            raise InputError("a chat prompt needs the model's tokenizer, not byte-level ids")
        ids = codec.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    else:
        ids = codec.encode(text)
    if not ids:
        raise InputError(f"the prompt {text!r} encodes to no tokens")
    if max(ids) >= vocab_size:
        raise InputError(
            f"the prompt encodes to id {max(ids)} but the model has only {vocab_size} ids; "
            f"{codec.source} does not belong to this model"
        )
    return ids


# --------------------------------------------------------------------------- loading


def _folder(path_or_id: str | os.PathLike, revision: str | None) -> Path:
    """The local folder holding a tokenizer's files: the folder itself, or the snapshot of a
    hub id with only its config and tokenizer files downloaded (`eqx_models.hub.folder`)."""
    from .hub import folder

    return folder(path_or_id, revision=revision, want="tokenizer")


def _read_json(path: Path) -> Any:
    """A JSON file's content, None if it does not exist."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None


def _read_tokenizer_json(path: Path) -> Any:
    from tokenizers import Tokenizer as Backend

    try:
        return Backend.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare `Exception` for every parse error
        raise CheckpointError(f"cannot read tokenizer file {path}: {err}") from None


_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


def _added_token(value: Any, **overrides: Any) -> Any:
    """A token setting as transformers holds it: a string, None, or an `AddedToken` (from a
    serialised dict, with or without its `"__type": "AddedToken"` marker)."""
    from tokenizers import AddedToken

    if isinstance(value, dict):
        if not isinstance(value.get("content"), str):
            raise CheckpointError(f"a token setting has no 'content' string: {value!r}")
        return AddedToken(**{**{k: value[k] for k in _TOKEN_FIELDS if k in value}, **overrides})
    if value is not None and not isinstance(value, (str, AddedToken)):
        raise CheckpointError(f"a token setting must be a string or an object, got {value!r}")
    return value


def _family(folder: Path, settings: dict[str, Any]) -> str | None:
    """Which family's conventions apply: `tokenizer_class`, else `config.json`'s `model_type`."""
    name = settings.get("tokenizer_class")
    if isinstance(name, str):
        return _CLASS_FAMILY.get(name.removesuffix("Fast"))
    model_type = (_read_json(folder / "config.json") or {}).get("model_type")
    return _MODEL_FAMILY.get(model_type) if isinstance(model_type, str) else None


def _settings(folder: Path, family: str | None, json_path: Path | None) -> tuple[dict[str, Any], dict[int, Any]]:
    """The tokenizer's settings, its special tokens resolved the way transformers'
    `from_pretrained` and the family's class resolve them, and the added tokens by id."""
    settings = dict(_read_json(folder / "tokenizer_config.json") or {})
    settings.pop("tokenizer_class", None)
    if (folder / "chat_template.jinja").is_file():
        settings["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    added: dict[int, Any] = {}
    if "added_tokens_decoder" in settings:
        for index, token in dict(settings.pop("added_tokens_decoder")).items():
            if not isinstance(token, dict):
                raise CheckpointError(f"added_tokens_decoder[{index}] in tokenizer_config.json is not an object")
            added[int(index)] = _added_token(token)
    else:  # older folders: special_tokens_map.json wins over tokenizer_config.json
        for key, value in (_read_json(folder / "special_tokens_map.json") or {}).items():
            if key == "additional_special_tokens" and isinstance(value, list):
                merged = list(settings.pop(key, None) or [])
                for token in value:
                    token = _added_token(token, special=True) if isinstance(token, dict) else token
                    if token not in merged:
                        merged.append(token)
                value = merged
            elif isinstance(value, dict):
                value = _added_token(value, special=True)
            settings[key] = value
        legacy_added = _read_json(folder / "added_tokens.json")
        if legacy_added:
            named = [str(settings[k]) for k in SPECIAL_KEYS if isinstance(settings.get(k), (str, dict))]
            named += [str(t) for t in settings.get("additional_special_tokens") or []]
            for content, index in legacy_added.items():
                special = content in named
                added[int(index)] = _added_token({"content": content, "normalized": not special, "special": special})
        if json_path is not None:
            for entry in (_read_json(json_path) or {}).get("added_tokens", []):
                added[int(entry.pop("id"))] = _added_token(entry)
    for key in SPECIAL_KEYS:
        if key in settings:
            settings[key] = _added_token(settings[key])
    if settings.get("additional_special_tokens") is not None:
        settings["additional_special_tokens"] = [_added_token(t) for t in settings["additional_special_tokens"]]
    by_content = {token.content: token for token in added.values()}
    for key in SPECIAL_KEYS:  # a special token that is also an added token takes its properties
        if settings.get(key) is not None and str(settings[key]) in by_content:
            settings[key] = by_content[str(settings[key])]
    if family is None:
        return settings, added
    for key, default in _DEFAULTS[family].items():
        settings.setdefault(key, default)
    from tokenizers import AddedToken

    for key, properties in (_FAST_WRAP if json_path is not None else _SLOW_WRAP).get(family, {}).items():
        if isinstance(settings.get(key), str):
            settings[key] = AddedToken(settings[key], **properties)
    extra = settings.get("additional_special_tokens")
    if family == "xglm":
        extra = list(extra or [])
        extra += [word for word in (f"<madeupword{i}>" for i in range(7)) if word not in extra]
    elif family == "t5":
        count = int(settings.get("extra_ids", 100))
        ids = [f"<extra_id_{i}>" for i in range(count)]
        if extra is None:
            extra = ids
        elif not any("<extra_id_" in str(token) for token in extra):
            extra = [*extra, *ids]
        elif count > 0 and count != sum("<extra_id_" in str(token) for token in extra):
            raise CheckpointError(f"extra_ids is {count} but additional_special_tokens has a different number of them")
    if extra is not None:
        settings["additional_special_tokens"] = extra
    return settings, added


def _special_values(settings: dict[str, Any]) -> list[Any]:
    """transformers' `all_special_tokens_extended`: every special token once, strings and
    `AddedToken`s as set, in `SPECIAL_KEYS` order, then the additional ones."""
    values, seen = [], set()
    for key in (*SPECIAL_KEYS, "additional_special_tokens"):
        value = settings.get(key)
        for token in value if isinstance(value, list) else [value] if value else []:
            if str(token) not in seen:
                seen.add(str(token))
                values.append(token)
    return values


def _add_tokens(backend: Any, settings: dict[str, Any], added: dict[int, Any]) -> None:
    """Register the added and special tokens on the backend as transformers' fast tokenizer
    does when it is created: saved added tokens that differ from the backend's, then special
    tokens not yet known (those given with properties always, to apply them)."""
    from tokenizers import AddedToken

    present = backend.get_added_tokens_decoder()
    known = {repr(token) for token in present.values()}
    pending = [token for _, token in sorted(added.items()) if repr(token) not in known]
    contents = [token.content for token in present.values()] + [str(token) for token in pending]
    specials = _special_values(settings)
    pending += [token for token in specials if token not in contents and token not in pending]
    names = {str(token) for token in specials}
    tokens = []
    for token in pending:
        if isinstance(token, str):
            token = AddedToken(token, special=token in names)
        else:
            token.special = token.special or token.content in names
        tokens.append(token)
    if tokens:
        backend.add_tokens(tokens)


def _bos_eos_template(backend: Any, settings: dict[str, Any]) -> None:
    """Gemma's post-processor (transformers' `update_post_processor`): BOS before the text when
    `add_bos_token` (default true), EOS after it when `add_eos_token` (default false)."""
    from tokenizers import processors

    parts: dict[str, tuple[str, int] | None] = {}
    for key, flag, default in (("bos_token", "add_bos_token", True), ("eos_token", "add_eos_token", False)):
        if not settings.get(flag, default):
            parts[key] = None
            continue
        if settings.get(key) is None:
            raise CheckpointError(f"{flag} is set but the tokenizer has no {key}")
        token = str(settings[key])
        index = backend.token_to_id(token)
        if index is None:
            raise CheckpointError(f"the {key} {token!r} is not in the tokenizer's vocabulary")
        parts[key] = (token, index)
    bos, eos = parts["bos_token"], parts["eos_token"]
    single = f"{bos[0] + ':0 ' if bos else ''}$A:0{' ' + eos[0] + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos[0] + ':1' if bos else ''} $B:1{' ' + eos[0] + ':1' if eos else ''}"
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[part for part in (bos, eos) if part]
    )


def _match_prefix_space(backend: Any, settings: dict[str, Any]) -> None:
    """A byte-level pre-tokeniser follows `add_prefix_space` from the settings (default false)."""
    from tokenizers import pre_tokenizers

    state = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else {}
    wanted = bool(settings.get("add_prefix_space") or False)
    if state.get("type") == "ByteLevel" and state.get("add_prefix_space", wanted) != wanted:
        state.pop("type")
        state["add_prefix_space"] = wanted
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(**state)


def _chat_template(value: Any) -> str | None:
    """A single template, or the one named "default" of a list of named templates."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise CheckpointError("tokenizer_config.json's chat_template is neither a string nor names a 'default' template")


def _slow_family(folder: Path, family: str | None) -> str:
    """The family whose slow files will be read, checked to be present."""
    present = _slow_tokenizers.slow_files_present(folder)
    if family is None:  # no tokenizer_class or model_type: the file names must tell
        if len(present) != 1:  # spiece.model alone fits T5 and BigBird
            raise CheckpointError(
                f"{folder} has slow tokenizer files ({', '.join(sorted({n for ns in present.values() for n in ns}))}) "
                "but neither tokenizer_config.json's tokenizer_class nor config.json's model_type says which "
                f"tokenizer they belong to (one of {', '.join(_CLASS_FAMILY)})"
            )
        return next(iter(present))
    if family not in present:
        wanted = " + ".join(_slow_tokenizers.SLOW_FILES[family])
        raise CheckpointError(f"{folder} has no {TOKENIZER_NAME} and no {wanted} for its {family} tokenizer")
    return family


def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / TOKENIZER_NAME).is_file() or bool(_slow_tokenizers.slow_files_present(folder))


def _build(folder: Path) -> Tokenizer:
    settings_file = _read_json(folder / "tokenizer_config.json") or {}
    if not isinstance(settings_file, dict):
        raise CheckpointError(f"{folder / 'tokenizer_config.json'} is not a JSON object")
    family = _family(folder, settings_file)
    json_path: Path | None = folder / TOKENIZER_NAME
    if not json_path.is_file():
        json_path = None
    elif family == "t5" and settings_file.get("add_prefix_space") is not None and (folder / "spiece.model").is_file():
        json_path = None  # T5's fast class rebuilds from spiece.model when add_prefix_space is set
    if json_path is None:
        family = _slow_family(folder, family)
    backend = _read_tokenizer_json(json_path) if json_path is not None else None  # a corrupt file is named first
    settings, added = _settings(folder, family, json_path)
    if backend is None:
        plain = {
            key: str(value) if key in SPECIAL_KEYS and value is not None else value for key, value in settings.items()
        }
        backend = _slow_tokenizers.build(family, folder, plain)
    _add_tokens(backend, settings, added)
    _match_prefix_space(backend, settings)
    if family == "gemma":
        _bos_eos_template(backend, settings)
    special = {key: str(settings[key]) for key in SPECIAL_KEYS if settings.get(key) is not None}
    special["additional_special_tokens"] = [str(t) for t in settings.get("additional_special_tokens") or []]
    return Tokenizer(
        backend,
        special_tokens=special,
        chat_template=_chat_template(settings.get("chat_template")),
        clean_up_tokenization_spaces=bool(settings.get("clean_up_tokenization_spaces", False)),
        source=str(json_path or folder),
    )


def load_tokenizer(
    path_or_id: str | os.PathLike, *, revision: str | None = None, byte_level: bool = False
) -> Tokenizer | ByteCodec:
    """The tokenizer of a model folder, equal to `transformers.AutoTokenizer.from_pretrained`'s.

    Read in this order: `tokenizer.json`; else the slow files of the family named by
    `tokenizer_config.json`'s `tokenizer_class` or `config.json`'s `model_type` (`vocab.json` +
    `merges.txt` for GPT-2/GPT-Neo, `sentencepiece.bpe.model` for XGLM, `spiece.model` for
    T5/mT5/LongT5/BigBird, `tokenizer.model` for Gemma); special and added tokens from
    `tokenizer_config.json`, `special_tokens_map.json` and `added_tokens.json`.

    **Arguments:**

    - `path_or_id`: a model folder.
    - `revision`: the hub revision of an id (ignored for a folder).
    - `byte_level`: use byte-level ids (`ByteCodec`) whatever the folder holds.

    **Returns:**

    A `Tokenizer`; a `ByteCodec` when `byte_level` is set or the folder has no tokenizer files
    and its `config.json` has a byte vocabulary (256 to `BYTE_VOCAB_MAX` ids).
    """
    folder = _folder(path_or_id, revision)
    vocab_size = (_read_json(folder / "config.json") or {}).get("vocab_size")
    if byte_level:
        return ByteCodec(vocab_size if isinstance(vocab_size, int) else 256)
    if _has_tokenizer_files(folder):
        return _build(folder)
    if isinstance(vocab_size, int) and 256 <= vocab_size <= BYTE_VOCAB_MAX:
        return ByteCodec(vocab_size)
    slow = dict.fromkeys(" + ".join(names) for names in _slow_tokenizers.SLOW_FILES.values())
    looked_for = ", ".join([TOKENIZER_NAME, *slow])
    raise CheckpointError(
        f"{folder} has no tokenizer files (looked for {looked_for}); ask for byte-level ids (--byte-level) to use bytes"
    )


class StreamDecoder:
    """Turns token ids arriving a few at a time into text that can be printed at once.

    Each `push` decodes every id so far and returns the text not yet returned. A trailing
    U+FFFD (an incomplete UTF-8 sequence: a character split over byte-level or
    byte-fallback tokens) is held back until the next push completes it, so multi-byte
    characters are never broken; `flush` returns whatever is left, even if incomplete.
    The pieces concatenate to `codec.decode(ids)` whenever decoding a prefix of the ids
    gives a prefix of the text (true of byte-level BPE and byte codecs).

    **Arguments:**

    - `codec`: a `Tokenizer`, `ByteCodec` or anything with `decode(ids) -> str`.
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
