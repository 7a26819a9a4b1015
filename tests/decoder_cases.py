"""Random tiny HF decoder-only models of each family (Gemma, XGLM, GPT-Neo), for the shared decoder tests."""

import dataclasses

import torch
import transformers
from cases import GPT_NEO
from oracle import randomise


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    config_class: str
    lm_class: str
    base_class: str
    flax_class: str
    config: dict

    def hf_config(self, **overrides):
        return getattr(transformers, self.config_class)(**{**self.config, **overrides})

    def save(self, folder, *, head=True, seed=0, **overrides):
        torch.manual_seed(seed)
        cls = getattr(transformers, self.lm_class if head else self.base_class)
        model = randomise(cls(self.hf_config(**overrides)), seed)
        model.save_pretrained(folder)
        return model


GEMMA = dict(
    vocab_size=89,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=12,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
)
XGLM = dict(
    vocab_size=83,
    d_model=32,
    ffn_dim=56,
    num_layers=3,
    attention_heads=4,
    max_position_embeddings=128,
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)

CASES = {
    "gemma-mqa": Case("gemma-mqa", "GemmaConfig", "GemmaForCausalLM", "GemmaModel", "FlaxGemmaForCausalLM", GEMMA),
    "gemma-gqa2": Case(
        "gemma-gqa2",
        "GemmaConfig",
        "GemmaForCausalLM",
        "GemmaModel",
        "FlaxGemmaForCausalLM",
        {**GEMMA, "num_key_value_heads": 2},
    ),
    "gemma-gqa3": Case(
        "gemma-gqa3",
        "GemmaConfig",
        "GemmaForCausalLM",
        "GemmaModel",
        "FlaxGemmaForCausalLM",
        {**GEMMA, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 8},
    ),
    "gemma-mha-bias": Case(
        "gemma-mha-bias",
        "GemmaConfig",
        "GemmaForCausalLM",
        "GemmaModel",
        "FlaxGemmaForCausalLM",
        {
            **GEMMA,
            "num_key_value_heads": 4,
            "attention_bias": True,
            "rope_theta": 500.0,
            "hidden_act": "gelu",
            "tie_word_embeddings": False,
        },
    ),
    "xglm": Case("xglm", "XGLMConfig", "XGLMForCausalLM", "XGLMModel", "FlaxXGLMForCausalLM", XGLM),
    "xglm-unscaled": Case(
        "xglm-unscaled",
        "XGLMConfig",
        "XGLMForCausalLM",
        "XGLMModel",
        "FlaxXGLMForCausalLM",
        {**XGLM, "scale_embedding": False, "activation_function": "relu"},
    ),
    # tests/cases.py's GPT-Neo (window 3) as hf_neo builds it: global and local layers alternating
    "gpt-neo": Case(
        "gpt-neo",
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        "GPTNeoModel",
        "FlaxGPTNeoForCausalLM",
        {**GPT_NEO, "num_layers": 4, "attention_types": [[["global", "local"], 2]], "pad_token_id": 0},
    ),
}
