"""`eqx-models`: convert checkpoints, check them against HF, generate, serve, and train.

Every failure prints one line naming the problem and exits with a code saying what kind
of failure it was (`EXIT_CODES`); `--debug` shows the traceback instead.
"""

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import numpy as np

from .compilation_cache import use_compilation_cache
from .errors import EqxModelsError, InputError
from .files import check_destination, interrupts_raise
from .quantize import SCHEMES, Scheme
from .validation import MAX_INT32, Range, Text, check_values

EXIT_OK = 0
EXIT_BAD_INPUT = 1  # an EqxModelsError or OSError: the message names the file, key or setting
EXIT_USAGE = 2  # argparse: unknown command or flag, a flag's value of the wrong type
EXIT_INTERNAL = 70  # an unexpected exception: a bug (sysexits' EX_SOFTWARE)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT) or SIGTERM, after cleaning up (128 + SIGINT)
EXIT_CODES = f"""exit status: {EXIT_OK} success; {EXIT_BAD_INPUT} bad input (a one-line error naming the file, key \
or setting); {EXIT_USAGE} usage error (unknown command or flag, malformed flag value); {EXIT_INTERNAL} internal \
error (a bug: rerun with --debug and report the traceback); {EXIT_INTERRUPTED} interrupted (Ctrl-C or SIGTERM; \
nothing half-written is left)."""


def _convert(args: argparse.Namespace) -> None:
    from .hub import folder, is_local
    from .pretrained import export_hf, load_with_report, save_pretrained, tokenizer_files

    # Before downloading or loading anything; again with the snapshot folder of a hub id.
    check_destination(args.dst, source=args.src if is_local(args.src) else None, overwrite=args.overwrite)
    started = time.perf_counter()
    src = folder(args.src, revision=args.revision)
    check_destination(args.dst, source=src, overwrite=args.overwrite)
    if args.quantize is not None and args.to == "hf":
        raise InputError(f"--quantize {args.quantize} stores weights that only eqx folders hold: use --to eqx")
    model, report = load_with_report(src, dtype=args.dtype, strict=args.strict, quantize=args.quantize, progress=True)
    for path in report.initialised:
        print(f"note: {path} is not in the checkpoint and was freshly initialised", file=sys.stderr)
    save = export_hf if args.to == "hf" else save_pretrained
    save(model, args.dst, overwrite=args.overwrite, progress=True, extra_files=tokenizer_files(src))
    print(f"converted {args.src} -> {args.dst} ({args.to}, {time.perf_counter() - started:.1f}s)")


def _verify(args: argparse.Namespace) -> None:
    from .verify import verify

    diff = verify(args.src, revision=args.revision, seq_len=args.seq_len, seed=args.seed)
    print(f"max |logits difference| vs transformers PyTorch: {diff:.3e}")
    if diff > args.tolerance:
        raise EqxModelsError(f"difference {diff:.3e} exceeds tolerance {args.tolerance:.1e}")


def _sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """`generate`/`stream` keyword arguments from the (checked) flags: sampling is on when any
    of `--temperature`, `--top-k`, `--top-p` is given, except that `--temperature 0` is greedy."""
    options: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
    wants_sampling = any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    if wants_sampling and args.temperature != 0:
        import jax

        options.update(do_sample=True, key=jax.random.key(args.seed))
        options.update({k: v for k in ("temperature", "top_k", "top_p") if (v := getattr(args, k)) is not None})
    return options


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _checked(flags: dict[str, Any], run: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    """`run`, after checking the flags against their declared annotations: a value out of range
    is a one-line error naming the flag, before anything is loaded."""

    def checked(args: argparse.Namespace) -> None:
        values = check_values(vars(args), flags, error=InputError, label=_flag)
        run(argparse.Namespace(**{**vars(args), **values}))

    return checked


Seed = Annotated[int, Range(0, 2**63 - 1)]  # what jax.random.key takes, without negatives
#: What each `generate` flag accepts.
GENERATE_FLAGS = {
    "prompt": Text,
    "max_new_tokens": Annotated[int, Range(1, MAX_INT32)],
    "temperature": Annotated[float, Range(0, None)] | None,
    "top_k": Annotated[int, Range(1, MAX_INT32)] | None,
    "top_p": Annotated[float, Range(0, 1)] | None,
    "num_beams": Annotated[int, Range(1, MAX_INT32)],
    "seed": Seed,
    "quantize": Scheme | None,
}
Count = Annotated[int, Range(1, MAX_INT32)]
#: What each `serve` flag accepts.
SERVE_FLAGS = {
    "port": Annotated[int, Range(0, 65535)],
    "max_batch": Count,
    "context": Count | None,
    "max_tokens_limit": Count | None,
    "max_queue": Count | None,
    "grace": Annotated[float, Range(0, None)],
    "quantize": Scheme | None,
}
#: What each `convert` flag accepts.
CONVERT_FLAGS = {"quantize": Scheme | None}
#: What each `verify` flag accepts (a NaN tolerance would pass every model).
VERIFY_FLAGS = {
    "seq_len": Annotated[int, Range(1, MAX_INT32)],
    "seed": Seed,
    "tolerance": Annotated[float, Range(0, None)],
}


def _until_eos(ids: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """`ids` before the first EOS (which is dropped), and whether there was one."""
    for i, token in enumerate(ids):
        if token in eos_ids:
            return ids[:i], True
    return ids, False


def _generate(args: argparse.Namespace) -> None:
    from .generation import generate, stream
    from .hub import folder
    from .models import Seq2SeqLM
    from .nn import separate_layers
    from .pretrained import end_token_ids, from_pretrained
    from .text import StreamDecoder, load_tokenizer, prompt_ids

    options = _sampling_options(args)
    src = folder(args.src, revision=args.revision)
    codec = load_tokenizer(src, byte_level=args.byte_level)  # before the weights: a missing tokenizer fails fast
    model = from_pretrained(src, dtype=args.dtype, strict=args.strict, quantize=args.quantize)
    if args.separate_layers:
        model = separate_layers(model)
    ids = prompt_ids(codec, args.prompt, vocab_size=model.config.vocab_size, chat=args.chat)
    prompt = np.asarray([ids], np.int32)
    eos_ids = end_token_ids(model.config.eos_token_id, src)
    if eos_ids:  # the loop stops at every end token transformers would (Gemma-it's <end_of_turn> too)
        options["eos_token_id"] = sorted(eos_ids)
    # An encoder-decoder model reads the prompt and writes new text: show only its output.
    seq2seq = isinstance(model, Seq2SeqLM)
    # A decoder continues the prompt: show it, then the new text. A chat prompt is the template's
    # text, so only the reply is shown (the prompt stays decoding context).
    text = StreamDecoder(codec) if seq2seq else StreamDecoder(codec, prefix=ids)
    if not seq2seq and not args.chat:
        print(args.prompt, end="", flush=True)

    started = time.perf_counter()
    first = None  # (seconds, tokens) of the first chunk, which includes compilation
    produced = 0
    if args.num_beams > 1:  # beam search knows its best sequence only at the end
        tokens = np.asarray(generate(model, prompt, **options))
        new, ended = _until_eos(tokens[0, 1 if seq2seq else prompt.shape[1] :].tolist(), eos_ids)
        produced = len(new) + int(ended)
        print(text.push(new), end="")
    else:
        for chunk in stream(model, prompt, **options):
            new, ended = _until_eos(np.asarray(chunk)[0].tolist(), eos_ids)
            produced += len(new) + int(ended)
            first = (time.perf_counter() - started, produced) if first is None else first
            print(text.push(new), end="", flush=True)
            if ended:
                break
    print(text.flush(), flush=True)
    elapsed = time.perf_counter() - started
    stats = f"{produced} new tokens in {elapsed:.2f}s, {produced / elapsed:.1f} tokens/s"
    if first is not None and produced > first[1]:
        rate = (produced - first[1]) / (elapsed - first[0])
        stats += f" ({rate:.1f} tokens/s after the first chunk, which took {first[0]:.2f}s with compilation)"
    print(stats, file=sys.stderr)


def _serve(args: argparse.Namespace) -> None:
    from .serve import load_served, run, warm_up

    served = load_served(
        args.src,
        revision=args.revision,
        slots=args.max_batch,
        context=args.context,
        max_tokens_limit=args.max_tokens_limit,
        max_queue=args.max_queue,
        quantize=args.quantize,
        adapter=args.adapter,
        dtype=args.dtype,
        byte_level=args.byte_level,
        separate_layers=args.separate_layers,
    )
    started = time.perf_counter()
    warm_up(served)
    engine = served.engine
    print(
        f"serving {served.name}: {engine.slots} slots, context {engine.context}, max_tokens up to "
        f"{engine.max_new_tokens}, compiled in {time.perf_counter() - started:.1f}s",
        file=sys.stderr,
    )
    run(served, host=args.host, port=args.port, grace=args.grace)


def _train(args: argparse.Namespace) -> None:
    from .train import TrainConfig, train

    given = {name: value for name, value in vars(args).items() if name in TrainConfig.__dataclass_fields__}
    config = TrainConfig.from_file(args.config, **given) if args.config else TrainConfig.from_dict(given)
    train(config)


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `TrainConfig` field; a flag left out keeps the file's (or default) value."""
    import dataclasses

    from .train import TrainConfig

    parser.add_argument("--config", help="a .toml or .json file of settings (flags override it)")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        shown = field.default if field.name != "data" else " ".join(field.default)
        help_text = f"{field.metadata['help']} ({shown})".replace("%", "%%")
        options: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        if field.type is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif field.name == "data":
            options["nargs"] = "+"
        else:
            options["type"] = {"int": int, "float": float}.get(type(field.default).__name__, str)
        parser.add_argument(flag, **options)


SOURCE_HELP = (
    "a local folder, or a hub id such as EleutherAI/gpt-neo-125m (downloaded into huggingface_hub's cache; "
    "HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE and HF_TOKEN apply)"
)


def _add_revision_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a hub id (default: main)")


def _add_quantize_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantize",
        default=None,
        metavar="SCHEME",
        help=f"store the weights quantised ({', '.join(SCHEMES)}: int8 with one scale per output channel, or "
        "rounded to bfloat16; embeddings included; activations stay in float)",
    )


def _add_separate_layers_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--separate-layers",
        action="store_true",
        help="store each layer's weights separately (eqx_models.separate_layers): faster decoding on CPU, "
        "compile time growing with depth",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eqx-models", description=__doc__.splitlines()[0], epilog=EXIT_CODES)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument(
        "--no-compilation-cache",
        dest="compilation_cache",
        action="store_false",
        help="compile every program afresh instead of keeping them in JAX's persistent compilation cache, "
        "$XDG_CACHE_HOME/eqx_models/jax or ~/.cache/eqx_models/jax (JAX_COMPILATION_CACHE_DIR chooses another "
        "folder, JAX_ENABLE_COMPILATION_CACHE=false turns it off too)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser(
        "convert",
        help="convert a checkpoint folder (HF or ours) or a hub id to ours or to HF",
        description="Converts SRC into DST, written atomically. DST must be new or empty; with --overwrite "
        "it may also be a folder eqx_models wrote (convert or export marks it), which is replaced whole. Any "
        "other folder, a file or a link at DST, and a DST that is, contains or lies inside SRC are refused "
        "before anything is read.",
        epilog=EXIT_CODES,
    )
    convert.add_argument(
        "src", help="HF folder (safetensors, pytorch_model.bin, flax msgpack), an eqx folder, or " + SOURCE_HELP[2:]
    )
    _add_revision_flag(convert)
    convert.add_argument("dst", help="output folder, written atomically")
    convert.add_argument(
        "--overwrite", action="store_true", help="replace DST if it is a folder eqx_models wrote (never another)"
    )
    convert.add_argument("--to", choices=("eqx", "hf"), default="eqx", help="output format (default: eqx)")
    convert.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    convert.add_argument("--strict", action="store_true", help="weights holding NaN or Inf are an error, not a warning")
    _add_quantize_flag(convert)
    convert.set_defaults(run=_checked(CONVERT_FLAGS, _convert))

    verify = commands.add_parser("verify", help="compare our logits with transformers' PyTorch model")
    verify.add_argument("src", help="a HF checkpoint folder or an eqx folder; or " + SOURCE_HELP[2:])
    _add_revision_flag(verify)
    verify.add_argument("--seq-len", type=int, default=16)
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--tolerance", type=float, default=1e-4)
    verify.set_defaults(run=_checked(VERIFY_FLAGS, _verify))

    gen = commands.add_parser(
        "generate",
        help="generate text from a prompt, printed as it is produced",
        description="Encodes the prompt with the folder's tokenizer (tokenizer.json, vocab.json + merges.txt or a "
        "SentencePiece model, as transformers' AutoTokenizer reads them; byte-level ids only with --byte-level or "
        "for a byte vocabulary), generates and prints the text as it comes. Greedy unless --temperature, "
        "--top-k or --top-p is given; --temperature 0 is greedy. --chat wraps the prompt in the chat template.",
    )
    gen.add_argument("src", help="a HF or eqx folder; or " + SOURCE_HELP[2:])
    _add_revision_flag(gen)
    gen.add_argument("--prompt", default="def ", help="the text to continue (encoder input for LongT5)")
    gen.add_argument("--chat", action="store_true", help="the prompt is one user message in the chat template")
    gen.add_argument("--byte-level", action="store_true", help="encode the prompt as UTF-8 byte ids")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=None, help="sample at this temperature; 0 is greedy")
    gen.add_argument("--top-k", type=int, default=None, help="sample from the K most likely tokens")
    gen.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of probability P")
    gen.add_argument("--num-beams", type=int, default=1, help="beam search with B beams (printed at the end)")
    gen.add_argument("--seed", type=int, default=0, help="random seed of the sampler (default 0)")
    gen.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    gen.add_argument("--strict", action="store_true", help="weights holding NaN or Inf are an error, not a warning")
    _add_quantize_flag(gen)
    _add_separate_layers_flag(gen)
    gen.set_defaults(run=_checked(GENERATE_FLAGS, _generate))

    serve = commands.add_parser(
        "serve",
        help="serve a model over OpenAI's HTTP API (completions, chat completions) with continuous batching",
        description="Serves SRC on http://HOST:PORT with OpenAI's endpoints: GET /health, GET /v1/models, POST "
        "/v1/completions and, when the tokenizer has a chat template, POST /v1/chat/completions. Up to --max-batch "
        "requests decode together in one compiled step; others wait in a bounded queue (HTTP 429 when it is full). "
        "SIGTERM finishes the requests in flight (up to --grace seconds) and exits 0.",
        epilog=EXIT_CODES,
    )
    serve.add_argument("src", help="a HF or eqx folder of a causal or seq2seq LM; or " + SOURCE_HELP[2:])
    _add_revision_flag(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    serve.add_argument("--max-batch", type=int, default=8, help="requests decoded at once (default 8)")
    serve.add_argument(
        "--context",
        type=int,
        default=None,
        help="cache slots per request, prompt plus new tokens (default: the model's positions); the longest "
        "encoder input for seq2seq models (default: their positions, or 512)",
    )
    serve.add_argument(
        "--max-tokens-limit",
        type=int,
        default=None,
        help="the largest max_tokens a request may ask for (default: the context; 512 for seq2seq models)",
    )
    serve.add_argument("--max-queue", type=int, default=None, help="requests that may wait (default 4 x max-batch)")
    serve.add_argument("--grace", type=float, default=30.0, help="seconds to finish work on SIGTERM (default 30)")
    serve.add_argument("--adapter", default=None, metavar="DIR", help="LoRA adapters (a PEFT folder or hub id)")
    serve.add_argument("--byte-level", action="store_true", help="byte-level ids instead of the folder's tokenizer")
    serve.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    _add_quantize_flag(serve)
    _add_separate_layers_flag(serve)
    serve.set_defaults(run=_checked(SERVE_FLAGS, _serve))

    train = commands.add_parser(
        "train",
        help="train a model on text (a preset, an HF config.json, or fine-tune a checkpoint)",
        description="Trains a language model on text files or Python's standard library and writes "
        "checkpoints, metrics.jsonl, loss.png, summary.json and an HF-format model folder to --output. "
        "Settings come from --config and the flags below (flags win).",
    )
    _add_train_flags(train)
    train.set_defaults(run=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns its exit status (`EXIT_CODES`). Usage errors exit through
    argparse with `EXIT_USAGE`. SIGTERM is handled as Ctrl-C: both unwind (temporary
    folders are removed) and end with one line, `interrupted`."""
    interruption = interrupts_raise()
    debug = False
    try:
        with interruption:
            args = build_parser().parse_args(argv)
            debug = args.debug
            if args.compilation_cache:  # a second run of the same shapes loads its programs instead of compiling
                use_compilation_cache()
            args.run(args)
    except (KeyboardInterrupt, Exception) as err:
        if debug:
            raise
        # A library may turn the interruption into another exception: the signal decides.
        if isinstance(err, KeyboardInterrupt) or interruption.received is not None:
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        if isinstance(err, EqxModelsError | OSError):
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        detail = f": {err}" if str(err) else ""  # an unexpected failure still gets one readable line
        print(f"error: {type(err).__name__}{detail} (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    if interruption.received is not None:  # swallowed by a library, or arrived at the very end
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
