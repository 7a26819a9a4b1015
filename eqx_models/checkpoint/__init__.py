"""Checkpoint readers, key maps, and conversion between HF folders and Equinox trees.

Loading and saving whole models (the application layer) is `eqx_models.pretrained`.
"""

from .keymap import KeyMap, LoadReport

__all__ = ["KeyMap", "LoadReport"]
