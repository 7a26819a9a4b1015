"""Tensors a checkpoint describes, read only when asked.

Every reader first turns a file into `LazyTensor`s: a dtype and a shape validated against
the bytes the file really holds, and a way to read them. Nothing is materialised until
`read()` is called, so a loader can check each shape against the model before paying for
it, and never reads what it does not use.
"""

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..errors import CheckpointError

#: The most names a reader builds from nested maps, in characters, per byte of the file
#: (plus `_NAME_SLACK`): real checkpoints spend far more bytes on each tensor than on its
#: name, while shared or deeply nested maps could otherwise multiply a short key by a
#: long prefix once per leaf.
NAME_BUDGET_PER_BYTE = 16
_NAME_SLACK = 1 << 20
#: Nesting deeper than this is refused (HF checkpoints nest 1 to 6 levels).
MAX_NESTING = 64


class LazyTensor:
    """A tensor of a checkpoint file: `dtype` and `shape` are known, `read()` returns
    its values as a numpy array of exactly that dtype and shape."""

    __slots__ = ("source", "dtype", "shape", "_read")

    def __init__(self, source: str, dtype: Any, shape: tuple[int, ...], read: Callable[[], np.ndarray]):
        self.source, self.dtype, self.shape, self._read = source, np.dtype(dtype), tuple(shape), read

    @classmethod
    def of(cls, array: np.ndarray, source: str = "<memory>") -> "LazyTensor":
        """An array already in memory, as a lazy tensor."""
        array = np.asarray(array)
        return cls(source, array.dtype, array.shape, lambda: array)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def T(self) -> "LazyTensor":  # noqa: N802 (numpy's name)
        """The transpose (as `np.ndarray.T`), still unread."""
        return LazyTensor(self.source, self.dtype, self.shape[::-1], lambda: self.read().T)

    def read(self) -> np.ndarray:
        array = self._read()
        if array.shape != self.shape or array.dtype != self.dtype:  # e.g. the file changed under us
            raise CheckpointError(
                f"{self.source}: read a {array.dtype} array of shape {array.shape} where the file "
                f"declared {self.dtype} {self.shape} (was the file modified while loading?)"
            )
        return array

    def __repr__(self) -> str:
        return f"LazyTensor({self.dtype}, {self.shape}, from {self.source})"


def as_lazy(value: "LazyTensor | np.ndarray") -> LazyTensor:
    return value if isinstance(value, LazyTensor) else LazyTensor.of(value)


def read_all(tensors: Mapping[str, LazyTensor], label: str, file_bytes: int) -> dict[str, np.ndarray]:
    """Every tensor read into memory, refusing up front to produce more than a few times
    the file's size: a strided or repeated view over a small storage (possible in torch
    pickles) could otherwise turn a tiny file into gigabytes. Loading into a model does
    not go through here: it checks each shape against the model first."""
    total = sum(t.nbytes for t in tensors.values())
    limit = 4 * file_bytes + (16 << 20)
    if total > limit:
        biggest = max(tensors, key=lambda n: tensors[n].nbytes)
        raise CheckpointError(
            f"{label}: its tensors would take {total} bytes, more than 4 times the {file_bytes} bytes of "
            f"the file (the largest, {biggest!r}, is {tensors[biggest].shape}): refused; load it into a "
            "model (from_pretrained), which checks every shape before reading"
        )
    return {name: tensor.read() for name, tensor in tensors.items()}


class NameBudget:
    """Counts the characters of the names a reader builds from nested maps (see
    `NAME_BUDGET_PER_BYTE`)."""

    def __init__(self, label: str, file_bytes: int):
        self.label, self.left = label, NAME_BUDGET_PER_BYTE * file_bytes + _NAME_SLACK

    def spend(self, name: str) -> str:
        self.left -= len(name)
        if self.left < 0:
            raise CheckpointError(
                f"{self.label}: its nested keys build names far longer than the file "
                "(shared or deeply nested maps): refused"
            )
        return name
