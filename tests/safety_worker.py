"""Subprocess side of the kill and concurrency tests (run as a script, never imported by a
test module).

    python safety_worker.py kill KINDS SIGNALS TRIALS SEED ROOT
        For each KIND (save, export, checkpoint; comma-separated) and SIGNAL (KILL, TERM):
        a forked child writes two versions of a tiny model (or train state) in turn to one
        destination, with overwrite; it is killed after a random delay (0 to 3 writes);
        the destination must hold one whole version; after SIGTERM nothing else may be
        left, after SIGKILL the next write must leave nothing. Prints a JSON summary.
    python safety_worker.py concurrent DST THREADS SEED GO
        Prints `ready`, waits for the file GO, then THREADS threads save_pretrained to DST
        at once (half with overwrite=True); prints one JSON record per writer.
    python safety_worker.py convert-loop SRC DST
        Runs `eqx-models convert SRC DST --overwrite` over and over (alternating dtypes),
        printing `ready` after the first; exits with the first non-zero code.
"""

import json
import os
import random
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import jax
import numpy as np
from safety_cases import leftovers, tiny_model

import eqx_models
from eqx_models.files import foreign_entries
from eqx_models.training.checkpoint import CheckpointManager, load_train_state
from eqx_models.training.step import TrainState


def _numpy_leaves(tree):
    # The forked child must not call into XLA (its threads do not survive a fork).
    return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, tree)


def _versions(kind):
    if kind == "checkpoint":
        states = []
        for seed in (1, 2):
            model = _numpy_leaves(tiny_model(seed))
            states.append(TrainState(model, (), np.asarray(seed, np.int32), np.asarray([0, seed], np.uint32)))
        return states
    return [_numpy_leaves(tiny_model(seed)) for seed in (1, 2)]


def _write(kind, dst, version):
    if kind == "save":
        eqx_models.save_pretrained(version, dst, overwrite=True)
    elif kind == "export":
        eqx_models.export_hf(version, dst, overwrite=True)
    else:  # dst is ROOT/step_XXXXXXXX
        CheckpointManager(dst.parent, keep=None).save(int(dst.name.split("_")[1]), version)


def _fingerprints(kind, versions, scratch):
    """The files of each version as written (marker included), to compare with dst."""
    prints = []
    for index, version in enumerate(versions):
        folder = scratch / f"v{index}" / "step_00000001" if kind == "checkpoint" else scratch / f"v{index}"
        _write(kind, folder, version)
        prints.append({p.name: p.read_bytes() for p in folder.iterdir()})
    return prints


def _state(dst, prints, kind, like):
    """Which version `dst` holds whole (0 or 1), else a description of what is wrong."""
    if not dst.is_dir():
        return f"missing ({dst.exists()})"
    if foreign_entries(dst) != []:
        return f"not one whole folder of ours: {sorted(p.name for p in dst.iterdir())}"
    files = {p.name: p.read_bytes() for p in dst.iterdir()}
    for index, expected in enumerate(prints):
        if files == expected:
            if kind == "checkpoint":
                load_train_state(dst, like)
            return index
    return f"neither version: {sorted(files)}"


def kill(kind, sig, trials, rng, root):
    versions = _versions(kind)
    prints = _fingerprints(kind, versions, root / "scratch")
    dst = root / "run" / "step_00000001" if kind == "checkpoint" else root / "dst"
    _write(kind, dst, versions[0])
    started = time.perf_counter()
    for _ in range(5):
        _write(kind, dst, versions[0])
    duration = (time.perf_counter() - started) / 5
    signum = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}[sig]
    summary = {"trials": 0, "held": [0, 0], "left_temporaries": 0, "cleaned_by_next_write": 0, "failures": []}
    for trial in range(trials):
        pid = os.fork()
        if pid == 0:  # the child: write the two versions in turn until killed
            try:
                index = 1
                while True:
                    _write(kind, dst, versions[index])
                    index = 1 - index
            except BaseException:
                traceback.print_exc()  # shown by the test when the child did not die by the signal
            finally:
                os._exit(3)
        time.sleep(rng.uniform(0, 3 * duration))
        os.kill(pid, signum)
        _, status = os.waitpid(pid, 0)
        summary["trials"] += 1
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signum):
            summary["failures"].append(f"trial {trial}: child ended with status {status}, not by {sig}")
        state = _state(dst, prints, kind, versions[0])
        if not isinstance(state, int):
            summary["failures"].append(f"trial {trial}: {state}")
            break
        summary["held"][state] += 1
        left = leftovers(dst.parent)
        if left:
            summary["left_temporaries"] += 1
            if signum == signal.SIGTERM:
                summary["failures"].append(f"trial {trial}: SIGTERM left {left}")
            _write(kind, dst, versions[state])  # the next run: removes what a killed writer left
            if leftovers(dst.parent):
                summary["failures"].append(f"trial {trial}: the next write left {leftovers(dst.parent)}")
            else:
                summary["cleaned_by_next_write"] += 1
    summary["save_seconds"] = round(duration, 4)
    return summary


def kill_all(kinds, sigs, trials, seed, root):
    warnings.simplefilter("ignore")  # JAX warns that fork() and threads do not mix: the child uses no XLA
    rng = random.Random(seed)
    results = {}
    for kind in kinds:
        for sig in sigs:
            folder = root / f"{kind}-{sig}"
            folder.mkdir(parents=True)
            results[f"{kind}/{sig}"] = kill(kind, sig, trials, rng, folder)
    print(json.dumps(results))


def concurrent(dst, threads, seed, go):
    models = [tiny_model(s) for s in (seed, seed + 1)]
    results = [None] * threads

    def write(index):
        overwrite = index % 2 == 0
        version = index % 4 // 2
        try:
            eqx_models.save_pretrained(models[version], dst, overwrite=overwrite)
            results[index] = {"seed": seed + version, "overwrite": overwrite, "ok": True}
        except Exception as err:
            results[index] = {"overwrite": overwrite, "ok": False, "error": f"{type(err).__name__}: {err}"}

    workers = [threading.Thread(target=write, args=(i,)) for i in range(threads)]
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.001)
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    print(json.dumps(results))


def convert_loop(src, dst):
    from eqx_models.cli import main

    dtypes = ["float32", "bfloat16"]
    index = 0
    while True:
        code = main(["convert", src, dst, "--overwrite", "--dtype", dtypes[index]])
        if code != 0:
            sys.exit(code)
        if index == 0:
            print("ready", flush=True)
        index = 1 - index


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "kill":
        kill_all(args[0].split(","), args[1].split(","), int(args[2]), int(args[3]), Path(args[4]))
    elif mode == "concurrent":
        concurrent(Path(args[0]), int(args[1]), int(args[2]), Path(args[3]))
    elif mode == "convert-loop":
        convert_loop(args[0], args[1])
    else:
        sys.exit(f"unknown mode {mode}")
