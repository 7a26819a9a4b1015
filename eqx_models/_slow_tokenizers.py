"""Fast tokenizer pipelines built from "slow" tokenizer files, per family.

A repository without a `tokenizer.json` ships the files of transformers' slow (Python)
tokenizer classes: a GPT-2 `vocab.json` + `merges.txt`, or a SentencePiece model. When
`transformers.AutoTokenizer` loads such a folder it converts the slow tokenizer into a
`tokenizers.Tokenizer` (transformers' `convert_slow_tokenizer.py`); what a user sees is that
converted pipeline. This module builds the same pipeline from the same files, without
transformers, for our families only:

- `gpt2` (GPT-2, GPT-Neo): byte-level BPE;
- `xglm`: SentencePiece re-indexed the fairseq way (`<s> <pad> </s> <unk>`, then the pieces
  shifted by one, then seven `<madeupwordN>`), `</s>` in front of every sequence;
- `t5` (T5, mT5, LongT5): SentencePiece, then `<extra_id_N>` counting down from the end,
  `</s>` appended;
- `big_bird`: SentencePiece, `[CLS] ... [SEP]` around every sequence;
- `gemma`: SentencePiece BPE with byte fallback, spaces kept as `▁` with no dummy prefix.

Special tokens, added tokens and the BOS/EOS templates that depend on `tokenizer_config.json`
are applied by `eqx_models.text`; this module only builds the model, normaliser,
pre-tokeniser, decoder and fixed post-processor of each family.
"""

import json
import os
from pathlib import Path
from typing import Any

from .errors import CheckpointError

#: The slow files each family reads, in the order looked for.
SLOW_FILES = {
    "gpt2": ("vocab.json", "merges.txt"),
    "xglm": ("sentencepiece.bpe.model",),
    "t5": ("spiece.model",),
    "big_bird": ("spiece.model",),
    "gemma": ("tokenizer.model",),
}
_SPACE = "\u2581"  # SentencePiece's visible space, "▁"
_CONTROL, _USER_DEFINED = 3, 4  # sentencepiece ModelProto.SentencePiece.Type
_UNIGRAM, _BPE = 1, 2  # sentencepiece TrainerSpec.ModelType


def build(family: str, folder: Path, settings: dict[str, Any]) -> Any:
    """The `tokenizers.Tokenizer` that transformers' converter makes of `folder`'s slow files.

    **Arguments:**

    - `family`: a key of `SLOW_FILES`.
    - `folder`: the folder holding the files.
    - `settings`: the slow tokenizer's settings (`tokenizer_config.json` with the special
      tokens resolved): `add_prefix_space`, `add_bos_token`, `bos_token`, `extra_ids`, `legacy`...
    """
    if family == "gpt2":
        return _byte_level_bpe(folder / "vocab.json", folder / "merges.txt", settings)
    proto = _read_proto(folder / SLOW_FILES[family][0])
    return _sentencepiece(family, proto, settings)


# --------------------------------------------------------------------------- GPT-2 BPE


def _byte_level_bpe(vocab_path: Path, merges_path: Path, settings: dict[str, Any]) -> Any:
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        # Like GPT2Tokenizer: the first line is the "#version" header, the text ends with a newline.
        lines = merges_path.read_text(encoding="utf-8").split("\n")[1:-1]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read the GPT-2 vocabulary {vocab_path} / {merges_path}: {err}") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise CheckpointError(f"{vocab_path} is not a JSON object of token -> id")
    merges = [tuple(line.split()) for line in lines]
    if any(len(pair) != 2 for pair in merges):
        raise CheckpointError(f"{merges_path} has a line that is not two space-separated tokens")
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(settings.get("add_prefix_space", False)))
    tokenizer.decoder = decoders.ByteLevel()
    bos = settings.get("bos_token")
    if settings.get("add_bos_token", False) and bos is not None and bos in vocab:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1", special_tokens=[(bos, vocab[bos])]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


# --------------------------------------------------------------------------- SentencePiece


def _read_proto(path: Path) -> Any:
    """The SentencePiece `ModelProto` of `path`, checked to load in sentencepiece itself."""
    import sentencepiece
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
        sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    except (OSError, DecodeError, RuntimeError) as err:
        raise CheckpointError(f"cannot read SentencePiece model {path}: {str(err).splitlines()[0]}") from None
    if not proto.pieces:
        raise CheckpointError(f"cannot read SentencePiece model {path}: it has no pieces")
    return proto


def _vocab(family: str, proto: Any, settings: dict[str, Any]) -> list[tuple[str, float]]:
    """(piece, score) in the order of the ids the family's slow tokenizer gives them."""
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if family == "xglm":  # fairseq's dictionary: 4 specials, then spm ids shifted by one
        madeup = [(f"<madeupword{i}>", 0.0) for i in range(7)]
        return [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces[3:], *madeup]
    if family == "t5":
        extra = int(settings.get("extra_ids", 100))
        return [*pieces, *((f"<extra_id_{i}>", 0.0) for i in range(extra - 1, -1, -1))]
    if family == "gemma":
        names = [
            settings.get("pad_token", "<pad>"),
            settings.get("eos_token", "<eos>"),
            settings.get("bos_token", "<bos>"),
        ]
        vocab = [(str(name), 0.0) for name in names] + pieces[3:]
        # Early Gemma vocabularies have no tab piece: the byte piece of a tab stands in for it.
        if not any(piece == "\t" for piece, _ in vocab):
            vocab = [("\t", 0.0) if piece == "<0x09>" else (piece, score) for piece, score in vocab]
        return vocab
    return pieces


def _merges(proto: Any, vocab_scores: list[tuple[str, float]], *, tab_fallback: bool) -> list[tuple[str, str]]:
    """BPE merges recovered from a SentencePiece BPE vocabulary: every split of a piece into two
    known pieces, ordered by the merged piece's score (higher first), then by the lengths of
    the left and right parts, as transformers' `SentencePieceExtractor` orders them."""
    ids = {p.piece: i for i, p in enumerate(proto.pieces)}
    if tab_fallback and "\t" not in ids and "<0x09>" in ids:
        ids["\t"] = ids["<0x09>"]
    scores: dict[str, float] = dict(vocab_scores)
    found = []
    for piece, score in scores.items():
        splits = [(piece[:k], piece[k:], score) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
        found.extend(sorted(splits, key=lambda s: (ids[s[0]], ids[s[1]])))
    found.sort(key=lambda s: (s[2], len(s[0]), len(s[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _sentencepiece(family: str, proto: Any, settings: dict[str, Any]) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE, Unigram

    gemma = family == "gemma"
    vocab_scores = _vocab(family, proto, settings)
    unk_id = 3 if family in ("xglm", "gemma") else proto.trainer_spec.unk_id
    algorithm = proto.trainer_spec.model_type
    if algorithm == _UNIGRAM:
        model = Unigram(vocab_scores, unk_id=unk_id, byte_fallback=gemma)
    elif algorithm == _BPE:
        merges = _merges(proto, vocab_scores, tab_fallback=gemma)
        bpe_vocab = {piece: i for i, (piece, _) in enumerate(vocab_scores)}
        model = BPE(
            bpe_vocab, merges, unk_token=proto.trainer_spec.unk_piece, fuse_unk=True, byte_fallback=gemma, dropout=None
        )
    else:
        raise CheckpointError(
            f"the SentencePiece model is of type {algorithm}; only unigram (1) and BPE (2) models convert"
        )
    tokenizer = Tokenizer(model)
    # Control pieces are special added tokens, user-defined pieces plain added tokens (Gemma's
    # turn markers are special too); neither is normalised, so they match the text as written.
    special_names = {"<start_of_turn>", "<end_of_turn>"} if gemma else set()
    tokenizer.add_tokens(
        [
            AddedToken(p.piece, normalized=False, special=p.type == _CONTROL or p.piece in special_names)
            for p in proto.pieces
            if p.type in (_CONTROL, _USER_DEFINED)
        ]
    )
    if gemma:
        tokenizer.normalizer = normalizers.Replace(" ", _SPACE)
        tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
        tokenizer.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
        return tokenizer  # BOS/EOS come from `add_bos_token` / `add_eos_token`, in eqx_models.text

    charsmap = proto.normalizer_spec.precompiled_charsmap
    steps = [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), _SPACE)]
    tokenizer.normalizer = normalizers.Sequence([normalizers.Precompiled(charsmap), *steps] if charsmap else steps)
    # T5's slow class has `add_prefix_space` (default true); XGLM's and BigBird's always prefix.
    # A non-legacy T5 (`legacy: false`) prefixes only the first piece of the text.
    prefix = bool(settings.get("add_prefix_space", True)) if family == "t5" else True
    scheme = ("first" if settings.get("legacy", True) is False else "always") if prefix else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme=scheme)
    tokenizer.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme=scheme)
    vocab = {piece: i for i, (piece, _) in enumerate(vocab_scores)}

    def template(single: str, pair: str, names: tuple[str, ...]) -> Any:
        return processors.TemplateProcessing(single=single, pair=pair, special_tokens=[(n, vocab[n]) for n in names])

    if family == "xglm":
        tokenizer.post_processor = template("</s> $A", "</s> $A </s> </s> $B", ("</s>",))
    elif family == "t5":
        tokenizer.post_processor = template("$A </s>", "$A </s> $B </s>", ("</s>",))
    elif family == "big_bird":
        tokenizer.post_processor = template(
            "[CLS]:0 $A:0 [SEP]:0", "[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1", ("[CLS]", "[SEP]")
        )
    return tokenizer


def slow_files_present(folder: str | os.PathLike) -> dict[str, tuple[str, ...]]:
    """The families whose slow files are all in `folder`."""
    folder = Path(folder)
    return {family: names for family, names in SLOW_FILES.items() if all((folder / n).is_file() for n in names)}
