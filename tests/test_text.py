"""Text in, text out: the tokenizer.json tokenizer, byte-level ids, streaming decode,
and the `generate` command line (streamed output equal to `eqx_models.generate`'s ids)."""

import inspect
import json
import shutil
import textwrap

import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from oracle import randomise
from tokenizers import decoders, models, pre_tokenizers, trainers

import eqx_models
import eqx_models.generation
from eqx_models.cli import EXIT_BAD_INPUT
from eqx_models.cli import main as cli
from eqx_models.text import ByteCodec, StreamDecoder, Tokenizer, load_tokenizer, prompt_ids

TEXTS = ["def f(x):\n    return x + 1", "é漢🙂", "  leading spaces, tabs\tand\nnewlines ", "naïve café 🙂🙂 漢字"]
PAD, EOS = 0, 1  # the tokenizer's special tokens, and the models' pad / eos ids
MODEL_VOCAB = 320  # bigger than the tokenizer's 300: models often pad their vocabulary
PROMPT = "def f(x): é"
NEO = dict(
    vocab_size=MODEL_VOCAB,
    hidden_size=16,
    num_heads=2,
    max_position_embeddings=64,
    window_size=3,
    num_layers=2,
    attention_types=[[["global", "local"], 1]],
    eos_token_id=EOS,
    bos_token_id=EOS,
    pad_token_id=PAD,
)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A small byte-level BPE trained on stdlib source: no downloads."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(inspect.getsource(textwrap).splitlines(), trainer)
    assert tokenizer.get_vocab_size() == 300 and tokenizer.token_to_id("<eos>") == EOS
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def codec(tokenizer_file):
    return Tokenizer.from_file(tokenizer_file)


@pytest.fixture(scope="module")
def neo_folder(tokenizer_file, tmp_path_factory):
    """A random tiny GPT-Neo with the trained tokenizer beside it."""
    folder = tmp_path_factory.mktemp("neo")
    torch.manual_seed(0)
    randomise(transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(**NEO))).save_pretrained(folder)
    shutil.copy(tokenizer_file, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "pad_token": "<pad>"}))
    return folder


@pytest.fixture(scope="module")
def neo(neo_folder):
    return eqx_models.from_pretrained(neo_folder)


# --- the codecs -----------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_codec_round_trips(codec, text):
    ids = codec.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert codec.decode(ids) == text


def test_multibyte_characters_take_several_tokens(codec):
    """The premise of the streaming tests: the trained vocabulary splits these characters."""
    assert len(codec.encode("🙂")) > 1 and len(codec.encode("漢")) > 1


def test_decode_skips_special_and_unknown_ids(codec):
    ids = codec.encode("hello world")
    assert codec.decode([EOS, *ids, EOS, PAD, PAD]) == "hello world"
    assert codec.decode([*ids, 305, 319]) == "hello world"  # past the tokenizer's vocabulary
    assert codec.decode(np.asarray(ids, np.int32)) == "hello world"


def test_prompt_ids_rejects_empty_prompts_and_ids_the_model_lacks(codec):
    assert codec.encode("") == []
    with pytest.raises(eqx_models.InputError, match="encodes to no tokens"):
        prompt_ids(codec, "", vocab_size=MODEL_VOCAB)
    with pytest.raises(eqx_models.InputError, match=r"model has only 200 ids; .*tokenizer\.json"):
        prompt_ids(codec, "def f(x): return x", vocab_size=200)
    with pytest.raises(eqx_models.InputError, match="at least 256"):
        ByteCodec(100)


def test_load_tokenizer_uses_tokenizer_json_else_bytes_only_when_asked(neo_folder, tmp_path):
    assert isinstance(load_tokenizer(neo_folder), Tokenizer)
    assert load_tokenizer(neo_folder, byte_level=True) == ByteCodec(MODEL_VOCAB)
    shutil.copy(neo_folder / "config.json", tmp_path / "config.json")
    with pytest.raises(eqx_models.CheckpointError, match="has no tokenizer files"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("content", [b"{not json", b"", b'{"version": "1.0"}', b"\xff\xfe"])
def test_corrupt_tokenizer_json_is_named(tmp_path, content):
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(eqx_models.CheckpointError, match=r"cannot read tokenizer file .*tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_missing_tokenizer_file_is_named(tmp_path):
    with pytest.raises(eqx_models.CheckpointError, match="no tokenizer file at .*nope.json"):
        Tokenizer.from_file(tmp_path / "nope.json")


# --- streaming decode -------------------------------------------------------------------


def streamed(codec, ids, chunk, prefix=()):
    decoder = StreamDecoder(codec, prefix=prefix)
    pieces = [decoder.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return pieces, decoder.flush()


@pytest.mark.parametrize("chunk", [1, 2, 3, 100])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_pieces_make_the_full_text(codec, text, chunk):
    for current in (codec, ByteCodec(256)):
        pieces, rest = streamed(current, current.encode(text), chunk)
        assert "".join(pieces) + rest == text
        assert rest == "" and not any("\ufffd" in piece for piece in pieces)


def test_stream_decoder_holds_back_a_split_character(codec):
    ids = codec.encode("a🙂")
    decoder = StreamDecoder(codec)
    pieces = [decoder.push([i]) for i in ids]
    assert pieces[0] == "a" and pieces[-1] == "🙂" and all(p == "" for p in pieces[1:-1])


def test_stream_decoder_flush_gives_an_incomplete_tail():
    decoder = StreamDecoder(ByteCodec(256))
    assert decoder.push(list("é".encode())[:1]) == ""
    assert decoder.flush() == "\ufffd"


def test_stream_decoder_prefix_is_context_not_output(codec):
    prompt, more = codec.encode("def f("), codec.encode("x): é漢🙂")
    pieces, rest = streamed(codec, more, 1, prefix=prompt)
    assert "".join(pieces) + rest == "x): é漢🙂"


# --- the command line -------------------------------------------------------------------


def expected_text(codec, model, prompt_text, **options):
    """What `eqx-models generate` should print, from `eqx_models.generate`'s ids."""
    prompt = np.asarray([codec.encode(prompt_text)], np.int32)
    tokens = np.asarray(eqx_models.generate(model, prompt, **options))
    if hasattr(model, "encode"):
        return codec.decode(tokens[0, 1:].tolist()) + "\n"
    return prompt_text + codec.decode(tokens[0, prompt.shape[1] :].tolist()) + "\n"


def run_generate(capsys, folder, *flags):
    assert cli(["generate", str(folder), "--prompt", PROMPT, *flags]) == 0
    return capsys.readouterr()


@pytest.mark.slow
def test_cli_generate_greedy_prints_prompt_and_decoded_tokens(neo_folder, neo, codec, capsys):
    out = run_generate(capsys, neo_folder, "--max-new-tokens", "20")
    assert out.out == expected_text(codec, neo, PROMPT, max_new_tokens=20)
    assert out.out != PROMPT + "\n"  # something was generated
    assert "new tokens in" in out.err and "tokens/s" in out.err
    zero = run_generate(capsys, neo_folder, "--max-new-tokens", "20", "--temperature", "0", "--top-k", "5")
    assert zero.out == out.out  # temperature 0 is greedy


def test_cli_generate_streams_text_before_generation_ends(neo_folder, codec, capsys, monkeypatch):
    real, printed = eqx_models.generation.stream, []

    def spy(*args, **kwargs):
        for chunk in real(*args, **kwargs):
            printed.append(capsys.readouterr().out)  # what the terminal shows before this chunk
            yield chunk

    monkeypatch.setattr(eqx_models.generation, "stream", spy)
    assert cli(["generate", str(neo_folder), "--prompt", PROMPT, "--max-new-tokens", "24"]) == 0
    printed.append(capsys.readouterr().out)
    assert len(printed) >= 3 and printed[0] == PROMPT  # the prompt shows before the first token
    assert any(printed[1:-1])  # text from early chunks shows while later ones are generated


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags,options",
    [
        (["--temperature", "0.7", "--seed", "3"], dict(temperature=0.7)),
        (["--top-k", "12", "--seed", "5"], dict(top_k=12)),
        (["--top-p", "0.9", "--temperature", "1.3"], dict(top_p=0.9, temperature=1.3)),
    ],
)
def test_cli_generate_samples_reproducibly(neo_folder, neo, codec, capsys, flags, options):
    seed = int(flags[flags.index("--seed") + 1]) if "--seed" in flags else 0
    first = run_generate(capsys, neo_folder, "--max-new-tokens", "16", *flags).out
    again = run_generate(capsys, neo_folder, "--max-new-tokens", "16", *flags).out
    assert first == again
    reference = expected_text(
        codec, neo, PROMPT, max_new_tokens=16, do_sample=True, key=jax.random.key(seed), **options
    )
    assert first == reference


@pytest.mark.slow
def test_cli_generate_beam_search_prints_the_best_beam(neo_folder, neo, codec, capsys):
    out = run_generate(capsys, neo_folder, "--max-new-tokens", "10", "--num-beams", "3")
    assert out.out == expected_text(codec, neo, PROMPT, max_new_tokens=10, num_beams=3)


@pytest.mark.slow
def test_cli_generate_seq2seq_prints_the_decoder_text(tokenizer_file, codec, tmp_path, capsys):
    config = transformers.LongT5Config(
        vocab_size=MODEL_VOCAB,
        d_model=24,
        d_kv=6,
        d_ff=40,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        local_radius=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        decoder_start_token_id=PAD,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    torch.manual_seed(0)
    randomise(transformers.LongT5ForConditionalGeneration(config)).save_pretrained(tmp_path)
    shutil.copy(tokenizer_file, tmp_path / "tokenizer.json")
    model = eqx_models.from_pretrained(tmp_path)
    out = run_generate(capsys, tmp_path, "--max-new-tokens", "12").out
    assert out == expected_text(codec, model, PROMPT, max_new_tokens=12)
    assert not out.startswith(PROMPT)


@pytest.mark.slow
def test_cli_generate_uses_bytes_only_when_asked(neo_folder, tmp_path, capsys):
    folder = tmp_path / "bytes"
    shutil.copytree(neo_folder, folder)
    (folder / "tokenizer.json").unlink()
    model = eqx_models.from_pretrained(folder)
    assert cli(["generate", str(folder), "--prompt", PROMPT]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has no tokenizer files (looked for tokenizer.json" in err
    assert err.count("\n") == 1
    out = run_generate(capsys, folder, "--max-new-tokens", "8", "--byte-level").out
    assert out == expected_text(ByteCodec(MODEL_VOCAB), model, PROMPT, max_new_tokens=8)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--temperature", "-1"], "--temperature must be a finite number >= 0 or null, got -1.0"),
        (["--num-beams", "0"], "--num-beams must be an integer in [1, 2**31 - 1], got 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be an integer in [1, 2**31 - 1], got 0"),
    ],
)
def test_cli_generate_bad_flags_give_one_line(neo_folder, capsys, flags, message):
    assert cli(["generate", str(neo_folder), *flags]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.err == f"error: {message}\n" and captured.out == ""


def test_cli_generate_corrupt_tokenizer_gives_one_line(neo_folder, tmp_path, capsys):
    folder = tmp_path / "corrupt"
    shutil.copytree(neo_folder, folder)
    (folder / "tokenizer.json").write_text("{not json")
    assert cli(["generate", str(folder)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read tokenizer file") and "tokenizer.json" in err and err.count("\n") == 1


# --- conversion keeps the tokenizer -------------------------------------------------------


def test_cli_convert_carries_tokenizer_files_both_ways(neo_folder, tmp_path, capsys):
    assert cli(["convert", str(neo_folder), str(tmp_path / "eqx")]) == 0
    assert cli(["convert", str(tmp_path / "eqx"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        for out in ("eqx", "hf"):
            assert (tmp_path / out / name).read_bytes() == (neo_folder / name).read_bytes(), (out, name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eqx", "hf"]  # no temporary folders left
    capsys.readouterr()
    direct = run_generate(capsys, neo_folder, "--max-new-tokens", "12").out
    assert run_generate(capsys, tmp_path / "eqx", "--max-new-tokens", "12").out == direct
    assert run_generate(capsys, tmp_path / "hf", "--max-new-tokens", "12").out == direct


def test_save_pretrained_refuses_extra_files_that_clash_or_are_missing(neo, neo_folder, tmp_path):
    with pytest.raises(eqx_models.CheckpointError, match="would overwrite the config.json"):
        eqx_models.save_pretrained(neo, tmp_path / "out", extra_files=[neo_folder / "config.json"])
    with pytest.raises(eqx_models.CheckpointError, match="extra file .*missing.json does not exist"):
        eqx_models.export_hf(neo, tmp_path / "out", extra_files=[neo_folder / "missing.json"])
    assert list(tmp_path.iterdir()) == []  # the atomic write left nothing
