"""The base of every architecture's config: a frozen dataclass that reads and writes
HuggingFace `config.json` dictionaries."""

import dataclasses
from typing import Any, ClassVar, TypeVar

from ..errors import ConfigError

# HF bookkeeping keys that describe a file, not a model; rewritten on export.
_HF_BOOKKEEPING = ("model_type", "architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype")


C = TypeVar("C", bound="ModelConfig")


def _freeze(value: Any) -> Any:
    """JSON lists become tuples so configs stay hashable (they are static in the model)."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Fields shared by every config.

    `extra` keeps the HF keys a model does not use, so export writes them back. How the
    layers run (scan, remat) is not part of the config: see `nn.RunOptions`.
    """

    model_type: ClassVar[str]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf_config(cls: type[C], hf: dict[str, Any], **overrides: Any) -> C:
        """Builds the config from a HF `config.json` dict; unknown keys go to `extra`."""
        declared = cls.model_type
        given = hf.get("model_type", declared)
        if given != declared:
            raise ConfigError(f"config has model_type {given!r}, expected {declared!r} for {cls.__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: _freeze(v) for k, v in hf.items() if k in names}
        extra = {k: v for k, v in hf.items() if k not in names and k not in _HF_BOOKKEEPING}
        return cls(**{**known, **overrides}, extra=extra)

    def to_hf_config(self) -> dict[str, Any]:
        """The HF `config.json` dict (without `architectures`, which depends on the head)."""
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = _thaw(getattr(self, f.name))
        out["model_type"] = self.model_type
        return out

    @property
    def position_limit(self) -> int | None:
        """The longest sequence the model can place (a learned position table), or `None`
        when positions are computed (rotary, sinusoidal) and any length works."""
        return None

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def require(condition: bool, message: str) -> None:
    """Raises `ConfigError(message)` unless `condition` holds."""
    if not condition:
        raise ConfigError(message)
