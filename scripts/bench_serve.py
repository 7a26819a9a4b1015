"""Serving throughput: the same greedy completion requests sent by 1, 4 and 16 concurrent
clients to `eqx-models serve` (run in this process on 127.0.0.1), tokens/s and latency.

    python scripts/bench_serve.py                          # the bundled model
    python scripts/bench_serve.py --model gpt-neo-125m     # random weights, GPT-Neo-125M's shape
    python scripts/bench_serve.py --requests 32 --max-tokens 64 --markdown

One client sends the requests one after another (what a server without batching does);
with 16 clients all of them decode together in one compiled step. Not a test: numbers depend
on the machine.
"""

import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "stdlib-gpt-neo"
PROMPTS = [
    "def ",
    "import os\n",
    "class Node:\n    def __init__(self",
    "for i in range(10):\n",
    "    return ",
    "# Copyright",
    "if __name__ == ",
    "with open(path) as f:\n",
]


def gpt_neo_125m(folder: Path) -> Path:
    """A GPT-Neo-125M-shaped model with random weights and the bundled tokenizer."""
    import shutil

    import jax

    import eqx_models
    from eqx_models.models.gpt_neo import GPTNeoConfig, GPTNeoForCausalLM

    config = GPTNeoConfig(
        vocab_size=50257,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        attention_types=((("global", "local"), 6),),
        max_position_embeddings=2048,
        window_size=256,
        bos_token_id=1,
        eos_token_id=1,
    )
    eqx_models.save_pretrained(GPTNeoForCausalLM(config, key=jax.random.key(0)), folder / "gpt-neo-125m")
    shutil.copy(EXAMPLE / "tokenizer.json", folder / "gpt-neo-125m")
    return folder / "gpt-neo-125m"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("bundled", "gpt-neo-125m"), default="bundled")
    parser.add_argument("--requests", type=int, default=16, help="requests per run (default 16)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default 64)")
    parser.add_argument("--context", type=int, default=256, help="cache slots per request (default 256)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--time-limit", type=float, default=1800.0, help="seconds allowed per run")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()

    from eqx_models import serve

    with tempfile.TemporaryDirectory() as tmp:
        src = EXAMPLE if args.model == "bundled" else gpt_neo_125m(Path(tmp))
        started = time.perf_counter()
        served = serve.load_served(str(src), slots=max(args.clients), context=args.context, name=args.model)
        serve.warm_up(served)
        print(f"loaded and compiled in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = serve.server(served, grace=5.0)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
        serve.load_test(url, prompts[:2], clients=2, max_tokens=args.max_tokens, time_limit=args.time_limit)  # warm
        reports = []
        for clients in args.clients:
            report = serve.load_test(
                url, prompts, clients=clients, max_tokens=args.max_tokens, time_limit=args.time_limit
            )
            print(report.line(), file=sys.stderr)
            reports.append(report)
        server.should_exit = True
        thread.join()
        sock.close()

    base = reports[0].tokens_per_second
    if args.markdown:
        print("| model | clients | requests x max_tokens | tokens/s | vs 1 client | p50 latency | p99 latency |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in reports:
            print(
                f"| {args.model} | {r.clients} | {len(r.latencies)} x {args.max_tokens} | {r.tokens_per_second:.1f} "
                f"| {r.tokens_per_second / base:.1f}x | {r.percentile(50):.2f}s | {r.percentile(99):.2f}s |"
            )
    else:
        for r in reports:
            print(f"{r.line()}  ({r.tokens_per_second / base:.1f}x one client)")


if __name__ == "__main__":
    main()
