"""The bundled `examples/stdlib-gpt-neo`: README command 1's model is trained, loads in both
libraries and generates the same greedy tokens as transformers."""

import inspect
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from oracle import hf_generate, left_pad

import eqx_models
from eqx_models.generation import generate
from eqx_models.training import head_loss

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "stdlib-gpt-neo"


@pytest.fixture(scope="module")
def example():
    model = eqx_models.from_pretrained(EXAMPLE)
    return model, eqx_models.load_tokenizer(EXAMPLE)


@pytest.mark.slow
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
    ids, mask = left_pad([codec.encode(p) for p in prompts], model.config.pad_token_id)
    ours = np.asarray(generate(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), max_new_tokens=24))

    reference = transformers.AutoModelForCausalLM.from_pretrained(EXAMPLE).eval()
    options = {"max_new_tokens": 24, "do_sample": False, "pad_token_id": model.config.pad_token_id}
    theirs = hf_generate(reference, ids, mask, **options).sequences.numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert codec.decode(ours[0, ids.shape[1] :].tolist()).strip()  # it writes something
