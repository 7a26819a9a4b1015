"""Every registered class as a random tiny HF PyTorch model, and its HF Flax twin where
transformers has one, for tests/test_state_dict.py. Configs come from the family fixture
modules (tests/cases.py, tests/decoder_cases.py, tests/t5_cases.py)."""

import jax
import jax.numpy as jnp
import torch
import transformers
from cases import BIG_BIRD, GPT_NEO, LONG_T5
from decoder_cases import GEMMA, XGLM
from oracle import randomise
from shapes import T5

from eqx_models.models import FAMILIES, all_classes

#: model_type -> (HF config class, its arguments): one tiny config per family. The T5 one ties
#: its head (a tied copy to write back), mT5's does not (an `lm_head` of its own); LongT5 uses
#: transient-global attention (its extra tables and norm).
CONFIGS = {
    "gpt_neo": ("GPTNeoConfig", {**GPT_NEO, "num_layers": 2, "attention_types": [[["global", "local"], 1]]}),
    "gemma": ("GemmaConfig", GEMMA),
    "xglm": ("XGLMConfig", XGLM),
    "big_bird": ("BigBirdConfig", BIG_BIRD),
    "longt5": ("LongT5Config", {**LONG_T5, "encoder_attention_type": "transient-global"}),
    "t5": ("T5Config", T5),
    "mt5": ("MT5Config", T5),
}
assert CONFIGS.keys() == FAMILIES.keys()

CLASSES = [cls.__name__ for cls in all_classes()]
#: The registered classes transformers 4.57.6 also has in Flax (all but LongT5EncoderModel).
FLAX_CLASSES = [name for name in CLASSES if hasattr(transformers, "Flax" + name)]


def model_type(name: str) -> str:
    return next(t for t, family in FAMILIES.items() if name in family.by_name())


def hf_config(name: str, **overrides) -> transformers.PretrainedConfig:
    config_class, kwargs = CONFIGS[model_type(name)]
    return getattr(transformers, config_class)(**{**kwargs, **overrides})


def torch_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """HF's PyTorch class `name` on its family's tiny config, every parameter random."""
    torch.manual_seed(seed)
    return randomise(getattr(transformers, name)(hf_config(name, **overrides)), seed)


def legacy_clip(a, a_min=None, a_max=None, *, min=None, max=None):
    """`jnp.clip` accepting the `a_min`/`a_max` keywords JAX removed, which HF's Flax T5 and
    LongT5 still pass; tests install it with `monkeypatch.setattr(jnp, "clip", legacy_clip)`
    so that those classes run at all."""
    return _CLIP(a, a_min if min is None else min, a_max if max is None else max)


_CLIP = jnp.clip


def flax_twin(name: str, folder) -> transformers.FlaxPreTrainedModel:
    """HF's Flax class of `name` loaded from the PyTorch checkpoint in `folder` by
    transformers' own PyTorch-to-Flax conversion (`from_pt=True`)."""
    with jax.numpy_dtype_promotion("standard"):  # HF's Flax code relies on implicit promotion
        return getattr(transformers, "Flax" + name).from_pretrained(folder, from_pt=True)
