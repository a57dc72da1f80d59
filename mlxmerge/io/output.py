"""Atomic output folders: checked against every input, built beside the target under a lock,
renamed into place only when complete and only over what was checked.

What a writer gets (``docs/io.md``, "Outputs and text inputs: what is guaranteed, what is checked"):

* ``check_output`` refuses a target equal to, inside or above anything an input reads, after
  resolving references (``base+adapter``, hub ids, single files) to the paths they read.
* ``atomic_folder`` builds in a hidden ``.NAME.partial-PID-XXXX`` folder beside the target while
  holding ``.NAME.lock`` (``flock``); at the end a target that is not empty is replaced only with
  ``force``. SIGTERM and SIGHUP unwind like Ctrl-C; a full disk is one ``OutputError``; partial
  folders of the same target left by a killed job are removed at the next run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

from mlxmerge.errors import Interrupted, OutputError

try:  # POSIX; MLX runs on macOS and Linux
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

_FULL = (errno.ENOSPC, errno.EDQUOT)
# Slack on top of what a writer counts (tensor bytes, tokenizer files) for headers, config, card.
SPACE_SLACK = 1024**2


def input_paths(reference) -> list[Path]:
    """The local files and folders a model reference reads, resolved through links.

    ``base+adapter`` gives both parts; a hub id its folder in the local cache (``models--org--name``
    with its snapshots and blobs; nothing when it is not cached yet: nothing local is read); an
    opened checkpoint its folder and, when fused, its adapter's."""
    if hasattr(reference, "path") and hasattr(reference, "entries"):  # an opened Checkpoint
        adapter = getattr(reference, "adapter", None)
        paths = [reference.path] + ([adapter.path] if adapter is not None else [])
        # A GGUF's folder is a cached sidecar: the file it reads is what must not be overwritten.
        paths += sorted({e.file for e in reference.entries.values()})
        return [Path(p).resolve() for p in paths]
    ref = str(reference)
    path = Path(ref).expanduser()
    if path.exists():
        return [path.resolve()]
    if "+" in ref:
        from mlxmerge.lora.fused import split_reference

        parts = split_reference(ref)
        if parts is not None:
            return [p for part in parts for p in input_paths(part)]
    from mlxmerge.io.hub import cached_reference

    cached = cached_reference(ref)
    # The repo's whole cache folder (snapshots link into its blobs/), not only this snapshot.
    return [cached.resolve().parents[1]] if cached is not None else []


def check_output(target: str | os.PathLike, inputs=(), *, force: bool = False) -> Path:
    """Refuse outputs that would clobber data or an input; return the folder to write.

    ``inputs`` are model references, paths or opened checkpoints. A target that is a link to a
    folder is written through: the folder it points to is returned. Raises ``OutputError``."""
    target = Path(target).expanduser()
    if target.is_symlink():
        if not target.exists():
            raise OutputError(f"{target}: a link to {os.readlink(target)}, which does not exist")
        target = target.resolve()
    resolved = target.resolve()
    for ref in inputs:
        for p in input_paths(ref):
            folder = p if p.is_dir() else p.parent
            if p.suffix == ".gguf" and p.is_file():  # a whole model in one file: siblings are fine
                inside = resolved == p or folder.is_relative_to(resolved)
            else:
                inside = resolved.is_relative_to(folder) or folder.is_relative_to(resolved)
            if inside:
                raise OutputError(f"{target}: output would overwrite or sit inside the input {ref}")
    if target.exists():
        if not target.is_dir():
            raise OutputError(f"{target}: exists and is not a folder")
        if any(target.iterdir()) and not force:
            raise OutputError(
                f"{target}: folder exists and is not empty (use --force to replace it)"
            )
    owner = _lock_owner(target)
    if owner is not None:
        raise OutputError(f"{target}: another mlxmerge job ({owner}) is writing this output")
    return target


def _first_existing(path: str | os.PathLike) -> Path:
    folder = Path(path).expanduser().absolute()
    while not folder.exists():
        folder = folder.parent
    return folder


def disk_free(target: str | os.PathLike) -> tuple[Path, int]:
    """The nearest existing folder at or above ``target`` and the bytes free on its disk."""
    folder = _first_existing(target)
    return folder, shutil.disk_usage(folder).free


def check_free_space(target: str | os.PathLike, nbytes: int, what: str = "the output") -> None:
    """Refuse (``OutputError``) when ``nbytes`` (plus slack) will not fit on ``target``'s disk."""
    from mlxmerge.io.writer import human_bytes

    folder, free = disk_free(target)
    if nbytes + SPACE_SLACK > free:
        raise OutputError(
            f"{target}: {what} needs {human_bytes(nbytes)} but the disk holding {folder} has "
            f"{human_bytes(free)} free"
        )


# -- the lock beside the target -------------------------------------------------------------------
def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def _lock_owner(target: Path) -> str | None:
    """``"PID n"`` when another process holds the target's lock, else None."""
    path = _lock_path(target)
    if fcntl is None or not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        with contextlib.suppress(OSError):
            return f"PID {os.pread(fd, 32, 0).decode().strip() or '?'}"
        return "PID ?"
    finally:
        os.close(fd)
    return None


@contextlib.contextmanager
def output_lock(target: Path):
    """Hold ``.NAME.lock`` beside ``target`` (an exclusive ``flock``, released by the kernel
    when the process dies); removed on exit. Raises ``OutputError`` when another job holds it."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = _lock_path(target)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"{target}: cannot write beside it ({e.strerror})") from None
        if not _try_lock(fd):
            os.close(fd)
            raise OutputError(
                f"{target}: another mlxmerge job ({_lock_owner(target) or 'PID ?'}) is writing "
                "this output"
            )
        # The holder before us may have removed the file after we opened it: lock the live one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked, so no one else can hold the removed inode
        os.close(fd)


def _try_lock(fd: int, tries: int = 20) -> bool:
    # A few short retries: check_output's probe (_lock_owner) holds a shared lock for an instant.
    for i in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if i + 1 < tries:
                time.sleep(0.01)
    return False


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT, SIGTERM and SIGHUP back for the instant of the final swap (delivered after)."""
    sigs = {signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)}
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale(target: Path) -> list[Path]:
    """Remove the partial folders a killed job left beside ``target`` (their PID is gone); call
    with the lock held. A replaced target a job was killed in the middle of swapping out
    (``.NAME.old-PID``) is put back when the target is missing, else removed."""
    removed = []
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(partial|old)-(\d+)(-.*)?")
    for p in sorted(target.parent.iterdir()) if target.parent.is_dir() else []:
        m = pattern.fullmatch(p.name)
        if m is None or _alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not target.exists() and not target.is_symlink():
            os.rename(p, target)
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()
        removed.append(p)
    return removed


# -- signals ----------------------------------------------------------------------------------------
def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_interrupt():
    """SIGTERM and SIGHUP raise ``Interrupted`` (a KeyboardInterrupt) like Ctrl-C does, so every
    ``finally`` and ``except BaseException`` cleanup runs. Main thread only; handlers a program
    installed itself are left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
            saved[sig] = signal.signal(sig, _raise_interrupted)
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


# -- the atomic folder ------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, *, force: bool = False):
    """Yield a temporary folder beside ``target``; on success it becomes ``target``.

    Without ``force`` a target that is not an empty folder when the result is ready (another job
    wrote it meanwhile) is kept and ``OutputError`` raised. On any exception (Ctrl-C, SIGTERM and
    SIGHUP included) the temporary folder is removed and ``target`` is left as it was; a full disk
    (ENOSPC, EDQUOT) becomes one ``OutputError``."""
    target = Path(os.path.abspath(Path(target).expanduser()))  # "-o ." names the folder itself
    if target.is_symlink() and target.exists():
        target = target.resolve()  # write through the link, never replace it
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        folder = _first_existing(target.parent)
        why = f"{folder} is a file" if folder.is_file() else e.strerror
        raise OutputError(f"{target}: cannot create its folder ({why})") from None
    with signals_interrupt(), output_lock(target):
        remove_stale(target)
        prefix = f".{target.name}.partial-{os.getpid()}-"
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        tmp.chmod(0o777 & ~_UMASK)  # mkdtemp's 0700 would survive the rename
        try:
            yield tmp
            with _signals_deferred():  # never a half-swapped target
                _install(tmp, target, force)
        except BaseException as e:
            full = _disk_full(e, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                raise OutputError(
                    f"{target}: the disk holding {target.parent} is full; nothing was written"
                ) from None
            raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before any thread starts
    os.umask(mask)
    return mask


_UMASK = _umask()


def _disk_full(e: BaseException, tmp: Path) -> bool:
    """ENOSPC/EDQUOT, or mlx's errno-less ``[write] Unable to write`` on a disk with no room."""
    if isinstance(e, OSError):
        return e.errno in _FULL
    if isinstance(e, RuntimeError) and "Unable to write" in str(e):
        return disk_free(tmp)[1] < SPACE_SLACK
    return False


def _install(tmp: Path, target: Path, force: bool) -> None:
    """Rename ``tmp`` to ``target``; a non-empty target only with ``force`` (checked here, under
    the lock, not only at the start: rename(2) itself refuses a non-empty folder)."""
    if not force or not (target.exists() or target.is_symlink()):
        try:
            os.rename(tmp, target)  # atomic; replaces only a missing target or an empty folder
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            raise OutputError(
                f"{target}: appeared or filled up while this job ran (another job?); it was kept "
                "and this job's output dropped (use --force to replace it)"
            ) from None
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
