"""The training loop: steps over a batch stream with a progress bar (loss, tokens/s, ETA),
periodic evaluation, metrics appended to a JSONL file, and a loss-curve PNG at the end."""

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ..files import write_text_atomically
from .losses import head_loss
from .step import TrainState

Batch = dict[str, Any]


@eqx.filter_jit
def _eval_step(model: eqx.Module, batch: Batch, loss_fn: Callable) -> tuple[Any, dict[str, Any]]:
    # Module-level, with `loss_fn` a static argument: every evaluation reuses one compile.
    return loss_fn(model, batch, key=None)


def evaluate(
    model: eqx.Module,
    batches: Iterable[Batch],
    *,
    loss_fn: Callable = head_loss,
    place: Callable[[Batch], Batch] | None = None,
) -> dict[str, Any]:
    """Mean loss (and the loss function's other metrics) over `batches`, in inference mode,
    weighting each batch by its number of rows. `place` puts a host batch on devices
    (e.g. `shard_batch`, needed when `model` spans several processes); default `jnp.asarray`."""
    model = eqx.nn.inference_mode(model)
    place = place or (lambda batch: {k: jnp.asarray(v) for k, v in batch.items()})
    totals: dict[str, Any] = {}
    rows = 0
    for batch in batches:
        _, metrics = _eval_step(model, place(batch), loss_fn)
        size = len(next(iter(batch.values())))
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + float(value) * size
        rows += size
    return {name: total / max(rows, 1) for name, total in totals.items()}


def fit(
    state: TrainState,
    step: Callable[[TrainState, Batch], tuple[TrainState, dict]],
    batches: Iterator[Batch],
    *,
    steps: int,
    tokens_per_batch: int,
    metrics_path: str | Path | None = None,
    evaluate_every: int = 0,
    eval_batches: Callable[[], Iterable[Batch]] | None = None,
    on_step: Callable[[TrainState, dict[str, Any]], None] | None = None,
    place: Callable[[Batch], Batch] | None = None,
    eval_place: Callable[[Batch], Batch] | None = None,
    progress: bool = True,
    report: Callable[[str], None] | None = None,
) -> tuple[TrainState, list[dict[str, Any]]]:
    """Runs `step` until `state.step == steps`, pulling batches from `batches`.

    - `metrics_path`: a JSONL file; one line per step (`step`, `loss`, `tokens_per_s`, the
      step's other metrics) and one per evaluation (`eval_loss`, ...), appended so a resumed
      run continues the same file. `tokens_per_s` counts from the end of the first step,
      which compiles (the first step's record has its own rate, compilation included).
    - `evaluate_every`, `eval_batches`: every so many steps (and at the end) the mean loss
      over `eval_batches()`.
    - `on_step(state, metrics)`: called after every step (checkpointing, early stopping).
    - `place`: puts a host batch on devices (e.g. `shard_batch`); default `jnp.asarray`.
    - `eval_place`: the same for the evaluation batches (`evaluate`'s `place`).
    - `report`: prints the evaluation lines; default `tqdm.write`.

    Returns the final state and every metrics record.
    """
    place = place or (lambda batch: {k: jnp.asarray(v) for k, v in batch.items()})
    records: list[dict[str, Any]] = []
    log = open(metrics_path, "a") if metrics_path is not None else None  # noqa: SIM115 (closed below)
    first = int(state.step)
    bar = tqdm(total=steps, initial=first, disable=not progress, unit="step", dynamic_ncols=True)
    try:
        counted_from, started = None, time.perf_counter()
        while int(state.step) < steps:
            state, metrics = step(state, place(next(batches)))
            record = {"step": int(state.step), **{k: float(v) for k, v in jax.device_get(metrics).items()}}
            # Throughput since the first step of this call, which compiles: the first record
            # carries its own rate, compilation included; later ones exclude it.
            now = time.perf_counter()
            done = 1 if counted_from is None else record["step"] - counted_from
            record["tokens_per_s"] = done * tokens_per_batch / (now - started)
            if counted_from is None:
                counted_from, started = record["step"], now
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"the loss became {record['loss']} at step {record['step']}")
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            _write(log, record, records)
            if (
                eval_batches is not None
                and evaluate_every
                and (record["step"] % evaluate_every == 0 or record["step"] == steps)
            ):
                scores = evaluate(state.model, eval_batches(), place=eval_place)
                _write(log, {"step": record["step"], **{f"eval_{k}": v for k, v in scores.items()}}, records)
                (report or bar.write)(f"step {record['step']}: eval loss {scores['loss']:.4f}")
            if on_step is not None:
                on_step(state, record)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return state, records


def _write(log, record: dict[str, Any], records: list[dict[str, Any]]) -> None:
    records.append(record)
    if log is not None:
        log.write(json.dumps(record) + "\n")
        log.flush()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def truncate_metrics(path: str | Path, step: int) -> int:
    """Keeps the records of `path` up to `step` (the step a run resumes from) and drops the
    rest, in one atomic rewrite: the records a run wrote after its last checkpoint, which
    the resumed run writes again, and a line cut short by a kill. Returns how many lines
    were dropped (0 when the file is missing)."""
    path = Path(path)
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return 0
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    dropped = sum(1 for line in lines if line.strip()) - len(kept)
    if dropped or (lines and not path.read_bytes().endswith(b"\n")):
        write_text_atomically(path, "".join(line + "\n" for line in kept))
    return dropped


def plot_losses(records: list[dict[str, Any]], path: str | Path, *, title: str = "loss") -> bool:
    """Writes a loss-curve PNG (training loss, smoothed, and evaluation loss). Returns
    `False`, writing nothing, when matplotlib is not installed (`pip install eqx_models[train]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = map(np.asarray, zip(*train, strict=True))
        axes.plot(steps, losses, alpha=0.3, label="train")
        window = max(1, len(losses) // 50)
        if window > 1:
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            axes.plot(steps[window - 1 :], smooth, label=f"train (mean of {window})")
    if evals:
        axes.plot(*zip(*evals, strict=True), "o-", label="eval")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats / token)")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
