"""Bad input gets one clear line naming the field: model configs (`config.json`), training
configs, generation options and CLI flags, as properties over generated hostile inputs and
as regressions for the cases of issue 13."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eqx_models
from eqx_models.cli import main
from eqx_models.errors import CheckpointError, ConfigError, InputError
from eqx_models.models import FAMILIES, resolve_class
from eqx_models.pretrained import read_config, save_pretrained
from eqx_models.train import TrainConfig
from eqx_models.training.presets import preset_config
from eqx_models.validation import describe

FAMILY_NAMES = sorted(FAMILIES)
PROPERTY = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)
MANY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tiny_config(family: str) -> dict:
    """A valid `config.json` of each family: its `tiny` training preset."""
    return {**preset_config(family, "tiny"), "vocab_size": 300}


def load_skeleton(folder: Path):
    """What loading does before reading weights: the config, the class, the abstract model."""
    hf = read_config(folder)
    family, cls = resolve_class(hf)
    config = family.config.from_hf_config(hf)
    return config, eqx.filter_eval_shape(cls, config, key=jax.random.key(0))


def assert_one_line_naming(err: Exception, names: set[str]) -> None:
    message = str(err)
    assert "\n" not in message and 0 < len(message) < 1200, message
    assert any(name in message for name in names), f"{message!r} names none of {sorted(names)}"


# --------------------------------------------------------------------------- hostile values

SCALARS = st.one_of(
    st.integers(-3, 8),
    st.sampled_from([0, -4, 2**31 - 1, 2**31, 2**63, -(2**70), 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([2.0, 0.5, 1e-5, -1e-5, 1e300]),
    st.booleans(),
    st.none(),
    st.text(max_size=6),
    st.sampled_from(["16", "abc", "nan", "gelu", "global", "local", "block_sparse", "gated-gelu", "transient-global"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=6,
)
#: JSON that `json.dumps` cannot write: nesting past Python's recursion limit, an integer
#: longer than Python parses by default, and nesting just past our limit.
RAW = st.sampled_from(
    ["[" * 5000 + "]" * 5000, "9" * 5000, "[" * 40 + "1" + "]" * 40, '{"a": ' * 3000 + "1" + "}" * 3000]
)


#: Values of a field's own type near its current value.
PLAUSIBLE = {
    int: lambda current: st.integers(0, 2 * current + 2),
    float: lambda current: st.floats(0, 1) | st.just(float(current)),
    bool: lambda current: st.booleans(),
    str: lambda current: st.just(current) | st.text(max_size=4),
}


def write_config(folder: Path, config: dict, raw: dict[str, str]) -> None:
    """`config` as `config.json`, with the values of the keys in `raw` written verbatim."""
    text = json.dumps({**config, **{key: f"@@{key}@@" for key in raw}})
    for key, fragment in raw.items():
        text = text.replace(json.dumps(f"@@{key}@@"), fragment)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(text)


@st.composite
def mutated_configs(draw, family: str):
    """A family's tiny config with a few keys (declared fields, bookkeeping keys, junk keys)
    set to hostile or plausible values; returns the config, raw JSON fragments, and the
    names an error may cite for these changes."""
    config = tiny_config(family)
    fields = [f.name for f in dataclasses.fields(FAMILIES[family].config) if f.name != "extra"]
    keys = st.sampled_from(fields + ["model_type", "architectures", "id2label", "zzz"])
    changed = draw(st.lists(keys, min_size=1, max_size=3, unique=True))
    raw = {}
    defaults = {f.name: f.default for f in dataclasses.fields(FAMILIES[family].config)}
    for key in changed:
        choice, current = draw(st.integers(0, 9)), config.get(key, defaults.get(key))
        if choice == 0:
            raw[key] = draw(RAW)
        elif choice <= 4 and type(current) in PLAUSIBLE:  # a value of the right type, often valid
            config[key] = draw(PLAUSIBLE[type(current)](current))
        else:
            config[key] = draw(VALUES)
    names = set(changed) | {"config.json"}
    if "architectures" in changed:
        names.add("architecture")
    if "id2label" in changed:
        names.add("num_labels")  # derived from id2label
    return config, raw, names


def check_config_property(family: str, case) -> str:
    config, raw, names = case
    with tempfile.TemporaryDirectory() as folder:
        write_config(Path(folder), config, raw)
        started = time.perf_counter()
        try:
            built, skeleton = load_skeleton(Path(folder))
        except (ConfigError, CheckpointError) as err:
            assert_one_line_naming(err, names)
            outcome = "refused"
        else:
            assert built.from_hf_config(built.to_hf_config()) == built  # round-trips
            assert jax.tree.leaves(skeleton)
            outcome = "built"
        assert time.perf_counter() - started < 20
    return outcome


@pytest.mark.parametrize("family", FAMILY_NAMES)
@PROPERTY
@given(data=st.data())
def test_every_mutated_config_is_refused_naming_a_changed_key_or_builds(family, data):
    check_config_property(family, data.draw(mutated_configs(family)))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_NAMES)
@MANY
@given(data=st.data())
def test_every_mutated_config_is_refused_naming_a_changed_key_or_builds_many(family, data):
    check_config_property(family, data.draw(mutated_configs(family)))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_tiny_configs_build_and_numbers_are_normalised(family, tmp_path):
    """The property above is not vacuous: valid configs build, with integers given for float
    fields and numpy scalars for integers turned into Python's floats and ints."""
    write_config(tmp_path, tiny_config(family), {})
    config, _ = load_skeleton(tmp_path)
    floats = [f.name for f in dataclasses.fields(config) if describe(f.type).startswith("a finite number")]
    assert floats
    rebuilt = type(config).from_hf_config(
        {**config.to_hf_config(), **dict.fromkeys(floats, 1), "vocab_size": np.int64(301)}
    )
    assert rebuilt.vocab_size == 301 and type(rebuilt.vocab_size) is int
    assert all(type(getattr(rebuilt, name)) is float for name in floats)
    assert hash(rebuilt) == hash(type(config).from_hf_config(rebuilt.to_hf_config()))


# --------------------------------------------------------------------------- issue 13's configs

NEO = tiny_config("gpt_neo")
CONFIG_CASES = [
    ({"num_heads": "4"}, r"num_heads must be an integer in \[1, 2\*\*31 - 1\], got '4'"),
    ({"num_heads": 0}, "num_heads must be an integer .* got 0"),
    ({"num_heads": -4}, "num_heads must be an integer .* got -4"),
    ({"layer_norm_epsilon": "abc"}, "layer_norm_epsilon must be a finite number > 0, got 'abc'"),
    ({"layer_norm_epsilon": float("nan")}, "layer_norm_epsilon must be a finite number > 0, got nan"),
    ({"num_layers": 2.0}, r"num_layers must be an integer in \[1, 10000\], got 2.0"),
    ({"num_layers": 10**6}, r"num_layers must be an integer in \[1, 10000\], got 1000000"),
    ({"hidden_size": 10**30}, "hidden_size must be an integer .* got 1000000000000000000000000000000"),
    ({"vocab_size": 2**80}, "vocab_size must be an integer .* got 1208925819614629174706176"),
    ({"resid_dropout": 1.5}, r"resid_dropout must be a finite number in \[0, 1\], got 1.5"),
    ({"eos_token_id": [1, "2"]}, "eos_token_id must be .* got \\[1, '2'\\]"),
    ({"attention_types": "global"}, "attention_types must be a list like"),
    ({"attention_types": [[["global", "local"], 10**9]]}, "attention_types must be a list like"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false, got 'yes'"),
    ({"model_type": ["gpt_neo"]}, r"unknown model_type \['gpt_neo'\]"),
    ({"model_type": {"a": 1}}, "unknown model_type {'a': 1}"),
    ({"model_type": None}, "has no model_type"),
    ({"architectures": "GPTNeoForCausalLM"}, "architectures must be a list of class names"),
    ({"architectures": [["GPTNeoForCausalLM"]]}, "architectures must be a list of class names"),
    ({"architectures": ["GPTNeoForPoetry"]}, "architecture 'GPTNeoForPoetry' is not supported"),
]


@pytest.mark.parametrize("changes, message", CONFIG_CASES, ids=[next(iter(c)) for c, _ in CONFIG_CASES])
def test_bad_config_json_values_are_named(tmp_path, changes, message):
    write_config(tmp_path, {**NEO, **changes}, {})
    with pytest.raises(ConfigError, match=message) as caught:
        eqx_models.from_pretrained(tmp_path)  # fails on the config, before any weights file is looked for
    assert "\n" not in str(caught.value)


def test_the_other_families_declare_their_constraints():
    cases = [
        ("gemma", {"num_attention_heads": 4, "num_key_value_heads": 3}, "must be divisible by num_key_value_heads"),
        ("gemma", {"rope_scaling": {"type": "linear"}}, "rope_scaling must be null"),
        ("gemma", {"rope_theta": -1}, "rope_theta must be a finite number > 0"),
        ("xglm", {"d_model": 2}, r"d_model must be an integer in \[4, 2\*\*31 - 1\]"),
        ("big_bird", {"attention_type": "sparse"}, "attention_type must be 'original_full' or 'block_sparse'"),
        ("big_bird", {"add_cross_attention": True, "is_decoder": False}, "add_cross_attention=True needs is_decoder"),
        ("big_bird", {"id2label": 3}, "id2label must be an object"),
        ("big_bird", {"id2label": {}}, r"num_labels must be an integer in \[1,"),
        ("longt5", {"relative_attention_num_buckets": 2}, "relative_attention_num_buckets must be an integer in"),
        ("longt5", {"relative_attention_max_distance": 8}, "relative_attention_max_distance must exceed half"),
        ("longt5", {"local_radius": -1}, "local_radius must be an integer"),
    ]
    for family, changes, message in cases:
        with pytest.raises(ConfigError, match=message):
            FAMILIES[family].config.from_hf_config({**tiny_config(family), **changes})


RAW_FILES = [
    (b"[" * 100000 + b"]" * 100000, "nests too deeply"),
    (b'{"a": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}", "nests more than 32 levels deep"),
    (b'{"vocab_size": ' + b"9" * 5000 + b"}", "is not valid JSON: Exceeds the limit"),
    (
        b'{"model_type": "gpt_neo", "num_heads": 4, "num_heads": 8}',
        r"gives the key\(s\) \['num_heads'\] more than once",
    ),
    (b'{"model_type": "caf\xe9"}', "is not UTF-8 text"),
    (b"[1, 2]", "must hold a JSON object, not list"),
    (b"{not json", "is not valid JSON"),
    (b'{"model_type": "gpt_neo", "eqx_models": [1]}', "the eqx_models entry must be an object"),
    (b'{"model_type": "gpt_neo", "eqx_models": {"dtype": ["float32"]}}', "the eqx_models entry must be an object"),
]


@pytest.mark.parametrize("data, message", RAW_FILES, ids=[m.split()[0] + str(i) for i, (_, m) in enumerate(RAW_FILES)])
def test_unreadable_config_files_are_named(tmp_path, data, message):
    (tmp_path / "config.json").write_bytes(data)
    with pytest.raises(CheckpointError, match=message) as caught:
        read_config(tmp_path)
    assert str(tmp_path / "config.json") in str(caught.value) and "\n" not in str(caught.value)


def test_a_utf8_bom_and_ordinary_values_are_accepted(tmp_path):
    (tmp_path / "config.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(NEO).encode())
    assert read_config(tmp_path)["model_type"] == "gpt_neo"


# --------------------------------------------------------------------------- training configs

TRAIN_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


@st.composite
def mutated_train_settings(draw):
    settings_ = {"tokenizer": "bytes", "steps": 10, "warmup_steps": 2}
    changed = draw(st.lists(st.sampled_from(TRAIN_FIELDS), min_size=1, max_size=3, unique=True))
    for name in changed:
        default = TrainConfig.__dataclass_fields__[name].default
        if isinstance(default, int) and not isinstance(default, bool) and draw(st.booleans()):
            settings_[name] = draw(st.integers(-2, 3 * default + 3))
        else:
            settings_[name] = draw(VALUES)
    return settings_, set(changed)


@PROPERTY
@given(case=mutated_train_settings())
def test_every_mutated_training_config_is_refused_naming_a_changed_field_or_accepted(case):
    settings_, changed = case
    try:
        config = TrainConfig.from_dict(settings_, source="run.toml")
    except InputError as err:
        assert_one_line_naming(err, changed | {"warmup_steps", "steps"} if "steps" in changed else changed)
        assert str(err).endswith("(in run.toml)")
    else:
        assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "text, message",
    [
        ('steps = "abc"\n', r"steps must be an integer in \[1, 2\*\*31 - 1\], got 'abc' \(in .*run.toml\)"),
        ("seed = -1\n", r"seed must be an integer in \[0, 2\*\*63 - 1\], got -1"),
        ("steps = 10\nwarmup_steps = 10\n", "warmup_steps must be fewer than steps"),
        ("learning_rate = nan\n", "learning_rate must be a finite number > 0, got nan"),
        ('data = ["a", 1]\n', "data must be a list of strings"),
        ("bf16 = 1\n", "bf16 must be true or false, got 1"),
        ('tokenizer = "bpe:10"\n', "tokenizer must be a string naming 'bytes', 'bpe:N'"),
        ('mesh = "2x2"\n', "mesh must be a string of the form DATAxFSDPxTENSOR"),
        ("steps = [" * 2000 + "]" * 2000 + "\n", "cannot parse .*run.toml"),
        ("steps = 1\nsteps = 2\n", "cannot parse .*run.toml"),
    ],
)
def test_bad_toml_settings_are_named(tmp_path, text, message):
    (tmp_path / "run.toml").write_text(text)
    with pytest.raises(InputError, match=message) as caught:
        TrainConfig.from_file(tmp_path / "run.toml")
    assert "\n" not in str(caught.value)


def test_a_non_utf8_training_config_and_a_deep_json_one_are_named(tmp_path):
    (tmp_path / "run.toml").write_bytes(b'family = "caf\xe9"\n')
    with pytest.raises(InputError, match="run.toml is not UTF-8 text"):
        TrainConfig.from_file(tmp_path / "run.toml")
    (tmp_path / "run.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(InputError, match="run.json: it nests too deeply"):
        TrainConfig.from_file(tmp_path / "run.json")


# --------------------------------------------------------------------------- generation options

GEMMA = tiny_config("gemma")
#: Tiny weights, a big cache: 4 layers of 16 KV heads of 256 hold 131 kB of float32 per
#: token, so 10**7 new tokens (a 2**24-slot cache) need terabytes on any machine.
WIDE_GEMMA = {**GEMMA, "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256}


def zero_model(hf: dict):
    """The model of `hf` with zero weights: these tests only feed it bad requests, and
    building the skeleton costs a fraction of a random initialisation."""
    family, cls = resolve_class(hf)
    skeleton = eqx.filter_eval_shape(cls, family.config.from_hf_config(hf), key=jax.random.key(0))
    fill = lambda leaf: jax.numpy.asarray(np.zeros(leaf.shape, leaf.dtype))  # noqa: E731
    return jax.tree.map(lambda leaf: fill(leaf) if isinstance(leaf, jax.ShapeDtypeStruct) else leaf, skeleton)


@pytest.fixture(scope="module")
def gemma():
    return zero_model(GEMMA)


@pytest.fixture(scope="module")
def wide_gemma():
    return zero_model(WIDE_GEMMA)


@pytest.mark.parametrize("budget", [10**7, 10**12])
def test_a_rotary_model_refuses_a_budget_beyond_memory_or_positions_at_once(wide_gemma, budget):
    from eqx_models.generation import _generate
    from eqx_models.generation._config import resolve

    started = time.perf_counter()
    with pytest.raises(InputError, match=f"max_new_tokens.*{budget}") as caught:
        next(eqx_models.generation.stream(wide_gemma, np.array([[3, 4, 5]]), max_new_tokens=budget))
    assert time.perf_counter() - started < 3
    message = str(caught.value)
    assert "\n" not in message
    if budget == 10**7:  # the numbers: what it needs, what there is, and what would fit
        assert "needs more memory than there is" in message and "TB while decoding" in message, message
        fits = int(message.split("at most about ")[1].split()[0])
        assert fits >= 16
        for new, ok in [(fits, True), (2 * fits, False)]:
            config = resolve(wide_gemma.config, prompt_length=3, seq2seq=False, max_new_tokens=new)
            if ok:
                _generate._check_budget(wide_gemma, config, 1, 3, False)
            else:
                with pytest.raises(InputError):
                    _generate._check_budget(wide_gemma, config, 1, 3, False)


def test_the_int32_position_limit_is_checked_before_memory(gemma):
    with pytest.raises(InputError, match=r"max_new_tokens=2147483600 is too large: .* beyond the 2147483647"):
        eqx_models.generate(gemma, np.array([[3, 4, 5]]), max_new_tokens=2**31 - 48)


def test_the_memory_estimate_counts_rows_and_scores(gemma):
    """With 2**20 new tokens, a batch whose KV caches fit is refused once every step's scores
    (`output_scores`, rows x steps x vocab floats) are kept too."""
    from eqx_models.generation import _generate
    from eqx_models.generation._config import resolve

    limit, _ = _generate.memory_limit()
    new = 2**20
    per_row = _generate.CACHE_COPIES * _generate.cache_bytes(gemma, 16 + new) + (16 + new) * 4
    scores_per_row = new * gemma.config.vocab_size * 4
    rows = int(limit // (per_row + scores_per_row)) + 1
    assert rows * per_row < limit  # the caches alone fit
    options = dict(prompt_length=3, seq2seq=False, max_new_tokens=new)
    _generate._check_budget(gemma, resolve(gemma.config, **options), rows, 3, False)
    with pytest.raises(InputError, match=f"max_new_tokens={new} needs more memory than there is: {rows} row"):
        _generate._check_budget(gemma, resolve(gemma.config, output_scores=True, **options), rows, 3, False)
    with pytest.raises(InputError, match="needs more memory than there is"):
        _generate._check_budget(gemma, resolve(gemma.config, **options), int(limit // per_row) + 1, 3, False)


BAD_OPTIONS = [
    (dict(max_new_tokens="10"), "max_new_tokens must be an integer .* got '10'"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer .* got 2.5"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer .* got True"),
    (dict(max_length=[9]), r"max_length must be an integer .* got \[9\]"),
    (dict(max_new_tokens=4, do_sample=True, temperature=float("nan")), "temperature must be a finite number > 0"),
    (dict(max_new_tokens=4, do_sample=True, top_p=float("nan")), "top_p must be a finite number in"),
    (dict(max_new_tokens=4, do_sample=True, top_k=-1), "top_k must be an integer"),
    (dict(max_new_tokens=4, num_beams=0), "num_beams must be an integer in"),
    (dict(max_new_tokens=4, repetition_penalty="x"), "repetition_penalty must be a finite number > 0"),
    (dict(max_new_tokens=4, suppress_tokens="abc"), "suppress_tokens must be an integer or a list of integers"),
    (dict(max_new_tokens=4, suppress_tokens=[[1, 2], [3]]), "suppress_tokens must be"),
    (dict(max_new_tokens=4, bad_words_ids=[5]), "bad_words_ids must be a list of non-empty lists"),
    (dict(max_new_tokens=4, pad_token_id=-3), "pad_token_id must be an integer in"),
    (dict(max_new_tokens=4, early_stopping=[1]), "early_stopping must be true or false or 'never'"),
]


@pytest.mark.parametrize("options, message", BAD_OPTIONS, ids=[str(i) for i in range(len(BAD_OPTIONS))])
def test_bad_generation_options_are_named(gemma, options, message):
    key = {"key": jax.random.key(0)} if options.get("do_sample") else {}
    with pytest.raises(InputError, match=message):
        eqx_models.generate(gemma, np.array([[3, 4, 5]]), **options, **key)


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny checkpoints in our format: a GPT-Neo and the wide Gemma."""
    root = tmp_path_factory.mktemp("models")
    for name, hf in [("neo", NEO), ("gemma", WIDE_GEMMA)]:
        save_pretrained(zero_model(hf), root / name)
    return root


def one_error_line(capsys, *names: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert all(name in err for name in names), err
    return err


GENERATE_FLAGS = [
    (["--max-new-tokens", "0"], ["--max-new-tokens", "got 0"]),
    (["--max-new-tokens", "-5"], ["--max-new-tokens", "got -5"]),
    (["--seed", str(2**70)], ["--seed", r"[0, 2**63 - 1]"]),
    (["--seed", "-1"], ["--seed", "got -1"]),
    (["--temperature", "nan"], ["--temperature", "finite", "got nan"]),
    (["--temperature", "-1"], ["--temperature", "got -1.0"]),
    (["--top-k", "0"], ["--top-k", "got 0"]),
    (["--top-p", "1.5"], ["--top-p", "got 1.5"]),
    (["--top-p", "inf"], ["--top-p", "got inf"]),
    (["--num-beams", "0"], ["--num-beams", "got 0"]),
    (["--prompt", "caf\udce9"], ["--prompt", "valid UTF-8 text"]),
]


@pytest.mark.parametrize("flags, names", GENERATE_FLAGS, ids=[" ".join(f) for f, _ in GENERATE_FLAGS])
def test_bad_generate_flags_get_one_line_naming_the_flag(folders, capsys, flags, names):
    assert main(["generate", str(folders / "neo"), *flags]) != 0
    one_error_line(capsys, *names)


@pytest.mark.parametrize(
    "flags, names",
    [
        (["--tolerance", "nan"], ["--tolerance", "got nan"]),
        (["--seq-len", "0"], ["--seq-len", "got 0"]),
        (["--seed", "-2"], ["--seed", "got -2"]),
    ],
)
def test_bad_verify_flags_get_one_line_naming_the_flag(folders, capsys, flags, names):
    assert main(["verify", str(folders / "neo"), *flags]) != 0
    one_error_line(capsys, *names)


def test_generate_refuses_a_huge_budget_in_one_line(folders, capsys):
    started = time.perf_counter()
    assert (
        main(["generate", str(folders / "gemma"), "--byte-level", "--prompt", "a", "--max-new-tokens", str(10**7)]) != 0
    )
    one_error_line(capsys, "max_new_tokens=10000000", "needs more memory than there is")
    assert (
        main(["generate", str(folders / "gemma"), "--byte-level", "--prompt", "a", "--max-new-tokens", str(10**12)])
        != 0
    )
    one_error_line(capsys, "--max-new-tokens", "1000000000000")
    assert time.perf_counter() - started < 20  # two model loads; no cache is allocated


def test_bad_training_flags_and_settings_get_one_line(tmp_path, capsys):
    assert main(["train", "--seed", str(2**70), "--output", str(tmp_path / "out")]) != 0
    one_error_line(capsys, "seed must be an integer in [0, 2**63 - 1]")
    (tmp_path / "run.toml").write_text('steps = "abc"\n')
    assert main(["train", "--config", str(tmp_path / "run.toml")]) != 0
    one_error_line(capsys, "steps must be an integer", "'abc'", "run.toml")
    config = tmp_path / "hf.json"
    config.write_text(json.dumps({**NEO, "model_type": ["gpt_neo"]}))
    flags = ["--tokenizer", "bytes", "--data", str(config), "--output", str(tmp_path / "o2")]
    assert main(["train", "--model-config", str(config), *flags]) != 0
    one_error_line(capsys, "unknown model_type ['gpt_neo']")
    assert not (tmp_path / "out").exists() and not (tmp_path / "o2" / "checkpoints").exists()


def test_convert_of_a_bad_config_gets_one_line(tmp_path, capsys):
    write_config(tmp_path / "src", {**NEO, "num_heads": "4"}, {})
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out")]) != 0
    one_error_line(capsys, "num_heads", "'4'")
    assert not (tmp_path / "out").exists()


def run_cli(args: list, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(eqx_models.__file__).parent.parent)}
    return subprocess.run(
        [sys.executable, "-m", "eqx_models.cli", *args], capture_output=True, env=env, timeout=120, **kwargs
    )


@pytest.mark.slow
def test_in_a_subprocess_a_non_utf8_prompt_is_one_line_naming_the_prompt(folders):
    """Python decodes argv bytes that are not UTF-8 to lone surrogates; they reach us here."""
    result = run_cli([b"generate", str(folders / "neo").encode(), b"--prompt", b"caf\xe9 \xff"])
    err = result.stderr.decode()
    assert result.returncode != 0 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: --prompt must be a string of valid UTF-8 text, got 'caf\\udce9 \\udcff'"), err


@pytest.mark.slow
def test_in_a_subprocess_a_bad_config_is_one_line(tmp_path):
    write_config(tmp_path / "src", {**NEO, "num_layers": 2.0}, {})
    result = run_cli(["convert", str(tmp_path / "src"), str(tmp_path / "out")], text=True)
    assert result.returncode != 0 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "num_layers must be an integer in [1, 10000], got 2.0" in result.stderr, result.stderr


def test_show_value_stays_short_whatever_the_value():
    from eqx_models.validation import show_value

    deep: list = []
    for _ in range(100000):
        deep = [deep]
    assert len(show_value(deep)) < 100
    assert show_value(-(10**5000)) == "-an integer of about 5001 digits"
    assert len(show_value("x" * 10**6)) < 100
    assert show_value(math.inf) == "inf"
