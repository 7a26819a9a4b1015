"""Tokenizer folders of every format our families ship, built here with the real libraries:
tiny BPE / unigram models trained with `tokenizers` and `sentencepiece` on an inline corpus,
written by transformers' own tokenizer classes (`save_pretrained`), with `tokenizer.json`
deleted where the real repositories have none. No downloads."""

import inspect
import io
import json
import shutil
import textwrap
from pathlib import Path

import sentencepiece
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

CORPUS = [
    *inspect.getsource(textwrap).splitlines(),
    "The quick brown fox jumps over the lazy dog. Naïve café, résumé, Ångström, façade.",
    "東京は日本の首都です。漢字とかなの文。北京是中国的首都。",
    "Emoji: 🙂 🚀 🎉 and flags 🇫🇷; math ∑ ≤ ∞.",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
    "numbers 12345 67890 3.14159 and runs    of   spaces",
]
#: Text mixing English, code, accents, CJK, emoji, runs of spaces, newlines, tabs, the empty
#: string and the special-token strings of every family.
TEXTS = [
    "",
    " ",
    "Hello world",
    "def f(x):\n    return x + 1\n",
    "naïve café, ÅNGSTRÖM résumé",
    "漢字 and 東京 mixed with English",
    "emoji 🙂🚀 inside text 🎉",
    "  leading, trailing  and    runs of spaces   ",
    "tabs\there\tand\nnewlines\n\nend",
    "</s> <pad> <s> <unk> in text",
    "a</s>b<pad>c",
    "<extra_id_0> fill <extra_id_1>",
    "[CLS] masked [MASK] token [SEP]",
    "<bos>bos and <eos> eos",
    "<|endoftext|>next document",
    "<start_of_turn>user\nhi<end_of_turn>\n",
    "<madeupword0> oddity",
    "12345 + 67890 = 80235",
]
#: Gemma's instruction-tuned chat template (gemma-2b-it / gemma-7b-it tokenizer_config.json).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def train_sentencepiece(path: Path, model_type: str, vocab_size: int, **options) -> Path:
    """A SentencePiece model trained on `CORPUS`, written to `path`."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        minloglevel=2,
        **options,
    )
    path.write_bytes(model.getvalue())
    return path


def gpt2_files(work: Path) -> tuple[Path, Path]:
    """`vocab.json` + `merges.txt` of a byte-level BPE with `<|endoftext|>`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    work.mkdir(parents=True, exist_ok=True)
    vocab, merges = tokenizer.model.save(str(work))
    return Path(vocab), Path(merges)


def write_config(folder: Path, model_type: str, vocab_size: int) -> None:
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": vocab_size}))


def build_folders(root: Path) -> dict[str, Path]:
    """Every case name -> its folder. Names say the family and what the folder holds."""
    folders: dict[str, Path] = {}
    work = root / "work"
    work.mkdir(parents=True)

    vocab, merges = gpt2_files(work / "gpt2")
    slow = transformers.GPT2Tokenizer(str(vocab), str(merges))
    slow.save_pretrained(root / "gpt_neo_slow")  # vocab.json + merges.txt, as GPT-Neo repos ship
    write_config(root / "gpt_neo_slow", "gpt_neo", 400)
    folders["gpt_neo_slow"] = root / "gpt_neo_slow"
    transformers.GPT2TokenizerFast(str(vocab), str(merges), add_prefix_space=True).save_pretrained(root / "gpt2_json")
    folders["gpt2_json"] = root / "gpt2_json"
    bare = root / "gpt_neo_bare"  # only the two files and config.json: the model_type decides
    bare.mkdir()
    (bare / "vocab.json").write_bytes(vocab.read_bytes())
    (bare / "merges.txt").write_bytes(merges.read_bytes())
    write_config(bare, "gpt_neo", 400)
    folders["gpt_neo_bare"] = bare

    xglm_model = train_sentencepiece(work / "xglm.model", "bpe", 320)
    transformers.XGLMTokenizer(str(xglm_model)).save_pretrained(root / "xglm")
    folders["xglm"] = root / "xglm"

    t5_model = train_sentencepiece(work / "t5.model", "unigram", 300, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    transformers.T5Tokenizer(str(t5_model), legacy=True).save_pretrained(root / "t5")
    folders["t5"] = root / "t5"
    transformers.T5Tokenizer(str(t5_model), extra_ids=8, legacy=False).save_pretrained(root / "mt5_nonlegacy")
    folders["mt5_nonlegacy"] = root / "mt5_nonlegacy"
    old = root / "t5_old_config"  # before added_tokens_decoder: special_tokens_map.json + added_tokens.json
    shutil.copytree(root / "t5", old)
    settings = json.loads((old / "tokenizer_config.json").read_text())
    del settings["added_tokens_decoder"]
    (old / "tokenizer_config.json").write_text(json.dumps(settings))
    folders["t5_old_config"] = old
    only = root / "longt5_only_spiece"  # an old repository: spiece.model and config.json, nothing else
    only.mkdir()
    (only / "spiece.model").write_bytes(t5_model.read_bytes())
    write_config(only, "longt5", 400)
    folders["longt5_only_spiece"] = only

    big_bird_model = train_sentencepiece(
        work / "big_bird.model",
        "unigram",
        300,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"],
    )
    transformers.BigBirdTokenizer(str(big_bird_model)).save_pretrained(root / "big_bird")
    folders["big_bird"] = root / "big_bird"

    gemma_model = train_sentencepiece(
        work / "gemma.model",
        "bpe",
        400,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
    )
    gemma = transformers.GemmaTokenizer(str(gemma_model), chat_template=GEMMA_CHAT_TEMPLATE)
    gemma.save_pretrained(root / "gemma_slow")
    folders["gemma_slow"] = root / "gemma_slow"
    fast = transformers.GemmaTokenizerFast(str(gemma_model), chat_template=GEMMA_CHAT_TEMPLATE)
    fast.save_pretrained(root / "gemma_json")  # tokenizer.model and tokenizer.json, as Gemma repos ship
    folders["gemma_json"] = root / "gemma_json"
    # The template inside tokenizer_config.json, as the Gemma repositories have it.
    settings = json.loads((root / "gemma_json" / "tokenizer_config.json").read_text())
    settings["chat_template"] = (root / "gemma_json" / "chat_template.jinja").read_text()
    (root / "gemma_json" / "tokenizer_config.json").write_text(json.dumps(settings))
    (root / "gemma_json" / "chat_template.jinja").unlink()
    for folder in folders.values():
        assert not (folder / "tokenizer.json").exists() or folder.name.endswith("_json"), folder
    return folders
