"""`load_tokenizer` against `transformers.AutoTokenizer` on every tokenizer format our families
ship (folders from `tokenizer_cases`): encode with and without special tokens, decode keeping
or skipping them, padded batches, special ids, Gemma's chat template; and `eqx-models
generate` with a SentencePiece-only folder, `--chat`, and a folder without tokenizer files."""

import copy
import shutil

import jinja2
import numpy as np
import pytest
import torch
import transformers
from oracle import randomise
from tokenizer_cases import GEMMA_CHAT_TEMPLATE, TEXTS, build_folders

import eqx_models
from eqx_models.cli import EXIT_BAD_INPUT
from eqx_models.cli import main as cli
from eqx_models.text import ByteCodec, Tokenizer, load_tokenizer

CASES = [
    "gpt_neo_slow",
    "gpt2_json",
    "gpt_neo_bare",
    "xglm",
    "t5",
    "mt5_nonlegacy",
    "t5_old_config",
    "longt5_only_spiece",
    "big_bird",
    "gemma_slow",
    "gemma_json",
]
SPECIAL_TEXT = {  # a special token each case must map to one id inside text, not spell out
    "gpt": "<|endoftext|>",
    "xglm": "</s>",
    "t5": "</s>",
    "mt5": "<extra_id_0>",
    "longt5": "<pad>",
    "big_bird": "[MASK]",
    "gemma": "<start_of_turn>",
}


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    return build_folders(tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture(scope="session")
def pairs(folders):
    """Case -> (transformers' AutoTokenizer, ours), each loaded once."""
    transformers.logging.set_verbosity_error()  # T5's legacy notice
    return {
        name: (transformers.AutoTokenizer.from_pretrained(folder), load_tokenizer(folder))
        for name, folder in folders.items()
    }


@pytest.fixture(params=CASES)
def pair(request, pairs):
    return pairs[request.param]


def test_the_cases_are_the_formats_repositories_ship(folders, pairs):
    names = {case: sorted(p.name for p in folders[case].iterdir()) for case in CASES}
    assert names["gpt_neo_bare"] == ["config.json", "merges.txt", "vocab.json"]
    assert names["xglm"] == ["sentencepiece.bpe.model", "special_tokens_map.json", "tokenizer_config.json"]
    assert names["longt5_only_spiece"] == ["config.json", "spiece.model"]
    assert "tokenizer.json" not in names["big_bird"] and "tokenizer.model" in names["gemma_json"]
    assert all(hf.is_fast for hf, _ in pairs.values())  # transformers converted the slow files, as we do


def test_encode_matches_transformers(pair):
    hf, ours = pair
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == hf(text, add_special_tokens=special)["input_ids"], (
                text,
                special,
            )


@pytest.mark.parametrize("case", CASES)
def test_special_token_text_maps_to_its_id(pairs, case):
    """Not a vacuous comparison: special-token text in the input becomes that token's one id."""
    _, ours = pairs[case]
    token = next(text for prefix, text in SPECIAL_TEXT.items() if case.startswith(prefix))
    ids = ours.encode(f"a {token} b", add_special_tokens=False)
    assert ids.count(ours.token_to_id(token)) == 1


def test_decode_matches_transformers(pair):
    hf, ours = pair
    every_id = list(range(len(hf) + 3))  # each token once, and ids past the vocabulary
    for ids in [*(hf(text)["input_ids"] for text in TEXTS), every_id, every_id[::-7]]:
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (ids, skip)
    assert ours.decode(np.asarray(hf("héllo 🙂")["input_ids"], np.int32)) == hf.decode(
        hf("héllo 🙂")["input_ids"], True
    )


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_match_transformers(pair, side):
    hf, ours = pair
    texts = ["short", "a longer text with 漢字 and 🙂", "", "def f(x):\n\treturn x"]
    if hf.pad_token is None:  # GPT-2's files name no pad token: both refuse, then both use EOS
        with pytest.raises(eqx_models.InputError, match="has no pad token"):
            ours.encode_batch(texts)
        hf = copy.deepcopy(hf)
        hf.pad_token = hf.eos_token
    expected = hf(texts, padding=True, padding_side=side, return_tensors="np")
    ids, mask = ours.encode_batch(texts, padding_side=side, pad_id=hf.pad_token_id)
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    assert ids.dtype == np.int32 and mask.sum() == sum(len(hf(t)["input_ids"]) for t in texts)


def test_special_tokens_match_transformers(pair):
    hf, ours = pair
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(ours, f"{name}_token") == getattr(hf, f"{name}_token"), name
        assert getattr(ours, f"{name}_token_id") == getattr(hf, f"{name}_token_id"), name
    assert ours.vocab_size == len(hf)


@pytest.mark.parametrize("case", ["gemma_slow", "gemma_json"])
def test_gemma_chat_template_matches_transformers(pairs, case):
    hf, ours = pairs[case]
    assert ours.chat_template == GEMMA_CHAT_TEMPLATE
    chats = [
        [{"role": "user", "content": "  Hi there!  "}],
        [
            {"role": "user", "content": "Écris un poème 🙂"},
            {"role": "assistant", "content": "Les roses\n\tsont rouges"},
            {"role": "user", "content": "</s> <eos> and 漢字"},
        ],
    ]
    for messages in chats:
        for prompt in (True, False):
            text = ours.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            assert text == hf.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            ids = ours.apply_chat_template(messages, add_generation_prompt=prompt)
            assert ids == hf.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)
    assert (
        text.startswith("<bos><start_of_turn>user\n")
        and ids[0] == ours.bos_token_id
        and ids.count(ours.bos_token_id) == 1
    )
    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="System role not supported"):
        hf.apply_chat_template(system)
    with pytest.raises(eqx_models.InputError, match="the chat template refused the conversation: System role not"):
        ours.apply_chat_template(system)


def test_chat_without_a_template_is_an_error(pairs):
    with pytest.raises(eqx_models.InputError, match="has no chat template"):
        pairs["t5"][1].apply_chat_template([{"role": "user", "content": "hi"}])


# --- folders without a usable tokenizer -------------------------------------------------------


def test_a_folder_without_tokenizer_files_is_an_error_unless_bytes(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neo", "vocab_size": 50257}')
    with pytest.raises(eqx_models.CheckpointError) as info:
        load_tokenizer(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    for name in (
        "tokenizer.json",
        "vocab.json + merges.txt",
        "sentencepiece.bpe.model",
        "spiece.model",
        "tokenizer.model",
    ):
        assert name in message
    assert load_tokenizer(tmp_path, byte_level=True) == ByteCodec(50257)
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neo", "vocab_size": 258}')
    assert load_tokenizer(tmp_path) == ByteCodec(258)  # the byte vocabulary of `train --tokenizer bytes`


def test_bad_folders_give_one_line_errors(folders, tmp_path):
    with pytest.raises(eqx_models.CheckpointError, match=r"missing is not a folder \(it does not exist\)"):
        load_tokenizer(tmp_path / "missing")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(folders["t5"], corrupt)
    (corrupt / "spiece.model").write_bytes(b"\x00not a sentencepiece model")
    with pytest.raises(eqx_models.CheckpointError, match=r"cannot read SentencePiece model .*spiece\.model"):
        load_tokenizer(corrupt)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    shutil.copy(folders["t5"] / "spiece.model", unknown / "spiece.model")  # T5 or BigBird? nothing says
    with pytest.raises(eqx_models.CheckpointError, match="neither tokenizer_config.json's tokenizer_class nor"):
        load_tokenizer(unknown)
    missing = tmp_path / "missing_model"
    shutil.copytree(folders["xglm"], missing)
    (missing / "sentencepiece.bpe.model").unlink()
    (missing / "config.json").write_text('{"vocab_size": 50000}')
    with pytest.raises(eqx_models.CheckpointError, match="has no tokenizer files"):
        load_tokenizer(missing)


# --- the command line ---------------------------------------------------------------------------


@pytest.mark.slow  # a model compiles and generates (~10-15 s)
def test_cli_generate_decodes_with_the_sentencepiece_tokenizer(folders, tmp_path, capsys):
    """A LongT5 folder whose only tokenizer file is spiece.model: the printed text is the
    generated ids decoded by transformers' tokenizer, not byte-level nonsense. The model's
    vocabulary stops before the 100 `<extra_id_N>`, which decode to nothing."""
    hf = transformers.AutoTokenizer.from_pretrained(folders["longt5_only_spiece"])
    config = transformers.LongT5Config(
        vocab_size=len(hf) - 100, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=4,
        local_radius=2, relative_attention_num_buckets=8, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    randomise(transformers.LongT5ForConditionalGeneration(config)).save_pretrained(tmp_path)
    shutil.copy(folders["longt5_only_spiece"] / "spiece.model", tmp_path / "spiece.model")
    prompt = "Bonjour, café 漢字"
    assert cli(["generate", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr().out
    model = eqx_models.from_pretrained(tmp_path)
    tokens = np.asarray(eqx_models.generate(model, np.asarray([hf(prompt)["input_ids"]], np.int32), max_new_tokens=10))
    new = tokens[0, 1:].tolist()
    new = new[: new.index(1)] if 1 in new else new
    assert out == hf.decode(new, skip_special_tokens=True) + "\n" and out.strip()


@pytest.mark.slow  # a model compiles and generates (~10-15 s)
def test_cli_generate_chat_applies_the_template(folders, tmp_path, capsys):
    hf = transformers.AutoTokenizer.from_pretrained(folders["gemma_slow"])
    config = transformers.GemmaConfig(
        vocab_size=len(hf), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    randomise(transformers.GemmaForCausalLM(config)).save_pretrained(tmp_path)
    for path in folders["gemma_slow"].iterdir():
        shutil.copy(path, tmp_path / path.name)
    assert cli(["generate", str(tmp_path), "--chat", "--prompt", "Salut 🙂", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    ids = hf.apply_chat_template([{"role": "user", "content": "Salut 🙂"}], add_generation_prompt=True)
    assert ids[:2] == [hf.bos_token_id, hf.convert_tokens_to_ids("<start_of_turn>")]
    model = eqx_models.from_pretrained(tmp_path)
    tokens = np.asarray(eqx_models.generate(model, np.asarray([ids], np.int32), max_new_tokens=8))[0].tolist()
    new = tokens[len(ids) :]
    new = new[: new.index(1)] if 1 in new else new
    expected = hf.decode(ids + new, skip_special_tokens=True)[len(hf.decode(ids, skip_special_tokens=True)) :]
    assert out == expected + "\n"


@pytest.mark.slow
def test_cli_generate_without_tokenizer_files_needs_byte_level(folders, tmp_path, capsys):
    config = transformers.GPTNeoConfig(
        vocab_size=300, hidden_size=16, num_heads=2, num_layers=1, attention_types=[[["global"], 1]],
        max_position_embeddings=32, eos_token_id=299, bos_token_id=299,
    )  # fmt: skip
    randomise(transformers.GPTNeoForCausalLM(config)).save_pretrained(tmp_path)
    assert cli(["generate", str(tmp_path), "--prompt", "hi"]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and "spiece.model" in captured.err
    assert captured.out == ""
    assert cli(["generate", str(tmp_path), "--prompt", "hi", "--byte-level", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("hi")
    assert cli(["generate", str(tmp_path), "--prompt", "hi", "--byte-level", "--chat"]) == EXIT_BAD_INPUT
    assert "a chat prompt needs the model's tokenizer" in capsys.readouterr().err


def test_tokenizer_is_a_codec_for_streaming(pairs):
    from eqx_models.text import Codec, StreamDecoder

    _, ours = pairs["gemma_slow"]
    assert isinstance(ours, Tokenizer) and isinstance(ours, Codec)
    ids = ours.encode("Bonjour 漢字 🙂 done", add_special_tokens=False)
    decoder = StreamDecoder(ours, prefix=ids[:2])
    pieces = [decoder.push([i]) for i in ids[2:]]
    assert ours.decode(ids[:2]) + "".join(pieces) + decoder.flush() == ours.decode(ids)


def test_cli_stops_at_the_end_tokens_of_generation_config(tmp_path):
    """`generate` stops where transformers would: the config's EOS and every id listed in
    `generation_config.json` (Gemma-it lists `<end_of_turn>` there)."""
    from eqx_models.pretrained import end_token_ids as _eos_ids

    assert _eos_ids(1, tmp_path) == {1}
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [1, 107], "bos_token_id": 2}')
    assert _eos_ids(1, tmp_path) == {1, 107}
    assert _eos_ids(None, tmp_path) == {1, 107}
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 5}')
    assert _eos_ids([1, 2], tmp_path) == {1, 2, 5}
