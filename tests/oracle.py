"""Random tiny HF PyTorch models: the numerical oracle of every parity test."""

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from eqx_models.checkpoint.keymap import array_leaves


def randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Every parameter random, so nothing rests at its init value. Norm weights are drawn
    around their init value (1, or 0 where the model stores `weight` and scales by
    `1 + weight`, as Gemma does)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            is_norm_weight = param.ndim == 1 and ("ln" in name or "norm" in name) and name.endswith("weight")
            center = float(param.mean()) if is_norm_weight else 0.0  # a fresh norm weight is all 1s or all 0s
            param.copy_(center + noise)
    return model.eval()


def left_padded(rng: np.random.Generator, vocab: int, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Random ids `[batch, max(lengths)]`, each row left-padded to the longest."""
    seq = max(lengths)
    ids = rng.integers(0, vocab, (len(lengths), seq))
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, seq - length :] = 1
        ids[row, : seq - length] = 0
    return ids, mask


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Given id rows `[batch, max length]`, each left-padded with `pad_id`, and their mask."""
    seq = max(map(len, rows))
    ids = np.array([[pad_id] * (seq - len(row)) + list(row) for row in rows])
    mask = np.array([[0] * (seq - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


def hf_generate(reference: torch.nn.Module, ids: np.ndarray, mask: np.ndarray, **options):
    """HF `generate` on numpy ids and mask, returning its dict output."""
    with torch.no_grad():
        return reference.generate(
            torch.tensor(ids), attention_mask=torch.tensor(mask), return_dict_in_generate=True, **options
        )


def hf_positions(mask: np.ndarray) -> np.ndarray:
    """The positions HF `generate` gives a left-padded batch."""
    return np.where(mask, np.cumsum(mask, -1) - 1, 1)


def torch_logits(model, ids, mask, positions=None) -> np.ndarray:
    kwargs = {"attention_mask": torch.tensor(mask)}
    if positions is not None:
        kwargs["position_ids"] = torch.tensor(positions)
    with torch.no_grad():
        out = model(torch.tensor(ids), **kwargs)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def max_diff_valid(ours, expected, mask) -> float:
    """Max |difference| over real (unpadded) tokens."""
    return float(np.abs(np.asarray(ours, np.float64) - expected)[np.asarray(mask, bool)].max())


class Float64Throughout(TorchFunctionMode):
    """Keeps a float64 HF model in float64 where its code casts to float32 on purpose (HF
    GPT-Neo's `_attn` computes its scores from `query.to(torch.float32)` and
    `key.to(torch.float32)`), so that `with Float64Throughout(): model.double()(...)` is a
    float64 truth to measure float32 implementations against."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and args and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.float64:
            if kwargs.get("dtype", args[1] if len(args) > 1 else None) is torch.float32:
                return args[0]
        return func(*args, **kwargs)


def float64_truth(run: Callable[..., np.ndarray], model: torch.nn.Module, *args) -> np.ndarray | None:
    """`run(model, *args)` with a float64 copy of the HF `model`: the exact result both float32
    implementations approximate. On some CPUs PyTorch's own float32 logits are as far from it
    as ours, in the other direction (LongT5 on an AVX-512 machine: 9.0e-5 and 7.6e-5, 1.7e-4
    apart), so comparing two float32 results measures PyTorch's rounding as much as ours.
    `None` where HF's code does not run in float64 (XGLM fills a float32 mask with float64's
    minimum and fails): compare with its float32 result there."""
    try:
        with Float64Throughout():
            return run(copy.deepcopy(model).double(), *args)
    except RuntimeError:
        return None


def assert_same_tree(a, b) -> None:
    """Same array leaves at the same paths, equal in dtype and every bit."""
    la = {path: np.asarray(leaf) for path, leaf in array_leaves(a)}
    lb = {path: np.asarray(leaf) for path, leaf in array_leaves(b)}
    assert la.keys() == lb.keys()
    for path in la:
        assert la[path].dtype == lb[path].dtype, path
        np.testing.assert_array_equal(la[path], lb[path], err_msg=path)
