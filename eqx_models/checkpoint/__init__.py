"""Checkpoint readers, key maps, and conversion between HF folders and Equinox trees.

Loading and saving whole models (the application layer) is `eqx_models.pretrained`.
"""

from ._msgpack import decode_flax_msgpack, encode_flax_msgpack
from .keymap import KeyMap, LoadReport
from .layout import FLAX_LEAF_NAMES, tree_from_flax, tree_to_flax

__all__ = [
    "FLAX_LEAF_NAMES",
    "KeyMap",
    "LoadReport",
    "decode_flax_msgpack",
    "encode_flax_msgpack",
    "tree_from_flax",
    "tree_to_flax",
]
