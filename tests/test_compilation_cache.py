"""`eqx-models` keeps compiled programs in JAX's persistent compilation cache: a second
`generate` of the same shapes compiles nothing, `--no-compilation-cache` leaves no folder,
and a folder that cannot be made never fails the command."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from eqx_models.compilation_cache import MAX_BYTES, default_folder, use_compilation_cache

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "stdlib-gpt-neo"
GENERATE = ["generate", str(EXAMPLE), "--prompt", "def ", "--max-new-tokens", "12"]


def run(argv, cache_home):
    """`eqx-models` in a fresh process whose cache folder is `cache_home`, with the cache on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(XDG_CACHE_HOME=str(cache_home), JAX_ENABLE_COMPILATION_CACHE="true")
    done = subprocess.run(
        [sys.executable, "-m", "eqx_models", *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done


def test_the_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_folder() == tmp_path / "eqx_models" / "jax"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the specification says
    assert default_folder() == Path("~/.cache/eqx_models/jax").expanduser()
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_folder() == Path("~/.cache/eqx_models/jax").expanduser()


def test_a_folder_that_cannot_be_made_leaves_the_cache_off(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", True)  # conftest turns it off for tests
    try:
        assert use_compilation_cache(tmp_path / "file" / "jax") is None
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
    assert "compiling without a compilation cache: cannot use" in capsys.readouterr().err
    assert jax.config.jax_compilation_cache_dir is None


@pytest.mark.slow  # two fresh processes that import jax and compile
def test_a_second_generate_loads_every_program_from_the_cache(tmp_path):
    folder = tmp_path / "eqx_models" / "jax"
    first = run(GENERATE, tmp_path)
    stored = sorted(p.name for p in folder.iterdir())
    assert any("sample_start" in name for name in stored) and any("sample_advance" in name for name in stored)
    second = run(GENERATE, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == stored  # nothing new was compiled
    assert second.stdout == first.stdout


@pytest.mark.slow  # fresh processes that import jax and compile
def test_the_flag_or_an_unusable_folder_runs_without_a_cache(tmp_path):
    run(["--no-compilation-cache", *GENERATE], tmp_path)
    assert not (tmp_path / "eqx_models").exists()
    (tmp_path / "file").write_text("XDG_CACHE_HOME is a file")
    done = run(GENERATE, tmp_path / "file")
    assert "note: compiling without a compilation cache: cannot use" in done.stderr


def cap_in_fresh_process(folder, **env):
    """`jax_compilation_cache_max_size` after `use_compilation_cache(folder)`, in a fresh process."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    environment.update(JAX_ENABLE_COMPILATION_CACHE="true", **env)
    code = (
        "import jax, sys; from eqx_models.compilation_cache import use_compilation_cache;"
        "use_compilation_cache(sys.argv[1]); print(jax.config.jax_compilation_cache_max_size)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(folder)], env=environment, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_the_folder_is_capped_unless_jax_is_told_otherwise(tmp_path):
    assert cap_in_fresh_process(tmp_path) == MAX_BYTES == 2**30
    assert cap_in_fresh_process(tmp_path, JAX_COMPILATION_CACHE_MAX_SIZE="-1") == -1
