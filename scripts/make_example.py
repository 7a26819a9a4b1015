"""Writes `examples/stdlib-gpt-neo` from a finished run of `examples/stdlib-gpt-neo.toml`.

    eqx-models train --config examples/stdlib-gpt-neo.toml     # about 95 minutes on 2 cores
    python scripts/make_example.py                             # needs the `hf` extra

The run's HF-format model is stored in bfloat16 (half the size; `from_pretrained` and
`transformers` load it as float32), re-evaluated on the run's evaluation split after that
rounding, and checked against `transformers`: its logits, and greedy generation token
for token. The folder gets a model card (`README.md`) with the numbers.
"""

import argparse
import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
import transformers

import eqx_models
from eqx_models import train as run
from eqx_models.generation import generate
from eqx_models.pretrained import export_hf, load_with_report, tokenizer_files
from eqx_models.text import Tokenizer
from eqx_models.training.data import split_documents
from eqx_models.training.loop import evaluate

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ("def ", "class ", "import ", "    for i in range(")


def eval_bits_per_byte(model, config: run.TrainConfig, codec: Tokenizer) -> tuple[float, float, float]:
    """(loss in nats/token, bits/byte, unigram bits/byte) on the run's evaluation split."""
    docs = run._documents(config)
    train_docs, eval_docs = split_documents(docs, config.eval_fraction, config.seed)
    eos = codec.token_to_id("<eos>")
    tokens = run.Tokens(codec, codec.vocab_size, pad=0, eos=eos, file=None)
    train_ids = run.tokenize(train_docs, codec, eos)
    evals = run._eval_set(config, tokens, eval_docs, train_ids)
    objective = run._objective(model, config)
    loss = evaluate(model, (objective(b) for b in evals.batches()))["loss"]
    return loss, loss * evals.tokens / (evals.bytes * math.log(2)), evals.unigram_bits_per_byte


def greedy_matches_transformers(folder: Path, codec: Tokenizer, new_tokens: int = 48) -> list[tuple[str, bool]]:
    ours = eqx_models.from_pretrained(folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    results = []
    for prompt in PROMPTS:
        ids = codec.encode(prompt)
        mine = np.asarray(generate(ours, jnp.asarray([ids], jnp.int32), max_new_tokens=new_tokens))[0]
        with torch.no_grad():
            hf = theirs.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)[0].numpy()
        n = min(len(mine), len(hf))
        results.append((prompt + codec.decode(mine[len(ids) :].tolist()), bool((mine[:n] == hf[:n]).all())))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "examples" / "stdlib-gpt-neo.toml"))
    parser.add_argument("--out", default=str(ROOT / "examples" / "stdlib-gpt-neo"))
    args = parser.parse_args()
    config = run.TrainConfig.from_file(args.config)
    source = Path(config.output) / "model"
    summary = json.loads((Path(config.output) / "summary.json").read_text())

    model, _ = load_with_report(source, dtype="bfloat16")
    export_hf(model, args.out, extra_files=tokenizer_files(source))
    out = Path(args.out)
    codec = Tokenizer.from_file(out / "tokenizer.json")
    loss, bpb, unigram = eval_bits_per_byte(eqx_models.from_pretrained(out), config, codec)
    samples = greedy_matches_transformers(out, codec)
    size = (out / "model.safetensors").stat().st_size / 2**20
    print(f"bfloat16 weights ({size:.1f} MiB): eval {loss:.4f} nats/token, {bpb:.3f} bits/byte (unigram {unigram:.3f})")
    for text, same in samples:
        print(f"greedy equals transformers: {same}\n{text}\n")

    tokens = summary["steps"] * config.batch_size * config.seq_len
    card = "\n".join(
        [
            "# stdlib-gpt-neo",
            "",
            f"A {summary['parameters'] / 1e6:.2f}M-parameter GPT-Neo trained by `eqx-models train` on the Python",
            "standard library's own sources (no test suites, no GUI modules), with a 4096-token byte-level BPE",
            "trained on the same files. It writes code-looking Python; it is a demonstration, not a useful model.",
            "",
            "- Trained with `eqx-models train --config examples/stdlib-gpt-neo.toml`: "
            f"{summary['steps']} steps of {config.batch_size} x {config.seq_len} tokens",
            f"  ({tokens / 1e6:.1f}M tokens) in {summary['seconds'] / 60:.0f} minutes on a 2-core CPU "
            f"({summary['tokens_per_s']:.0f} tokens/s).",
            f"- Held-out files ({config.eval_fraction:.0%} of the documents, chosen by a hash of their path): "
            f"{summary['eval_bits_per_byte']:.3f} bits per byte",
            f"  after training (float32), {bpb:.3f} with these bfloat16 weights; a unigram model of the training",
            f"  tokens scores {unigram:.3f}.",
            f"- Stored in bfloat16 ({size:.1f} MiB); `eqx_models.from_pretrained` and `transformers` load it as",
            "  float32. `python scripts/make_example.py` wrote this folder and checked that `transformers`",
            "  generates the same greedy tokens.",
            "",
            "Greedy samples (48 new tokens):",
            "",
            *(f"```python\n{text}\n```\n" for text, _ in samples),
        ]
    )
    (out / "README.md").write_text(card)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
