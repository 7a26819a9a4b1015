"""Fixtures of the int8 tests: a tiny text model of every family, held-out Python text for
the bundled example, and the teacher-forced comparison of a quantised model with its float
original (top-1 agreement, mean NLL of the true next token, KL divergence)."""

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from eqx_models.models import FAMILIES, CausalLM, Seq2SeqLM
from eqx_models.training.presets import TEXT_HEADS

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "stdlib-gpt-neo"

#: Each family's text head at a toy size (BigBird's as a decoder with full attention, as the
#: training presets make it).
TINY = {
    "gpt_neo": dict(
        vocab_size=61,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        max_position_embeddings=64,
        attention_types=[[["global", "local"], 1]],
        window_size=4,
    ),
    "gemma": dict(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    ),
    "xglm": dict(vocab_size=61, d_model=32, ffn_dim=48, num_layers=2, attention_heads=4),
    "big_bird": dict(
        vocab_size=61,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        is_decoder=True,
        attention_type="original_full",
    ),
    "longt5": dict(
        vocab_size=61, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, local_radius=3, decoder_start_token_id=0
    ),
    "t5": dict(vocab_size=61, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0),
    "mt5": dict(vocab_size=61, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0),
}
assert set(TINY) == set(FAMILIES)


def tiny_text_model(model_type: str, key: jax.Array, **overrides):
    """The family's causal or seq2seq LM at toy size, random weights, inference mode."""
    family = FAMILIES[model_type]
    config = family.config.from_hf_config({"model_type": model_type, **TINY[model_type], **overrides})
    cls = family.by_name()[TEXT_HEADS[model_type]]
    return eqx.nn.inference_mode(cls(config, key=key))


def teacher_forced_logits(model, ids: np.ndarray) -> jax.Array:
    """`[batch, seq, vocab]` float32 logits of `ids` read with teacher forcing: a causal LM
    predicts each next token; a seq2seq LM reads the first half and predicts the second."""
    ids = jnp.asarray(ids, jnp.int32)
    if isinstance(model, Seq2SeqLM):
        half = ids.shape[1] // 2
        source, target = ids[:, :half], ids[:, half:]
        start = jnp.full((ids.shape[0], 1), model.config.decoder_start_token_id, jnp.int32)
        decoder_ids = jnp.concatenate([start, target[:, :-1]], axis=1)
        run = eqx.filter_jit(lambda m, s, d: jax.vmap(lambda a, b: m(a, b))(s, d))
        return run(model, source, decoder_ids).astype(jnp.float32)
    assert isinstance(model, CausalLM)
    run = eqx.filter_jit(lambda m, i: jax.vmap(lambda a: m(a))(i))
    return run(model, ids).astype(jnp.float32)


def _targets(model, ids: np.ndarray) -> np.ndarray:
    if isinstance(model, Seq2SeqLM):
        return ids[:, ids.shape[1] // 2 :]
    return ids[:, 1:]


@dataclass
class Comparison:
    """A quantised model against its float original on the same teacher-forced tokens."""

    tokens: int
    agreement: float  # fraction of positions where both predict the same top-1 token
    nll_float: float  # mean negative log-likelihood of the true next token, nats
    nll_quantised: float
    kl: float  # mean KL(float || quantised) of the next-token distributions, nats
    max_logit_error: float  # max |logits difference| / max |float logits|

    @property
    def nll_change(self) -> float:
        """Relative change of the mean NLL."""
        return self.nll_quantised / self.nll_float - 1


def compare(float_model, quantised, ids: np.ndarray) -> Comparison:
    ref = teacher_forced_logits(float_model, ids)
    got = teacher_forced_logits(quantised, ids)
    targets = jnp.asarray(_targets(float_model, ids))
    if not isinstance(float_model, Seq2SeqLM):  # the last position has no next token
        ref, got = ref[:, :-1], got[:, :-1]
    log_p, log_q = jax.nn.log_softmax(ref), jax.nn.log_softmax(got)

    def nll(log_probs):
        return float(-jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1)))

    return Comparison(
        tokens=int(targets.size),
        agreement=float(jnp.mean((jnp.argmax(ref, -1) == jnp.argmax(got, -1)).astype(jnp.float32))),
        nll_float=nll(log_p),
        nll_quantised=nll(log_q),
        kl=float(jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))),
        max_logit_error=float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref))),
    )


#: Held-out text for the bundled example: it was trained on the standard library without its
#: test suite and without idlelib (`training.data.stdlib_sources`), so these files are unseen.
HELD_OUT_FILES = (
    "test/test_heapq.py",
    "test/test_bisect.py",
    "test/test_textwrap.py",
    "test/test_fnmatch.py",
    "idlelib/format.py",
    "idlelib/history.py",
)


def held_out_ids(codec, *, rows: int, seq: int) -> np.ndarray:
    """`[rows, seq]` token ids of held-out standard-library files (consecutive windows)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join((root / name).read_text() for name in HELD_OUT_FILES if (root / name).is_file())
    ids = np.asarray(codec.encode(text), np.int32)
    if ids.size < rows * seq:
        raise RuntimeError(f"only {ids.size} held-out tokens under {root}, need {rows * seq}")
    return ids[: rows * seq].reshape(rows, seq)
