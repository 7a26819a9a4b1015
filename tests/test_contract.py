"""The declared model contract and the registry: every model class implements it, the rest of
the package dispatches on it, and what the docs say about the registry is the registry."""

import ast
import re
from pathlib import Path

import equinox as eqx
import jax
import pytest

import eqx_models
from eqx_models import models
from eqx_models.models import TASKS, CausalLM, EncoderDecoder, Model, Seq2SeqLM
from eqx_models.training.losses import LOSSES
from eqx_models.training.presets import PRESETS, TEXT_HEADS

PACKAGE = Path(eqx_models.__file__).parent
ROOT = PACKAGE.parent


def test_every_registered_class_implements_the_contract():
    for model_type, family in models.FAMILIES.items():
        assert family.model_type == model_type
        for cls in family.classes:
            assert issubclass(cls, Model), cls
            assert cls.task is None or cls.task in TASKS, cls
            if cls.task == "causal_lm":
                assert issubclass(cls, CausalLM), cls
            if cls.task == "seq2seq_lm":
                assert issubclass(cls, Seq2SeqLM), cls
            assert cls.outputs, cls


def test_every_task_has_a_loss_and_every_family_a_text_head_and_presets():
    assert set(LOSSES) == set(TASKS)
    assert set(TEXT_HEADS) == set(models.FAMILIES) == set(PRESETS)
    for model_type, head in TEXT_HEADS.items():
        assert head in models.FAMILIES[model_type].by_name()


def test_abstract_bases_cannot_be_built():
    for base in (Model, CausalLM, Seq2SeqLM, EncoderDecoder):
        with pytest.raises(TypeError):
            base()


def test_a_class_declaring_an_unknown_task_is_refused():
    with pytest.raises(TypeError, match="not one of"):

        class Bad(Model):  # noqa: F841
            task = "summarise_poetry"


@pytest.mark.slow
def test_tiny_models_of_every_class_build_and_run_through_the_contract(getkey):
    """Every registered class builds from its config's defaults shrunk to a toy size, and a
    causal LM or seq2seq LM runs one cached step through the contract's methods."""
    tiny = {
        "gpt_neo": dict(
            vocab_size=31,
            hidden_size=16,
            num_layers=2,
            num_heads=2,
            max_position_embeddings=16,
            attention_types=[[["global", "local"], 1]],
        ),
        "gemma": dict(vocab_size=31, hidden_size=16, intermediate_size=24, num_hidden_layers=2, head_dim=8),
        "xglm": dict(vocab_size=31, d_model=16, ffn_dim=24, num_layers=2, attention_heads=2),
        "big_bird": dict(vocab_size=31, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, is_decoder=True),
        "longt5": dict(vocab_size=31, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2, local_radius=3),
        "t5": dict(vocab_size=31, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2),
        "mt5": dict(vocab_size=31, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2),
    }
    assert set(tiny) == set(models.FAMILIES)
    ids = jax.numpy.arange(5, dtype=jax.numpy.int32)
    for model_type, family in models.FAMILIES.items():
        config = family.config.from_hf_config({"model_type": model_type, **tiny[model_type]})
        for cls in family.classes:
            model = eqx.filter_eval_shape(cls, config, key=getkey())
            assert model.config is config
            if isinstance(model, CausalLM | Seq2SeqLM):
                model = eqx.nn.inference_mode(cls(config, key=getkey()))
                cache = model.init_cache(8)
                assert cache.keys.shape[0] == model.cache_shape[0]
                if isinstance(model, Seq2SeqLM):
                    cross = model.cross_kv(model.encode(ids))
                    logits, cache = model.decode(ids[:1], cache, cross)
                else:
                    logits, cache = model.decode(ids, cache)
                assert logits.shape[-1] == config.vocab_size


def test_docs_registry_table_is_the_registry():
    index = (ROOT / "docs" / "index.md").read_text()
    table = re.search(r"<!-- registry:start -->\n(.*?)\n<!-- registry:end -->", index, re.S)
    assert table is not None, "docs/index.md lost its registry markers"
    assert table.group(1).strip() == models.registry_table()


def _package_sources():
    return [(path, path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))]


def test_nothing_asks_a_model_what_it_is():
    """Dispatch is on the contract's types: no `hasattr` probing, no `model_type` string
    comparisons, no `model: Any` outside the contract module."""
    offences = []
    for path, source in _package_sources():
        if path.name == "_contract.py":
            continue
        for number, line in enumerate(source.splitlines(), 1):
            code = line.split("#")[0]
            if "hasattr(" in code or re.search(r"model_type\"?\)?\s*[!=]=", code) or "model: Any" in code:
                offences.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offences, "\n".join(offences)


def test_no_private_cross_package_imports():
    """Public names come from public modules: no `from ..pkg._private import` across packages."""
    offences = []
    for path, source in _package_sources():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.level >= 2 and node.module:
                if any(part.startswith("_") for part in node.module.split(".")):
                    offences.append(f"{path.relative_to(ROOT)}: from {'.' * node.level}{node.module}")
    assert not offences, "\n".join(offences)


# The package's layers, lowest first: a module may import its own layer and those below.
LAYERS = {
    "errors": 0,
    "validation": 0,
    "files": 0,
    "_slow_tokenizers": 0,
    "compilation_cache": 0,  # turns on JAX's persistent cache for the CLI; imports only jax
    "nn": 1,
    "checkpoint": 2,
    "hub": 3,  # huggingface_hub downloads; knows the checkpoint readers' file preference
    "text": 3,  # tokenizers of folders and hub ids
    "models": 3,
    "generation": 4,
    "training": 4,
    "quantize": 4,  # transforms any model's weights; pretrained loads and saves quantised models
    "pretrained": 5,
    "lora": 5,  # a tree transformation of any registered model; adapter folders and hub ids
    "state_dict": 5,
    "verify": 6,
    "compat": 6,
    "train": 6,
    "serve": 6,  # the OpenAI-compatible server: a slot engine over any generating model
    "cli": 7,
    "__main__": 8,
    "__init__": 8,
}


def _layer_of(module: str) -> int:
    """`module` is dotted below the package (`models.t5`, `pretrained`)."""
    first = module.split(".")[0]
    return LAYERS.get(first, LAYERS["__init__"])  # a name from the package's own __init__


def test_imports_never_run_up_the_layers():
    offences = []
    for path, source in _package_sources():
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        here = ".".join(parts)
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.ImportFrom) or node.level == 0:
                continue
            base = list(package[: len(package) - (node.level - 1)]) if node.level > 1 else list(package)
            targets = (
                [".".join([*base, node.module])] if node.module else [".".join([*base, a.name]) for a in node.names]
            )
            for target in targets:
                if not target or parts == ("__init__",):
                    continue
                if _layer_of(target) > _layer_of(here):
                    offences.append(f"{path.relative_to(ROOT)}: imports {target}")
    assert not offences, "\n".join(offences)
