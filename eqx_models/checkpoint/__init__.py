"""Checkpoint readers, key maps, and conversion between HF folders and Equinox trees.

The loading functions live in `eqx_models.checkpoint.io` (re-exported by `eqx_models`).
"""

from .keymap import KeyMap, LoadReport

__all__ = ["KeyMap", "LoadReport"]
