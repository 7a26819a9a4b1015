"""Numerical check of a converted model against transformers' PyTorch classes."""

import os
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from .errors import EqxModelsError, InputError
from .generation import hf_positions
from .models import CausalLM, EncoderDecoder, Model


def _inputs(model: Model, seq_len: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Two random rows, the second padded by a third: on the left for causal LMs (with HF's
    generation positions), on the right for encoders and encoder-decoders (whose decoder
    reads random ids of its own). Multiple choice gets one example with the two rows as its
    choices."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, model.config.vocab_size, (2, seq_len))
    mask = np.ones_like(ids)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if isinstance(model, CausalLM):
        mask[1, : seq_len // 3] = 0
        inputs["position_ids"] = np.asarray(hf_positions(jnp.asarray(mask, bool)))
    else:
        mask[1, seq_len - seq_len // 3 :] = 0
    if isinstance(model, EncoderDecoder):
        inputs["decoder_input_ids"] = rng.integers(0, model.config.vocab_size, (2, seq_len))
        mask = np.ones_like(ids)  # decoder outputs are compared at every position
    if model.task == "multiple_choice":
        inputs = {name: value[None] for name, value in inputs.items()}
    return inputs, mask.astype(bool)


def _pairs(model: Model, ours, theirs) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each of the model's declared outputs, ours beside HF's of the same name."""
    names = type(model).outputs
    mine = [ours] if len(names) == 1 and not isinstance(ours, tuple) else [getattr(ours, n) for n in names]
    return [(np.asarray(m), getattr(theirs, n).numpy()) for n, m in zip(names, mine) if m is not None]


def _difference(mine: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """|mine - expected|, 0 where both are the same NaN or infinity, inf where only one is
    finite: a NaN must never vanish from the maximum (Python's `max(0.0, nan)` is 0.0)."""
    mine, expected = mine.astype(np.float64), expected.astype(np.float64)
    same = (mine == expected) | (np.isnan(mine) & np.isnan(expected))
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(mine - expected))
    return np.nan_to_num(diff, nan=np.inf, posinf=np.inf)


def verify(
    path_or_repo_id: str | os.PathLike, *, revision: str | None = None, seq_len: int = 16, seed: int = 0
) -> float:
    """Max absolute difference between our float32 outputs and the HF PyTorch model's on
    random token ids with padding (only real tokens count). Weights holding NaN or Inf are
    named on stderr; outputs agree where both are the same NaN or infinity. A hub id is
    downloaded once (`eqx_models.hub.folder`) and both sides load the same snapshot folder."""
    try:
        import torch
        import transformers
    except ImportError:
        raise EqxModelsError("verify needs transformers and torch: pip install 'eqx_models[hf]'") from None
    from .checkpoint.keymap import NonFiniteWeightsWarning
    from .hub import folder
    from .pretrained import export_hf, load_with_report, read_config

    path = folder(path_or_repo_id, revision=revision)

    with warnings.catch_warnings():  # named below, once, on our own line
        warnings.simplefilter("ignore", NonFiniteWeightsWarning)
        model, report = load_with_report(path, dtype="float32")
    if report.nonfinite:
        print(f"warning: {len(report.nonfinite)} tensor(s) hold NaN or Inf:", file=sys.stderr)
        for name in report.nonfinite:
            print(f"  {name}", file=sys.stderr)
    limit = model.config.position_limit
    if limit is not None and seq_len > limit:
        raise InputError(f"--seq-len {seq_len} is longer than the model's {limit} positions")
    reference_class = getattr(transformers, type(model).__name__)
    if "eqx_models" in read_config(path):  # our own folder: let transformers read an export
        with tempfile.TemporaryDirectory(prefix="eqx-verify-") as tmp:  # removed even on failure
            hf_dir = os.path.join(tmp, "hf")
            export_hf(model, hf_dir)
            reference = reference_class.from_pretrained(hf_dir, dtype=torch.float32).eval()
    else:
        reference = reference_class.from_pretrained(path, dtype=torch.float32).eval()
    inputs, valid = _inputs(model, seq_len, seed)
    with torch.no_grad():
        theirs = reference(**{name: torch.tensor(value) for name, value in inputs.items()})
    ours = jax.vmap(lambda arrays: model(**arrays))(inputs)
    worst = 0.0
    for mine, expected in _pairs(model, ours, theirs):
        diff = _difference(mine, expected)
        if diff.ndim >= 2 and diff.shape[:2] == valid.shape:  # per-token outputs: real tokens only
            diff = diff[valid]
        worst = max(worst, float(diff.max()))
    return worst
