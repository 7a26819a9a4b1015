"""Fixtures of tests/test_compat.py: every HF 4.57 Flax class `eqx_models.compat` replaces, each with a random tiny
PyTorch checkpoint and the inputs its `__call__` takes; how to run HF's Flax classes on current JAX; comparisons of
outputs, params and gradients; and the training / generation idioms of HF's Flax example scripts, written once over a
model class so that the same code runs with HF's class and with ours."""

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers
from cases import BIG_BIRD, GPT_NEO, LONG_T5
from decoder_cases import GEMMA, XGLM
from flax.training import train_state
from flax.training.common_utils import onehot
from oracle import randomise
from shapes import T5

# --------------------------------------------------------------------------- the classes and their checkpoints

# Dropout is on in every config (train=True must change outputs); comparisons run with train=False. Tiny configs:
# hidden 32 (T5 family: 24), 2 layers, vocab < 100.
DROPOUT = {
    "gpt_neo": dict(embed_dropout=0.1, attention_dropout=0.1, resid_dropout=0.1),
    "gemma": dict(attention_dropout=0.1),
    "xglm": dict(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1),
    "big_bird": dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
    "t5": dict(dropout_rate=0.1),
}
NO_DROPOUT = {family: {name: 0.0 for name in options} for family, options in DROPOUT.items()}

CONFIGS = {
    "gpt_neo": ("GPTNeoConfig", {**GPT_NEO, "num_layers": 2, "attention_types": [[["global", "local"], 1]]}),
    # rope_theta left at its default: HF Flax Gemma ignores it (compared with PyTorch in its own test)
    "gemma": ("GemmaConfig", {**GEMMA, "num_hidden_layers": 2}),
    "xglm": ("XGLMConfig", {**XGLM, "num_layers": 2}),
    "big_bird": ("BigBirdConfig", BIG_BIRD),
    # global_block_size 4: HF Flax and PyTorch LongT5 place transient-global blocks alike (not for 3: see the test)
    "longt5": ("LongT5Config", {**LONG_T5, "num_layers": 2}),
    "t5": ("T5Config", T5),
    "mt5": ("MT5Config", T5),
}
PAD = {"gpt_neo": 0, "gemma": 0, "xglm": 1, "big_bird": 0, "longt5": 0, "t5": 0, "mt5": 0}


@dataclasses.dataclass(frozen=True)
class Case:
    """One HF Flax class on one random tiny checkpoint."""

    name: str  # HF's Flax class name, e.g. "FlaxGPTNeoForCausalLM"; PyTorch's is the same without "Flax"
    family: str  # a key of CONFIGS
    kind: str  # "decoder", "bird", "choice" (BigBird multiple choice), "seq2seq" or "encoder"
    overrides: tuple[tuple[str, Any], ...] = ()  # config options beyond the family's
    variant: str = ""  # names a second case of the same class

    @property
    def id(self) -> str:
        return f"{self.name}-{self.variant}" if self.variant else self.name

    @property
    def torch_name(self) -> str:
        return self.name.removeprefix("Flax")

    @property
    def dropout_family(self) -> str:
        return "t5" if self.family in ("longt5", "mt5") else self.family

    @property
    def pad(self) -> int:
        return PAD[self.family]

    @property
    def is_lm(self) -> bool:
        return self.name.endswith(("ForCausalLM", "ForConditionalGeneration"))

    def hf_config(self, **overrides) -> transformers.PretrainedConfig:
        config_class, config = CONFIGS[self.family]
        options = {**config, **DROPOUT[self.dropout_family], **dict(self.overrides), **overrides}
        return getattr(transformers, config_class)(**options)

    def save(self, folder, *, seed: int = 0, **overrides) -> torch.nn.Module:
        """A PyTorch model of this class with every parameter randomised, saved into `folder`."""
        torch.manual_seed(seed)
        model = randomise(getattr(transformers, self.torch_name)(self.hf_config(**overrides)), seed)
        model.save_pretrained(folder)
        return model

    def inputs(self, rng: np.random.Generator, lengths=(13, 9, 6), seq: int | None = None) -> dict[str, np.ndarray]:
        """`__call__` inputs: a right-padded batch (no row a multiple of any block size)."""
        vocab = self.hf_config().vocab_size
        if self.kind == "choice":  # [batch, choices, seq]
            rows = [self._encoder_inputs(rng, vocab, lengths, seq) for _ in range(2)]
            return {name: np.stack([row[name] for row in rows]) for name in rows[0]}
        batch = self._encoder_inputs(rng, vocab, lengths, seq)
        if self.kind == "seq2seq":
            decoder = right_padded(rng, vocab, [7, 4, 5][: len(lengths)], pad=self.pad)
            batch["decoder_input_ids"], batch["decoder_attention_mask"] = decoder
            batch["decoder_input_ids"][:, 0] = 0  # the decoder start token
        return batch

    def _encoder_inputs(self, rng, vocab, lengths, seq) -> dict[str, np.ndarray]:
        ids, mask = right_padded(rng, vocab, list(lengths), seq=seq, pad=self.pad)
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.kind in ("bird", "choice"):
            ids[:, 3] = BIG_BIRD["sep_token_id"]  # question answering measures the question up to the first [SEP]
            batch["token_type_ids"] = rng.integers(0, BIG_BIRD["type_vocab_size"], ids.shape)
        return batch


def right_padded(rng, vocab: int, lengths: list[int], *, seq: int | None = None, pad: int = 0):
    """Random ids `[batch, seq]` (none below 6: no special token) and their mask, each row right-padded."""
    seq = seq or max(lengths)
    mask = (np.arange(seq)[None] < np.array(lengths)[:, None]).astype(np.int32)
    return np.where(mask, rng.integers(6, vocab, mask.shape), pad).astype(np.int32), mask


def _cases() -> dict[str, Case]:
    cases = []
    for prefix, family in [("GPTNeo", "gpt_neo"), ("Gemma", "gemma"), ("XGLM", "xglm")]:
        cases += [Case(f"Flax{prefix}{head}", family, "decoder") for head in ("Model", "ForCausalLM")]
    for head in ["Model", "ForPreTraining", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification"]:
        cases.append(Case(f"FlaxBigBird{head}", "big_bird", "bird"))
    cases += [
        Case("FlaxBigBirdForCausalLM", "big_bird", "bird", (("is_decoder", True),)),
        Case("FlaxBigBirdForQuestionAnswering", "big_bird", "bird", (("num_labels", 2),)),
        Case("FlaxBigBirdForMultipleChoice", "big_bird", "choice"),
    ]
    for prefix, family in [("LongT5", "longt5"), ("T5", "t5"), ("MT5", "mt5")]:
        cases += [Case(f"Flax{prefix}{head}", family, "seq2seq") for head in ("Model", "ForConditionalGeneration")]
        if family != "longt5":  # HF has no FlaxLongT5EncoderModel
            cases.append(Case(f"Flax{prefix}EncoderModel", family, "encoder"))
    tglobal = (("encoder_attention_type", "transient-global"),)
    cases.append(Case("FlaxLongT5ForConditionalGeneration", "longt5", "seq2seq", tglobal, variant="tglobal"))
    return {case.id: case for case in cases}


CASES = _cases()
LM_CASES = [case for case in CASES.values() if case.is_lm and case.family != "big_bird"]

# BigBird block-sparse attention: HF Flax needs the padded length to be a multiple of the block size, and falls back to
# full attention up to (5 + 2 * random blocks) * block size tokens (14 and 21 here), so 24 tokens are really sparse.
SPARSE = [dict(attention_type="block_sparse", block_size=2, num_random_blocks=1),
          dict(attention_type="block_sparse", block_size=3, num_random_blocks=1)]  # fmt: skip
SPARSE_LENGTHS, SPARSE_SEQ = (23, 19, 17), 24


# --------------------------------------------------------------------------- running HF's Flax classes today


def _clip_with_old_keywords(original: Callable) -> Callable:
    @functools.wraps(original)
    def clip(a, a_min=None, a_max=None, *, min=None, max=None, **kwargs):  # noqa: A002 - jnp.clip's own names
        return original(a, a_min if min is None else min, a_max if max is None else max, **kwargs)

    return clip


@contextlib.contextmanager
def hf_flax_runs() -> Iterator[None]:
    """HF's Flax classes in this process, on current JAX: `jnp.clip(a_min=..., a_max=...)` (HF Flax T5 / mT5 / LongT5
    relative position buckets; the keywords were removed from JAX) accepted again, and implicit dtype promotion (HF's
    Flax code relies on it; our tests run with `jax_numpy_dtype_promotion=strict`) — only while the block runs (jit
    traces inside it). Checked in test_compat: without the shim HF Flax T5 fails, so the shim is needed and is all."""
    original = jnp.clip
    jnp.clip = _clip_with_old_keywords(original)
    try:
        with jax.numpy_dtype_promotion("standard"):
            yield
    finally:
        jnp.clip = original


def runs(cls: type) -> contextlib.AbstractContextManager:
    """The context a class runs in: HF's Flax classes need `hf_flax_runs`, ours nothing."""
    return hf_flax_runs() if cls.__module__.startswith("transformers") else contextlib.nullcontext()


def user_code() -> contextlib.AbstractContextManager:
    """What users' training code runs with: JAX's default dtype promotion (optax's adamw itself promotes a Python
    float against an int32 step count, which `jax_numpy_dtype_promotion=strict` refuses)."""
    return jax.numpy_dtype_promotion("standard")


# --------------------------------------------------------------------------- comparisons


def tolerance(reference) -> float:
    """2e-5 + 1e-4 * max|reference| (over the positions compared)."""
    reference = np.asarray(reference, np.float64)
    return 2e-5 + 1e-4 * (float(np.abs(reference).max()) if reference.size else 0.0)


def valid(array, masks: list[np.ndarray]) -> np.ndarray:
    """The entries of `array` at real tokens: the first mask whose shape leads `array`'s selects them."""
    array = np.asarray(array, np.float64)
    for mask in masks:
        if array.ndim > mask.ndim and array.shape[: mask.ndim] == mask.shape:
            return array[mask.astype(bool)]
    return array.reshape(-1)


def assert_close(name: str, ours, reference, masks: list[np.ndarray]) -> float:
    """Same shape; equal within `tolerance` on real tokens. Returns the max difference."""
    assert np.shape(ours) == np.shape(reference), (name, np.shape(ours), np.shape(reference))
    a, b = valid(ours, masks), valid(reference, masks)
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    assert diff <= tolerance(b), f"{name}: max |ours - HF| = {diff:.3g} > {tolerance(b):.3g}"
    return diff


def output_masks(case: Case, inputs: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Which mask selects the real tokens of each output field: the decoder's for decoder outputs of seq2seq
    models, the encoder's for `encoder_*` fields and for every other model."""
    mask = inputs["attention_mask"]
    encoder = [mask, mask.reshape(-1, mask.shape[-1])]  # the second for multiple choice's flattened hidden states
    decoder = [inputs["decoder_attention_mask"]] if "decoder_attention_mask" in inputs else encoder
    return {"encoder": encoder, "decoder": decoder}


def masks_of(field: str, masks: dict[str, list[np.ndarray]]) -> list[np.ndarray]:
    return masks["encoder"] if field.startswith("encoder_") else masks["decoder"]


def assert_outputs_close(ours, reference, masks: dict[str, list[np.ndarray]]) -> dict[str, float]:
    """Every field HF's output has (none of its `None`s), ours by attribute and by position, equal within
    `tolerance`; hidden-state tuples element by element. Returns the max difference of each field."""
    diffs = {}
    fields = [name for name, value in reference.items() if value is not None and name != "past_key_values"]
    assert fields, "HF's output has no fields"
    for index, field in enumerate(fields):
        theirs, mine = reference[field], getattr(ours, field)
        assert_same_structure(field, mine, ours[index])
        if isinstance(theirs, tuple):
            assert isinstance(mine, tuple) and len(mine) == len(theirs), (field, type(mine), len(theirs))
            for layer, (a, b) in enumerate(zip(mine, theirs, strict=True)):
                diffs[f"{field}[{layer}]"] = assert_close(f"{field}[{layer}]", a, b, masks_of(field, masks))
        else:
            diffs[field] = assert_close(field, mine, theirs, masks_of(field, masks))
    return diffs


def assert_same_structure(field: str, a, b) -> None:
    """`a` and `b` are the same arrays (an output's field by name and by position)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb), field
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=field)


def assert_trees_close(name: str, ours, reference, relative: float = 1e-4, absolute: float = 1e-6) -> float:
    """Same dict structure and shapes; each leaf within `absolute + relative * max|leaf|` of HF's (gradients,
    updated params). Returns the max difference relative to each leaf's scale."""
    flat_ours, flat_ref = flatten(ours), flatten(reference)
    assert flat_ours.keys() == flat_ref.keys(), (name, sorted(flat_ours.keys() ^ flat_ref.keys())[:5])
    worst = 0.0
    for path, theirs in flat_ref.items():
        mine, theirs = np.asarray(flat_ours[path], np.float64), np.asarray(theirs, np.float64)
        assert mine.shape == theirs.shape, (name, path, mine.shape, theirs.shape)
        scale = float(np.abs(theirs).max())
        diff = float(np.abs(mine - theirs).max())
        assert diff <= absolute + relative * scale, f"{name} {path}: max diff {diff:.3g}, leaf max {scale:.3g}"
        worst = max(worst, diff / max(scale, 1e-12))
    return worst


def flatten(tree) -> dict[str, Any]:
    """`{"a/b/kernel": leaf}` of a nested params dict (FrozenDict or dict)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


def assert_same_params(ours, reference) -> None:
    """Params trees identical: the same nested keys, shapes, dtypes and every value."""
    flat_ours, flat_ref = flatten(ours), flatten(reference)
    assert flat_ours.keys() == flat_ref.keys(), sorted(flat_ours.keys() ^ flat_ref.keys())[:10]
    for path, theirs in flat_ref.items():
        mine = flat_ours[path]
        assert np.asarray(mine).dtype == np.asarray(theirs).dtype, (path, np.asarray(mine).dtype, theirs.dtype)
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs), err_msg=path)


def perturbed(params, seed: int = 1, scale: float = 0.05):
    """`params` with every floating leaf moved by random noise (a plain nested dict of jnp arrays)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [leaf + scale * jax.random.normal(key, leaf.shape, leaf.dtype) for leaf, key in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, moved)


# --------------------------------------------------------------------------- HF's training idiom


class TrainState(train_state.TrainState):
    """HF's example scripts' train state: flax's, plus the dropout key carried from step to step."""

    dropout_rng: jax.Array


def generic_loss(first_output, batch: dict[str, np.ndarray]):
    """A cross-entropy on any head's first output (`outputs[0]`): random targets over its last axis, averaged over
    real tokens where the output is per token."""
    targets = jax.random.randint(jax.random.key(7), first_output.shape[:-1], 0, first_output.shape[-1])
    losses = optax.softmax_cross_entropy(first_output, onehot(targets, first_output.shape[-1]))
    mask = jnp.asarray(batch.get("decoder_attention_mask", batch["attention_mask"]), losses.dtype)
    if losses.shape == mask.shape:
        return (losses * mask).sum() / mask.sum()
    return losses.mean()


def new_train_state(model, learning_rate: float = 1e-3) -> TrainState:
    return TrainState.create(
        apply_fn=model.__call__,
        params=model.params,
        # eps 1e-3, not 1e-8: some gradients are zero up to float noise (attention key biases: softmax ignores a
        # constant score shift), and Adam's first step would turn that noise into +-learning_rate on either side
        tx=optax.adamw(learning_rate, eps=1e-3, weight_decay=0.01),
        dropout_rng=jax.random.key(3),
    )


def train_step(state: TrainState, batch: dict, *, train: bool):
    """One step as HF's examples take it: split the dropout key, loss of `apply_fn(**batch, params=...,
    dropout_rng=..., train=...)[0]`, `jax.value_and_grad` over the params dict, `apply_gradients`."""
    dropout_rng, new_dropout_rng = jax.random.split(state.dropout_rng)

    def compute_loss(params):
        first = state.apply_fn(**batch, params=params, dropout_rng=dropout_rng, train=train)[0]
        return generic_loss(first, batch)

    loss, grads = jax.value_and_grad(compute_loss)(state.params)
    return state.apply_gradients(grads=grads, dropout_rng=new_dropout_rng), loss, grads


# --------------------------------------------------------------------------- HF's example scripts, import changed


def clm_example(model_class: type, folder, batch: dict[str, np.ndarray], output_dir) -> dict[str, Any]:
    """What `examples/flax/language-modeling/run_clm_flax.py` does with a causal LM, in our words and without
    pmap: load, a TrainState over `model.params` with adamw masked off biases and norm scales, two jitted train steps
    (`train=True`, shifted cross entropy on `outputs[0]`), an eval step calling `model(**batch, params=...)`, and
    `model.save_pretrained(output_dir, params=...)`. Only `model_class` differs between HF's run and ours."""
    model = model_class.from_pretrained(folder, from_pt=True, dtype=jnp.float32)

    def decay_mask_fn(params):
        flat = flatten(params)
        return jax.tree.unflatten(jax.tree.structure(params), [not p.endswith(("bias", "scale")) for p in flat])

    schedule = optax.linear_schedule(init_value=1e-3, end_value=0.0, transition_steps=2)
    # the script's --adam_epsilon; 1e-3 rather than 1e-8 for the reason given in new_train_state
    optimizer = optax.adamw(learning_rate=schedule, b1=0.9, b2=0.999, eps=1e-3, weight_decay=0.01, mask=decay_mask_fn)
    state = TrainState.create(apply_fn=model.__call__, params=model.params, tx=optimizer, dropout_rng=jax.random.key(0))

    def loss_fn(logits, labels):
        shifted = logits[..., :-1, :]
        return optax.softmax_cross_entropy(shifted, onehot(labels[..., 1:], shifted.shape[-1])).mean()

    def train_step(state, batch):
        dropout_rng, new_dropout_rng = jax.random.split(state.dropout_rng)

        def compute_loss(params):
            labels = batch.pop("labels")
            logits = state.apply_fn(**batch, params=params, dropout_rng=dropout_rng, train=True)[0]
            return loss_fn(logits, labels)

        loss, grad = jax.value_and_grad(compute_loss)(state.params)
        new_state = state.apply_gradients(grads=grad, dropout_rng=new_dropout_rng)
        return new_state, {"loss": loss, "learning_rate": schedule(state.step)}

    def eval_step(params, batch):
        labels = batch.pop("labels")
        logits = model(**batch, params=params, train=False)[0]
        return {"loss": loss_fn(logits, labels)}

    batch = {**batch, "labels": batch["input_ids"]}
    p_train_step, p_eval_step = jax.jit(train_step, donate_argnums=(0,)), jax.jit(eval_step)
    losses = []
    for _ in range(2):
        state, metrics = p_train_step(state, dict(batch))
        losses.append(float(metrics["loss"]))
    eval_loss = float(p_eval_step(state.params, dict(batch))["loss"])
    params = jax.device_get(state.params)
    model.save_pretrained(output_dir, params=params)
    return {"losses": losses, "eval_loss": eval_loss, "params": params}


def summarization_example(model_class: type, folder, batch: dict[str, np.ndarray], output_dir) -> dict[str, Any]:
    """What `examples/flax/summarization/run_summarization_flax.py` does with a seq2seq model, in our words and
    without pmap: labels shifted right into `decoder_input_ids`, a jitted train step with the label-smoothed cross
    entropy over real label tokens (`train=True`), a jitted eval step, and a jitted generate step that assigns
    `model.params = params` and calls `model.generate(input_ids, attention_mask=..., max_length=..., num_beams=...)`,
    then `save_pretrained(..., params=...)`. Only `model_class` differs between HF's run and ours."""
    model = model_class.from_pretrained(folder, from_pt=True)
    config = model.config
    labels = batch["labels"]
    decoder_input_ids = np.full_like(labels, config.pad_token_id)
    decoder_input_ids[:, 0] = config.decoder_start_token_id
    decoder_input_ids[:, 1:] = labels[:, :-1]
    batch = {**batch, "decoder_input_ids": decoder_input_ids}

    state = TrainState.create(
        apply_fn=model.__call__, params=model.params, tx=optax.adamw(1e-3, eps=1e-3), dropout_rng=jax.random.key(0)
    )

    def loss_fn(logits, labels, padding_mask, label_smoothing_factor=0.0):
        vocab_size = logits.shape[-1]
        confidence = 1.0 - label_smoothing_factor
        low_confidence = (1.0 - confidence) / (vocab_size - 1)
        normalizer = -(
            confidence * jnp.log(confidence) + (vocab_size - 1) * low_confidence * jnp.log(low_confidence + 1e-20)
        )
        soft = onehot(labels, vocab_size, on_value=confidence, off_value=low_confidence)
        loss = (optax.softmax_cross_entropy(logits, soft) - normalizer) * padding_mask
        return loss.sum() / padding_mask.sum()

    def train_step(state, batch, label_smoothing_factor=0.1):
        dropout_rng, new_dropout_rng = jax.random.split(state.dropout_rng)

        def compute_loss(params):
            labels = batch.pop("labels")
            logits = state.apply_fn(**batch, params=params, dropout_rng=dropout_rng, train=True)[0]
            return loss_fn(logits, labels, batch["decoder_attention_mask"], label_smoothing_factor)

        loss, grad = jax.value_and_grad(compute_loss)(state.params)
        return state.apply_gradients(grads=grad, dropout_rng=new_dropout_rng), {"loss": loss}

    def eval_step(params, batch, label_smoothing_factor=0.1):
        labels = batch.pop("labels")
        logits = model(**batch, params=params, train=False)[0]
        return {"loss": loss_fn(logits, labels, batch["decoder_attention_mask"], label_smoothing_factor)}

    gen_kwargs = {"max_length": 9, "num_beams": 2}

    def generate_step(params, batch):
        model.params = params
        output_ids = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **gen_kwargs)
        return output_ids.sequences

    state, metrics = jax.jit(train_step)(state, dict(batch))
    eval_loss = float(jax.jit(eval_step)(state.params, dict(batch))["loss"])
    generated = np.asarray(jax.jit(generate_step)(state.params, batch))
    params = jax.device_get(state.params)
    model.save_pretrained(output_dir, params=params)
    return {"loss": float(metrics["loss"]), "eval_loss": eval_loss, "generated": generated, "params": params}
