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
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from ..errors import CheckpointError

Rule = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """HF name <-> tree path rules of one model class.

    - `rules`: `(hf_prefix, tree_prefix)` pairs, most specific first.
    - `ignore`: regexes of HF keys that are read and dropped (buffers, tied copies).
    - `prefix`: HF's `base_model_prefix` ("transformer", "model", "bert"...).
    - `is_head`: the tree nests the base model under `prefix`.
    """

    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()
    prefix: str = ""
    is_head: bool = False

    def nested(self) -> "KeyMap":
        """This base-model map with both sides under `prefix`, as inside a head model."""
        prefix = self.prefix
        join = lambda p: f"{prefix}.{p}" if p else f"{prefix}."  # noqa: E731
        return KeyMap(
            rules=tuple((join(hf), join(tree)) for hf, tree in self.rules),
            ignore=tuple(rf"{re.escape(prefix)}\.{pattern}" for pattern in self.ignore),
            prefix=prefix,
            is_head=True,
        )

    def extended(self, rules: tuple[Rule, ...] = (), ignore: tuple[str, ...] = ()) -> "KeyMap":
        """Adds head rules (matched before the existing ones) and ignored keys."""
        return dataclasses.replace(self, rules=rules + self.rules, ignore=self.ignore + ignore)

    def hf_names(self, path: str, num_layers: int | None) -> tuple[list[str], bool]:
        """HF key(s) of the leaf at `path`, and whether the leaf is stacked over layers."""
        for hf_prefix, tree_prefix in self.rules:
            if path.startswith(tree_prefix):
                name = hf_prefix + path[len(tree_prefix) :]
                if "{i}" not in name:
                    return [name], False
                if num_layers is None:
                    raise CheckpointError(f"stacked parameter {path} has no layers axis")
                return [name.replace("{i}", str(i)) for i in range(num_layers)], True
        raise CheckpointError(f"no key-map rule covers the model parameter {path}")

    def is_ignored(self, name: str) -> bool:
        return any(re.fullmatch(pattern, name) for pattern in self.ignore)


def array_leaves(tree: Any) -> Iterator[tuple[str, Any]]:
    """`(dotted path, leaf)` for every array (or `ShapeDtypeStruct`) leaf of `tree`."""
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
            yield jax.tree_util.keystr(key_path, simple=True, separator="."), leaf


def from_flax_names(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flax parameter names to PyTorch's: `kernel` (transposed), `scale` and
    `embedding` all become `weight`."""
    out = {}
    for name, array in state.items():
        stem, _, last = name.rpartition(".")
        if last == "kernel":
            array = array.T if array.ndim == 2 else array
            last = "weight"
        elif last in ("scale", "embedding"):
            last = "weight"
        out[f"{stem}.{last}" if stem else last] = array
    return out


def align_prefix(state: dict[str, np.ndarray], key_map: KeyMap) -> tuple[dict[str, np.ndarray], list[str]]:
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


def _progress(items: list, enabled: bool, what: str) -> Any:
    """`items`, behind a tqdm bar when `enabled` and stderr is a terminal."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=what, unit="tensor", leave=False, disable=None)


def _describe(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclasses.dataclass
class LoadReport:
    """What a load did besides filling parameters: HF keys dropped on purpose, and
    parameters missing from the checkpoint that were freshly initialised (new heads)."""

    ignored: list[str] = dataclasses.field(default_factory=list)
    initialised: list[str] = dataclasses.field(default_factory=list)


def fill_tree(
    skeleton: Any,
    state: dict[str, np.ndarray],
    key_map: KeyMap,
    *,
    may_initialise: tuple[str, ...] = (),
    progress: bool = False,
) -> tuple[list[Any], list[str], LoadReport]:
    """Matches checkpoint arrays to the skeleton's leaves, strictly.

    Returns the leaves in `array_leaves` order (numpy arrays cast to the leaf dtype,
    or `None` where a leaf was missing and may be initialised), the missing paths and
    a report. Raises `CheckpointError` naming the key on a missing key, an unexpected
    key or a shape mismatch.
    """
    state, dropped = align_prefix(state, key_map)
    report = LoadReport(ignored=dropped)
    used: set[str] = set()
    values: list[Any] = []
    missing_paths: list[str] = []
    missing_keys: list[str] = []
    for path, leaf in _progress(list(array_leaves(skeleton)), progress, "loading"):
        layers = leaf.shape[0] if leaf.ndim else None
        names, stacked = key_map.hf_names(path, layers)
        absent = [n for n in names if n not in state]
        if absent:
            if path.startswith(may_initialise) and may_initialise:
                missing_paths.append(path)
                values.append(None)
                continue
            missing_keys.extend(absent)
            values.append(None)
            continue
        want = leaf.shape[1:] if stacked else leaf.shape
        for name in names:
            if state[name].shape != want:
                raise CheckpointError(
                    f"shape mismatch for {name}: checkpoint has {tuple(state[name].shape)}, "
                    f"model expects {tuple(want)} (parameter {path})"
                )
        used.update(names)
        arrays = [state[n] for n in names]
        array = np.stack(arrays) if stacked else arrays[0]
        values.append(array.astype(leaf.dtype, copy=False))
    if missing_keys:
        raise CheckpointError(f"checkpoint is missing {len(missing_keys)} key(s): {_describe(missing_keys)}")
    unexpected = sorted(n for n in state if n not in used and not key_map.is_ignored(n))
    if unexpected:
        raise CheckpointError(
            f"checkpoint has {len(unexpected)} unexpected key(s) for this model: {_describe(unexpected)}"
        )
    report.ignored += sorted(n for n in state if n not in used and key_map.is_ignored(n))
    report.initialised = missing_paths
    return values, missing_paths, report


def tree_to_state(tree: Any, key_map: KeyMap, *, progress: bool = False) -> dict[str, np.ndarray]:
    """A model tree's parameters under HF (PyTorch) names, unstacking layers."""
    state: dict[str, np.ndarray] = {}
    for path, leaf in _progress(list(array_leaves(tree)), progress, "exporting"):
        array = np.asarray(leaf)
        names, stacked = key_map.hf_names(path, array.shape[0] if array.ndim else None)
        for i, name in enumerate(names):
            state[name] = np.ascontiguousarray(array[i] if stacked else array)
    return state
