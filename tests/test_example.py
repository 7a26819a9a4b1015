"""The bundled `examples/stdlib-gpt-neo`: README command 1's model is trained, loads in both
libraries and generates the same greedy tokens as transformers."""

import inspect
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import eqx_models
from eqx_models.generation import generate
from eqx_models.text import load_codec
from eqx_models.training import head_loss

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "stdlib-gpt-neo"


@pytest.fixture(scope="module")
def example():
    model = eqx_models.from_pretrained(EXAMPLE)
    return model, load_codec(EXAMPLE, model.config)


def test_the_example_has_learned_python(example):
    """On a standard-library file's source, the loss is far below a uniform guess's ln(4096)."""
    model, codec = example
    ids = codec.encode(inspect.getsource(math.__loader__.__class__))[:256]  # any stdlib source
    batch = {"input_ids": jnp.asarray([ids], jnp.int32), "labels": jnp.asarray([ids], jnp.int32)}
    loss, _ = head_loss(model, batch)
    print(f"\nloss on {len(ids)} stdlib tokens: {float(loss):.3f} nats (uniform {math.log(codec.vocab_size):.3f})")
    assert float(loss) < 0.5 * math.log(codec.vocab_size)


def test_greedy_generation_equals_transformers(example):
    model, codec = example
    prompts = ["def ", "class Parser:\n    def "]
    rows = [codec.encode(p) for p in prompts]
    width = max(map(len, rows))
    ids = np.array([[0] * (width - len(r)) + r for r in rows], np.int32)  # left-padded
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int32)
    ours = np.asarray(generate(model, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=24))

    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(EXAMPLE).eval()
    with torch.no_grad():
        theirs = theirs_model.generate(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
            pad_token_id=theirs_model.config.pad_token_id,
        ).numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert codec.decode(ours[0, width:].tolist()).strip()  # it writes something
