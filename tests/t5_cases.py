"""Random tiny HF T5-family models (T5, the FLAN-T5 / T5 v1.1 layout, mT5) for tests/test_t5.py,
and the checkpoint formats they are written in."""

import dataclasses
import json
from pathlib import Path

import flax.serialization
import numpy as np
import torch
import transformers
from oracle import randomise
from shapes import T5


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    prefix: str  # HF's class-name prefix: "T5" or "MT5"
    config: dict

    def hf_config(self, **overrides) -> transformers.PretrainedConfig:
        return getattr(transformers, f"{self.prefix}Config")(**{**self.config, **overrides})

    def hf_class(self, head: str) -> type:
        """HF's class `{prefix}{head}`, `head` one of `ForConditionalGeneration`, `Model`, `EncoderModel`."""
        return getattr(transformers, self.prefix + head)

    def build(self, head: str = "ForConditionalGeneration", *, seed: int = 0, **overrides) -> torch.nn.Module:
        """A random model with every parameter randomised (in eval mode)."""
        torch.manual_seed(seed)
        return randomise(self.hf_class(head)(self.hf_config(**overrides)), seed)

    def save(self, folder, head: str = "ForConditionalGeneration", *, seed: int = 0, **overrides) -> torch.nn.Module:
        model = self.build(head, seed=seed, **overrides)
        model.save_pretrained(folder)
        return model


CASES = {
    # the original T5: ReLU feed-forward, LM head tied to the embedding (rescaled by d_model ** -0.5)
    "t5": Case("t5", "T5", T5),
    # T5 v1.1 / FLAN-T5: gated tanh-GELU, untied head; here also a deeper encoder than decoder
    "flan-t5": Case(
        "flan-t5",
        "T5",
        {
            **T5,
            "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": False,
            "num_layers": 3,
            "num_decoder_layers": 2,
        },
    ),
    # mT5: model_type "mt5" and HF's MT5* classes (gated-gelu and untied by default)
    "mt5": Case("mt5", "MT5", T5),
}


def right_padded(rng: np.random.Generator, vocab: int, lengths: list[int], pad: int = 0):
    """Random ids `[batch, max(lengths)]` (none of them pad or EOS), each row right-padded."""
    seq = max(lengths)
    mask = (np.arange(seq)[None] < np.array(lengths)[:, None]).astype(np.int64)
    ids = np.where(mask, rng.integers(2, vocab, (len(lengths), seq)), pad)
    return ids, mask


def flax_params(reference: torch.nn.Module) -> dict:
    """The nested parameters HF's `FlaxT5ForConditionalGeneration` (or `FlaxMT5...`) holds
    for the PyTorch model `reference`: `kernel` transposed, `embedding`, layer-norm `weight`,
    no tied copies of `shared` (HF's Flax T5 no longer initialises on current JAX, so it
    cannot write them itself)."""
    tied = reference.config.tie_word_embeddings
    skipped = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", *(["lm_head.weight"] if tied else [])}
    params: dict = {}
    for name, value in reference.state_dict().items():
        if name in skipped:
            continue
        array = value.numpy()
        stem = name.removesuffix(".weight")
        if "layer_norm" in name:
            leaf = "weight"
        elif "relative_attention_bias" in name or name == "shared.weight":
            leaf = "embedding"
        else:
            leaf, array = "kernel", array.T
        node = params
        for part in stem.split("."):
            node = node.setdefault(part, {})
        node[leaf] = array
    return params


def write_flax_msgpack(reference: torch.nn.Module, folder: Path, max_shard_size: str = "10GB") -> None:
    """`flax_model.msgpack` (or its shards and index) as HF's Flax `save_pretrained` writes
    them, using HF's own sharding function, beside the model's `config.json`."""
    from flax.traverse_util import unflatten_dict
    from transformers.modeling_flax_utils import flax_shard_checkpoint

    folder.mkdir(parents=True)
    reference.config.to_json_file(folder / "config.json")
    params = flax_params(reference)
    shards, index = flax_shard_checkpoint(params, max_shard_size)
    if index is None:  # one file: the nested parameters
        (folder / "flax_model.msgpack").write_bytes(flax.serialization.to_bytes(params))
        return
    for name, shard in shards.items():  # shards hold "/"-joined paths: nested again, as HF writes them
        (folder / name).write_bytes(flax.serialization.to_bytes(unflatten_dict(shard, sep="/")))
    (folder / "flax_model.msgpack.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
