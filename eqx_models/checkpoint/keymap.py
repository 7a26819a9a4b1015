"""Declarative maps between HF parameter names and paths in an Equinox tree.

An architecture declares its map once, as `(hf_prefix, tree_prefix)` rules; the
same declaration runs forwards (import) and backwards (export). The tree is the
source of truth for which parameters exist: every array leaf's path is matched
against the rules' tree prefixes (first match wins) and the HF name is the rule's
HF prefix plus the rest of the path. `{i}` in an HF prefix marks a stacked layer:
the leaf has a leading `layers` axis and one HF key per layer.
"""

import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import CheckpointError
from ._lazy import LazyTensor, as_lazy

Rule = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """HF name <-> tree path rules of one model class.

    - `rules`: `(hf_prefix, tree_prefix)` pairs, most specific first.
    - `ignore`: regexes of HF keys that are read and dropped (buffers some savers kept).
    - `prefix`: HF's `base_model_prefix` ("transformer", "model", "bert"...).
    - `is_head`: the tree nests the base model under `prefix`.
    - `tied`: `(copy, source)` HF names: PyTorch's `state_dict()` holds `copy` as the very
      tensor `source` is (tied embeddings and biases). Loading reads and drops a copy;
      `to_state_dict` writes it, so that `load_state_dict(strict=True)` accepts the result.
    - `embedding`: the HF name of the input-embedding weight, which heads tie to.
    - `not_in_flax`: tree-path prefixes of parameters HF's Flax class of this model does not
      hold (BigBird's pooler in heads that never use it): left out of the Flax layout and,
      when a Flax checkpoint lacks them, initialised like a new head.
    """

    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()
    prefix: str = ""
    is_head: bool = False
    tied: tuple[tuple[str, str], ...] = ()
    embedding: str = ""
    not_in_flax: tuple[str, ...] = ()

    def __post_init__(self):
        for hf_prefix, _ in self.rules:
            if hf_prefix.count("{i}") > 1 or "{i}" in hf_prefix and not re.search(r"(^|\.)\{i\}\.", hf_prefix):
                raise ValueError(f"key-map rule {hf_prefix!r}: `{{i}}` must be one whole dotted component")

    def nested(self) -> "KeyMap":
        """This base-model map with both sides under `prefix`, as inside a head model."""
        prefix = self.prefix
        join = lambda p: f"{prefix}.{p}" if p else f"{prefix}."  # noqa: E731
        return KeyMap(
            rules=tuple((join(hf), join(tree)) for hf, tree in self.rules),
            ignore=tuple(rf"{re.escape(prefix)}\.{pattern}" for pattern in self.ignore),
            prefix=prefix,
            is_head=True,
            tied=tuple((join(copy), join(source)) for copy, source in self.tied),
            embedding=join(self.embedding) if self.embedding else "",
            not_in_flax=tuple(join(path) for path in self.not_in_flax),
        )

    def extended(
        self,
        rules: tuple[Rule, ...] = (),
        ignore: tuple[str, ...] = (),
        tied: tuple[tuple[str, str], ...] = (),
        not_in_flax: tuple[str, ...] = (),
    ) -> "KeyMap":
        """Adds head rules (matched before the existing ones), ignored keys, tied copies and
        parameters HF's Flax class leaves out."""
        return dataclasses.replace(
            self,
            rules=rules + self.rules,
            ignore=self.ignore + ignore,
            tied=self.tied + tied,
            not_in_flax=self.not_in_flax + not_in_flax,
        )

    def hf_pattern(self, path: str) -> str:
        """The HF key of the leaf at `path`, with `{i}` standing for the layer of a stacked leaf."""
        for hf_prefix, tree_prefix in self.rules:
            if path.startswith(tree_prefix):
                return hf_prefix + path[len(tree_prefix) :]
        raise CheckpointError(f"no key-map rule covers the model parameter {path}")

    def hf_names(self, path: str, num_layers: int | None) -> tuple[list[str], bool]:
        """HF key(s) of the leaf at `path`, and whether the leaf is stacked over layers."""
        name = self.hf_pattern(path)
        if "{i}" not in name:
            return [name], False
        if num_layers is None:
            raise CheckpointError(f"stacked parameter {path} has no layers axis")
        return [name.replace("{i}", str(i)) for i in range(num_layers)], True

    def is_ignored(self, name: str) -> bool:
        return any(copy == name for copy, _ in self.tied) or any(re.fullmatch(p, name) for p in self.ignore)


def array_leaves(tree: Any) -> Iterator[tuple[str, Any]]:
    """`(dotted path, leaf)` for every array (or `ShapeDtypeStruct`) leaf of `tree`."""
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
            yield jax.tree_util.keystr(key_path, simple=True, separator="."), leaf


def align_prefix(state: dict[str, Any], key_map: KeyMap) -> tuple[dict[str, Any], list[str]]:
    """Lets base-model checkpoints load into head models and head checkpoints into base
    models, as HF does. Returns the state and the head keys a base model drops."""
    if not key_map.prefix:
        return state, []
    head = key_map.prefix + "."
    prefixed = any(name.startswith(head) for name in state)
    if key_map.is_head and not prefixed:
        return {head + name: array for name, array in state.items()}, []
    if not key_map.is_head and prefixed:
        dropped = sorted(name for name in state if not name.startswith(head))
        return {name[len(head) :]: a for name, a in state.items() if name.startswith(head)}, dropped
    return state, []


def progress_bar(items: list, enabled: bool, what: str) -> Any:
    """`items`, behind a tqdm bar when `enabled` and stderr is a terminal."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=what, unit="tensor", leave=False, disable=None)


def describe_names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class NonFiniteWeightsWarning(UserWarning):
    """A loaded checkpoint has NaN or Inf weights (`LoadReport.nonfinite` names them)."""


@dataclasses.dataclass
class LoadReport:
    """What a load did besides filling parameters: HF keys dropped on purpose, parameters
    missing from the checkpoint that were freshly initialised (new heads), and the HF keys
    whose loaded values (after the cast to the model's dtype) hold NaN or Inf."""

    ignored: list[str] = dataclasses.field(default_factory=list)
    initialised: list[str] = dataclasses.field(default_factory=list)
    nonfinite: list[str] = dataclasses.field(default_factory=list)


class _LayerIndex:
    """For each key with a decimal path component, the key with `{i}` there -> the layers
    present. Lets a stacked leaf count the checkpoint's layers without spelling out the
    model's: a config claiming 10**6 layers fails at once, not after building 10**6 names
    per leaf."""

    _NUMBER = re.compile(r"^(?:0|[1-9][0-9]{0,17})$")

    def __init__(self, names):
        self.layers: dict[str, set[int]] = {}
        for name in names:
            parts = name.split(".")
            for at, part in enumerate(parts):
                if self._NUMBER.match(part):
                    pattern = ".".join([*parts[:at], "{i}", *parts[at + 1 :]])
                    self.layers.setdefault(pattern, set()).add(int(part))

    def missing(self, pattern: str, count: int, limit: int) -> tuple[int, list[int]]:
        """How many of layers 0..count-1 lack `pattern`, and the first `limit` of them."""
        present = self.layers.get(pattern, set())
        absent = count - sum(1 for i in present if i < count)
        first: list[int] = []
        i = 0
        while len(first) < min(absent, limit):
            if i not in present:
                first.append(i)
            i += 1
        return absent, first


def _is_float(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.inexact)


def _leaf_value(tensor: LazyTensor, name: str, path: str, want: tuple, dtype: Any) -> np.ndarray:
    """The checkpoint value of one HF key, shape-checked before it is read, cast to `dtype`."""
    if tensor.shape != want:
        raise CheckpointError(
            f"shape mismatch for {name}: checkpoint has {tensor.shape}, model expects {want} (parameter {path})"
        )
    with np.errstate(over="ignore"):  # overflow to inf is reported by the caller, per key
        return tensor.read().astype(dtype, copy=False)


def fill_tree(
    skeleton: Any,
    state: Mapping[str, LazyTensor | np.ndarray],
    key_map: KeyMap,
    *,
    may_initialise: tuple[str, ...] = (),
    progress: bool = False,
) -> tuple[list[Any], list[str], LoadReport]:
    """Matches checkpoint tensors to the skeleton's leaves, strictly.

    Returns the leaves in `array_leaves` order (numpy arrays cast to the leaf dtype,
    or `None` where a leaf was missing and may be initialised), the missing paths and
    a report. Raises `CheckpointError` naming the key on a missing key, an unexpected
    key or a shape mismatch.

    `state` values may be `LazyTensor`s: each one's shape is checked against its leaf
    before it is read, keys the model does not use are never read, and a stacked leaf is
    filled layer by layer into one array. Memory and time are thus linear in the model's
    size, whatever the checkpoint declares.
    """
    state = {name: as_lazy(value) for name, value in state.items()}
    state, dropped = align_prefix(state, key_map)
    report = LoadReport(ignored=dropped)
    index = _LayerIndex(state)
    used: set[str] = set()
    values: list[Any] = []
    missing_paths: list[str] = []
    missing_keys: list[str] = []
    missing_count = 0
    for path, leaf in progress_bar(list(array_leaves(skeleton)), progress, "loading"):
        pattern = key_map.hf_pattern(path)
        stacked = "{i}" in pattern
        if stacked and not leaf.ndim:
            raise CheckpointError(f"stacked parameter {path} has no layers axis")
        count = leaf.shape[0] if stacked else 1
        if stacked:
            absent, first = index.missing(pattern, count, 8)
            absent_names = [pattern.replace("{i}", str(i)) for i in first]
        else:
            absent, absent_names = (0, []) if pattern in state else (1, [pattern])
        if absent:
            if may_initialise and path.startswith(may_initialise):
                missing_paths.append(path)
            else:
                missing_count += absent
                missing_keys.extend(absent_names[: max(0, 8 - len(missing_keys))])
            values.append(None)
            continue
        if missing_count:  # already failing: check the remaining keys, read nothing more
            values.append(None)
            continue
        if not stacked:
            value = _leaf_value(state[pattern], pattern, path, tuple(leaf.shape), leaf.dtype)
            if _is_float(leaf.dtype) and not np.isfinite(value).all():
                report.nonfinite.append(pattern)
            used.add(pattern)
            values.append(value)
            continue
        value = np.empty(leaf.shape, leaf.dtype)
        for i in range(count):
            name = pattern.replace("{i}", str(i))
            value[i] = _leaf_value(state[name], name, path, tuple(leaf.shape[1:]), leaf.dtype)
            if _is_float(leaf.dtype) and not np.isfinite(value[i]).all():
                report.nonfinite.append(name)
            used.add(name)
        values.append(value)
    if missing_count:
        shown = ", ".join(missing_keys) + (
            f" and {missing_count - len(missing_keys)} more" if missing_count > len(missing_keys) else ""
        )
        raise CheckpointError(f"checkpoint is missing {missing_count} key(s): {shown}")
    unexpected = sorted(n for n in state if n not in used and not key_map.is_ignored(n))
    if unexpected:
        raise CheckpointError(
            f"checkpoint has {len(unexpected)} unexpected key(s) for this model: {describe_names(unexpected)}"
        )
    report.ignored += sorted(n for n in state if n not in used and key_map.is_ignored(n))
    report.initialised = missing_paths
    return values, missing_paths, report


def tree_to_state(tree: Any, key_map: KeyMap, *, progress: bool = False, tied: bool = False) -> dict[str, np.ndarray]:
    """A model tree's parameters under HF (PyTorch) names, unstacking layers; with `tied`,
    also the tied copies PyTorch's `state_dict()` holds (`KeyMap.tied`), as the same arrays."""
    state: dict[str, np.ndarray] = {}
    for path, leaf in progress_bar(list(array_leaves(tree)), progress, "exporting"):
        array = np.asarray(leaf)
        names, stacked = key_map.hf_names(path, array.shape[0] if array.ndim else None)
        for i, name in enumerate(names):
            state[name] = np.ascontiguousarray(array[i] if stacked else array)
    if tied:
        for copy, source in key_map.tied:
            if source not in state:
                raise CheckpointError(f"key map ties {copy} to {source}, which the model does not have")
            state[copy] = state[source]
    return state
