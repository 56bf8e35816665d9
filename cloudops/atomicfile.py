"""Files that are never seen half-written: atomic replace, and read-modify-write under a lock.

``write(path, data)`` writes a temporary file in the same directory, fsyncs it, renames it over
``path`` and fsyncs the directory: readers see the old content or the new, a crash leaves one
of them, never a mix. ``replace(tmp, path)`` does the last steps for a file (or directory) made
some other way. ``update(path, change)`` is read-modify-write under flock(2), so two processes
cannot both read the old content and each write their own change; ``locked(lock_path)`` is that
lock alone. Temporary names start with ``TMP_PREFIX``, so a directory's owner can sweep up what a
crash left.
"""

import contextlib
import fcntl
import os
import secrets
from pathlib import Path

TMP_PREFIX = ".tmp-"


def temp_path(path) -> Path:
    """A fresh temporary name beside ``path`` (same directory, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(4)}")


def fsync_dir(directory) -> None:
    """Make a rename (or a new name) in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(tmp, path) -> None:
    """Rename ``tmp`` over ``path`` (same directory): ``tmp`` is fsync'ed first and the directory after."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def write(path, data: str | bytes, mode: int | None = None) -> Path:
    """Replace ``path``'s content with ``data`` atomically; returns ``path``.

    The new file has ``mode`` exactly when given (it is 0600 until then, so a private file is never
    readable by others), else the mode a plain ``open(path, "w")`` gives (0666 less the umask).
    """
    path = Path(path)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600 if mode is not None else 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            if mode is not None:
                os.fchmod(out.fileno(), mode)
            out.write(data.encode() if isinstance(data, str) else data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def locked(lock_path, shared: bool = False):
    """Hold flock(2) on ``lock_path`` (created if missing) for the block: exclusive, or ``shared``."""
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update(path, change, lock_path=None, mode: int | None = None) -> bool:
    """Read-modify-write ``path`` under the lock ``lock_path`` (default: ``.<name>.lock`` beside it).

    ``change(text)`` gets the current text ("" when there is no file) and returns the new text;
    the file is written atomically (``write``, with ``mode``) only when it differs. Whether it did.
    """
    path = Path(path)
    with locked(lock_path or path.with_name(f".{path.name}.lock")):
        text = path.read_text() if path.exists() else ""
        new = change(text)
        if new == text:
            return False
        write(path, new, mode)
        return True
