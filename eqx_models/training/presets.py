"""Model sizes to train from scratch, as HF `config.json` fields per family.

The vocabulary and special-token ids are not part of a preset: the trainer sets them
from the tokenizer. `tiny` runs in seconds (tests, smoke runs); `small` is a few million
parameters, trainable on a laptop CPU; the third size of each family is the published
architecture's shape.
"""

from typing import Any

from ..errors import ConfigError
from ..models import FAMILIES

_NO_DROPOUT_NEO = {"embed_dropout": 0.0, "attention_dropout": 0.0, "resid_dropout": 0.0}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "gpt_neo": {
        "tiny": {
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "attention_types": [[["global", "local"], 1]],
            "window_size": 32,
            "max_position_embeddings": 256,
            **_NO_DROPOUT_NEO,
        },
        "small": {  # examples/stdlib-gpt-neo
            "hidden_size": 192,
            "num_layers": 6,
            "num_heads": 6,
            "attention_types": [[["global", "local"], 3]],
            "window_size": 128,
            "max_position_embeddings": 512,
            **_NO_DROPOUT_NEO,
        },
        "125M": {
            "hidden_size": 768,
            "num_layers": 12,
            "num_heads": 12,
            "attention_types": [[["global", "local"], 6]],
            "window_size": 256,
            "max_position_embeddings": 2048,
        },
    },
    "gemma": {
        "tiny": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "max_position_embeddings": 256,
        },
        "small": {
            "hidden_size": 256,
            "intermediate_size": 768,
            "num_hidden_layers": 6,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "max_position_embeddings": 2048,
        },
        "2b": {
            "hidden_size": 2048,
            "intermediate_size": 16384,
            "num_hidden_layers": 18,
            "num_attention_heads": 8,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "max_position_embeddings": 8192,
        },
    },
    "xglm": {
        "tiny": {
            "d_model": 64,
            "ffn_dim": 128,
            "num_layers": 2,
            "attention_heads": 4,
            "max_position_embeddings": 256,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "activation_dropout": 0.0,
        },
        "small": {
            "d_model": 256,
            "ffn_dim": 1024,
            "num_layers": 6,
            "attention_heads": 8,
            "max_position_embeddings": 2048,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "activation_dropout": 0.0,
        },
        "564M": {"d_model": 1024, "ffn_dim": 4096, "num_layers": 24, "attention_heads": 16},
    },
    "big_bird": {  # a causal LM: HF runs decoders with full attention
        "tiny": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 256,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
        "small": {
            "hidden_size": 256,
            "intermediate_size": 1024,
            "num_hidden_layers": 6,
            "num_attention_heads": 8,
            "max_position_embeddings": 512,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
        "base": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
    },
    "longt5": {  # trained to continue text: the encoder reads a row's first half, the decoder writes the rest
        "tiny": {
            "d_model": 64,
            "d_kv": 16,
            "d_ff": 128,
            "num_layers": 2,
            "num_heads": 4,
            "local_radius": 16,
            "global_block_size": 8,
            "encoder_attention_type": "transient-global",
            "dropout_rate": 0.0,
        },
        "small": {
            "d_model": 256,
            "d_kv": 32,
            "d_ff": 1024,
            "num_layers": 6,
            "num_heads": 8,
            "local_radius": 64,
            "global_block_size": 16,
            "encoder_attention_type": "transient-global",
            "dropout_rate": 0.0,
        },
        "base": {
            "d_model": 768,
            "d_kv": 64,
            "d_ff": 2048,
            "num_layers": 12,
            "num_heads": 12,
            "local_radius": 127,
            "global_block_size": 16,
            "encoder_attention_type": "transient-global",
            "feed_forward_proj": "gated-gelu",
        },
    },
    "t5": {  # trained as LongT5: the encoder reads a row's first half, the decoder writes the rest
        "tiny": {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4, "dropout_rate": 0.0},
        "small": {"d_model": 256, "d_kv": 32, "d_ff": 1024, "num_layers": 6, "num_heads": 8, "dropout_rate": 0.0},
        "base": {  # t5-v1_1-base / flan-t5-base
            "d_model": 768,
            "d_kv": 64,
            "d_ff": 2048,
            "num_layers": 12,
            "num_heads": 12,
            "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": False,
        },
    },
}

PRESETS["mt5"] = {
    size: {**fields, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
    for size, fields in PRESETS["t5"].items()
}

#: The head each family trains on text with: its language model, from the registry.
TEXT_HEADS: dict[str, str] = {
    model_type: next(cls.__name__ for cls in family.classes if cls.task in ("causal_lm", "seq2seq_lm"))
    for model_type, family in FAMILIES.items()
}
# The config fields that make BigBird's causal-LM head a decoder.
_HEAD_FIELDS: dict[str, dict[str, Any]] = {"big_bird": {"is_decoder": True, "attention_type": "original_full"}}


def preset_config(family: str, size: str) -> dict[str, Any]:
    """The HF `config.json` dict of `family` at `size` (without vocabulary and token ids)."""
    if family not in PRESETS:
        raise ConfigError(f"unknown model family {family!r}; known: {', '.join(PRESETS)}")
    sizes = PRESETS[family]
    if size not in sizes:
        raise ConfigError(f"no preset {size!r} for {family}; known: {', '.join(sizes)}")
    return {
        "model_type": family,
        "architectures": [TEXT_HEADS[family]],
        **sizes[size],
        **_HEAD_FIELDS.get(family, {}),
    }
