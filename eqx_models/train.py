"""A whole training run from one `TrainConfig`: what `eqx-models train` executes.

Text files (or the standard library's sources) are split, tokenized and packed; a model is
built from a preset, an HF `config.json` or an existing checkpoint; AdamW with warmup +
cosine trains it on one device or a `data x fsdp x tensor` mesh; checkpoints, metrics and
evaluations go to the output folder, and at the end an HF-format model folder (with the
tokenizer) that `transformers` and `eqx-models generate` both load.

Every check that can fail runs before anything is compiled: the config's numbers, the
mesh against the devices and the batch, the data paths, the family and preset, the
sequence length against the model's position table, the tokenizer against the vocabulary.

The output folder:

```
OUTPUT/train_config.json   the config of the run (resuming checks it)
OUTPUT/tokenizer.json      the tokenizer (trained here for `bpe:N`)
OUTPUT/checkpoints/        step_XXXXXXXX/ train states, the newest `keep_checkpoints`
OUTPUT/metrics.jsonl       one line per step and per evaluation
OUTPUT/loss.png            the loss curve
OUTPUT/summary.json        final losses, bits per byte against the unigram baseline, timing
OUTPUT/model/              config.json + model.safetensors (+ tokenizer.json), HF format
OUTPUT/adapter/            with --lora-rank: adapter_config.json + adapter_model.safetensors, PEFT's
                           format (OUTPUT/model/ then holds the merged model, with --lora-merge only)
```

With `--lora-rank R` (a fine-tune: `--init-from` is required) the model gets LoRA adapters on
the `--lora-targets` layers (`eqx_models.lora`) and only the adapters train; the base weights
stay exactly as loaded, and the optimizer state covers the adapters alone. With
`--lora-quantize int8` the base is loaded quantised (`eqx_models.quantize`) and stays so while
training (QLoRA-style); `--lora-merge` then merges into the float weights the base stands for.

The same command runs on every process of a multi-process (multi-host) job: with
`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` set (or a cluster JAX
detects), the processes join one job and the mesh spans all their devices. Each computes
the same batches and feeds its devices their rows; process 0 alone writes the output
folder and logs.
"""

import dataclasses
import json
import os
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import lora
from .errors import ConfigError, InputError
from .files import check_destination
from .models import Model, Seq2SeqLM, resolve_class
from .quantize import Scheme
from .training.checkpoint import CheckpointManager, barrier, gather_to_host
from .training.data import (
    Document,
    PackedBatches,
    bits_per_byte,
    find_documents,
    split_documents,
    stdlib_sources,
    tokenize,
    train_bpe_tokenizer,
    unigram_bits_per_byte,
)
from .training.loop import fit, plot_losses, read_metrics, truncate_metrics
from .training.losses import head_loss
from .training.optim import adamw, warmup_cosine
from .training.presets import TEXT_HEADS, preset_config
from .training.step import TrainState, all_inexact, init_state, make_train_step
from .validation import (
    MAX_INT32,
    Count,
    NonNegativeFloat,
    PositiveFloat,
    Range,
    Relation,
    Satisfies,
    Size,
    Text,
    check_fields,
)

STDLIB = "stdlib"


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _is_mesh(spec: str) -> bool:
    parts = spec.lower().split("x")
    return len(parts) == 3 and all(part.strip().lstrip("-").isdigit() for part in parts)


def _is_tokenizer(spec: str) -> bool:
    """`bpe:N` must give a usable size; `bytes` and paths are checked when the run starts."""
    if not spec.startswith("bpe:"):
        return True
    size = spec[4:]
    return size.isdigit() and len(size) < 11 and 258 <= int(size) <= MAX_INT32


def _is_targets(spec: str) -> bool:
    return spec == "" or all(part.strip() for part in spec.split(","))


LoraTargets = Annotated[str, Satisfies(_is_targets, "of comma-separated module names, e.g. 'q_proj,v_proj'")]
Mesh = Annotated[str, Satisfies(_is_mesh, "of the form DATAxFSDPxTENSOR, e.g. '2x4x1' or '-1x1x1'")]
Tokenizer = Annotated[
    str,
    Satisfies(_is_tokenizer, "naming 'bytes', 'bpe:N' (N >= 258: the bytes and 2 special tokens) or a tokenizer.json"),
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a run needs. The CLI flags are these fields (`--seq-len` for `seq_len`);
    a TOML or JSON file holds the same names. Each field's annotation declares what it
    accepts (see `eqx_models.models._config.check_fields`), checked on creation."""

    # What to train.
    family: str = _field("gpt_neo", "model family: gpt_neo, gemma, xglm, big_bird, longt5")
    size: str = _field("small", "preset size of the family (tiny, small, or the published shape)")
    model_config: str | None = _field(None, "an HF config.json to train from scratch instead of a preset")
    init_from: str | None = _field(
        None, "fine-tune: start from this checkpoint folder (HF or eqx) or hub id, and its tokenizer"
    )
    revision: str | None = _field(None, "branch, tag or commit of an init_from hub id (default: main)")
    # Data.
    data: Annotated[tuple[str, ...], Satisfies(len, "with at least one entry")] = _field(
        (STDLIB,), "text files, folders, globs or .jsonl; 'stdlib' is Python's own sources"
    )
    jsonl_field: Text = _field("text", "the key holding the text in .jsonl records")
    tokenizer: Tokenizer = _field(
        "bpe:4096", "'bytes', 'bpe:N' (trained here on the training split) or a tokenizer.json"
    )
    eval_fraction: Annotated[float, Range(0, 1, open_high=True)] = _field(
        0.05, "share of documents held out for evaluation (by a hash of their path)"
    )
    seq_len: Size = _field(256, "tokens per training row")
    # Optimisation.
    batch_size: Size = _field(16, "rows per step (across all devices)")
    steps: Size = _field(1000, "optimizer steps in total")
    learning_rate: PositiveFloat = _field(1e-3, "peak learning rate")
    warmup_steps: Count = _field(100, "linear warmup steps, then cosine decay to 10%")
    weight_decay: NonNegativeFloat = _field(0.1, "AdamW weight decay (Linear weights only)")
    clip_norm: NonNegativeFloat = _field(1.0, "global gradient-norm clip; 0 turns it off")
    accumulate: Size = _field(1, "gradient accumulation: one update every N steps")
    # Schedule of side work.
    eval_every: Count = _field(250, "evaluate every N steps (and at the end); 0: only at the end")
    eval_batches: Count = _field(0, "evaluate on at most N batches; 0: the whole evaluation split")
    checkpoint_every: Size = _field(500, "save a checkpoint every N steps (and at the end)")
    keep_checkpoints: Size = _field(2, "checkpoints kept")
    # Hardware and numerics.
    mesh: Mesh = _field("-1x1x1", "device mesh DATAxFSDPxTENSOR; -1 is all remaining devices")
    bf16: bool = _field(False, "bfloat16 compute over float32 master weights")
    remat: bool = _field(False, "recompute each layer's activations in the backward pass (less memory)")
    seed: Annotated[int, Range(0, 2**63 - 1)] = _field(0, "seed of the initialisation, data order, split and dropout")
    # Output.
    output: str = _field("runs/train", "the run folder")
    resume: bool = _field(False, "continue from the newest checkpoint in the run folder")
    sample_prompt: Text = _field("def ", "greedy sample printed at the end ('' for none)")
    progress: bool = _field(True, "show a progress bar")
    # LoRA (eqx_models.lora): adapters on the named layers of an init_from model, trained alone.
    lora_rank: Count = _field(0, "LoRA: train rank-R adapters instead of every weight; 0: full fine-tuning")
    lora_alpha: PositiveFloat = _field(16.0, "LoRA: scaling numerator (scale alpha / rank)")
    lora_targets: LoraTargets = _field("", "LoRA: comma-separated HF module names, e.g. q_proj,v_proj")
    lora_dropout: Annotated[float, Range(0, 1, open_high=True)] = _field(0.0, "LoRA: dropout on the adapters' input")
    lora_rslora: bool = _field(False, "LoRA: scale by alpha / sqrt(rank) (rank-stabilised)")
    lora_merge: bool = _field(False, "LoRA: also write the merged model to OUTPUT/model")
    lora_quantize: Scheme | None = _field(
        None, "LoRA: store the frozen base quantised while training (int8 or bfloat16; QLoRA-style)"
    )

    # Fields that define the run: resuming with other values would train something else.
    IDENTITY = (
        "family",
        "size",
        "model_config",
        "init_from",
        "revision",
        "data",
        "jsonl_field",
        "tokenizer",
        "eval_fraction",
        "seq_len",
        "batch_size",
        "seed",
        "lora_rank",
        "lora_alpha",
        "lora_targets",
        "lora_dropout",
        "lora_rslora",
        "lora_quantize",
    )
    RELATIONS = (
        Relation(
            ("warmup_steps", "steps"), lambda warmup, steps: warmup < steps, "warmup_steps must be fewer than steps"
        ),
        Relation(
            ("model_config", "init_from"),
            lambda scratch, tune: not (scratch and tune),
            "give model_config (train from scratch) or init_from (fine-tune), not both",
        ),
        Relation(
            ("revision", "init_from"),
            lambda revision, init_from: revision is None or init_from is not None,
            "revision applies to an init_from hub id; give init_from too",
        ),
        Relation(
            ("lora_rank", "init_from"),
            lambda rank, init_from: rank == 0 or init_from is not None,
            "LoRA adapts a trained model: give init_from with lora_rank",
        ),
        Relation(
            ("lora_rank", "lora_targets"),
            lambda rank, targets: (rank == 0) == (targets == ""),
            "lora_targets names the layers LoRA adapts: give it exactly when lora_rank is set",
        ),
        Relation(
            ("lora_rank", "lora_merge"),
            lambda rank, merge: rank > 0 or not merge,
            "lora_merge applies to LoRA runs; give lora_rank too",
        ),
        Relation(
            ("lora_rank", "lora_quantize"),
            lambda rank, scheme: rank > 0 or scheme is None,
            "lora_quantize stores a LoRA run's frozen base quantised; give lora_rank too",
        ),
    )
    # Our checks run in `__post_init__`, with our messages; jaxtyping's import hook (on in the
    # tests) would otherwise check `__init__`'s arguments first, with beartype's.
    __no_type_check__ = True

    def __post_init__(self) -> None:
        check_fields(self, relations=self.RELATIONS, error=InputError)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> "TrainConfig":
        """Reads a `.toml` or `.json` file of field values; `overrides` win."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"no config file at {path}")
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise InputError(f"{path} is not UTF-8 text (byte offset {err.start})") from None
        try:
            values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except RecursionError:
            raise InputError(f"cannot parse {path}: it nests too deeply") from None
        except ValueError as err:  # TOML and JSON syntax errors, integers of over 4300 digits
            raise InputError(f"cannot parse {path}: {err}") from None
        if not isinstance(values, dict):
            raise InputError(f"{path} must hold a table of settings, got {type(values).__name__}")
        return cls.from_dict({**values, **overrides}, source=str(path))

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str | None = None) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            where = f" in {source}" if source else ""
            raise InputError(f"unknown setting(s) {unknown}{where}; known: {sorted(names)}")
        values = dict(values)
        if isinstance(values.get("data"), str):
            values["data"] = (values["data"],)
        try:
            return cls(**values)
        except InputError as err:
            if source is None:
                raise
            raise InputError(f"{err} (in {source})") from None

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["data"] = list(self.data)
        return values

    @property
    def lora_target_list(self) -> list[str]:
        return [part.strip() for part in self.lora_targets.split(",") if part.strip()]

    def mesh_shape(self) -> tuple[int, int, int]:
        data, fsdp, tensor = (int(part) for part in self.mesh.lower().split("x"))
        return data, fsdp, tensor

    def validate(self) -> None:
        """The checks that need the file system (every value was checked on creation)."""
        _parse_tokenizer(self.tokenizer)


# --------------------------------------------------------------------------- pieces


def _parse_tokenizer(spec: str) -> tuple[str, int | Path]:
    """`("bytes", 0)`, `("bpe", N)` or `("file", path)`."""
    if spec == "bytes":
        return "bytes", 0
    if spec.startswith("bpe:"):
        try:
            return "bpe", int(spec[4:])
        except ValueError:
            raise InputError(f"tokenizer 'bpe:N' needs an integer vocabulary size, got {spec!r}") from None
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"tokenizer must be 'bytes', 'bpe:N' or a tokenizer.json; {spec!r} is none of these")
    return "file", path


def _documents(config: TrainConfig) -> list[Document]:
    paths: list[str | Path] = []
    for item in config.data:
        paths.extend(stdlib_sources() if item == STDLIB else [item])
    return find_documents(paths, jsonl_field=config.jsonl_field)


@dataclasses.dataclass(frozen=True)
class Tokens:
    """A codec and its special ids: `pad` (also the seq2seq decoder start) and `eos`."""

    codec: Any
    vocab_size: int
    pad: int
    eos: int
    file: Path | None  # the tokenizer.json to ship with the model, if any


def _special_id(codec: Any, names: tuple[str, ...], what: str) -> int:
    for name in names:
        if (token := codec.token_to_id(name)) is not None:
            return int(token)
    raise InputError(f"{codec.source} has no {what} token; looked for {', '.join(names)}")


def _tokens(
    config: TrainConfig, train_docs: list[Document], output: Path, init_config: Any, init_folder: Path | None
) -> Tokens:
    """The run's tokenizer: reused from the run folder when resuming, else as configured
    (the `init_from` folder's `tokenizer.json` unless a tokenizer file is named).
    A BPE is trained and saved by process 0; the other processes read its file."""
    from . import text

    saved = output / "tokenizer.json"
    kind, value = _parse_tokenizer(config.tokenizer)
    if init_folder is not None and kind != "file" and (init_folder / "tokenizer.json").is_file():
        kind, value = "file", init_folder / "tokenizer.json"
    if kind == "bytes":  # bytes 0-255, then EOS and padding
        return Tokens(text.ByteCodec(258), 258, pad=257, eos=256, file=None)
    if kind == "bpe":
        if jax.process_index() == 0 and not saved.is_file():
            train_bpe_tokenizer(train_docs, int(value)).save(str(saved))  # <pad> = 0, <eos> = 1
        barrier("eqx_models.train.tokenizer")
    codec = text.Tokenizer.from_file(saved if kind == "bpe" else value)
    eos = _special_id(codec, ("<eos>", "</s>", "<|endoftext|>"), "end-of-text")
    try:
        pad = _special_id(codec, ("<pad>",), "padding")
    except InputError:
        pad = eos
    if init_config is not None:  # the checkpoint's ids win
        eos = int(np.atleast_1d(init_config.eos_token_id)[0]) if init_config.eos_token_id is not None else eos
        pad = init_config.pad_token_id if getattr(init_config, "pad_token_id", None) is not None else pad
    return Tokens(codec, codec.vocab_size, pad=pad, eos=eos, file=saved if kind == "bpe" else Path(value))


def _hf_config(config: TrainConfig, tokens: Tokens) -> dict[str, Any]:
    """The HF config dict of a model trained from scratch, with the tokenizer's ids."""
    if config.model_config is not None:
        path = Path(config.model_config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise InputError(f"no model config at {config.model_config}")
        from .models import family_of
        from .pretrained import read_config

        hf = read_config(path.parent, name=path.name)
        family = family_of(hf.get("model_type"))
        hf.setdefault("architectures", [TEXT_HEADS[family.config.model_type]])
        vocab = hf.get("vocab_size", family.config.vocab_size)  # not an integer: the config names it later
        if isinstance(vocab, int) and vocab < tokens.vocab_size:
            raise InputError(
                f"{path} has vocab_size {hf.get('vocab_size')} but the tokenizer has {tokens.vocab_size} ids"
            )
    else:
        hf = {**preset_config(config.family, config.size), "vocab_size": tokens.vocab_size}
    ids = {"eos_token_id": tokens.eos, "pad_token_id": tokens.pad}
    if issubclass(resolve_class(hf)[1], Seq2SeqLM):
        ids["decoder_start_token_id"] = tokens.pad
    else:
        ids["bos_token_id"] = tokens.eos  # GPT-2 style: documents are separated by EOS alone
    return {**hf, **ids}  # the data is built with the tokenizer's ids, so they win


def _build_model(config: TrainConfig, tokens: Tokens, init: Model | None) -> Model:
    from .nn import with_run_options

    if init is not None:
        model = init
    else:
        hf = _hf_config(config, tokens)
        family, cls = resolve_class(hf)
        if cls.__name__ not in TEXT_HEADS.values():
            raise InputError(
                f"training on text needs a language-model head, not {cls.__name__}; "
                f"use one of {', '.join(TEXT_HEADS.values())} (other heads train with the library's head_loss)"
            )
        model = cls(family.config.from_hf_config(hf), key=jax.random.key(config.seed))
    limit = model.config.position_limit
    longest = config.seq_len // 2 if isinstance(model, Seq2SeqLM) else config.seq_len
    if limit is not None and longest > limit:
        raise InputError(f"seq_len {config.seq_len} is longer than the model's {limit} positions")
    if model.config.vocab_size < tokens.vocab_size:
        raise InputError(f"the tokenizer has {tokens.vocab_size} ids but the model only {model.config.vocab_size}")
    return with_run_options(model, remat=config.remat)


def _objective(model: Model, config: TrainConfig) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Packed rows to the head's batch: causal LMs predict each row; seq2seq models read a
    row's first half and write its second."""
    if isinstance(model, Seq2SeqLM):
        if config.seq_len < 2:
            raise InputError("seq2seq training splits each row in two: seq_len must be at least 2")
        half = config.seq_len // 2

        def split(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            ids = batch["input_ids"]
            mask = batch["attention_mask"][:, :half]
            return {"input_ids": ids[:, :half], "attention_mask": mask, "labels": ids[:, half:]}

        return split
    return lambda batch: {**batch, "labels": batch["input_ids"]}


def _check_resume(config: TrainConfig, output: Path, manager: CheckpointManager) -> None:
    latest = manager.latest()
    if latest is not None and not config.resume:
        raise InputError(
            f"{output} already holds checkpoints of a run; pass --resume to continue it or pick another output"
        )
    if config.resume:
        if latest is None:
            raise InputError(f"--resume: no checkpoint in {manager.root}")
        saved = json.loads((output / "train_config.json").read_text())
        ours = config.to_dict()
        changed = [name for name in TrainConfig.IDENTITY if saved.get(name) != ours[name]]
        if changed:
            shown = ", ".join(f"{n}: {saved.get(n)!r} -> {ours[n]!r}" for n in changed)
            raise InputError(f"cannot resume {output} with different settings ({shown})")


def _count_parameters(model: Model, spec: Any = None) -> int:
    """The number of floating-point parameters (those `spec` selects, if given)."""
    return sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array if spec is None else spec)))


def _with_lora(model: Model, config: TrainConfig) -> Model:
    """The model with the run's LoRA adapters (drawn from the seed), when `lora_rank` is set."""
    from . import lora

    if not config.lora_rank:
        return model
    return lora.add_lora(
        model,
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        target_modules=config.lora_target_list,
        dropout=config.lora_dropout,
        use_rslora=config.lora_rslora,
        key=jax.random.fold_in(jax.random.key(config.seed), 1),
    )


# --------------------------------------------------------------------------- the run


def train(config: TrainConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs `config` end to end (see the module docstring) and returns the summary."""
    from .hub import folder
    from .pretrained import export_hf, from_pretrained
    from .quantize import dequantize
    from .training.sharding import initialize_distributed, make_mesh, make_sharded_train_step, shard_batch, shard_state

    config.validate()
    started = time.perf_counter()
    output = Path(config.output)
    if config.family not in TEXT_HEADS and config.model_config is None and config.init_from is None:
        raise ConfigError(f"unknown model family {config.family!r}; known: {', '.join(TEXT_HEADS)}")
    initialize_distributed()  # a no-op in a single process
    processes, main = jax.process_count(), jax.process_index() == 0
    if not main:
        log = _silent
    mesh = make_mesh(*config.mesh_shape())
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % shards:
        raise InputError(
            f"batch_size {config.batch_size} does not divide over the mesh's data x fsdp = {shards} devices"
        )
    if config.batch_size % processes:
        raise InputError(f"batch_size {config.batch_size} does not divide over the {processes} processes")
    rows = _process_rows(mesh, config.batch_size)
    manager = CheckpointManager(output / "checkpoints", keep=config.keep_checkpoints)
    _check_resume(config, output, manager)
    # The end's writes must not fail after training.
    if config.lora_rank:
        check_destination(output / "adapter", overwrite=True)
    if not config.lora_rank or config.lora_merge:
        check_destination(output / "model", overwrite=True)

    # Data, tokenizer and model, all checked before compiling anything.
    docs = _documents(config)
    train_docs, eval_docs = split_documents(docs, config.eval_fraction, config.seed)
    init_folder = folder(config.init_from, revision=config.revision) if config.init_from is not None else None
    init = from_pretrained(init_folder, quantize=config.lora_quantize) if init_folder is not None else None
    output.mkdir(parents=True, exist_ok=True)
    tokens = _tokens(config, train_docs, output, None if init is None else init.config, init_folder)
    model = _with_lora(_build_model(config, tokens, init), config)
    trainable = lora.adapter_filter if config.lora_rank else all_inexact
    log(
        f"{type(model).__name__}: {_count_parameters(model) / 1e6:.2f}M parameters; "
        f"{len(train_docs)} training and {len(eval_docs)} evaluation documents; tokenizer {config.tokenizer}"
    )
    if config.lora_rank:
        share = _count_parameters(model, lora.adapter_filter(model)) / _count_parameters(model)
        log(f"LoRA rank {config.lora_rank} on {config.lora_targets}: {share:.2%} of the parameters train")
    train_ids = tokenize(train_docs, tokens.codec, tokens.eos, progress=config.progress and main)
    batches = PackedBatches(train_ids, seq_len=config.seq_len, batch_size=config.batch_size, seed=config.seed)
    evals = _eval_set(config, tokens, eval_docs, train_ids)
    objective = _objective(model, config)
    if not config.resume and main:
        (output / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        (output / "metrics.jsonl").unlink(missing_ok=True)

    schedule = warmup_cosine(config.learning_rate, warmup_steps=config.warmup_steps, total_steps=config.steps)
    clip = config.clip_norm or None
    params = eqx.filter(model, trainable(model))
    optimizer = adamw(schedule, params, weight_decay=config.weight_decay, clip_norm=clip, accumulate=config.accumulate)
    state = init_state(model, optimizer, key=jax.random.key(config.seed), trainable=trainable)
    compute_dtype = jnp.bfloat16 if config.bf16 else None
    step_options = dict(compute_dtype=compute_dtype, trainable=trainable)
    if config.lora_dropout:
        step_options["loss_fn"] = lora.with_adapter_dropout(head_loss)
    eval_place = None
    if mesh.size > 1:
        state = shard_state(state, mesh)
        step = make_sharded_train_step(optimizer, mesh, **step_options)

        def shard(batch: dict[str, np.ndarray]) -> dict[str, Any]:  # this process's rows
            return shard_batch({k: v[rows] for k, v in batch.items()}, mesh)

        def place(batch: dict[str, np.ndarray]) -> dict[str, Any]:
            return shard(objective(batch))

        if processes > 1:  # the evaluation's model is global: so must its batches be
            eval_place = shard
    else:
        step = make_train_step(optimizer, **step_options)

        def place(batch: dict[str, np.ndarray]) -> dict[str, Any]:
            return {k: jnp.asarray(v) for k, v in objective(batch).items()}

    if config.resume:
        # The newest checkpoint that loads (a corrupt one is skipped, with a warning), and
        # the metrics cut back to it: records after it were never checkpointed and the run
        # writes them again.
        state, meta = manager.restore_latest(state, on_skip=lambda path, err: log(f"warning: skipped {path}: {err}"))
        batches.restore(meta["data_position"])
        dropped = truncate_metrics(output / "metrics.jsonl", int(state.step)) if main else 0
        note = f"; dropped {dropped} metrics.jsonl records written after it" if dropped else ""
        log(f"resumed from step {int(state.step)} of {config.steps}{note}")

    def checkpoint(state: TrainState, record: dict[str, Any]) -> None:
        if record["step"] % config.checkpoint_every == 0 or record["step"] == config.steps:
            manager.save(record["step"], state, batches.position)

    state, fit_records = fit(
        state,
        step,
        _batches(batches),
        steps=config.steps,
        tokens_per_batch=batches.tokens_per_batch,
        metrics_path=output / "metrics.jsonl" if main else None,
        evaluate_every=config.eval_every or config.steps,
        eval_batches=None if evals is None else (lambda: (objective(b) for b in evals.batches())),
        on_step=checkpoint,
        place=place,
        eval_place=eval_place,
        progress=config.progress and main,
        report=None if main else _silent,
    )
    if manager.latest() is None or manager.steps()[-1] != int(state.step):
        manager.save(int(state.step), state, batches.position)

    model = eqx.nn.inference_mode(state.model)
    if processes > 1:  # the whole model on every host, as single-device arrays
        model = jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, gather_to_host(model))
    if not main:
        barrier("eqx_models.train.done")
        return _summary(config, model, fit_records, evals, time.perf_counter() - started)
    extra_files = [tokens.file] if tokens.file is not None else []
    if config.lora_rank:
        task = "SEQ_2_SEQ_LM" if isinstance(model, Seq2SeqLM) else "CAUSAL_LM"
        lora.save_adapter(
            model, output / "adapter", base_model_name_or_path=config.init_from, task_type=task, overwrite=True
        )
        log(f"adapter written to {output / 'adapter'}")
    if not config.lora_rank or config.lora_merge:
        # a quantised base merges as the float weights it stands for: the model that trained
        export_hf(lora.merge_lora(dequantize(model)), output / "model", overwrite=True, extra_files=extra_files)
        log(f"model written to {output / 'model'}")
    records = read_metrics(output / "metrics.jsonl")
    plot_losses(records, output / "loss.png", title=f"{type(model).__name__} on {', '.join(config.data)}")
    summary = _summary(config, model, records, evals, time.perf_counter() - started)
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if summary.get("eval_bits_per_byte") is not None:
        log(
            f"evaluation: {summary['eval_loss']:.4f} nats/token = {summary['eval_bits_per_byte']:.3f} bits/byte "
            f"(unigram baseline {summary['unigram_bits_per_byte']:.3f})"
        )
    if config.sample_prompt:
        log("sample: " + _sample(model, tokens, config.sample_prompt))
    barrier("eqx_models.train.done")
    return summary


def _silent(message: str) -> None:
    """The log of the processes other than process 0."""


def _process_rows(mesh: Any, batch_size: int) -> slice:
    """The rows of the global batch that this process's devices hold: all of them in a
    single process, a contiguous block in a multi-process job."""
    from .training.sharding import batch_sharding

    if jax.process_count() == 1:
        return slice(None)
    held = batch_sharding(mesh).addressable_devices_indices_map((batch_size,)).values()
    spans = sorted({index[0].indices(batch_size)[:2] for index in held})
    start, stop = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != stop - start:
        raise InputError(
            f"mesh {'x'.join(map(str, mesh.devices.shape))}: process {jax.process_index()}'s devices hold "
            "scattered rows of the batch; order the mesh so that each process's devices are adjacent"
        )
    return slice(start, stop)


def _batches(batches: PackedBatches) -> Iterator[dict[str, np.ndarray]]:
    while True:
        yield batches.next_batch()


@dataclasses.dataclass(frozen=True)
class EvalSet:
    packed: PackedBatches
    limit: int
    tokens: int  # of the whole evaluation split
    bytes: int
    unigram_bits_per_byte: float

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        for index in range(min(self.limit or len(self.packed), len(self.packed))):
            yield self.packed.batch_at(0, index)


def _eval_set(config: TrainConfig, tokens: Tokens, docs: list[Document], train_ids: np.ndarray) -> EvalSet | None:
    if config.eval_fraction == 0:
        return None
    ids = tokenize(docs, tokens.codec, tokens.eos)
    if len(ids) < config.seq_len * config.batch_size:
        raise InputError(
            f"the evaluation split has {len(ids)} tokens, fewer than one batch "
            f"({config.batch_size} x {config.seq_len}); raise eval_fraction or set it to 0"
        )
    size = sum(len(doc.text.encode("utf-8")) for doc in docs)
    packed = PackedBatches(ids, seq_len=config.seq_len, batch_size=config.batch_size, seed=config.seed)
    baseline = unigram_bits_per_byte(train_ids, ids, size, tokens.vocab_size)
    return EvalSet(packed, config.eval_batches, len(ids), size, baseline)


def _summary(config: TrainConfig, model: Model, records: list[dict], evals: EvalSet | None, seconds: float) -> dict:
    steps = [r for r in records if "loss" in r]
    scored = [r for r in records if "eval_loss" in r]
    summary: dict[str, Any] = {
        "model": type(model).__name__,
        "parameters": _count_parameters(model),
        "trainable_parameters": _count_parameters(model, lora.adapter_filter(model) if config.lora_rank else None),
        "steps": steps[-1]["step"] if steps else 0,
        "train_loss": steps[-1]["loss"] if steps else None,
        "tokens_per_s": steps[-1]["tokens_per_s"] if steps else None,
        "seconds": round(seconds, 1),
    }
    if evals is not None and scored:
        loss = scored[-1]["eval_loss"]
        summary.update(
            eval_loss=loss,
            # The rows evaluated are a uniform share of the split, so its tokens-per-byte applies.
            eval_bits_per_byte=bits_per_byte(loss, evals.tokens, evals.bytes),
            unigram_bits_per_byte=evals.unigram_bits_per_byte,
        )
    return summary


def _sample(model: Model, tokens: Tokens, prompt: str, new_tokens: int = 64) -> str:
    from .generation import generate

    ids = tokens.codec.encode(prompt)
    out = np.asarray(generate(model, np.asarray([ids], np.int32), max_new_tokens=new_tokens))[0]
    new = out[1:] if isinstance(model, Seq2SeqLM) else out[len(ids) :]
    if tokens.eos in new.tolist():
        new = new[: new.tolist().index(tokens.eos)]
    text = tokens.codec.decode(new.tolist())
    return (text if isinstance(model, Seq2SeqLM) else prompt + text).replace("\n", "\n  ")


__all__ = ["TrainConfig", "train"]
