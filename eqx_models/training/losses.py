"""Losses of every head, on batched arrays, as HF computes them when given labels.

Every loss is a float32 mean over the valid items (labels equal to `IGNORE_INDEX`, -100,
are skipped, as in HF); with no valid item the loss is 0, where PyTorch would return NaN.
`head_loss` runs a model on a batch of HF-named arrays (vmapping the unbatched module) and
picks the loss of the model class's declared `task` (`LOSSES`).
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ..errors import InputError
from ..models import TASKS, Model, shift_tokens_right

IGNORE_INDEX = -100

Metrics = dict[str, Float[Array, ""]]


def _nll_sum(
    logits: Float[Array, "*items n"], labels: Int[Array, "*items"], valid: Bool[Array, "*items"]
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Summed negative log-likelihood of `labels` over `valid` items, and their count."""
    logits = logits.astype(jnp.float32)
    safe = jnp.clip(labels, 0, logits.shape[-1] - 1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid.astype(jnp.float32))


def _mean(total: Float[Array, ""], count: Float[Array, ""]) -> Float[Array, ""]:
    return total / jnp.maximum(count, 1.0)


def _cross_entropy(
    logits: Float[Array, "*items n"], labels: Int[Array, "*items"], valid: Bool[Array, "*items"]
) -> Float[Array, ""]:
    return _mean(*_nll_sum(logits, labels, valid))


def _accuracy(
    logits: Float[Array, "*items n"], labels: Int[Array, "*items"], valid: Bool[Array, "*items"]
) -> Float[Array, ""]:
    hits = (jnp.argmax(logits, axis=-1) == labels) & valid
    return _mean(jnp.sum(hits.astype(jnp.float32)), jnp.sum(valid.astype(jnp.float32)))


def _causal_targets(
    labels: Int[Array, "batch seq"], attention_mask: Int[Array, "batch seq"] | Bool[Array, "batch seq"] | None
) -> tuple[Int[Array, "batch seq"], Bool[Array, "batch seq"]]:
    """Targets of each position (the next label, -100 past the end) and which count."""
    targets = jnp.pad(labels[:, 1:], ((0, 0), (0, 1)), constant_values=IGNORE_INDEX)
    valid = targets != IGNORE_INDEX
    if attention_mask is not None:
        mask = attention_mask.astype(bool)
        next_mask = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
        valid = valid & mask & next_mask
    return targets, valid


def causal_lm_loss(
    logits: Float[Array, "batch seq vocab"],
    labels: Int[Array, "batch seq"],
    attention_mask: Int[Array, "batch seq"] | Bool[Array, "batch seq"] | None = None,
) -> Float[Array, ""]:
    """Next-token cross-entropy: position `t` predicts `labels[t + 1]`, as HF's
    `ForCausalLMLoss`. Labels equal to -100 are skipped, and so are pairs where the
    predicting or the predicted position has `attention_mask == 0`.

    **Arguments:** `logits [batch, seq, vocab]`, `labels [batch, seq]` (usually the
    input ids), `attention_mask [batch, seq]` or `None`.

    **Returns:** the mean loss, a float32 scalar.
    """
    return _cross_entropy(logits, *_causal_targets(labels, attention_mask))


def label_cross_entropy(logits: Float[Array, "*items n"], labels: Int[Array, "*items"]) -> Float[Array, ""]:
    """Cross-entropy with labels aligned with the logits, -100 skipped: the loss of masked
    LM (`[batch, seq, vocab]`), seq2seq (decoder inputs are the labels shifted right, as HF's
    T5-style models), token classification (`[batch, seq, labels]`) and multiple choice
    (`[batch, choices]`).

    **Returns:** the mean loss, a float32 scalar.
    """
    return _cross_entropy(logits, labels, labels != IGNORE_INDEX)


def pretraining_loss(
    prediction_logits: Float[Array, "batch seq vocab"],
    seq_relationship_logits: Float[Array, "batch 2"],
    labels: Int[Array, "batch seq"],
    next_sentence_label: Int[Array, " batch"] | None = None,
) -> Float[Array, ""]:
    """Masked-LM loss plus, when `next_sentence_label [batch]` is given, the
    next-sentence cross-entropy, as HF's `BigBirdForPreTraining`.

    **Returns:** the summed loss, a float32 scalar.
    """
    loss = label_cross_entropy(prediction_logits, labels)
    if next_sentence_label is not None:
        loss = loss + _cross_entropy(seq_relationship_logits, next_sentence_label, next_sentence_label != IGNORE_INDEX)
    return loss


def sequence_classification_loss(
    logits: Float[Array, "batch labels"],
    labels: Int[Array, " batch"] | Float[Array, " batch"] | Float[Array, "batch labels"] | Int[Array, "batch labels"],
) -> Float[Array, ""]:
    """HF's `problem_type` inference of `BigBirdForSequenceClassification`:

    - one label (`logits [batch, 1]`): regression, mean squared error against `labels
      [batch]` (or `[batch, 1]`);
    - integer `labels [batch]`: single-label cross-entropy (-100 skipped);
    - float `labels [batch, labels]`: multi-label binary cross-entropy with logits, mean
      over every entry.

    **Returns:** the mean loss, a float32 scalar.
    """
    logits = logits.astype(jnp.float32)
    batch, num_labels = logits.shape
    if num_labels == 1:
        target = labels.reshape(batch).astype(jnp.float32)
        return jnp.mean(jnp.square(logits[:, 0] - target))
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape != (batch,):
            raise InputError(
                f"integer labels for {num_labels}-way classification must have shape ({batch},), got {labels.shape}"
            )
        return _cross_entropy(logits, labels, labels != IGNORE_INDEX)
    if labels.shape != logits.shape:
        raise InputError(
            f"float labels for multi-label classification must have the logits' shape {logits.shape}, "
            f"got {labels.shape}; pass integer labels for single-label classification"
        )
    target = labels.astype(jnp.float32)
    # the numerically stable form of BCEWithLogitsLoss, as PyTorch's
    per_item = jnp.maximum(logits, 0.0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return jnp.mean(per_item)


def _span_loss(logits: Float[Array, "batch seq"], positions: Int[Array, " batch"]) -> Float[Array, ""]:
    seq = logits.shape[1]
    positions = jnp.clip(positions.reshape(-1), 0, seq)
    return _cross_entropy(logits, positions, positions != seq)


def question_answering_loss(
    start_logits: Float[Array, "batch seq"],
    end_logits: Float[Array, "batch seq"],
    start_positions: Int[Array, " batch"],
    end_positions: Int[Array, " batch"],
) -> Float[Array, ""]:
    """Span-extraction loss as HF: positions are clamped to `[0, seq]`, a position equal
    to `seq` (outside the input) is ignored, and the start and end cross-entropies are
    averaged.

    **Returns:** the mean loss, a float32 scalar.
    """
    return (_span_loss(start_logits, start_positions) + _span_loss(end_logits, end_positions)) / 2


def mask_tokens(
    key: PRNGKeyArray,
    input_ids: Int[Array, "batch seq"],
    special_tokens_mask: Bool[Array, "batch seq"],
    *,
    vocab_size: int,
    mask_token_id: int,
    probability: float = 0.15,
    pad_token_id: int | None = None,
) -> tuple[Int[Array, "batch seq"], Int[Array, "batch seq"]]:
    """BERT's masked-LM corruption (HF's `DataCollatorForLanguageModeling`): each
    non-special token is selected with `probability`; of the selected, 80% become
    `mask_token_id`, 10% a uniformly random token of `[0, vocab_size)` and 10% stay.

    **Arguments:**

    - `key`: the randomness; the same key gives the same corruption.
    - `input_ids [batch, seq]`: the clean ids.
    - `special_tokens_mask [batch, seq]`: `True` for tokens never selected (CLS, SEP and
      padding; tokens equal to `pad_token_id`, when given, count as special too).

    **Returns:** `(inputs, labels)`: the corrupted ids, and the clean ids where selected and
    -100 elsewhere.
    """
    k_select, k_replace, k_random, k_words = jax.random.split(key, 4)
    special = special_tokens_mask.astype(bool)
    if pad_token_id is not None:
        special = special | (input_ids == pad_token_id)
    selected = jax.random.bernoulli(k_select, probability, input_ids.shape) & ~special
    labels = jnp.where(selected, input_ids, IGNORE_INDEX).astype(input_ids.dtype)
    replaced = jax.random.bernoulli(k_replace, 0.8, input_ids.shape) & selected
    randomised = jax.random.bernoulli(k_random, 0.5, input_ids.shape) & selected & ~replaced
    words = jax.random.randint(k_words, input_ids.shape, 0, vocab_size, dtype=input_ids.dtype)
    inputs = jnp.where(replaced, jnp.asarray(mask_token_id, input_ids.dtype), input_ids)
    inputs = jnp.where(randomised, words, inputs)
    return inputs, labels


# --- the dispatcher ---------------------------------------------------------------------


def _require(batch: dict[str, Array], name: str, model: Model) -> Array:
    if name not in batch:
        raise InputError(f"{type(model).__name__} needs the batch key {name!r} for its loss; got keys {sorted(batch)}")
    return jnp.asarray(batch[name])


def _optional(batch: dict[str, Array], name: str) -> Array | None:
    return None if batch.get(name) is None else jnp.asarray(batch[name])


#: Optional per-example inputs passed to the model when the batch has them.
_OPTIONAL_INPUTS = ("attention_mask", "token_type_ids", "position_ids", "question_lengths")


def _run(model: Model, batch: dict[str, Array], key: PRNGKeyArray | None, *positional: str) -> Any:
    """The model on the batch, vmapped: `positional` keys in order, then the optional inputs
    the batch holds (`question_lengths` flattened), one dropout key per example."""
    args = [_require(batch, name, model) for name in positional]
    names = [name for name in _OPTIONAL_INPUTS if _optional(batch, name) is not None]
    args += [_optional(batch, name).reshape(-1) if name == "question_lengths" else batch[name] for name in names]
    size = args[0].shape[0]
    keys = None if key is None else jax.random.split(key, size)

    def one(keys_, *values):
        inputs = dict(zip(names, values[len(positional) :]))
        return model(*values[: len(positional)], **inputs, key=keys_)

    return jax.vmap(one)(keys, *(jnp.asarray(a) for a in args))


def _token_metrics(loss, logits, labels, valid) -> Metrics:
    return {
        "loss": loss,
        "accuracy": _accuracy(logits, labels, valid),
        "tokens": jnp.sum(valid.astype(jnp.float32)),
    }


def _causal_lm(model, batch, key) -> tuple[Float[Array, ""], Metrics]:
    labels = _require(batch, "labels", model)
    logits = _run(model, batch, key, "input_ids")
    targets, valid = _causal_targets(labels, _optional(batch, "attention_mask"))
    loss = _cross_entropy(logits, targets, valid)
    return loss, _token_metrics(loss, logits, targets, valid)


def _labelled_tokens(model, batch, key):
    """Masked LM and token classification: one label per position."""
    labels = _require(batch, "labels", model)
    logits = _run(model, batch, key, "input_ids")
    loss = label_cross_entropy(logits, labels)
    return loss, _token_metrics(loss, logits, labels, labels != IGNORE_INDEX)


def _pretraining(model, batch, key):
    labels = _require(batch, "labels", model)
    nsp_label = _optional(batch, "next_sentence_label")
    out = _run(model, batch, key, "input_ids")
    nsp_label = None if nsp_label is None else nsp_label.reshape(-1)
    loss = pretraining_loss(out.prediction_logits, out.seq_relationship_logits, labels, nsp_label)
    metrics = _token_metrics(loss, out.prediction_logits, labels, labels != IGNORE_INDEX)
    metrics["mlm_loss"] = label_cross_entropy(out.prediction_logits, labels)
    if nsp_label is not None:
        nsp_valid = nsp_label != IGNORE_INDEX
        metrics["nsp_loss"] = loss - metrics["mlm_loss"]
        metrics["nsp_accuracy"] = _accuracy(out.seq_relationship_logits, nsp_label, nsp_valid)
    return loss, metrics


def _sequence_classification(model, batch, key):
    labels = _require(batch, "labels", model)
    logits = _run(model, batch, key, "input_ids")
    loss = sequence_classification_loss(logits, labels)
    metrics = {"loss": loss}
    if logits.shape[1] > 1 and jnp.issubdtype(labels.dtype, jnp.integer):
        metrics["accuracy"] = _accuracy(logits, labels, labels != IGNORE_INDEX)
    return loss, metrics


def _multiple_choice(model, batch, key):
    labels = _require(batch, "labels", model)
    logits = _run(model, batch, key, "input_ids")
    loss = label_cross_entropy(logits, labels)
    return loss, {"loss": loss, "accuracy": _accuracy(logits, labels, labels != IGNORE_INDEX)}


def _question_answering(model, batch, key):
    start, end = _require(batch, "start_positions", model), _require(batch, "end_positions", model)
    out = _run(model, batch, key, "input_ids")
    start_loss, end_loss = _span_loss(out.start_logits, start), _span_loss(out.end_logits, end)
    loss = question_answering_loss(out.start_logits, out.end_logits, start, end)
    return loss, {"loss": loss, "start_loss": start_loss, "end_loss": end_loss}


def _seq2seq(model, batch, key):
    labels = _require(batch, "labels", model)
    if _optional(batch, "decoder_input_ids") is None:
        config = model.config
        if config.decoder_start_token_id is None or config.pad_token_id is None:
            raise InputError(
                "the batch has no 'decoder_input_ids' and the config cannot build them from the labels: "
                f"decoder_start_token_id={config.decoder_start_token_id}, pad_token_id={config.pad_token_id}; "
                "set both, or pass 'decoder_input_ids'"
            )
        shift = lambda lab: shift_tokens_right(lab, config.decoder_start_token_id, config.pad_token_id)  # noqa: E731
        batch = {**batch, "decoder_input_ids": jax.vmap(shift)(labels)}
    ids, decoder_ids = _require(batch, "input_ids", model), batch["decoder_input_ids"]
    mask, decoder_mask = _optional(batch, "attention_mask"), _optional(batch, "decoder_attention_mask")
    keys = None if key is None else jax.random.split(key, ids.shape[0])

    def run(i, d, m, dm, k):
        return model(i, d, attention_mask=m, decoder_attention_mask=dm, key=k)

    logits = jax.vmap(run)(ids, jnp.asarray(decoder_ids), mask, decoder_mask, keys)
    loss = label_cross_entropy(logits, labels)
    return loss, _token_metrics(loss, logits, labels, labels != IGNORE_INDEX)


#: The loss of each task a model class declares (`Model.task`).
LOSSES: dict[str, Callable[[Model, dict[str, Array], PRNGKeyArray | None], tuple[Float[Array, ""], Metrics]]] = {
    "causal_lm": _causal_lm,
    "masked_lm": _labelled_tokens,
    "pretraining": _pretraining,
    "sequence_classification": _sequence_classification,
    "multiple_choice": _multiple_choice,
    "token_classification": _labelled_tokens,
    "question_answering": _question_answering,
    "seq2seq_lm": _seq2seq,
}
assert set(LOSSES) == set(TASKS), "every task has a loss"


def head_loss(
    model: Model, batch: dict[str, Array], *, key: PRNGKeyArray | None = None
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """The training loss of `model` on a batch, as HF's head computes it from `labels`.

    **Arguments:**

    - `model`: an unbatched model whose class declares a `task` (every causal LM, BigBird
      head and seq2seq LM); it is vmapped over the batch.
    - `batch`: arrays with HF's names and a leading batch axis: `input_ids`, `labels`
      and, as the head needs, `attention_mask`, `token_type_ids`, `position_ids`,
      `next_sentence_label`, `start_positions`, `end_positions`, `question_lengths`,
      `decoder_input_ids` (by default the labels shifted right, as HF),
      `decoder_attention_mask`. Multiple choice takes `[batch, choices, seq]` inputs.
      Causal LMs use positions `0..seq-1` unless `position_ids` is given, as HF does in
      training.
    - `key`: enables dropout (split per example; the model must not be in inference
      mode for it to act); `None` runs the model in inference mode, deterministically.

    **Returns:** `(loss, metrics)`: the float32 scalar loss and a dict of float32
    scalars (`loss` and, per head, `accuracy`, `tokens`, `mlm_loss`, `nsp_loss`,
    `start_loss`, `end_loss`).
    """
    if model.task is None:
        raise InputError(
            f"{type(model).__name__} is a base model without a loss; train a head "
            f"(a class whose task is one of {', '.join(TASKS)})"
        )
    if key is None:  # deterministic, whatever mode the model is in
        model = eqx.nn.inference_mode(model)
    return LOSSES[model.task](model, batch, key)
