"""The base of every architecture's config: a frozen dataclass that reads and writes
HuggingFace `config.json` dictionaries, and the one validation mechanism of configs.

Every field's annotation says what it accepts: its type (`int` is an integer and not a
bool or a float, `float` is a finite number, `str`, `bool`, tuples, `None`, `Literal`) and,
through `typing.Annotated`, declared constraints (`Range`, `OneOf`, `MultipleOf`,
`Satisfies`). Checks between fields are declared as `Relation`s in a class-level table.
`check_fields` runs all of them and raises one error naming the field, the value received
and what is allowed, e.g.

    gpt_neo config: num_heads must be an integer in [1, 2**31 - 1], got -4

The same mechanism checks `TrainConfig`, `GenerationConfig` and the CLI's flags.
"""

import dataclasses
import math
import numbers
import reprlib
import types
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import equinox as eqx
import numpy as np

from ..errors import ConfigError
from ..nn._activations import ACTIVATIONS

# HF bookkeeping keys that describe a file, not a model; rewritten on export.
_HF_BOOKKEEPING = ("model_type", "architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype")

#: JAX indexes arrays and positions with int32 by default: no size, position or token id
#: can go beyond this.
MAX_INT32 = 2**31 - 1
#: Deeper than any published transformer (about 100 layers; DeepNet's 1000): loading builds
#: per-layer key names, so an absurd count would cost memory before anything else fails.
MAX_LAYERS = 10_000
#: Configs nest a few levels (lists of lists); deeper values are refused, not recursed into.
MAX_DEPTH = 32


# --------------------------------------------------------------------------- constraints


@dataclasses.dataclass(frozen=True)
class Range:
    """`low <= value <= high` (`<` at an end marked open); `None` leaves an end unbounded."""

    low: int | float | None = None
    high: int | float | None = None
    open_low: bool = False
    open_high: bool = False

    def allows(self, value: Any) -> bool:
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or (value < self.high if self.open_high else value <= self.high)

    @property
    def text(self) -> str:
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {_number(self.low)}"
        if self.low is None:
            return f"{'<' if self.open_high else '<='} {_number(self.high)}"
        left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
        return f"in {left}{_number(self.low)}, {_number(self.high)}{right}"


@dataclasses.dataclass(frozen=True)
class OneOf:
    """One of the listed values (of the same type: `0` is not `False`)."""

    values: tuple[Any, ...]

    def allows(self, value: Any) -> bool:
        return any(type(value) is type(v) and value == v for v in self.values)

    @property
    def text(self) -> str:
        shown = [_json(v) for v in self.values]
        return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]


@dataclasses.dataclass(frozen=True)
class MultipleOf:
    factor: int

    def allows(self, value: Any) -> bool:
        return value % self.factor == 0

    @property
    def text(self) -> str:
        return "even" if self.factor == 2 else f"a multiple of {self.factor}"


@dataclasses.dataclass(frozen=True)
class Satisfies:
    """Any other condition on one value, with the words that describe it."""

    test: Callable[[Any], bool]
    text: str

    def allows(self, value: Any) -> bool:
        return bool(self.test(value))


@dataclasses.dataclass(frozen=True)
class Note:
    """Words appended to a field's description (why it is restricted)."""

    text: str


@dataclasses.dataclass(frozen=True)
class Example:
    """Describes a structured field by an example instead of by its type."""

    text: str


@dataclasses.dataclass(frozen=True)
class Relation:
    """A condition between fields, checked once every field is valid on its own."""

    fields: tuple[str, ...]
    test: Callable[..., bool]
    text: str

    def check(self, values: Mapping[str, Any], error: type[Exception], where: str, label: Callable[[str], str]):
        if not self.test(*(values[name] for name in self.fields)):
            shown = ", ".join(f"{label(name)}={show_value(_thaw(values[name]))}" for name in self.fields)
            raise error(f"{where}{self.text}; got {shown}")


def divisible(field: str, by: str) -> Relation:
    return Relation((field, by), lambda a, b: a % b == 0, f"{field} must be divisible by {by}")


def at_most(field: str, bound: str) -> Relation:
    return Relation((field, bound), lambda a, b: a <= b, f"{field} must be at most {bound}")


# Annotations shared by the configs.
Size = Annotated[int, Range(1, MAX_INT32)]
Count = Annotated[int, Range(0, MAX_INT32)]
Layers = Annotated[int, Range(1, MAX_LAYERS)]
TokenId = Annotated[int, Range(0, MAX_INT32)]
TokenIds = TokenId | tuple[TokenId, ...]
Probability = Annotated[float, Range(0, 1)]
PositiveFloat = Annotated[float, Range(0, None, open_low=True)]
NonNegativeFloat = Annotated[float, Range(0, None)]


def _is_text(value: str) -> bool:
    """Python turns bytes that are not UTF-8 (in argv, in file names) into lone surrogates,
    which no tokenizer encodes and no JSON file can hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


Text = Annotated[str, Satisfies(_is_text, "of valid UTF-8 text")]
Activation = Annotated[
    str, Satisfies(ACTIVATIONS.__contains__, f"naming a supported activation ({', '.join(sorted(ACTIVATIONS))})")
]


# --------------------------------------------------------------------------- checking


class _Mismatch(Exception):
    """A value does not fit an annotation (turned into the caller's error with the field)."""


def _freeze(value: Any, depth: int = 0) -> Any:
    """JSON lists become tuples so configs stay hashable (they are static in the model)."""
    if depth > MAX_DEPTH:
        raise _Mismatch
    if isinstance(value, list | tuple):
        return tuple(_freeze(v, depth + 1) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _conform(value: Any, annotation: Any) -> Any:
    """`value` normalised to `annotation` (lists to tuples, integers to floats for float
    fields, numpy scalars to Python's), or `_Mismatch`."""
    origin = get_origin(annotation)
    if annotation is Any:
        return _freeze(value)
    if origin is Annotated:
        base, *meta = get_args(annotation)
        value = _conform(value, base)
        if not all(m.allows(value) for m in meta if hasattr(m, "allows")):
            raise _Mismatch
        return value
    if origin is Union or origin is types.UnionType:
        for arm in get_args(annotation):
            try:
                return _conform(value, arm)
            except _Mismatch:
                pass
        raise _Mismatch
    if annotation is None or annotation is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is Literal:
        if OneOf(get_args(annotation)).allows(value):
            return value
        raise _Mismatch
    if annotation is bool:
        if isinstance(value, bool | np.bool_):
            return bool(value)
        raise _Mismatch
    if annotation is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise _Mismatch
    if annotation is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond float's range
                raise _Mismatch from None
            if math.isfinite(number):
                return number
        raise _Mismatch
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if annotation is tuple or origin is tuple:
        if not isinstance(value, list | tuple):
            raise _Mismatch
        items = get_args(annotation)
        if not items:
            return _freeze(value)
        if len(items) == 2 and items[1] is Ellipsis:
            return tuple(_conform(v, items[0]) for v in value)
        if len(items) != len(value):
            raise _Mismatch
        return tuple(_conform(v, item) for v, item in zip(value, items))
    if annotation is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    raise TypeError(f"check_fields cannot check the annotation {annotation!r}")


def describe(annotation: Any) -> str:
    """What an annotation accepts, in words: `an integer in [1, 2**31 - 1] or null`."""
    origin = get_origin(annotation)
    if annotation is Any:
        return "any value"
    if origin is Annotated:
        base, *meta = get_args(annotation)
        examples = [m.text for m in meta if isinstance(m, Example)]
        choices = [m for m in meta if isinstance(m, OneOf)]
        if examples:
            text = f"a list like {examples[0]}"
        elif choices:
            text = choices[0].text
        else:
            text = describe(base)
            limits = [m.text for m in meta if hasattr(m, "allows")]
            if limits:
                text += " " + " and ".join(limits)
        notes = [m.text for m in meta if isinstance(m, Note)]
        return text + "".join(f" ({note})" for note in notes)
    if origin is Union or origin is types.UnionType:
        return " or ".join(describe(arm) for arm in get_args(annotation))
    if annotation is None or annotation is type(None):
        return "null"
    if origin is Literal:
        return OneOf(get_args(annotation)).text
    if annotation is tuple or origin is tuple:
        items = get_args(annotation)
        if len(items) == 2 and items[1] is Ellipsis:
            plural = {str: "strings", int: "integers", float: "finite numbers", bool: "booleans"}
            return f"a list of {plural[items[0]]}" if items[0] in plural else f"a list of ({describe(items[0])})"
        if items:
            return "a list of " + ", ".join(describe(item) for item in items)
        return "a list"
    words = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", dict: "an object"}
    return words.get(annotation, getattr(annotation, "__name__", repr(annotation)))


def check_values(
    values: Mapping[str, Any],
    annotations: Mapping[str, Any],
    *,
    relations: tuple[Relation, ...] = (),
    error: type[Exception] = ConfigError,
    where: str = "",
    label: Callable[[str], str] = str,
) -> dict[str, Any]:
    """Checks each `values[name]` against `annotations[name]`, then the `relations`; returns
    the normalised values. The error names the field (`label(name)`, e.g. a CLI flag), the
    value received and what is allowed, prefixed by `where`."""
    checked = {}
    for name, annotation in annotations.items():
        value = values[name]
        try:
            checked[name] = _conform(value, annotation)
        except _Mismatch:
            raise error(f"{where}{label(name)} must be {describe(annotation)}, got {show_value(value)}") from None
    for relation in relations:
        relation.check(checked, error, where, label)
    return checked


def check_fields(
    instance: Any,
    *,
    relations: tuple[Relation, ...] = (),
    error: type[Exception] = ConfigError,
    where: str = "",
    label: Callable[[str], str] = str,
) -> None:
    """`check_values` on a frozen dataclass's fields (call it from `__post_init__`); the
    normalised values replace the given ones."""
    fields = dataclasses.fields(instance)
    values = {f.name: getattr(instance, f.name) for f in fields}
    checked = check_values(
        values, {f.name: f.type for f in fields}, relations=relations, error=error, where=where, label=label
    )
    for name, value in checked.items():
        if value is not values[name]:
            object.__setattr__(instance, name, value)


class _Shown(reprlib.Repr):
    """`repr` that stays short whatever the value: deep lists, long strings, huge integers
    (whose `repr` Python refuses beyond 4300 digits)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 3, 60, 60
        self.maxlist = self.maxtuple = self.maxdict = 6

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:
            return f"{'-' if x < 0 else ''}an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits"
        return repr(x)


def show_value(value: Any) -> str:
    return _Shown().repr(value)


def _number(x: int | float | None) -> str:
    if isinstance(x, int) and x > 2**16 and (x + 1) & x == 0:
        return f"2**{(x + 1).bit_length() - 1} - 1"
    return repr(x)


def _json(value: Any) -> str:
    """A value as `config.json` spells it."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)


# --------------------------------------------------------------------------- configs

C = TypeVar("C", bound="ModelConfig")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Fields shared by every config.

    `extra` keeps the HF keys a model does not use, so export writes them back.
    `scan_layers` and `remat` are eqx_models run options, not HF fields.
    """

    model_type: ClassVar[str]
    # eqx_models options: scan over stacked layers (compile time independent of depth),
    # and rematerialise each layer's activations in the backward pass.
    scan_layers: bool = True
    remat: bool = False
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    _RUN_OPTIONS: ClassVar[tuple[str, ...]] = ("scan_layers", "remat")
    #: Conditions between fields (divisibility...), declared by each family.
    RELATIONS: ClassVar[tuple[Relation, ...]] = ()
    # Opts out of jaxtyping's import hook (on in the tests), which would check `__init__`'s
    # arguments with beartype's messages before ours run; `__post_init__` checks them all.
    __no_type_check__ = True

    def __post_init__(self) -> None:
        check_fields(self, relations=self.RELATIONS, where=f"{self.model_type} config: ")
        self._check_family()

    def _check_family(self) -> None:
        """A family's checks that are neither one field's constraint nor a `Relation`."""

    @classmethod
    def from_hf_config(cls: type[C], hf: dict[str, Any], **overrides: Any) -> C:
        """Builds the config from a HF `config.json` dict; unknown keys go to `extra`."""
        declared = cls.model_type
        if not isinstance(hf, Mapping):
            raise ConfigError(f"a {declared} config must be a JSON object of settings, got {show_value(hf)}")
        given = hf.get("model_type", declared)
        if not (isinstance(given, str) and given == declared):
            raise ConfigError(f"config has model_type {show_value(given)}, expected {declared!r} for {cls.__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} option(s) {unknown}")
        known = {k: v for k, v in hf.items() if k in names}
        extra = {k: v for k, v in hf.items() if k not in names and k not in _HF_BOOKKEEPING}
        return cls(**{**known, **overrides}, extra=extra)

    def to_hf_config(self) -> dict[str, Any]:
        """The HF `config.json` dict (without `architectures`, which depends on the head)."""
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra" and f.name not in self._RUN_OPTIONS:
                out[f.name] = _thaw(getattr(self, f.name))
        out["model_type"] = self.model_type
        return out

    @property
    def position_limit(self) -> int | None:
        """The longest sequence the model can place (a learned position table), or `None`
        when positions are computed (rotary, sinusoidal) and any length works."""
        return None

    def run_options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._RUN_OPTIONS}

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def require(condition: bool, message: str) -> None:
    """Raises `ConfigError(message)` unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


def with_run_options(model: Any, **options: Any) -> Any:
    """A copy of `model` whose configs carry new run options, e.g.
    `with_run_options(model, scan_layers=False, remat=True)`. Parameters are shared.

    Configs are static fields (part of the tree structure, not leaves), so `eqx.tree_at`
    cannot replace them; this rebuilds the modules that hold one.
    """
    unknown = set(options) - set(ModelConfig._RUN_OPTIONS)
    if unknown:
        raise ConfigError(f"unknown run option(s) {sorted(unknown)}; known: {list(ModelConfig._RUN_OPTIONS)}")

    def rebuild(node: Any) -> Any:
        if isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
            return type(node)(rebuild(item) for item in node)
        if not isinstance(node, eqx.Module):
            return node
        copy = object.__new__(type(node))
        for field in dataclasses.fields(node):
            value = getattr(node, field.name)
            value = value.replace(**options) if isinstance(value, ModelConfig) else rebuild(value)
            object.__setattr__(copy, field.name, value)
        return copy

    return rebuild(model)
