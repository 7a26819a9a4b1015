"""Fixtures of the filesystem-safety tests: a tiny model, a foreign HF folder, and a
snapshot of a folder tree to prove that nothing in it changed."""

import os
import stat
from pathlib import Path

import jax

import eqx_models
from eqx_models.models import GPTNeoConfig, GPTNeoForCausalLM

TINY_NEO = dict(
    vocab_size=31,
    hidden_size=8,
    num_heads=2,
    num_layers=2,
    max_position_embeddings=16,
    window_size=3,
    attention_types=((("global", "local"), 1),),
)


def tiny_model(seed: int = 0) -> GPTNeoForCausalLM:
    """A 2-layer GPT-Neo of a few hundred parameters; `seed` makes its weights distinct."""
    return GPTNeoForCausalLM(GPTNeoConfig(**TINY_NEO), key=jax.random.key(seed))


def foreign_hf_folder(folder: Path, seed: int = 0, *, tokenizer: bool = True) -> Path:
    """A HF checkpoint folder as a user has it: weights, config, a tokenizer file and a
    README, and none of our markers."""
    eqx_models.export_hf(tiny_model(seed), folder)
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            entry.unlink()
    if tokenizer:
        (folder / "tokenizer_config.json").write_text('{"model_max_length": 16}\n')
    (folder / "README.md").write_text("the user's notes\n")
    return folder


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root` (not following symlinks): its kind and content (bytes of a
    file, target of a link) and permission bits."""
    found = {}
    for path, folders, files in os.walk(root):
        for name in folders + files:
            full = Path(path) / name
            info = full.lstat()
            key = str(full.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                found[key] = ("link", os.readlink(full))
                folders[:] = [f for f in folders if f != name]
            elif stat.S_ISDIR(info.st_mode):
                found[key] = ("dir", stat.S_IMODE(info.st_mode))
            else:
                found[key] = ("file", full.read_bytes(), stat.S_IMODE(info.st_mode))
    return found


def leftovers(root: Path) -> list[str]:
    """Temporary folders, lock files and set-aside folders of our atomic writes under `root`."""
    return sorted(
        str(Path(path, name).relative_to(root))
        for path, folders, files in os.walk(root)
        for name in folders + files
        if name.startswith(".") and any(tag in name for tag in (".tmp-", ".old-", ".lock"))
    )


def train_flags(corpus: Path, output: Path, **changes) -> list[str]:
    """`eqx-models train` flags of a tiny byte-level GPT-Neo run on `corpus`."""
    settings = {
        "family": "gpt_neo",
        "size": "tiny",
        "data": str(corpus),
        "tokenizer": "bytes",
        "eval_fraction": 0.2,
        "seq_len": 32,
        "batch_size": 4,
        "steps": 12,
        "warmup_steps": 2,
        "eval_every": 4,
        "eval_batches": 1,
        "checkpoint_every": 1,
        "keep_checkpoints": 2,
        "output": str(output),
        "sample_prompt": "",
        **changes,
    }
    flags = ["train", "--no-progress"]
    for name, value in settings.items():
        flags += ["--" + name.replace("_", "-"), str(value)]
    return flags
