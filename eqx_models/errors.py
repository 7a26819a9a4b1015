"""Exceptions raised for bad user input.

Every error names what was wrong, what was received and, where possible, what is
allowed, so that a user never has to read a traceback from deep inside JAX.
"""


class EqxModelsError(Exception):
    """Base class of every error eqx_models raises on purpose."""


class ConfigError(EqxModelsError, ValueError):
    """A model configuration value is missing, unknown or unsupported."""


class CheckpointError(EqxModelsError, ValueError):
    """A checkpoint file or folder cannot be read, or does not fit the model."""


class InputError(EqxModelsError, ValueError):
    """Arguments to a model or to `generate` are malformed (ids out of range, too long...)."""


class HubError(CheckpointError):
    """A hub id cannot be resolved to a folder: no such repository or revision, no access, no
    network and no cached copy, or no supported weights in the repository."""


class BusyError(EqxModelsError, RuntimeError):
    """A server's queue of waiting requests is full: retry later (HTTP 429)."""
