"""Filesystem safety: the one place where eqx_models writes folders, replaces them and
copies files in.

The guarantees, for every folder written through `atomic_folder` (converted and exported
models, training checkpoints):

- **Nothing of the user's is lost.** A destination that is a file or a symbolic link is
  refused; so is a non-empty folder, unless `overwrite=True` and the folder is one that
  eqx_models wrote (it holds our marker, `MARKER_NAME`, listing what we wrote) with
  nothing added since. The current folder and its parents are refused too, and
  `check_destination` refuses a destination that is, contains or lies inside the source.
- **All or nothing.** The folder is built under a temporary name beside the destination
  and moved into place at the end: on Linux an existing destination is swapped with the
  new folder in one step (`renameat2(RENAME_EXCHANGE)`), so at every instant the
  destination holds the old folder or the new one, never neither.
- **No trace on failure.** An exception, Ctrl-C or SIGTERM removes the temporary folder.
  A process killed outright (SIGKILL) cannot clean up: its temporary folders carry its
  pid and host (`.NAME.tmp-PID-HOST-XXXX`), and the next write into the same parent
  removes those whose writer is dead.
- **One writer at a time.** Concurrent writers of one destination (threads or processes)
  take turns on a lock file beside it (`.NAME.lock`, removed by its last holder), so each
  either succeeds whole or fails with a clear message.

Copies of side files (`copy_file_into`) read only regular files, never follow a link out
of the source's folder, and never make a file more readable than its source.

This module imports nothing from eqx_models but its error types, so that every layer can
use it.
"""

import contextlib
import ctypes
import errno
import functools
import hashlib
import inspect
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import CheckpointError, InputError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; writers are not serialised there
    fcntl = None  # type: ignore[assignment]

#: Written last into every folder `atomic_folder` produces: the names of what we wrote.
MARKER_NAME = ".eqx_models.json"
MARKER_FORMAT = 1

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
# `.NAME.tmp-PID-HOST-RANDOM` (a folder being built, or an old one being removed) and
# `.NAME.old-PID-HOST-RANDOM` (an old folder set aside where exchange is unsupported).
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[A-Za-z0-9_]+$")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM (and SIGINT) while `interrupts_raise` is
    active, so that `finally` blocks and context managers clean up as on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --------------------------------------------------------------------------- modes


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (`os.umask` alone
    would set it for a moment, under the feet of other threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_mode(*, folder: bool = False) -> int:
    """The permissions `mkdir` (0777) and `open` (0666) give under the current umask."""
    return (0o777 if folder else 0o666) & ~_umask()


def give_usual_permissions(path: str | os.PathLike) -> None:
    """Sets a file (or folder) we created to `usual_mode`: some writers (`mkdtemp`,
    safetensors) make private ones."""
    Path(path).chmod(usual_mode(folder=Path(path).is_dir()))


# --------------------------------------------------------------------------- signals
#
# Python runs signal handlers in the main thread, between bytecodes. The handlers this
# module installs consult `_Deferral`: while a section that must run to its end is in
# progress (a rename sequence, a cleanup: `deferred_signals`) they only record the signal,
# which is raised again when the last section ends. A cleanup in a `finally` begins with
# the inline `_Deferral.depth += 1`: Python checks for signals only at calls and backward
# jumps, so none can come in between. Handlers of other code are left alone.


class _Unwinding:
    """`contextlib.contextmanager`'s context manager, minus two windows where a signal's
    exception would leave the generator holding what it holds (a lock, a temporary
    folder) until the process ends: right after the generator yielded, before `__enter__`
    returns (then `__exit__` never runs), and on entering `__exit__` (then the generator is
    never resumed). A signal arriving in either is held back (see `_held_back`) and raised
    once the generator has run its cleanup."""

    def __init__(self, gen: Any):
        self.gen = gen

    def __enter__(self):
        try:
            value = next(self.gen)
            _deliver_held_back()  # one that came meanwhile: the generator unwinds below
            return value
        except StopIteration:
            raise RuntimeError("generator didn't yield") from None
        except BaseException as err:
            if self.gen.gi_suspended:  # it had yielded: run its cleanup
                self.gen.throw(err)
            raise

    def __exit__(self, typ, value, traceback):
        # No call may come before the generator is resumed: the first one could raise.
        try:
            if typ is None:
                try:
                    next(self.gen)
                except StopIteration:
                    return False
                raise RuntimeError("generator didn't stop")
            try:
                self.gen.throw(value)
            except StopIteration as stop:
                return stop is not value
            except BaseException as err:
                if err is value:
                    return False
                raise
            raise RuntimeError("generator didn't stop after throw()")
        finally:
            _deliver_held_back()


def _unwinding(function: Any) -> Any:
    """Decorates a generator function as `contextlib.contextmanager` does, with `_Unwinding`."""

    @functools.wraps(function)
    def manager(*args: Any, **kwargs: Any) -> _Unwinding:
        return _Unwinding(function(*args, **kwargs))

    return manager


class _Deferral:
    depth = 0  # sections in progress, in any thread
    pending: int | None = None  # the first signal held back


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _held_back(signum: int, frame: Any) -> bool:
    """Whether a handler must hold `signum` back (recording it) rather than raise: inside a
    deferred section, or on entering the `__enter__`/`__exit__` of our context managers."""
    if _Deferral.depth or (frame is not None and frame.f_code in _PROTECTED_CODE):
        _Deferral.pending = _Deferral.pending or signum
        return True
    return False


def _deliver_held_back() -> None:
    """Raises the signal held back, to the handler now in place, unless a section is
    still in progress (its end will)."""
    if not _Deferral.depth and _Deferral.pending is not None:
        signum, _Deferral.pending = _Deferral.pending, None
        signal.raise_signal(signum)


def _end_deferral(*, deliver: bool = True) -> None:
    """Ends a section begun with `_Deferral.depth += 1`; the last one to end raises the
    signal held back."""
    _Deferral.depth -= 1
    if deliver:
        _deliver_held_back()


@_unwinding
def deferred_signals() -> Iterator[None]:
    """Holds SIGINT and SIGTERM back while inside (for the handlers of this module) and
    raises the first one received on leaving: the section runs to its end. A signal may
    still interrupt before the section starts: put what needs cleaning up in a `try`."""
    _Deferral.depth += 1
    try:
        yield
    finally:
        _end_deferral()


def _set_handlers(handlers: dict[int, Any]) -> None:
    """Installs `handlers`; a signal arriving meanwhile is held back for the caller."""
    _Deferral.depth += 1
    try:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    finally:
        _end_deferral(deliver=False)


class _DroppedInterruptions:
    """Python drops an exception raised where no caller can catch it (a garbage-collection
    callback, a `__del__`, a weakref callback) and prints it as "Exception ignored": a
    signal's exception raised there would be lost, the work would go on and a traceback
    would reach the user. While our `handlers` are installed, such a dropped interruption
    is not printed; the signal is sent to the main thread again 20 ms later, to be raised
    where it unwinds."""

    DELAY = 0.02

    def __init__(self, handlers: dict[int, Any]):
        self.handlers = handlers
        self.previous = sys.unraisablehook
        self.timers: list[threading.Timer] = []
        sys.unraisablehook = self.hook

    def hook(self, unraisable: Any) -> None:
        err = unraisable.exc_value
        signum = getattr(err, "signum", signal.SIGINT) if isinstance(err, KeyboardInterrupt) else None
        if signum not in self.handlers:
            self.previous(unraisable)
            return
        timer = threading.Timer(self.DELAY, self.resend, (signum,))
        timer.daemon = True
        self.timers.append(timer)
        timer.start()

    def resend(self, signum: int) -> None:
        if signal.getsignal(signum) == self.handlers[signum]:  # still ours: not restored meanwhile
            signal.pthread_kill(threading.main_thread().ident, signum)

    def release(self) -> None:
        """Stops sending again (before the previous handlers return) and restores the hook."""
        for timer in self.timers:
            timer.cancel()
        if sys.unraisablehook == self.hook:
            sys.unraisablehook = self.previous


class interrupts_raise:  # noqa: N801 (a context manager, named like contextlib's)
    """SIGINT and SIGTERM raise `Interrupted` (a `KeyboardInterrupt`) in the main thread
    while inside: what the CLI runs its commands under. Elsewhere a no-op.

    `received` keeps the signal: a library that catches every exception (numpy's
    `tofile` turns one raised while it flushes into a `TypeError`) may surface the
    interruption as another error, and the caller should still treat it as one. One that
    Python drops (raised in a garbage-collection callback) is raised again: see
    `_DroppedInterruptions`."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._dropped: _DroppedInterruptions | None = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = self.received or signum
        if not _held_back(signum, frame):
            raise Interrupted(signum)

    def __enter__(self) -> "interrupts_raise":
        if _in_main_thread():
            previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
            self._previous = {sig: handler for sig, handler in previous.items() if handler is not None}
            try:
                handlers = {sig: self._handler for sig in self._previous}
                self._dropped = _DroppedInterruptions(handlers)
                _set_handlers(handlers)
            except BaseException:  # a signal right after: `__exit__` would not run
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        _Deferral.depth += 1
        try:
            if self._dropped is not None:
                self._dropped.release()
                self._dropped = None
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            if _Deferral.depth == 1:  # one held back while restoring is in `received`
                _Deferral.pending = None
        finally:
            _end_deferral(deliver=False)


@_unwinding
def _signals_unwind() -> Iterator[None]:
    """While a temporary folder exists, SIGTERM and SIGINT under their default handling
    (terminate; `KeyboardInterrupt`) raise, so that the folder is removed; then a SIGTERM
    terminates the process by its default action, as the sender asked, even if a library
    turned the exception into another. One that Python drops is raised again
    (`_DroppedInterruptions`). Handlers someone installed (the CLI's
    `interrupts_raise`) are left alone."""
    if not _in_main_thread():
        yield
        return
    saved = {}
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        saved[signal.SIGTERM] = signal.SIG_DFL
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        saved[signal.SIGINT] = signal.default_int_handler
    received: set[int] = set()

    def handler(signum: int, frame: Any) -> None:
        received.add(signum)
        if not _held_back(signum, frame):
            raise _Terminated(signum) if signum == signal.SIGTERM else KeyboardInterrupt()

    unwinding = dropped = None
    try:
        if saved:
            dropped = _DroppedInterruptions(dict.fromkeys(saved, handler))
        _set_handlers(dict.fromkeys(saved, handler))
        yield
    except BaseException as err:
        unwinding = err
        raise
    finally:
        _Deferral.depth += 1
        try:
            if dropped is not None:
                dropped.release()
            for sig, previous in saved.items():
                signal.signal(sig, previous)
            if _Deferral.depth == 1 and _Deferral.pending is not None:
                received.add(_Deferral.pending)
                _Deferral.pending = None
        finally:
            _end_deferral(deliver=False)
        if signal.SIGTERM in received:
            signal.raise_signal(signal.SIGTERM)  # the default action now: terminate
        if signal.SIGINT in received and not isinstance(unwinding, KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # `KeyboardInterrupt`, if a library dropped it


class _Terminated(Interrupted):
    """SIGTERM under `_signals_unwind`: the process terminates once it has unwound."""


# The frames in which a handler holds a signal back: their first instruction already
# checks for signals, before any `try` of theirs is in place.
_PROTECTED_CODE = frozenset(
    inspect.unwrap(method).__code__ for method in (_Unwinding.__enter__, _Unwinding.__exit__, interrupts_raise.__exit__)
)


# --------------------------------------------------------------------------- destinations


def resolve_destination(path: str | os.PathLike) -> Path:
    """The absolute destination `path` names, with the symlinks of its parent resolved but
    not a symlink at its last component (which the checks refuse); `.`, `..` and trailing
    slashes are resolved to the folder they name."""
    raw = os.fspath(path)
    if not raw:
        raise InputError("the destination path is empty")
    stripped = raw.rstrip(os.sep) or os.sep
    head, tail = os.path.split(stripped)
    if tail in ("", os.curdir, os.pardir):
        return Path(os.path.realpath(stripped))
    return Path(os.path.realpath(head or os.curdir)) / tail


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _shown(path: str | os.PathLike, resolved: Path) -> str:
    given = os.fspath(path)
    return given if os.path.abspath(given) == str(resolved) else f"{given} ({resolved})"


def check_destination(
    destination: str | os.PathLike, *, source: str | os.PathLike | None = None, overwrite: bool = False
) -> Path:
    """Refuses, with a one-line `InputError`, a destination that `atomic_folder` would
    refuse, and one that is, contains or lies inside `source` (after resolving symlinks,
    `.` and `..`). Call it before any long work. Returns the resolved destination."""
    target = resolve_destination(destination)
    shown = _shown(destination, target)
    if source is not None:
        src = Path(os.path.realpath(source))
        if target == src:
            raise InputError(f"destination {shown} is the source folder itself; write to another folder")
        if _within(target, src):
            raise InputError(f"destination {shown} is inside the source folder {source}; write outside it")
        if _within(src, target):
            raise InputError(f"destination {shown} contains the source folder {source}; write to another folder")
    _check_parent(target.parent)
    _inspect(target, shown, overwrite=overwrite)
    return target


def _inspect(target: Path, shown: str, *, overwrite: bool) -> bool:
    """Whether `target` exists, after refusing what may not be replaced."""
    try:
        cwd = Path(os.path.realpath(os.getcwd()))
    except OSError:  # the current folder was deleted
        cwd = None
    if cwd is not None and _within(cwd, target):
        raise InputError(f"destination {shown} is the current folder or contains it; name a new folder")
    if target.is_symlink():
        raise InputError(
            f"destination {shown} is a symbolic link (to {os.readlink(target)}); eqx_models does not write "
            "through or replace links: name a real folder"
        )
    if not target.exists():
        return False
    if not target.is_dir():
        raise InputError(f"destination {shown} exists and is not a folder; eqx_models will not replace it")
    entries = sorted(os.listdir(target))
    if not entries:
        return True
    if not overwrite:
        raise InputError(
            f"destination {shown} is not empty; pass --overwrite (overwrite=True) to replace a folder "
            "eqx_models wrote, or name a new or empty folder"
        )
    foreign = foreign_entries(target, entries)
    if foreign is None:
        raise InputError(
            f"destination {shown} was not written by eqx_models (it has no valid {MARKER_NAME}); it is never "
            "replaced, even with --overwrite: name a new folder or remove it yourself"
        )
    if foreign:
        few = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise InputError(
            f"destination {shown} holds what eqx_models did not write ({few}); it is not replaced: "
            "move those out or name another folder"
        )
    return True


def foreign_entries(folder: Path, entries: list[str] | None = None) -> list[str] | None:
    """The entries of `folder` that its marker does not list as ours (`None` when the
    folder has no readable marker: then none of it is ours)."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text())
        listed = marker["entries"]
        if marker.get("writer") != "eqx_models" or not isinstance(listed, dict):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    foreign = []
    for name in sorted(os.listdir(folder)) if entries is None else entries:
        if name == MARKER_NAME:
            continue
        path = folder / name
        kind = "folder" if path.is_dir() and not path.is_symlink() else "file"
        if listed.get(name) != kind:
            foreign.append(name + ("/" if kind == "folder" else ""))
    return foreign


def _write_marker(folder: Path) -> None:
    entries = {
        entry.name: "folder" if entry.is_dir(follow_symlinks=False) else "file"
        for entry in os.scandir(folder)
        if entry.name != MARKER_NAME
    }
    marker = {"writer": "eqx_models", "format": MARKER_FORMAT, "entries": dict(sorted(entries.items()))}
    with open(folder / MARKER_NAME, "x") as file:
        file.write(json.dumps(marker, indent=2) + "\n")


def _check_parent(parent: Path) -> None:
    for folder in (parent, *parent.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise InputError(f"cannot write into {parent}: {folder} is not a folder")
            return


# --------------------------------------------------------------------------- temporaries


def _writer_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a name we wrote: leave it
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _stale(name: str, kind: str) -> re.Match | None:
    match = _TEMPORARY.match(name)
    if match and match["kind"] == kind and match["host"] == _HOST and not _writer_alive(int(match["pid"])):
        return match
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale_temporaries(parent: str | os.PathLike) -> list[Path]:
    """Removes the temporary folders and files in `parent` that a killed writer on this
    host left behind (their pid is dead); returns them. Live writers' are kept."""
    removed = []
    try:
        names = os.listdir(parent)
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for name in names:
        if _stale(name, "tmp"):
            _remove(Path(parent) / name)
            removed.append(Path(parent) / name)
    return removed


def _recover(target: Path) -> None:
    """Finishes the replace of a writer killed after setting the old folder aside (where
    the atomic exchange is unsupported): the old folder comes back if no new one took its
    place, else it goes. Runs under the destination's lock."""
    for name in os.listdir(target.parent):
        match = _stale(name, "old")
        if match and match["name"] == target.name:
            aside = target.parent / name
            if os.path.lexists(target):
                _remove(aside)
            else:
                os.rename(aside, target)


def _temporary_name(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{os.getpid()}-{_HOST}-"


@_unwinding
def temporary_beside(target: str | os.PathLike, *, folder: bool = True) -> Iterator[Path]:
    """A temporary folder (or empty file) beside `target`, named so that a later run can
    tell it is stale, removed on leaving unless it was renamed away."""
    target = Path(target)
    path = None
    try:
        with deferred_signals():  # an interruption comes after `path` is known, so it is removed
            if folder:
                path = Path(tempfile.mkdtemp(prefix=_temporary_name(target, "tmp"), dir=target.parent))
            else:
                fd, name = tempfile.mkstemp(prefix=_temporary_name(target, "tmp"), dir=target.parent)
                os.close(fd)
                path = Path(name)
        yield path
    finally:
        _Deferral.depth += 1  # first: see `_Deferral`
        try:
            if path is not None and os.path.lexists(path):
                _remove(path)
        finally:
            _end_deferral()


def remove_folder(folder: str | os.PathLike) -> None:
    """Removes a folder of ours so that an interruption never leaves part of it under its
    own name: it is first renamed to a temporary name (which a later run removes if this
    process dies), then deleted."""
    folder = Path(folder)
    with deferred_signals():
        aside = folder.parent / (_temporary_name(folder, "tmp") + secrets.token_hex(4))
        os.rename(folder, aside)
        _remove(aside)


# --------------------------------------------------------------------------- lock


@_unwinding
def destination_lock(target: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on `target` for writers of eqx_models, threads or processes:
    `flock` on `.NAME.lock` beside it. The holder removes the file on release; a waiter
    that got the lock on a removed file tries again on the new one. A lock file left by a
    killed holder is taken over (the kernel released its lock) and removed."""
    target = Path(target)
    if fcntl is None:
        yield
        return
    path = target.parent / f".{target.name}.lock"
    fd, held = None, False
    try:
        while not held:
            with deferred_signals():  # an interruption comes after `fd` is known, so it is closed
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)  # may wait; Ctrl-C and SIGTERM still interrupt it
            held = _locks_the_file(fd, path)
            if not held:  # the previous holder removed that file: lock the new one
                with deferred_signals():
                    os.close(fd)
                    fd = None
        yield
    finally:
        _Deferral.depth += 1  # first: see `_Deferral`
        try:
            if fd is not None:
                if not held:  # interrupted before holding it: remove the file only if it is free
                    with contextlib.suppress(OSError):
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        held = _locks_the_file(fd, path)
                if held:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                os.close(fd)
        finally:
            _end_deferral()


def _locks_the_file(fd: int, path: Path) -> bool:
    """Whether the (locked) `fd` is still the file at `path`."""
    try:
        current = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino)


# --------------------------------------------------------------------------- atomic folder


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2_function() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _renameat2_function()


def _rename(source: Path, target: Path, flags: int) -> bool:
    """`renameat2`; `False` where the system or the filesystem does not support `flags`."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(target))


def _commit(tmp: Path, target: Path, exists: bool, shown: str) -> None:
    """Moves the finished `tmp` to `target`, replacing an existing (checked) folder; the
    old folder ends up at `tmp` or aside and is removed."""
    if not exists:
        try:
            if not _rename(tmp, target, _RENAME_NOREPLACE):
                os.rename(tmp, target)
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise InputError(f"destination {shown} appeared while it was being written; nothing replaced") from None
            raise
        return
    if _rename(tmp, target, _RENAME_EXCHANGE):  # one step: the old folder is now at `tmp`
        _remove(tmp)
        return
    aside = target.parent / (_temporary_name(target, "old") + secrets.token_hex(4))
    os.rename(target, aside)  # a kill from here to the next rename is undone by `_recover`
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside, target)
        raise
    _remove(aside)


@_unwinding
def atomic_folder(destination: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty temporary folder beside `destination` to write into; on success it
    becomes `destination`, with our marker and the usual permissions.

    `destination` must be new, an empty folder, or (with `overwrite=True`) a folder that
    eqx_models wrote and nobody added to; anything else raises `InputError` before the
    body runs, and again at the end if it changed meanwhile (writers take turns on a
    lock). On an exception, Ctrl-C or SIGTERM the temporary folder is removed and an
    existing `destination` is untouched. Stale temporaries of killed writers beside it are
    removed first.
    """
    target = resolve_destination(destination)
    shown = _shown(destination, target)
    _check_parent(target.parent)
    _inspect(target, shown, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent)
    with _signals_unwind(), temporary_beside(target) as tmp:
        yield tmp
        with destination_lock(target):
            _recover(target)
            exists = _inspect(target, shown, overwrite=overwrite)
            with deferred_signals():
                _write_marker(tmp)
                give_usual_permissions(tmp)
                _commit(tmp, target, exists, shown)


def write_text_atomically(path: str | os.PathLike, text: str | bytes) -> None:
    """Replaces the file at `path` with `text` (or bytes) in one step (a temporary file
    beside it, renamed over it), keeping the file's permissions when it exists."""
    path = Path(path)
    with _signals_unwind(), temporary_beside(path, folder=False) as tmp:
        if isinstance(text, bytes):
            tmp.write_bytes(text)
        else:
            tmp.write_text(text)
        try:
            tmp.chmod(stat.S_IMODE(path.stat().st_mode))
        except FileNotFoundError:
            give_usual_permissions(tmp)
        with deferred_signals():
            os.replace(tmp, path)


# --------------------------------------------------------------------------- side files


def _allowed_roots(folder: Path) -> list[Path]:
    """Where a file of `folder` may really be: inside the folder, and for a snapshot of the
    Hugging Face cache (`.../snapshots/REV`, whose files are links to `../../blobs/`) in
    that repository's blobs."""
    roots = [Path(os.path.realpath(folder))]
    if folder.parent.name == "snapshots":
        roots.append(Path(os.path.realpath(folder.parent.parent / "blobs")))
    return roots


def _opened_path(fd: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def copy_file_into(source: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Copies the regular file `source` into `folder` under its own name and returns the
    copy. A symbolic link is followed only within `source`'s own folder (or its Hugging Face
    cache repository); the copy gets the usual permissions, but never more than the
    source's. Raises `CheckpointError` naming the file otherwise."""
    source, folder = Path(source), Path(folder)
    if source.name == MARKER_NAME:
        raise CheckpointError(f"extra file {source} has the name of eqx_models' own marker file")
    roots = _allowed_roots(source.parent)
    real = Path(os.path.realpath(source))
    if not any(_within(real, root) for root in roots):
        raise CheckpointError(
            f"extra file {source} is a symbolic link to {real}, outside {source.parent}; it is not copied "
            "(copy the file itself into the folder if it belongs there)"
        )
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise CheckpointError(f"extra file {source} does not exist or is not a file") from None
    except OSError as err:
        raise CheckpointError(f"cannot read extra file {source}: {err.strerror}") from None
    with open(fd, "rb") as reader:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"extra file {source} does not exist or is not a file")
        opened = _opened_path(fd)
        if opened is not None and not any(_within(opened, root) for root in roots):  # swapped meanwhile
            raise CheckpointError(f"extra file {source} changed to point outside {source.parent} while copied")
        copy = folder / source.name
        try:
            out = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise CheckpointError(f"two extra files are named {source.name}") from None
        with open(out, "wb") as writer:
            shutil.copyfileobj(reader, writer, 1 << 20)
            os.fchmod(writer.fileno(), usual_mode() & stat.S_IMODE(info.st_mode))
    return copy


__all__ = [
    "MARKER_NAME",
    "Interrupted",
    "atomic_folder",
    "check_destination",
    "copy_file_into",
    "deferred_signals",
    "destination_lock",
    "foreign_entries",
    "give_usual_permissions",
    "interrupts_raise",
    "remove_folder",
    "remove_stale_temporaries",
    "resolve_destination",
    "temporary_beside",
    "usual_mode",
    "write_text_atomically",
]
