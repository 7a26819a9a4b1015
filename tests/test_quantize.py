"""Weight-only quantisation (`eqx_models.quantize`, int8 and bfloat16 weights): the
per-channel rounding bound, bfloat16 weights stored exactly, every family running quantised,
generation, our folder format, the CLI, and the quality of the bundled trained model on
held-out text.

Tolerances here are quantisation error, not parity: every int8 weight is within half a step
(`max|row| / 254`) of its float value and every bfloat16 one within 2**-9 of it (relative),
so each quantised product is off by a fraction of a percent of its output's scale and a
tiny model chains about ten of them."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from quantize_cases import EXAMPLE, TINY, compare, held_out_ids, tiny_text_model

import eqx_models
from eqx_models import cli, nn
from eqx_models.errors import CheckpointError, InputError
from eqx_models.generation import stream
from eqx_models.quantize import SCHEMES, quantization_of


def _array_leaves(tree):
    return jax.tree_util.tree_leaves_with_path(eqx.filter(tree, eqx.is_array))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_int8_rows_are_within_half_a_step_of_the_float_rows(getkey, dtype):
    """Per output channel: `scale = max|row| / 127`, values in [-127, 127], every element
    within `scale / 2` of its float value (plus the float dtype's own rounding of the
    product), and a row of zeros stays zeros. Stacked weights keep their layers axis."""
    rows = jax.random.normal(getkey(), (3, 40, 24)) * jnp.logspace(-3, 1, 40)[None, :, None]
    weight = rows.at[1, 5].set(0.0).astype(dtype)
    q = nn.QuantizedWeight.quantize(weight)
    assert q.values.dtype == jnp.int8 and q.values.shape == (3, 40, 24)
    assert q.scale.dtype == dtype and q.scale.shape == (3, 40)
    w = np.asarray(weight, np.float32)
    scale = np.asarray(q.scale, np.float32)
    np.testing.assert_allclose(scale, np.abs(w).max(-1) / 127, rtol=np.finfo(dtype).eps)
    assert np.abs(np.asarray(q.values)).max() <= 127
    error = np.abs(np.asarray(q.dequantize(), np.float32) - w)
    bound = scale[..., None] / 2 + np.abs(w) * np.finfo(dtype).eps  # half a step, plus the product's rounding
    assert (error <= bound).all(), float((error / bound).max())
    assert (np.asarray(q.values[1, 5]) == 0).all() and float(q.scale[1, 5]) == 0.0
    # the rounding is to the nearest step, not a truncation: the mean error is a quarter step
    assert 0.2 < float((error[scale > 0] / scale[scale > 0][..., None]).mean()) < 0.3


@pytest.mark.parametrize("d_in", [37, 768, 16384])
def test_int8_products_are_as_exact_as_float32_products_of_the_same_weights(getkey, d_in):
    """An int8 weight multiplies a float activation written as three int8 digits (module
    docstring of `nn.QuantizedWeight`): against the exact product of the dequantised weight
    (float64), the error stays within float32's own bound for a dot product of `d_in` terms,
    `d_in * 2**-24 * sum|x||w|`, for activations from 1e-3 to 300, a zero row, batch axes and
    under `jit`; so do its gradients (they are defined through the float product)."""
    weight = 0.05 * jax.random.normal(getkey(), (48, d_in))
    q = nn.QuantizedWeight.quantize(weight)
    x = jax.random.normal(getkey(), (3, 5, d_in)) * jnp.array([1e-3, 1.0, 300.0])[:, None, None]
    x = x.at[0, 0].set(0.0)
    w64 = np.asarray(q.values, np.float64) * np.asarray(q.scale, np.float64)[:, None]
    x64 = np.asarray(x, np.float64)
    bound = d_in * 2.0**-24 * (np.abs(x64) @ np.abs(w64).T)
    ours = np.asarray(eqx.filter_jit(lambda q, x: q.matmul_transposed(x))(q, x), np.float64)
    error = np.abs(ours - x64 @ w64.T)
    print(f"\nd_in {d_in}: largest error / float32's bound {(error / np.maximum(bound, 1e-300)).max():.2e}")
    assert (error <= bound).all()
    assert (ours[0, 0] == 0).all()
    # gradients of a linear function of the product: exactly `g @ w` and `g^T x * values`
    g = np.asarray(jax.random.normal(getkey(), (3, 5, 48)), np.float64)
    dx, dscale = jax.grad(
        lambda x, scale: jnp.sum(nn.QuantizedWeight(q.values, scale).matmul_transposed(x) * g.astype(np.float32)),
        argnums=(0, 1),
    )(x, q.scale)
    np.testing.assert_allclose(np.asarray(dx), g @ w64, rtol=1e-5, atol=1e-5 * np.abs(g @ w64).max())
    expected = np.einsum("bso,bsi,oi->o", g, x64, np.asarray(q.values, np.float64))
    np.testing.assert_allclose(np.asarray(dscale), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bfloat16_rows_store_the_bfloat16_weights_exactly(getkey, dtype, jit):
    """Scheme "bfloat16": float16 values times a power-of-two row scale give back each
    weight rounded to bfloat16, bit for bit, for every element within 2**-29 of its row's
    largest (here rows spanning 40 binades), and within 2**-40 of the row's largest below
    that; the largest value sits in [2**15, 2**16) after scaling; zeros stay zeros. Under
    `jit` too (as `quantize` runs it), where XLA may drop an `astype` round trip: 4096 rows
    whose largest element rounds up to a power of two in bfloat16 catch that."""
    rows = jax.random.normal(getkey(), (3, 40, 24)) * jnp.logspace(-30, 3, 40)[None, :, None]
    rows = rows.at[2, 7].set(rows[2, 7] * jnp.logspace(-12, 0, 24))  # one row spanning 12 decades
    weight = rows.at[1, 5].set(0.0).astype(dtype)
    quantize = jax.jit(nn.QuantizedWeight.quantize, static_argnums=1) if jit else nn.QuantizedWeight.quantize
    powers = jnp.exp2(jax.random.randint(getkey(), (4096, 1), -20, 4).astype(jnp.float32))
    near_powers = powers * (1 - jnp.linspace(0, 2**-9, 4096))[:, None]
    table = quantize((near_powers * jnp.linspace(-1, 1, 24)).astype(dtype), "bfloat16")
    assert bool(jnp.isfinite(table.dequantize()).all())
    q = quantize(weight, "bfloat16")
    assert q.scheme == "bfloat16" and q.values.dtype == jnp.float16 and q.values.shape == (3, 40, 24)
    assert q.scale.dtype == dtype and q.scale.shape == (3, 40)
    scale = np.asarray(q.scale, np.float64)
    assert (np.frexp(scale)[0] == 0.5).all()  # powers of two
    want = np.asarray(weight.astype(jnp.bfloat16), np.float64)
    top = np.abs(want).max(-1, keepdims=True)
    scaled_top = top[..., 0][top[..., 0] > 0] / scale[top[..., 0] > 0]
    assert (scaled_top >= 2**15).all() and (scaled_top < 2**16).all()
    got = np.asarray(q.values, np.float64) * scale[..., None]
    large = np.abs(want) >= top * 2.0**-29
    np.testing.assert_array_equal(got[large], want[large])
    assert (np.abs(got - want) <= top * 2.0**-40).all()
    assert not large.all()  # the rows do reach below 2**-29
    assert (np.asarray(q.values[1, 5]) == 0).all()
    np.testing.assert_array_equal(np.asarray(q.dequantize(), np.float64)[large], want[large])


def test_quantize_replaces_weights_only_and_keeps_the_tree(getkey):
    model = tiny_text_model("gpt_neo", getkey())
    q = eqx_models.quantize(model, "int8")
    attn = q.transformer.h.layers.attn
    assert isinstance(attn.q_proj, nn.Linear) and isinstance(attn.q_proj.weight, nn.QuantizedWeight)
    assert attn.q_proj.weight.values.shape == (2, 32, 32)  # stacked: [layers, out, in]
    assert attn.q_proj.weight.scale.shape == (2, 32)
    assert isinstance(q.transformer.wte.weight, nn.QuantizedWeight)
    assert q.transformer.ln_f.weight is model.transformer.ln_f.weight  # norms shared, not copied
    assert quantization_of(q) == {"scheme": "int8", "embeddings": True}
    assert quantization_of(model) is None
    assert eqx_models.quantize(q) is not q and quantization_of(eqx_models.quantize(q)) == quantization_of(q)

    kept = eqx_models.quantize(model, embeddings=False)
    assert kept.transformer.wte.weight is model.transformer.wte.weight
    assert quantization_of(kept) == {"scheme": "int8", "embeddings": False}
    back = eqx_models.dequantize(q)
    assert quantization_of(back) is None
    assert back.transformer.wte.weight.shape == model.transformer.wte.weight.shape

    half = eqx_models.quantize(model, "bfloat16")
    assert half.transformer.h.layers.attn.q_proj.weight.values.dtype == jnp.float16
    assert quantization_of(half) == {"scheme": "bfloat16", "embeddings": True}
    with pytest.raises(InputError, match="the model is already quantised int8; dequantize it first"):
        eqx_models.quantize(q, "bfloat16")


# Per scheme: the bound on the largest logit error (relative to the largest logit) and on
# the next-token KL (nats), from the module docstring's rationale. A bfloat16 weight's error
# bound (2**-9 of itself) is about half an int8 one's (1/254 of its row's largest), so are
# its bounds. Measured over the families: int8 0.5-3.6% and KL <= 3.3e-4; bfloat16
# 0.13-0.93% and KL <= 4.4e-5.
LOGIT_BOUNDS = {"int8": (0.05, 1e-3), "bfloat16": (0.025, 5e-4)}


@pytest.mark.slow
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("model_type", sorted(TINY))
def test_every_family_runs_quantised_with_logits_close_to_float(getkey, model_type, scheme):
    """Teacher-forced logits of each family's text head, quantised against float32, random
    tiny weights: within `LOGIT_BOUNDS` of the largest logit, and a small next-token KL."""
    model = tiny_text_model(model_type, getkey())
    ids = np.random.default_rng(0).integers(3, 61, (2, 12))
    result = compare(model, eqx_models.quantize(model, scheme), ids)
    print(f"\n{model_type} {scheme}: {result}")
    error, kl = LOGIT_BOUNDS[scheme]
    assert 0 < result.max_logit_error < error
    assert result.kl < kl


@pytest.mark.slow
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("model_type", ["gpt_neo", "t5"])
def test_greedy_generation_and_streaming_run_quantised(getkey, model_type, scheme):
    """Greedy decoding of a quantised decoder and encoder-decoder (the cached decode loop and
    the layer scan over quantised weights); streaming yields the same tokens."""
    q = eqx_models.quantize(tiny_text_model(model_type, getkey()), scheme)
    prompt = np.asarray([[5, 9, 13, 2, 7], [3, 4, 8, 8, 1]], np.int32)
    tokens = np.asarray(eqx_models.generate(q, prompt, max_new_tokens=6, eos_token_id=None))
    chunks = [np.asarray(c) for c in stream(q, prompt, max_new_tokens=6, eos_token_id=None, chunk_size=2)]
    new = tokens[:, prompt.shape[1] :] if model_type == "gpt_neo" else tokens[:, 1:]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), new)
    assert new.shape == (2, 6)


@pytest.fixture(scope="module")
def example():
    return eqx_models.from_pretrained(EXAMPLE), eqx_models.load_tokenizer(EXAMPLE)


@pytest.mark.slow
def test_from_pretrained_quantize_is_quantize_of_the_loaded_model(example):
    """`from_pretrained(quantize="int8")` gives `quantize(from_pretrained(...))` bit for bit,
    and the quantised bundled model generates (greedy, one row)."""
    model, codec = example
    loaded = eqx_models.from_pretrained(EXAMPLE, quantize="int8")
    want = _array_leaves(eqx_models.quantize(model))
    for (path, a), (_, b) in zip(want, _array_leaves(loaded), strict=True):
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    prompt = np.asarray([codec.encode("class Parser:\n    def ")], np.int32)
    tokens = np.asarray(eqx_models.generate(loaded, prompt, max_new_tokens=8))
    assert tokens.shape == (1, prompt.shape[1] + 8) and (tokens < codec.vocab_size).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_save_and_load_round_trip_is_bit_identical(getkey, tmp_path, scheme):
    model = tiny_text_model("gpt_neo", getkey())
    for embeddings in (True, False):
        q = eqx_models.quantize(model, scheme, embeddings=embeddings)
        folder = tmp_path / f"embeddings-{embeddings}"
        eqx_models.save_pretrained(q, folder)
        own = json.loads((folder / "config.json").read_text())["eqx_models"]
        assert own["quantization"] == {"scheme": scheme, "embeddings": embeddings}
        loaded = eqx_models.from_pretrained(folder)
        want, got = _array_leaves(q), _array_leaves(loaded)
        assert [path for path, _ in want] == [path for path, _ in got]
        for (path, a), (_, b) in zip(want, got, strict=True):
            assert a.dtype == b.dtype, path
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
        # asking again for the same quantisation leaves a quantised folder as it was
        again = eqx_models.from_pretrained(folder, quantize=scheme, quantize_embeddings=embeddings)
        for (path, a), (_, b) in zip(want, _array_leaves(again), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_cli_generate_and_convert_quantised(tmp_path, capsys):
    assert cli.main(["generate", str(EXAMPLE), "--quantize", "int8", "--prompt", "def ", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def ") and len(out.out) > len("def \n")
    assert "8 new tokens" in out.err

    dst = tmp_path / "int8"
    assert cli.main(["convert", str(EXAMPLE), str(dst), "--quantize", "int8"]) == 0
    capsys.readouterr()
    assert quantization_of(eqx_models.from_pretrained(dst)) == {"scheme": "int8", "embeddings": True}
    size = lambda folder: (folder / "model.safetensors").stat().st_size  # noqa: E731
    float_dst = tmp_path / "float32"
    assert cli.main(["convert", str(EXAMPLE), str(float_dst), "--dtype", "float32"]) == 0
    assert size(dst) < 0.3 * size(float_dst)
    half = tmp_path / "bfloat16"
    assert cli.main(["convert", str(EXAMPLE), str(half), "--dtype", "float32", "--quantize", "bfloat16"]) == 0
    assert quantization_of(eqx_models.from_pretrained(half)) == {"scheme": "bfloat16", "embeddings": True}
    assert size(half) < 0.55 * size(float_dst)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", str(EXAMPLE), "--quantize", "int4"], "--quantize must be 'int8'"),
        (["convert", str(EXAMPLE), "OUT", "--quantize", "int4"], "--quantize must be 'int8'"),
        (["convert", str(EXAMPLE), "OUT", "--quantize", "int8", "--to", "hf"], "only eqx folders hold"),
    ],
)
def test_cli_refuses_bad_quantize_flags_in_one_line(argv, message, tmp_path, capsys):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert cli.main(argv) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_bad_input_is_one_line_errors(getkey, tmp_path):
    model = tiny_text_model("gpt_neo", getkey())
    assert SCHEMES == ("int8", "bfloat16")
    with pytest.raises(InputError, match="unknown quantisation scheme 'int4'; choose one of int8, bfloat16"):
        eqx_models.quantize(model, "int4")
    with pytest.raises(InputError, match="holds no nn.Linear layer"):
        eqx_models.quantize({"table": nn.Embedding(4, 3, key=getkey())})
    with pytest.raises(InputError, match="unknown quantisation scheme"):
        eqx_models.from_pretrained(tmp_path / "never-read", quantize="fp4")
    with pytest.raises(InputError, match="export_hf writes float weights"):
        eqx_models.export_hf(eqx_models.quantize(model), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()

    folder = tmp_path / "q"
    eqx_models.save_pretrained(eqx_models.quantize(model), folder)
    config = json.loads((folder / "config.json").read_text())
    config["eqx_models"]["quantization"] = {"scheme": "int3", "embeddings": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quantization entry must be") as info:
        eqx_models.from_pretrained(folder)
    assert "\n" not in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quality_of_the_bundled_model_on_held_out_text(example, scheme):
    """Teacher-forced on 4080 tokens of standard-library files the model never saw (test
    suites and idlelib): the quantised model (embedding included) picks float32's top-1
    token at >= 97% of positions and its mean NLL is within 2% of float32's."""
    model, codec = example
    ids = held_out_ids(codec, rows=16, seq=256)
    result = compare(model, eqx_models.quantize(model, scheme), ids)
    print(f"\nbundled example, {scheme}: {result} (NLL change {result.nll_change:+.3%})")
    assert result.agreement >= 0.97
    assert abs(result.nll_change) <= 0.02


@pytest.mark.slow
def test_quality_table(example, capsys):
    """Prints the quality table of docs/quantization.md: every family's text head (random tiny
    weights, 4 x 32 random tokens) and the bundled model (held-out text), under each scheme,
    with the embeddings quantised and kept in float. Run with `-s` to see it."""
    cases = []
    for model_type in sorted(TINY):
        ids = np.random.default_rng(0).integers(3, 61, (4, 32))
        cases.append((model_type, tiny_text_model(model_type, jax.random.key(0)), ids))
    model, codec = example
    cases.append(("stdlib-gpt-neo", model, held_out_ids(codec, rows=16, seq=256)))
    rows = [
        (name, scheme, e, compare(model, eqx_models.quantize(model, scheme, embeddings=e), ids))
        for name, model, ids in cases
        for scheme in SCHEMES
        for e in (True, False)
    ]
    lines = [
        "| model | scheme | embeddings | tokens | top-1 agreement | NLL float32 | NLL quantised | NLL change "
        "| KL (nats) | max logit error / max logit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, scheme, embeddings, r in rows:
        lines.append(
            f"| {name} | {scheme} | {'quantised' if embeddings else 'float'} | {r.tokens} | {r.agreement:.2%} "
            f"| {r.nll_float:.4f} | {r.nll_quantised:.4f} | {r.nll_change:+.3%} | {r.kl:.1e} "
            f"| {r.max_logit_error:.2%} |"
        )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    # finite everywhere; zero only for bfloat16 weights of the bundled model, whose weights are
    # bfloat16 already (its folder stores them so): stored exactly, they give float32's logits
    assert all(r.tokens > 0 and np.isfinite([r.kl, r.max_logit_error]).all() for *_, r in rows)
    exact = [(name, scheme) == ("stdlib-gpt-neo", "bfloat16") for name, scheme, _, _ in rows]
    assert [r.max_logit_error == 0 for *_, r in rows] == exact
