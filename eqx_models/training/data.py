"""Text to fixed-length training batches: deterministic, and resumable mid-epoch.

The pipeline, all on the host in numpy:

1. `find_documents(paths)` (or `find_documents(stdlib_sources())`, the offline corpus every
   machine has) reads text files and JSONL records into `Document`s.
2. `split_documents(docs, eval_fraction, seed)` splits them by a hash of each source, so
   the split is the same on every run and machine, and a document keeps its side when the
   corpus grows.
3. `train_bpe_tokenizer(train, vocab_size)` trains a byte-level BPE (optional: the
   `ByteCodec` of `eqx_models.text` needs no training).
4. `tokenize(docs, codec, eos_id)` concatenates every document's ids, each followed by EOS.
5. `PackedBatches(tokens, seq_len=..., batch_size=..., seed=...)` cuts the stream into rows,
   shuffles them per epoch and yields `{"input_ids", "attention_mask"}` batches; its
   `position` saves and `restore` resumes exactly where a run stopped.

`unigram_bits_per_byte` is the baseline a language model must beat; `bits_per_byte`
converts a model's mean loss to the same unit.
"""

import dataclasses
import glob
import hashlib
import json
import logging
import math
import sysconfig
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Int

from ..errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_SUFFIXES = (".txt", ".py", ".md", ".jsonl")
# Standard-library folders left out of `stdlib_sources`: test suites (huge, repetitive,
# full of deliberately odd code), GUI demos, and anything installed by pip.
_STDLIB_EXCLUDED = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "tkinter", "turtledemo", "__pycache__"}
)


@dataclasses.dataclass(frozen=True)
class Document:
    """One training document: `source` is `path` or, for a JSONL record, `path:line`."""

    source: str
    text: str


# --------------------------------------------------------------------------- discovery


def find_documents(
    paths: Sequence[str | Path],
    *,
    jsonl_field: str = "text",
    suffixes: Sequence[str] = DEFAULT_SUFFIXES,
) -> list[Document]:
    """Read text documents from files, directories and glob patterns.

    **Arguments:**

    - `paths`: files (read whatever their suffix), directories (searched recursively for
      files ending in one of `suffixes`, skipping hidden files and folders, in sorted order)
      or glob patterns (`"data/**/*.txt"`; matches are sorted). Paths are taken in the order
      given; a file reached twice is read once.
    - `jsonl_field`: the key holding the text in each record of a `.jsonl` file.
    - `suffixes`: which files a directory search picks up.

    **Returns:**

    The documents in discovery order. A `.jsonl` file gives one document per non-blank line
    (`source` is `path:line`, 1-based); any other file is one document. Empty texts are
    dropped. Files that are not valid UTF-8 are skipped, and their number and names are
    logged as a warning (rather than decoded with replacement characters, which would teach
    a model U+FFFD).

    **Raises:**

    `InputError` for a path or pattern that matches nothing, a JSONL line that is not a JSON
    object with a string `jsonl_field`, or when no document is found at all.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    suffixes = tuple(suffixes)
    files = _expand_paths(paths, suffixes)
    docs: list[Document] = []
    undecodable: list[str] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            undecodable.append(str(file))
            continue
        if file.suffix == ".jsonl":
            docs.extend(_jsonl_documents(file, text, jsonl_field))
        elif text:
            docs.append(Document(str(file), text))
    if undecodable:
        shown = ", ".join(undecodable[:5]) + (" ..." if len(undecodable) > 5 else "")
        logger.warning("skipped %d file(s) that are not valid UTF-8: %s", len(undecodable), shown)
    if not docs:
        where = ", ".join(str(p) for p in paths)
        raise InputError(
            f"no documents found in {where} ({len(files)} file(s) matched, "
            f"{len(undecodable)} not UTF-8; directories are searched for {', '.join(suffixes)})"
        )
    return docs


def _expand_paths(paths: Sequence[str | Path], suffixes: tuple[str, ...]) -> list[Path]:
    files: list[Path] = []
    seen: set[Path] = set()
    missing: list[str] = []

    def add(file: Path) -> None:
        key = file.resolve()
        if key not in seen:
            seen.add(key)
            files.append(file)

    for raw in paths:
        path = Path(raw)
        if path.is_file():
            add(path)
        elif path.is_dir():
            for file in _walk(path, suffixes):
                add(file)
        elif glob.has_magic(str(raw)):
            matches = sorted(glob.glob(str(raw), recursive=True), key=lambda m: Path(m).parts)
            if not matches:
                missing.append(str(raw))
            for match in map(Path, matches):
                if match.is_file():
                    add(match)
                elif match.is_dir():
                    for file in _walk(match, suffixes):
                        add(file)
        else:
            missing.append(str(raw))
    if missing:
        raise InputError(f"no such file, directory or matching glob: {', '.join(missing)}")
    return files


def _walk(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under `root` ending in one of `suffixes`, sorted by relative path, no hidden ones."""
    found = []
    for file in root.rglob("*"):
        relative = file.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if file.is_file() and file.name.endswith(suffixes):
            found.append((relative.parts, file))
    return [file for _, file in sorted(found, key=lambda pair: pair[0])]


def _jsonl_documents(file: Path, text: str, field: str) -> list[Document]:
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{file}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{source} is not valid JSON: {err}") from None
        if not isinstance(record, dict):
            raise InputError(f"{source} is a JSON {type(record).__name__}, expected an object with a {field!r} key")
        if field not in record:
            keys = ", ".join(map(repr, list(record)[:10]))
            raise InputError(f"{source} has no field {field!r} (it has {keys}); pass jsonl_field=... to choose one")
        value = record[field]
        if not isinstance(value, str):
            raise InputError(f"{source}: field {field!r} is a {type(value).__name__}, expected a string")
        if value:
            docs.append(Document(source, value))
    return docs


def stdlib_sources() -> list[Path]:
    """The Python standard library's own `.py` files, sorted: an offline corpus on every machine.

    Reads `sysconfig.get_paths()["stdlib"]`; leaves out `site-packages`, the `test`/`tests`
    folders, `idlelib`, `tkinter`, `turtledemo` and hidden folders.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for file in root.rglob("*.py"):
        parts = file.relative_to(root).parts
        if any(part in _STDLIB_EXCLUDED or part.startswith(".") for part in parts[:-1]):
            continue
        if file.is_file():
            found.append((parts, file))
    return [file for _, file in sorted(found, key=lambda pair: pair[0])]


# --------------------------------------------------------------------------- split


def _unit_hash(source: str, seed: int) -> float:
    """A number in [0, 1) from SHA-256 of `seed` and `source`: the same on every run and machine."""
    digest = hashlib.sha256(f"{seed}\0{source}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(
    docs: Sequence[Document], eval_fraction: float, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Split documents into `(train, eval)` by a hash of each document's `source`.

    A document goes to eval when `sha256(seed, source)`, read as a number in [0, 1), is below
    `eval_fraction`. Each document's side depends only on its own source and the seed, so
    the split is stable across runs, machines and a growing corpus; the eval share is
    `eval_fraction` on average. If that leaves eval empty while `eval_fraction > 0` and
    there are at least two documents, the document with the smallest hash goes to eval.
    Both lists keep the input order.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise InputError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    scores = [_unit_hash(doc.source, seed) for doc in docs]
    to_eval = [score < eval_fraction for score in scores]
    if eval_fraction > 0 and not any(to_eval) and len(docs) >= 2:
        to_eval[int(np.argmin(scores))] = True
    train = [doc for doc, e in zip(docs, to_eval, strict=True) if not e]
    evals = [doc for doc, e in zip(docs, to_eval, strict=True) if e]
    return train, evals


# --------------------------------------------------------------------------- tokenizer


def train_bpe_tokenizer(
    docs: Sequence[Document],
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = ("<pad>", "<eos>"),
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Any:
    """Train a byte-level BPE tokenizer (GPT-2 style) on the documents' text.

    The ByteLevel pre-tokenizer maps every byte to a printable symbol, so any text encodes
    without unknown tokens and decodes back exactly (ByteLevel decoder). Special tokens take
    the first ids in order (`<pad>` = 0, `<eos>` = 1 by default), then the 256 byte
    symbols, then learned merges.

    **Arguments:**

    - `docs`: the training documents.
    - `vocab_size`: the largest vocabulary allowed, special tokens included; at least
      `256 + len(special_tokens)`. Small corpora may stop short of it.
    - `special_tokens`, `min_frequency`, `show_progress`: passed to the `BpeTrainer`.

    **Returns:**

    A `tokenizers.Tokenizer`; wrap it in `eqx_models.text.Tokenizer`, or `.save(path)`
    it as a `tokenizer.json`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    special_tokens = list(special_tokens)
    smallest = 256 + len(special_tokens)
    if vocab_size < smallest:
        raise InputError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs the 256 byte symbols "
            f"plus {len(special_tokens)} special token(s), at least {smallest}"
        )
    if not docs:
        raise InputError("train_bpe_tokenizer got no documents")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator((doc.text for doc in docs), trainer=trainer, length=len(docs))
    return tokenizer


# --------------------------------------------------------------------------- tokenize


def tokenize(
    docs: Sequence[Document], codec: Any, eos_id: int, *, progress: bool = False, chunk: int = 1024
) -> Int[np.ndarray, " tokens"]:
    """Every document's ids followed by `eos_id`, concatenated into one int32 stream.

    **Arguments:**

    - `docs`: the documents, in order.
    - `codec`: an `eqx_models.text` codec (`ByteCodec`, `Tokenizer`) or anything with
      `encode(text) -> list[int]`. A `Tokenizer` encodes in parallel batches of
      `chunk` documents, giving the same ids as `codec.encode`.
    - `eos_id`: appended after each document.
    - `progress`: show a tqdm progress bar.

    **Returns:**

    An int32 array of shape `[sum(len(ids) + 1 for each document)]`.
    """
    from ..text import ByteCodec, Tokenizer

    if not 0 <= eos_id < 2**31:
        raise InputError(f"eos_id must be a non-negative int32, got {eos_id}")
    eos = np.array([eos_id], np.int32)
    pieces: list[np.ndarray] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(docs), desc="tokenize", unit="doc")
    for start in range(0, len(docs), chunk):
        texts = [doc.text for doc in docs[start : start + chunk]]
        if isinstance(codec, ByteCodec):
            encoded = [np.frombuffer(text.encode("utf-8"), np.uint8) for text in texts]
        elif isinstance(codec, Tokenizer):
            encoded = [np.asarray(e.ids, np.int64) for e in codec.backend.encode_batch(texts)]
        else:
            encoded = [np.asarray(codec.encode(text) if text else [], np.int64) for text in texts]
        for ids in encoded:
            if ids.size and (ids.min() < 0 or ids.max() >= 2**31):
                raise InputError(f"the codec produced id {ids.max()}, which does not fit int32")
            pieces.append(ids.astype(np.int32))
            pieces.append(eos)
        if bar is not None:
            bar.update(len(texts))
    if bar is not None:
        bar.close()
    if not pieces:
        return np.zeros((0,), np.int32)
    return np.concatenate(pieces)


# --------------------------------------------------------------------------- batches


class PackedBatches:
    """A token stream cut into `seq_len`-token rows, shuffled each epoch, served in batches.

    Rows are consecutive, non-overlapping windows of the stream (documents run across row
    boundaries, separated by EOS; the tail shorter than `seq_len` is dropped). For causal
    LM the labels are the inputs: the loss shifts them. Epoch `e` visits the rows in the
    order `np.random.default_rng([seed, e]).permutation(num_rows)`, so every epoch differs
    and any epoch can be recomputed without replaying earlier ones.

    Iterating (`for batch in batches`) yields the rest of the current epoch, then stops;
    iterate again for the next epoch. `next_batch()` serves batches across epochs without
    end. Each batch is a dict of numpy arrays:
    `{"input_ids": int32[batch, seq_len], "attention_mask": int32[batch, seq_len] (ones)}`.

    **Resuming:** `position` is `{"epoch": e, "index": i}`, the batch that will be served
    next. Save it with a checkpoint taken after training on a batch; `restore(position)` on
    a `PackedBatches` built from the same tokens and settings continues with exactly the
    batch an uninterrupted run would have served.

    **Arguments:**

    - `tokens`: the int token stream, shape `[tokens]` (see `tokenize`).
    - `seq_len`: tokens per row.
    - `batch_size`: rows per batch.
    - `seed`: a non-negative int for the shuffle.
    - `drop_remainder`: drop the rows that do not fill a last batch (a different set
      each epoch); otherwise the last batch of an epoch is smaller.
    """

    def __init__(
        self,
        tokens: Int[np.ndarray, " tokens"],
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        drop_remainder: bool = True,
    ):
        if seq_len < 1 or batch_size < 1:
            raise InputError(f"seq_len and batch_size must be positive, got seq_len={seq_len}, batch_size={batch_size}")
        if seed < 0:
            raise InputError(f"seed must be a non-negative int, got {seed}")
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise InputError(f"tokens must be a 1-D stream, got shape {tokens.shape}")
        num_rows = tokens.shape[0] // seq_len
        needed_rows = batch_size if drop_remainder else 1
        if num_rows < needed_rows:
            raise InputError(
                f"{tokens.shape[0]} tokens are too few: one batch of {batch_size} x {seq_len} needs at least "
                f"{needed_rows * seq_len} tokens; use more data or a smaller seq_len/batch_size"
            )
        self.rows = tokens[: num_rows * seq_len].astype(np.int32, copy=False).reshape(num_rows, seq_len)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.drop_remainder = drop_remainder
        self.num_rows = num_rows
        if drop_remainder:
            self.batches_per_epoch = num_rows // batch_size
        else:
            self.batches_per_epoch = -(-num_rows // batch_size)
        self._epoch = 0
        self._index = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __repr__(self) -> str:
        return (
            f"PackedBatches(rows={self.num_rows}, seq_len={self.seq_len}, batch_size={self.batch_size}, "
            f"seed={self.seed}, batches_per_epoch={self.batches_per_epoch}, position={self.position})"
        )

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def position(self) -> dict[str, int]:
        """The next batch to serve, as `{"epoch": e, "index": i}` (JSON-serialisable)."""
        return {"epoch": self._epoch, "index": self._index}

    def restore(self, position: Mapping[str, int] | tuple[int, int]) -> None:
        """Continue from a saved `position` (a dict from `.position`, or `(epoch, index)`)."""
        try:
            if isinstance(position, Mapping):
                epoch, index = int(position["epoch"]), int(position["index"])
            else:
                epoch, index = (int(v) for v in position)
        except (KeyError, TypeError, ValueError):
            expected = "{'epoch': int, 'index': int} or (epoch, index)"
            raise InputError(f"a position is {expected}, got {position!r}") from None
        if epoch < 0 or not 0 <= index <= self.batches_per_epoch:
            raise InputError(
                f"position {position!r} is out of range: epochs start at 0 and this data has "
                f"{self.batches_per_epoch} batches per epoch (was it saved with other data or settings?)"
            )
        if index == self.batches_per_epoch:
            epoch, index = epoch + 1, 0
        self._epoch, self._index = epoch, index

    def order(self, epoch: int) -> Int[np.ndarray, " rows"]:
        """The row order of `epoch`: a permutation of `range(num_rows)`."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            self._order_cache = (epoch, perm)
        return self._order_cache[1]

    def batch_at(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """Batch `index` of `epoch`, without moving `position`."""
        if not 0 <= index < self.batches_per_epoch:
            raise InputError(f"batch index {index} out of range: there are {self.batches_per_epoch} per epoch")
        picked = self.order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        input_ids = self.rows[picked]
        return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}

    def next_batch(self) -> dict[str, np.ndarray]:
        """The batch at `position`, then advance (into the next epoch at an epoch's end)."""
        batch = self.batch_at(self._epoch, self._index)
        self._index += 1
        if self._index == self.batches_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Yield the rest of the current epoch; `position` moves past each batch as it is yielded."""
        epoch = self._epoch
        while self._epoch == epoch:
            yield self.next_batch()


# --------------------------------------------------------------------------- metrics


def unigram_bits_per_byte(
    train_tokens: Int[np.ndarray, " train_tokens"],
    eval_tokens: Int[np.ndarray, " eval_tokens"],
    eval_bytes: int,
    vocab_size: int,
) -> float:
    """Bits per byte of a unigram model: the baseline any language model must beat.

    The model is `p(t) = (count_train(t) + 1) / (len(train_tokens) + vocab_size)` (add-one
    smoothing over the whole vocabulary). The result is `-sum(log2 p(t) for t in
    eval_tokens) / eval_bytes`, where `eval_bytes` is the UTF-8 length of the eval text
    (`sum(len(doc.text.encode()) for doc in eval_docs)`), so codecs compare fairly.
    """
    train_tokens = np.asarray(train_tokens).reshape(-1)
    eval_tokens = np.asarray(eval_tokens).reshape(-1)
    if eval_bytes <= 0:
        raise InputError(f"eval_bytes must be positive, got {eval_bytes}")
    for name, toks in (("train_tokens", train_tokens), ("eval_tokens", eval_tokens)):
        if toks.size and (toks.min() < 0 or toks.max() >= vocab_size):
            raise InputError(f"{name} holds ids outside [0, {vocab_size}): min {toks.min()}, max {toks.max()}")
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    log2_p = np.log2(counts) - np.log2(counts.sum())
    return float(-log2_p[eval_tokens].sum() / eval_bytes)


def bits_per_byte(mean_loss_nats_per_token: float, tokens: int, bytes: int) -> float:
    """Convert a mean cross-entropy in nats per token over `tokens` tokens covering `bytes`
    UTF-8 bytes into bits per byte: `loss * tokens / (bytes * ln 2)`."""
    if bytes <= 0:
        raise InputError(f"bytes must be positive, got {bytes}")
    return float(mean_loss_nats_per_token) * tokens / (bytes * math.log(2))
