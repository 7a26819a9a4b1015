"""Random tiny configs and HF PyTorch model factories of the GPT-Neo, BigBird and LongT5
families, shared by the test modules (Gemma and XGLM: tests/decoder_cases.py; T5 and mT5:
tests/t5_cases.py)."""

import numpy as np
import pytest
import torch
import transformers
from oracle import randomise
from shapes import GPT_NEO


def hf_neo(tmp_path, seed=0, head=transformers.GPTNeoForCausalLM, **overrides):
    config = transformers.GPTNeoConfig(
        **{**GPT_NEO, "num_layers": 4, "attention_types": [[["global", "local"], 2]], **overrides}
    )
    torch.manual_seed(seed)
    model = randomise(head(config), seed)
    model.save_pretrained(tmp_path)
    return model


BIG_BIRD = dict(
    vocab_size=91,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=40,
    max_position_embeddings=96,
    type_vocab_size=3,
    attention_type="original_full",
    hidden_act="gelu_new",
    sep_token_id=5,
    num_labels=3,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
)


def hf_bird(folder, head, seed=0, **overrides):
    torch.manual_seed(seed)
    model = randomise(getattr(transformers, head)(transformers.BigBirdConfig(**{**BIG_BIRD, **overrides})), seed)
    model.save_pretrained(folder)
    return model


def right_padded(rng, lengths, seq=None):
    """Random BigBird ids, mask and token types `[batch, seq]`, each row right-padded."""
    seq = seq or max(lengths)
    ids = rng.integers(6, BIG_BIRD["vocab_size"], (len(lengths), seq))
    mask = (np.arange(seq)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    types = rng.integers(0, BIG_BIRD["type_vocab_size"], ids.shape)
    return np.where(mask, ids, 0), mask, types


def bird_batch(rng, lengths=(13, 9, 4)):
    ids, mask, types = right_padded(rng, list(lengths))
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def mlm_labels(rng, batch):
    """Masked-LM labels: about 40% of the real tokens (at least the first of each row), -100 elsewhere."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    chosen = (rng.random(ids.shape) < 0.4) & (mask == 1)
    chosen[:, 0] = True  # at least one per row
    return np.where(chosen, rng.integers(0, BIG_BIRD["vocab_size"], ids.shape), -100)


LONG_T5 = dict(
    vocab_size=73,
    d_model=24,
    d_kv=6,
    d_ff=40,
    num_layers=3,
    num_heads=4,
    local_radius=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    global_block_size=4,
)


def hf_long_t5_encoder(folder, seed=0, **overrides):
    torch.manual_seed(seed)
    model = randomise(transformers.LongT5EncoderModel(transformers.LongT5Config(**{**LONG_T5, **overrides})), seed)
    model.save_pretrained(folder)
    return model


def tiered(values, *fast):
    """Parameter values for `pytest.mark.parametrize` of which only those in `fast` run in the
    fast tier (`-m "not slow"`); the others are marked slow. A tuple is the arguments of a
    multi-name parametrisation. Test ids are the same as without it."""

    def param(value):
        return pytest.param(*value) if isinstance(value, tuple) else pytest.param(value)

    return [value if value in fast else pytest.param(*param(value).values, marks=pytest.mark.slow) for value in values]
