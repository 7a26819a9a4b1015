"""Training-step benchmark: our GPT-Neo against HF's Flax GPT-Neo + optax, same weights.

    python scripts/bench_train.py                      # GPT-Neo-125M, batch 8 x 512, 3 timed steps
    python scripts/bench_train.py --batch 2 --seq 64 --layers 2 --hidden 64 --heads 4 --vocab 512

Variants (`--variants`):

- `ours`: `make_train_step` (scan over layers, no remat), `adamw` from `eqx_models.training`;
- `ours_remat`: the same with `remat=True`;
- `hf_flax`: `FlaxGPTNeoForCausalLM` under `jax.jit` (parameters and optimizer state
  donated), mean shifted cross-entropy, `jax.value_and_grad`, optax update.

Both sides run float32, deterministically (every dropout probability 0, no dropout keys),
with the same optimizer: global-norm clipping at 1.0, then AdamW (lr 1e-4, weight decay
0.01 on the Dense/Linear kernels only), every step on the same batch.

The parent writes one random HF Flax checkpoint to a temporary folder, then runs each
variant in its own subprocess (`--only VARIANT`, loading that checkpoint), so they neither
share memory nor compete for cores. Each child reports: compile seconds (`lower` +
`compile`), the median of `--steps` timed steps after one warm-up step, XLA's memory
analysis of the compiled step (temporary buffers; arguments), the process's peak RSS, and
the losses of the first and last steps: with equal weights and updates, these agree across
variants to float32 rounding. Not a test: numbers depend on the machine.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

VARIANTS = {"ours": "ours (scan)", "ours_remat": "ours + remat", "hf_flax": "HF Flax"}
MARKER = "BENCH_TRAIN_JSON "
LEARNING_RATE, WEIGHT_DECAY, CLIP_NORM = 1e-4, 0.01, 1.0


def hf_config(args: argparse.Namespace):
    import transformers

    pairs, odd = divmod(args.layers, 2)
    types = [[["global", "local"], pairs]] + ([[["global"], 1]] if odd else [])
    return transformers.GPTNeoConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        max_position_embeddings=max(2048, args.seq),
        attention_types=types,
        window_size=256,
        embed_dropout=0.0,
        attention_dropout=0.0,
        resid_dropout=0.0,
    )


def write_checkpoint(args: argparse.Namespace, folder: str) -> None:
    """Random weights as `flax_model.msgpack`: both sides load it without PyTorch."""
    import transformers

    transformers.FlaxGPTNeoForCausalLM(hf_config(args), seed=0).save_pretrained(folder)


def masked_size(params, mask) -> int:
    """How many parameters `mask` (a tree of bools shaped like `params`) selects."""
    import jax

    return sum(x.size for x, keep in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if keep)


def token_ids(args: argparse.Namespace) -> np.ndarray:
    return np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq)).astype(np.int32)


def ours_step(folder: str, args: argparse.Namespace, remat: bool):
    """(compiled step, state, batch maker, decayed parameter count)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import eqx_models
    from eqx_models.training.losses import head_loss
    from eqx_models.training.optim import adamw, decay_mask
    from eqx_models.training.step import init_state, make_train_step

    model = eqx_models.from_pretrained(folder, scan_layers=True, remat=remat)
    optimizer = adamw(LEARNING_RATE, model, weight_decay=WEIGHT_DECAY, clip_norm=CLIP_NORM)
    # No key: the model runs in inference mode, as HF's `train=False`.
    step = make_train_step(optimizer, loss_fn=lambda m, batch, key: head_loss(m, batch))
    state = init_state(model, optimizer, key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_inexact_array)
    decayed = masked_size(params, decay_mask(params))
    ids = token_ids(args)

    def batch():  # fresh arrays every step: the step donates its whole input
        return {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(ids)}

    # `filter_jit` silences this when called, not when lowered: the int batch cannot alias anything.
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    start = time.perf_counter()
    compiled = step.lower(state, batch()).compile()
    seconds = time.perf_counter() - start

    def run(state):
        state, metrics = compiled(state, batch())
        return state, metrics["loss"]

    return run, state, seconds, compiled.compiled.memory_analysis(), decayed


def hf_step(folder: str, args: argparse.Namespace):
    import jax
    import jax.numpy as jnp
    import optax
    import transformers

    model, params = transformers.FlaxGPTNeoForCausalLM.from_pretrained(folder, _do_init=False)
    params = jax.tree.map(jnp.asarray, params)
    mask = jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)
    decayed = masked_size(params, mask)
    optimizer = optax.chain(
        optax.clip_by_global_norm(CLIP_NORM),
        optax.adamw(LEARNING_RATE, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WEIGHT_DECAY, mask=mask),
    )

    def loss_fn(params, ids):
        logits = model(ids, params=params, train=False).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    def step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    ids = jnp.asarray(token_ids(args))
    state = (params, optimizer.init(params))
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*state, ids).compile()
    seconds = time.perf_counter() - start

    def run(state):
        params, opt_state, loss = compiled(*state, ids)
        return (params, opt_state), loss

    return run, state, seconds, compiled.memory_analysis(), decayed


def child(args: argparse.Namespace) -> None:
    """Measures one variant; prints one JSON line."""
    import jax

    if args.only == "hf_flax":
        run, state, compile_s, memory, decayed = hf_step(args.checkpoint, args)
    else:
        run, state, compile_s, memory, decayed = ours_step(args.checkpoint, args, remat=args.only == "ours_remat")
    losses, times = [], []
    for i in range(1 + args.steps):  # the first step is the warm-up
        start = time.perf_counter()
        state, loss = jax.block_until_ready(run(state))
        if i:
            times.append(time.perf_counter() - start)
        losses.append(float(loss))
    report = {
        "variant": args.only,
        "compile_s": compile_s,
        "step_s": statistics.median(times),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "decayed": decayed,
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
    }
    if memory is not None:
        report |= {
            "temp_mib": memory.temp_size_in_bytes / 2**20,
            "args_mib": memory.argument_size_in_bytes / 2**20,
            "out_mib": memory.output_size_in_bytes / 2**20,
            "alias_mib": memory.alias_size_in_bytes / 2**20,
        }
    print(MARKER + json.dumps(report), flush=True)


#: Issue 18's target: our training step's tokens/s over HF Flax + optax's.
SPEED_TARGET = 1.1


def shape_flags(args: argparse.Namespace) -> list[str]:
    names = ("batch", "seq", "steps", "layers", "hidden", "heads", "vocab")
    return [part for name in names for part in (f"--{name}", str(getattr(args, name)))]


def run_child(variant: str, folder: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--only", variant, "--checkpoint", folder]
    done = subprocess.run(command + shape_flags(args), capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :])
    tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
    return {"variant": variant, "error": f"exit {done.returncode}: {tail}"}


def print_table(results: list[dict], args: argparse.Namespace) -> None:
    tokens = args.batch * args.seq
    reference = next((r for r in results if r["variant"] == "hf_flax" and "error" not in r), None)

    def mib(r, key):
        return f"{r[key]:.0f}" if key in r else "n/a"

    print(
        f"| variant | compile s | step s | tokens/s | vs HF Flax (target ours >= {SPEED_TARGET}) | XLA temp MiB "
        "| XLA args MiB "
        "| peak RSS MiB | first loss | last loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        name = VARIANTS[r["variant"]]
        if "error" in r:
            print(f"| {name} | failed: {r['error']} |")
            continue
        speed = f"{reference['step_s'] / r['step_s']:.2f}x" if reference else "n/a"
        print(
            f"| {name} | {r['compile_s']:.1f} | {r['step_s']:.3f} | {tokens / r['step_s']:.0f} | {speed} "
            f"| {mib(r, 'temp_mib')} | {mib(r, 'args_mib')} | {r['rss_mib']:.0f} "
            f"| {r['first_loss']:.6f} | {r['last_loss']:.6f} |"
        )
    good = [r for r in results if "error" not in r]
    if len(good) > 1:
        spread = max(r["first_loss"] for r in good) - min(r["first_loss"] for r in good)
        decayed = ", ".join(f"{VARIANTS[r['variant']]} {r['decayed']:,}" for r in good)
        print(f"\nfirst-loss spread {spread:.2e}; weight-decayed parameters: {decayed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up step")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--only", choices=list(VARIANTS), help=argparse.SUPPRESS)  # internal: child mode
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.only:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="eqx-bench-train-") as folder:
        write_checkpoint(args, folder)
        results = [run_child(variant, folder, args) for variant in args.variants]
    import jax

    print(
        f"GPT-Neo {args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab {args.vocab}; "
        f"batch {args.batch} x seq {args.seq}; float32, no dropout, clip {CLIP_NORM} + AdamW "
        f"(lr {LEARNING_RATE}, wd {WEIGHT_DECAY} on kernels); median of {args.steps} steps after 1 warm-up; "
        f"{os.cpu_count()} CPU cores, jax {jax.__version__}, backend {jax.default_backend()}\n"
    )
    print_table(results, args)


if __name__ == "__main__":
    main()
