import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from jaxtyping import TypeCheckError

from eqx_models.errors import InputError
from eqx_models.text import ByteCodec, Tokenizer
from eqx_models.training.data import (
    Document,
    PackedBatches,
    bits_per_byte,
    find_documents,
    split_documents,
    stdlib_sources,
    tokenize,
    train_bpe_tokenizer,
    unigram_bits_per_byte,
)


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "a.py").write_text("print('hi')\n")
    (tmp_path / "notes.md").write_text("# notes\n")
    (tmp_path / "skip.bin").write_bytes(b"not picked up by suffix")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00broken utf-8 \xc3")
    nested = tmp_path / "sub" / "deeper"
    nested.mkdir(parents=True)
    (nested / "z.txt").write_text("nested z")
    (tmp_path / "sub" / "y.txt").write_text("nested y")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.txt").write_text("hidden")
    records = [{"text": "record one", "id": 1}, {"text": "record two"}, {"text": ""}]
    lines = [json.dumps(records[0]), "", json.dumps(records[1]), json.dumps(records[2])]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_find_documents_directory(corpus, caplog):
    with caplog.at_level(logging.WARNING, logger="eqx_models.training.data"):
        docs = find_documents([corpus])
    names = [Path(d.source).relative_to(corpus).as_posix() for d in docs]
    assert names == ["a.py", "b.txt", "data.jsonl:1", "data.jsonl:3", "notes.md", "sub/deeper/z.txt", "sub/y.txt"]
    assert docs[0].text == "print('hi')\n"
    assert docs[2].text == "record one" and docs[3].text == "record two"
    assert "1 file(s) that are not valid UTF-8" in caplog.text and "bad.txt" in caplog.text
    # Deterministic.
    assert find_documents([corpus]) == docs


def test_find_documents_files_globs_and_dedup(corpus):
    docs = find_documents([corpus / "b.txt", str(corpus / "sub" / "**" / "*.txt"), corpus / "b.txt"])
    # Sorted by path components, as in a directory walk: sub/deeper/z.txt before sub/y.txt.
    assert [Path(d.source).name for d in docs] == ["b.txt", "z.txt", "y.txt"]
    # An explicit file is read whatever its suffix.
    assert find_documents([corpus / "skip.bin"])[0].text == "not picked up by suffix"
    only_md = find_documents([corpus], suffixes=(".md",))
    assert [Path(d.source).name for d in only_md] == ["notes.md"]


def test_find_documents_errors(corpus, tmp_path):
    with pytest.raises(InputError, match="nope.txt"):
        find_documents([corpus / "b.txt", corpus / "nope.txt"])
    with pytest.raises(InputError, match="no such file"):
        find_documents([str(corpus / "*.csv")])
    with pytest.raises(InputError, match=r"data.jsonl:1 has no field 'content'"):
        find_documents([corpus / "data.jsonl"], jsonl_field="content")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2 is not valid JSON"):
        find_documents([bad])
    bad.write_text('{"text": 3}\n')
    with pytest.raises(InputError, match="expected a string"):
        find_documents([bad])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no documents found"):
        find_documents([empty])


@pytest.mark.slow
def test_stdlib_sources():
    files = stdlib_sources()
    assert len(files) > 300
    posix = [f.as_posix() for f in files]
    assert any(p.endswith("/json/__init__.py") for p in posix)
    assert not any("site-packages" in f.parts or "test" in f.parts or "tkinter" in f.parts for f in files)
    assert files == stdlib_sources()


def _docs(n):
    return [Document(f"doc{i}.txt", f"text {i}") for i in range(n)]


def test_split_documents():
    docs = _docs(1000)
    train, evals = split_documents(docs, 0.1, seed=0)
    assert (train, evals) == split_documents(docs, 0.1, seed=0)
    assert sorted(d.source for d in train + evals) == sorted(d.source for d in docs)
    assert not {d.source for d in train} & {d.source for d in evals}
    assert 60 <= len(evals) <= 140
    # Another seed, another split; a document's side does not depend on the others.
    assert split_documents(docs, 0.1, seed=1)[1] != evals
    _, evals_sub = split_documents(docs[:500], 0.1, seed=0)
    assert evals_sub == [d for d in evals if d in docs[:500]]
    # Tiny corpora still get an eval document.
    assert len(split_documents(_docs(2), 0.01, seed=0)[1]) == 1
    assert split_documents(docs, 0.0, seed=0) == (docs, [])
    with pytest.raises(InputError, match="eval_fraction"):
        split_documents(docs, 1.0)


def _lines():
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "naïve", "café"]
    rng = np.random.default_rng(0)
    return [" ".join(words[i] for i in rng.integers(0, len(words), 8)) for _ in range(300)]


def test_train_bpe_tokenizer():
    docs = [Document(f"l{i}", line) for i, line in enumerate(_lines())]
    tok = train_bpe_tokenizer(docs, 300)
    assert tok.get_vocab_size() <= 300
    assert tok.get_vocab_size() > 258  # learned some merges
    assert tok.token_to_id("<pad>") == 0 and tok.token_to_id("<eos>") == 1
    for text in ["alpha beta café", "unseen wörds ✓ \n\ttabs", docs[5].text]:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
    assert len(tok.encode("alpha beta gamma").ids) < len("alpha beta gamma")
    with pytest.raises(InputError, match="at least 258"):
        train_bpe_tokenizer(docs, 100)


def test_tokenize_adds_eos():
    docs = [Document("a", "hé"), Document("b", "xy")]
    ids = tokenize(docs, ByteCodec(300), eos_id=256)
    assert ids.dtype == np.int32
    assert ids.tolist() == [104, 0xC3, 0xA9, 256, 120, 121, 256]
    train = [Document(f"l{i}", line) for i, line in enumerate(_lines())]
    codec = Tokenizer(train_bpe_tokenizer(train, 300))
    ids = tokenize(train[:20], codec, eos_id=1, chunk=7)
    expected = [t for d in train[:20] for t in [*codec.encode(d.text), 1]]
    assert ids.tolist() == expected
    assert (ids == 1).sum() == 20


def test_packed_batches_shapes_and_rows():
    tokens = np.arange(1000, dtype=np.int32)
    data = PackedBatches(tokens, seq_len=16, batch_size=4, seed=0)
    assert data.num_rows == 62 and len(data) == data.batches_per_epoch == 15
    batches = list(data)
    assert len(batches) == 15 and data.position == {"epoch": 1, "index": 0}
    seen = []
    for batch in batches:
        assert batch["input_ids"].shape == (4, 16) and batch["input_ids"].dtype == np.int32
        assert (batch["attention_mask"] == 1).all() and batch["attention_mask"].shape == (4, 16)
        for row in batch["input_ids"]:
            # Each row is a consecutive window of the stream starting at a multiple of seq_len.
            assert row[0] % 16 == 0 and (row == np.arange(row[0], row[0] + 16)).all()
            seen.append(int(row[0]))
    assert len(set(seen)) == 60  # no row repeats within an epoch
    # Different epochs, different orders; same seed, same order; other seed, other order.
    epoch1 = [b["input_ids"] for b in data]
    assert not all((a["input_ids"] == b).all() for a, b in zip(batches, epoch1, strict=True))
    again = list(PackedBatches(tokens, seq_len=16, batch_size=4, seed=0))
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(batches, again, strict=True))
    other = list(PackedBatches(tokens, seq_len=16, batch_size=4, seed=1))
    assert not all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(batches, other, strict=True))


def test_packed_batches_no_drop_remainder():
    data = PackedBatches(np.arange(100), seq_len=10, batch_size=4, seed=0, drop_remainder=False)
    sizes = [b["input_ids"].shape[0] for b in data]
    assert sizes == [4, 4, 2]


def test_packed_batches_resume():
    tokens = np.random.default_rng(0).integers(0, 50, 3000).astype(np.int32)

    def make():
        return PackedBatches(tokens, seq_len=8, batch_size=5, seed=3)

    full = make()
    reference = [full.next_batch()["input_ids"] for _ in range(200)]  # ~2.7 epochs
    assert full.position["epoch"] == 2

    first = make()
    got = []
    for _ in range(103):
        got.append(first.next_batch()["input_ids"])
    saved = json.loads(json.dumps(first.position))
    resumed = make()
    resumed.restore(saved)
    assert resumed.position == saved
    got += [resumed.next_batch()["input_ids"] for _ in range(97)]
    assert all((a == b).all() for a, b in zip(reference, got, strict=True))

    # Resuming mid-epoch with `for batch in data` finishes just that epoch.
    mid = make()
    mid.restore((1, 70))
    rest = list(mid)
    assert len(rest) == 75 - 70 and mid.position == {"epoch": 2, "index": 0}
    assert all((a["input_ids"] == b).all() for a, b in zip(rest, reference[75 + 70 : 150], strict=True))
    # The end of an epoch is the start of the next one.
    mid.restore({"epoch": 0, "index": 75})
    assert mid.position == {"epoch": 1, "index": 0}
    with pytest.raises(InputError, match="out of range"):
        mid.restore({"epoch": 0, "index": 76})
    with pytest.raises(InputError, match="position"):
        mid.restore({"step": 3})


def test_packed_batches_too_little_data():
    with pytest.raises(InputError, match="needs at least 64 tokens"):
        PackedBatches(np.arange(63), seq_len=16, batch_size=4, seed=0)
    # The jaxtyping hook of the test run may catch the wrong rank first.
    with pytest.raises((InputError, TypeCheckError)):
        PackedBatches(np.zeros((4, 40), np.int32), seq_len=16, batch_size=1, seed=0)


def test_unigram_bits_per_byte_by_hand():
    # Add-one counts over vocab 3 from train [0, 0, 1]: [3, 2, 1] / 6.
    # Eval [0, 2]: -log2(3/6) - log2(1/6) = 1 + log2(6) bits over 2 bytes.
    got = unigram_bits_per_byte(np.array([0, 0, 1]), np.array([0, 2]), eval_bytes=2, vocab_size=3)
    assert got == pytest.approx((1 + math.log2(6)) / 2)
    with pytest.raises(InputError, match="outside"):
        unigram_bits_per_byte(np.array([0, 5]), np.array([0]), eval_bytes=1, vocab_size=3)


def test_bits_per_byte():
    assert bits_per_byte(math.log(2), tokens=10, bytes=10) == pytest.approx(1.0)
    assert bits_per_byte(2.0, tokens=3, bytes=12) == pytest.approx(2.0 * 3 / (12 * math.log(2)))
