"""`eqx-models`: convert checkpoints, check them against HF, and generate.

Every failure prints one line naming the problem and exits non-zero; `--debug`
shows the traceback instead.
"""

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np

from .errors import EqxModelsError


def _convert(args: argparse.Namespace) -> None:
    from .checkpoint.io import export_hf, load_with_report, save_pretrained

    started = time.perf_counter()
    model, report = load_with_report(args.src, dtype=args.dtype, progress=True)
    for path in report.initialised:
        print(f"note: {path} is not in the checkpoint and was freshly initialised", file=sys.stderr)
    (export_hf if args.to == "hf" else save_pretrained)(model, args.dst, progress=True)
    print(f"converted {args.src} -> {args.dst} ({args.to}, {time.perf_counter() - started:.1f}s)")


def _verify(args: argparse.Namespace) -> None:
    from .verify import verify

    diff = verify(args.src, seq_len=args.seq_len, seed=args.seed)
    print(f"max |logits difference| vs transformers PyTorch: {diff:.3e}")
    if diff > args.tolerance:
        raise EqxModelsError(f"difference {diff:.3e} exceeds tolerance {args.tolerance:.1e}")


def _generate(args: argparse.Namespace) -> None:
    from . import from_pretrained, generate
    from .text import ByteCodec

    model = from_pretrained(args.src, dtype=args.dtype)
    codec = ByteCodec.for_model(model.config)
    prompt = np.asarray([codec.encode(args.prompt)], np.int32)
    tokens = np.asarray(generate(model, prompt, max_new_tokens=args.max_new_tokens))
    new = tokens[0, prompt.shape[1] :].tolist()
    print(f"prompt ids: {prompt[0].tolist()}\nnew ids:    {new}")
    print("text:", repr(args.prompt + codec.decode(new)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eqx-models", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert a checkpoint folder (HF or ours) to ours or to HF")
    convert.add_argument("src", help="HF folder (safetensors, pytorch_model.bin, flax msgpack) or an eqx folder")
    convert.add_argument("dst", help="output folder, written atomically")
    convert.add_argument("--to", choices=("eqx", "hf"), default="eqx", help="output format (default: eqx)")
    convert.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    convert.set_defaults(run=_convert)

    verify = commands.add_parser("verify", help="compare our logits with transformers' PyTorch model")
    verify.add_argument("src", help="a HF checkpoint folder")
    verify.add_argument("--seq-len", type=int, default=16)
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--tolerance", type=float, default=1e-4)
    verify.set_defaults(run=_verify)

    gen = commands.add_parser("generate", help="greedy generation from a prompt (byte-level ids)")
    gen.add_argument("src", help="a HF or eqx folder")
    gen.add_argument("--prompt", default="def ")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    gen.set_defaults(run=_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (EqxModelsError, OSError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # an unexpected failure still gets one readable line
        if args.debug:
            raise
        print(f"error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
