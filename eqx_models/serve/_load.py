"""A bounded load test of a running server: a fixed list of completion requests sent by a
number of concurrent clients, within a time limit; throughput and latency percentiles.
Standard library only (threads and `urllib`), so it runs wherever the server does."""

import concurrent.futures
import dataclasses
import json
import time
import urllib.request
from collections.abc import Sequence

import numpy as np

from ..errors import EqxModelsError


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What a load test measured: every request's latency (seconds) and completion tokens,
    and the wall time of the whole run."""

    clients: int
    seconds: float
    latencies: tuple[float, ...]
    completion_tokens: tuple[int, ...]
    texts: tuple[str, ...]

    @property
    def tokens_per_second(self) -> float:
        return sum(self.completion_tokens) / self.seconds

    def percentile(self, q: float | int) -> float:
        return float(np.percentile(self.latencies, q))

    def line(self) -> str:
        return (
            f"{self.clients:>3} clients: {len(self.latencies)} requests, {sum(self.completion_tokens)} tokens in "
            f"{self.seconds:.2f}s, {self.tokens_per_second:.1f} tokens/s, latency p50 {self.percentile(50):.2f}s "
            f"p99 {self.percentile(99):.2f}s"
        )


def load_test(
    url: str,
    prompts: Sequence[str],
    *,
    clients: int,
    max_tokens: int,
    time_limit: float | int,
    model: str | None = None,
) -> LoadReport:
    """Sends one greedy `/v1/completions` request per prompt to the server at `url`, at most
    `clients` at a time. Raises `EqxModelsError` if a request fails or the run exceeds
    `time_limit` seconds (requests still queued then are abandoned)."""

    def one(prompt: str) -> tuple[float, int, str]:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        if model is not None:
            body["model"] = model
        request = urllib.request.Request(
            url.rstrip("/") + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=time_limit) as response:
            answer = json.loads(response.read())
        return time.perf_counter() - started, answer["usage"]["completion_tokens"], answer["choices"][0]["text"]

    started = time.perf_counter()
    pool = concurrent.futures.ThreadPoolExecutor(clients)
    futures = [pool.submit(one, prompt) for prompt in prompts]
    done, late = concurrent.futures.wait(futures, timeout=time_limit)
    pool.shutdown(wait=not late, cancel_futures=True)
    if late:
        raise EqxModelsError(f"{len(late)} of {len(prompts)} requests were not answered within {time_limit}s")
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:
        raise EqxModelsError(f"{len(failed)} of {len(prompts)} requests failed, the first with: {failed[0]}")
    results = [f.result() for f in futures]
    return LoadReport(
        clients=clients,
        seconds=time.perf_counter() - started,
        latencies=tuple(r[0] for r in results),
        completion_tokens=tuple(r[1] for r in results),
        texts=tuple(r[2] for r in results),
    )
