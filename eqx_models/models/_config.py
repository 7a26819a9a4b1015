"""The base of every architecture's config: a frozen dataclass that reads and writes
HuggingFace `config.json` dictionaries, checked on creation by `eqx_models.validation`.
"""

import dataclasses
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, TypeVar

from ..errors import ConfigError
from ..nn import ACTIVATIONS
from ..validation import Relation, Satisfies, check_fields, show_value, thaw

# HF bookkeeping keys that describe a file, not a model; rewritten on export.
_HF_BOOKKEEPING = ("model_type", "architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype")

Activation = Annotated[
    str, Satisfies(ACTIVATIONS.__contains__, f"naming a supported activation ({', '.join(sorted(ACTIVATIONS))})")
]


# --------------------------------------------------------------------------- configs

C = TypeVar("C", bound="ModelConfig")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Fields shared by every config.

    `extra` keeps the HF keys a model does not use, so export writes them back. How the
    layers run (scan, remat) is not part of the config: see `nn.RunOptions`.
    """

    model_type: ClassVar[str]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

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
            if f.name != "extra":
                out[f.name] = thaw(getattr(self, f.name))
        out["model_type"] = self.model_type
        return out

    @property
    def position_limit(self) -> int | None:
        """The longest sequence the model can place (a learned position table), or `None`
        when positions are computed (rotary, sinusoidal) and any length works."""
        return None

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)
