import gc
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `eqx-models` keeps compiled programs in the user's cache folder: not from tests, in process or in the
# subprocesses they start (tests/test_compilation_cache.py points it at tmp_path).
os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")

import jax
import pytest

# As in Equinox's own test suite: no silent dtype promotion.
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each test module compiles its own programs, and JAX keeps every one (and the constants
    they hold) for the life of the process: a pytest-xdist worker grew past 5 GiB over a full
    run. Dropping them after each module bounds a worker's memory."""
    yield
    jax.clear_caches()
    gc.collect()


# XLA:CPU's compiler (jaxlib 0.10) has segfaulted inside `backend_compile_and_load` at
# random: twice in two full runs, in different tests (test_verify, test_training), each of
# which passes on its own and when rerun. A test whose pytest-xdist worker crashes is run
# once more in a fresh worker and counted as "rerun" in the summary; a second crash fails.
_CRASHES: dict[str, int] = {}


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
    _CRASHES[crashitem] = _CRASHES.get(crashitem, 0) + 1
    if _CRASHES[crashitem] == 1:
        sched.mark_test_pending(crashitem)
        report.outcome = "rerun"


def pytest_report_teststatus(report):
    if report.outcome == "rerun":
        return "rerun", "R", ("RERUN (worker crashed; running it again)", {"yellow": True})
    return None


@pytest.fixture
def getkey():
    keys = iter(jax.random.split(jax.random.key(0), 1000))
    return lambda: next(keys)
