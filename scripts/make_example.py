"""Writes `examples/tiny-gpt-neo`: a small random GPT-Neo in HF format with a byte-level
vocabulary (ids 0-255 are bytes, 256 is end-of-text), for the README's first command.

    python scripts/make_example.py   # needs the `hf` extra (transformers, torch)
"""

from pathlib import Path

import torch
import transformers

OUT = Path(__file__).resolve().parent.parent / "examples" / "tiny-gpt-neo"


def main() -> None:
    config = transformers.GPTNeoConfig(
        vocab_size=257,
        hidden_size=64,
        num_layers=4,
        num_heads=4,
        max_position_embeddings=256,
        attention_types=[[["global", "local"], 2]],
        window_size=32,
        bos_token_id=256,
        eos_token_id=256,
    )
    torch.manual_seed(0)
    transformers.GPTNeoForCausalLM(config).save_pretrained(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
