"""LoRA cases for tests/test_lora.py: a random tiny HF model of each family, the PEFT targets
it is adapted on, a padded batch, and the logits of HF (through `peft`) and of ours."""

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import peft
import torch
import transformers
from cases import LONG_T5, bird_batch, hf_bird
from decoder_cases import CASES as DECODERS
from oracle import float64_truth, hf_positions, left_padded, randomise
from t5_cases import CASES as T5_CASES
from t5_cases import right_padded

import eqx_models


def tolerance(expected: np.ndarray) -> float:
    """The issue's bound: 2e-5 + 1e-4 * max |reference|."""
    return 2e-5 + 1e-4 * float(np.abs(expected).max())


def _decoder_batch(vocab: int) -> Callable[[np.random.Generator], dict]:
    def batch(rng):
        ids, mask = left_padded(rng, vocab, [9, 6, 3])
        return {"input_ids": ids, "attention_mask": mask, "position_ids": hf_positions(mask)}

    return batch


def _seq2seq_batch(vocab: int) -> Callable[[np.random.Generator], dict]:
    def batch(rng):
        ids, mask = right_padded(rng, vocab, [11, 7])
        dec, dec_mask = right_padded(rng, vocab, [6, 4])
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "decoder_attention_mask": dec_mask}

    return batch


def _decoder_logits(model, batch):
    return jax.vmap(lambda i, m, p: model(i, attention_mask=m, position_ids=p))(
        batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    )


def _seq2seq_logits(model, batch):
    return jax.vmap(lambda i, m, d, dm: model(i, d, attention_mask=m, decoder_attention_mask=dm))(
        batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], batch["decoder_attention_mask"]
    )


def _classifier_logits(model, batch):
    return jax.vmap(lambda i, m, t: model(i, attention_mask=m, token_type_ids=t))(
        batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    )


def _long_t5(folder: Path, seed: int) -> torch.nn.Module:
    config = transformers.LongT5Config(
        **{**LONG_T5, "encoder_attention_type": "transient-global", "feed_forward_proj": "gated-gelu"}
    )
    torch.manual_seed(seed)
    model = randomise(transformers.LongT5ForConditionalGeneration(config), seed)
    model.save_pretrained(folder)
    return model


@dataclasses.dataclass(frozen=True)
class LoraCase:
    id: str
    save_base: Callable[[Path, int], torch.nn.Module]  # (folder, seed) -> the saved HF model
    targets: tuple[str, ...] | str
    batch: Callable[[np.random.Generator], dict]
    ours: Callable  # (model, batch) -> logits
    compare: str | None  # the batch entry masking the compared positions (None: all)
    lora: dict = dataclasses.field(default_factory=dict)  # more LoraConfig options

    def peft_config(self, **changes) -> peft.LoraConfig:
        options = {"r": 4, "lora_alpha": 8, "target_modules": self.targets, **self.lora, **changes}
        return peft.LoraConfig(**options)

    def mask(self, batch: dict, logits: np.ndarray) -> np.ndarray:
        """Which rows of `logits` (all but the last axis) hold real tokens."""
        return np.ones(logits.shape[:-1], bool) if self.compare is None else batch[self.compare].astype(bool)


def hf_logits(model: torch.nn.Module, batch: dict) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()


def float64_logits(model: torch.nn.Module, batch: dict) -> np.ndarray | None:
    """`hf_logits` of a float64 copy of `model` (`oracle.float64_truth`), or `None`."""
    return float64_truth(hf_logits, model, batch)


def randomise_adapters(peft_model: torch.nn.Module, seed: int, std: float = 0.3) -> torch.nn.Module:
    """Every `lora_A` and `lora_B` random (PEFT starts B at zero, which would test nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return peft_model.eval()


def peft_adapter(case: LoraCase, folder: Path, *, seed: int = 0, **changes) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The base saved in `folder/base`, adapted by `peft` with random adapters saved in
    `folder/adapter`. Returns the PEFT model and a fresh copy of the base."""
    base = case.save_base(folder / "base", seed)
    fresh = copy.deepcopy(base)
    adapted = randomise_adapters(peft.get_peft_model(base, case.peft_config(**changes)), seed + 1)
    adapted.save_pretrained(folder / "adapter")
    return adapted, fresh


def our_logits(case: LoraCase, model, batch: dict) -> np.ndarray:
    return np.asarray(_compiled(case.ours, model, {k: jax.numpy.asarray(v) for k, v in batch.items()}))


@eqx.filter_jit
def _compiled(forward, model, batch):
    return forward(model, batch)


def load_base(folder: Path):
    return eqx_models.from_pretrained(folder / "base")


CASES = {
    "gpt-neo": LoraCase(
        "gpt-neo",
        lambda folder, seed: DECODERS["gpt-neo"].save(folder, seed=seed),
        ("q_proj", "v_proj", "c_fc"),
        _decoder_batch(DECODERS["gpt-neo"].config["vocab_size"]),
        _decoder_logits,
        "attention_mask",
    ),
    "gemma": LoraCase(  # grouped KV heads (fused q/k/v with adapters on all three), rsLoRA
        "gemma",
        lambda folder, seed: DECODERS["gemma-gqa2"].save(folder, seed=seed),
        ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
        _decoder_batch(DECODERS["gemma-gqa2"].config["vocab_size"]),
        _decoder_logits,
        "attention_mask",
        {"use_rslora": True, "lora_alpha": 6},
    ),
    "xglm": LoraCase(
        "xglm",
        lambda folder, seed: DECODERS["xglm"].save(folder, seed=seed),
        ("q_proj", "v_proj", "fc1"),
        _decoder_batch(DECODERS["xglm"].config["vocab_size"]),
        _decoder_logits,
        "attention_mask",
        {"lora_alpha": 5.5},
    ),
    "big-bird-classifier": LoraCase(  # "dense" is in every layer and in the classification head
        "big-bird-classifier",
        lambda folder, seed: hf_bird(folder, "BigBirdForSequenceClassification", seed=seed),
        ("query", "value", "dense", "out_proj"),
        lambda rng: bird_batch(rng),
        _classifier_logits,
        None,
    ),
    "t5": LoraCase(  # a regular expression, as PEFT accepts: the encoder's and decoder's q and v
        "t5",
        lambda folder, seed: T5_CASES["t5"].save(folder, seed=seed),
        r".*\.(SelfAttention|EncDecAttention)\.(q|v)|.*\.wo",
        _seq2seq_batch(T5_CASES["t5"].config["vocab_size"]),
        _seq2seq_logits,
        "decoder_attention_mask",
    ),
    "long-t5": LoraCase(
        "long-t5",
        _long_t5,
        ("q", "k", "v", "o", "wi_0", "wi_1"),
        _seq2seq_batch(LONG_T5["vocab_size"]),
        _seq2seq_logits,
        "decoder_attention_mask",
        {"lora_alpha": 16},
    ),
}
