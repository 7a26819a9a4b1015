"""The shared layers: attention core, masks, stacked layers."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from eqx_models import nn, with_run_options
from eqx_models.models import GPTNeoConfig, GPTNeoForCausalLM


@pytest.mark.slow
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 2), (4, 1)])
def test_grouped_attention_equals_attention_with_repeated_kv(getkey, heads, kv_heads):
    q = jax.random.normal(getkey(), (5, heads, 8))
    k = jax.random.normal(getkey(), (7, kv_heads, 8))
    v = jax.random.normal(getkey(), (7, kv_heads, 8))
    mask = jax.random.bernoulli(getkey(), 0.7, (5, 7)).at[:, 0].set(True)
    ours = nn.dot_product_attention(q, nn.heads_first(k), nn.heads_first(v), mask)
    repeat = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        torch.tensor(np.asarray(q)).transpose(0, 1),
        torch.tensor(np.asarray(jnp.repeat(k, repeat, axis=1))).transpose(0, 1),
        torch.tensor(np.asarray(jnp.repeat(v, repeat, axis=1))).transpose(0, 1),
        attn_mask=torch.tensor(np.asarray(mask)),
    ).transpose(0, 1)
    np.testing.assert_allclose(ours, expected.numpy(), atol=1e-5)


@pytest.mark.slow
def test_unscaled_attention_and_bias(getkey):
    q, k, v = (jax.random.normal(getkey(), (3, 2, 4)) for _ in range(3))
    bias = jax.random.normal(getkey(), (2, 3, 3))
    scores = jnp.einsum("qhd,khd->hqk", q, k) + bias
    expected = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(scores, axis=-1), v)
    ours = nn.dot_product_attention(q, nn.heads_first(k), nn.heads_first(v), scale=1.0, bias=bias)
    np.testing.assert_allclose(ours, expected, atol=1e-6)


@pytest.mark.parametrize("window", [1, 2, 5])
def test_sliding_window_mask_is_hfs_xor_of_triangles(window):
    causal = np.tril(np.ones((9, 9), bool))
    hf_local = causal ^ np.tril(causal, -window)  # how GPT-Neo builds its local mask
    slots = jnp.arange(9)
    ours = nn.causal_mask(slots, slots, jnp.ones(9, bool), window)
    np.testing.assert_array_equal(ours, hf_local)
    np.testing.assert_array_equal(nn.causal_mask(slots, slots, jnp.ones(9, bool)), causal)


def test_causal_mask_respects_padding_and_cache_slots():
    kv_valid = jnp.array([False, False, True, True, True, False])  # left padding, then empty cache
    mask = nn.causal_mask(jnp.array([4]), jnp.arange(6), kv_valid)
    np.testing.assert_array_equal(mask, [[False, False, True, True, True, False]])


def _tiny(num_layers, **kw):
    return GPTNeoConfig(
        vocab_size=50,
        hidden_size=16,
        num_heads=2,
        max_position_embeddings=32,
        window_size=3,
        num_layers=num_layers,
        attention_types=((("global", "local"), num_layers // 2),),
        **kw,
    )


@pytest.mark.slow
def test_scan_loop_and_remat_agree_in_value_and_gradient(getkey):
    model = GPTNeoForCausalLM(_tiny(4), key=getkey())
    ids = jnp.arange(10, dtype=jnp.int32) % 50

    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(ids))[:, 3])

    results = []
    for scan_layers, remat in [(True, False), (False, False), (True, True)]:
        variant = with_run_options(model, scan_layers=scan_layers, remat=remat)
        assert nn.run_options(variant) == nn.RunOptions(scan_layers, remat)
        results.append(eqx.filter_value_and_grad(loss)(variant))
    (v0, g0), *others = results
    for value, grads in others:
        np.testing.assert_allclose(value, v0, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g0)):
            np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_program_size_does_not_grow_with_depth(getkey):
    """With scan, the traced program is the same size at any depth (so is compile time)."""

    def size(num_layers):
        model = GPTNeoForCausalLM(_tiny(num_layers), key=getkey())
        jaxpr, _, _ = eqx.filter_make_jaxpr(lambda m, i: m(i))(model, jnp.arange(8, dtype=jnp.int32))
        return len(str(jaxpr).splitlines())

    assert size(2) == size(12)


def test_stacked_layer_unstacks_one_layer(getkey):
    stack = nn.Stacked.build(lambda k: nn.Linear(3, 4, key=k), 5, key=getkey())
    assert stack.layers.weight.shape == (5, 4, 3)
    np.testing.assert_array_equal(stack.layer(2).weight, stack.layers.weight[2])


@pytest.mark.slow
@pytest.mark.parametrize("window", [nn.NO_WINDOW, 100])
def test_causal_block_skipping_equals_full_attention(getkey, window):
    seq = 601  # several query blocks, the last one short
    q, k, v = (jax.random.normal(getkey(), (seq, 4, 8)) for _ in range(3))
    slots = jnp.arange(seq)
    valid = jnp.arange(seq) >= 37  # left padding
    mask = nn.causal_mask(slots, slots, valid, window)
    k, v = nn.heads_first(k), nn.heads_first(v)
    blocked = nn.dot_product_attention(q, k, v, mask, causal=True)
    full = nn.dot_product_attention(q, k, v, mask)
    np.testing.assert_allclose(blocked[37:], full[37:], atol=1e-5)
