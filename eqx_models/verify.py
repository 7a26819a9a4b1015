"""Numerical check of a converted model against transformers' PyTorch classes."""

import os

import jax
import numpy as np

from .errors import EqxModelsError


def verify(path: str | os.PathLike, *, seq_len: int = 16, seed: int = 0) -> float:
    """Max absolute difference between our float32 outputs and the HF PyTorch model's
    on random token ids (two rows, the second left-padded)."""
    try:
        import torch
        import transformers
    except ImportError:
        raise EqxModelsError("verify needs transformers and torch: pip install 'eqx_models[hf]'") from None
    from .checkpoint.io import export_hf, from_pretrained, read_config

    model = from_pretrained(path, dtype="float32")
    hf_dir = path
    if "eqx_models" in read_config(path):  # our own folder: let transformers read an export
        import tempfile

        hf_dir = tempfile.mkdtemp(prefix="eqx-verify-")
        export_hf(model, hf_dir)
    architecture = type(model).__name__
    reference = getattr(transformers, architecture).from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, model.config.vocab_size, (2, seq_len))
    mask = np.ones_like(ids)
    mask[1, : seq_len // 3] = 0
    positions = np.where(mask, np.cumsum(mask, -1) - 1, 1)
    with torch.no_grad():
        out = reference(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
    expected = (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()
    ours = jax.vmap(lambda i, m, p: model(i, attention_mask=m, position_ids=p))(ids, mask, positions)
    valid = mask.astype(bool)
    return float(np.abs(np.asarray(ours) - expected)[valid].max())
