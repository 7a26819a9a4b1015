"""JAX's persistent compilation cache for the command line: a second `eqx-models generate` of
the same shapes loads its compiled programs from disk instead of compiling them again.

Only `eqx-models` turns it on (`use_compilation_cache`); importing the library never changes
JAX's configuration. The folder follows the XDG convention, `$XDG_CACHE_HOME/eqx_models/jax`
or `~/.cache/eqx_models/jax`, and JAX's own variables take precedence:
`JAX_COMPILATION_CACHE_DIR` chooses another folder, `JAX_ENABLE_COMPILATION_CACHE=false` turns
the cache off, `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` keeps its meaning (we store every
program, since even the small ones of a small model take a tenth of a second to compile).
The folder is capped at `MAX_BYTES` (JAX deletes the least recently used programs beyond it)
unless `JAX_COMPILATION_CACHE_MAX_SIZE` says otherwise (`-1`: no cap).
"""

import os
import sys
from pathlib import Path

#: The cache folder's default cap. The README's first command stores 260 kB (its two
#: generation programs are 46 kB each): a gigabyte keeps thousands of shapes.
MAX_BYTES = 2**30


def default_folder() -> Path:
    """`$XDG_CACHE_HOME/eqx_models/jax`, or `~/.cache/eqx_models/jax` when the variable is
    unset or not an absolute path (which the XDG specification says to ignore)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path("~/.cache").expanduser()
    return root / "eqx_models" / "jax"


def use_compilation_cache(folder: str | Path | None = None) -> Path | None:
    """Turns on JAX's persistent compilation cache in `folder` (default: JAX's
    `JAX_COMPILATION_CACHE_DIR` if set, else `default_folder()`), storing every compiled
    program, in a folder capped at `MAX_BYTES`. Call it before anything is compiled.

    **Returns:** the folder, or `None` when the cache stays off: JAX's
    `JAX_ENABLE_COMPILATION_CACHE` is false, or the folder cannot be created or written
    (then a one-line note goes to stderr; the command runs on, compiling as usual).
    """
    import jax

    if not jax.config.jax_enable_compilation_cache:
        return None
    folder = Path(folder or jax.config.jax_compilation_cache_dir or default_folder())
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"[Errno 13] Permission denied: {str(folder)!r}")
    except OSError as err:
        print(f"note: compiling without a compilation cache: cannot use {folder}: {err}", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return folder
