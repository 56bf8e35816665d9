"""libvirt connections to inventory hosts: opened once per process and reused, quiet, clear errors.

Opening ``qemu+ssh://`` costs an SSH handshake (~0.5-1 s here); a command that
checks names, places a VM and builds it would pay it three times per host.
Connections are cached by URI and checked with ``isAlive()`` and one cheap RPC before reuse.
"""

import contextlib
import threading

import libvirt

from .errors import CloudopsError


class LibvirtUnavailable(CloudopsError):
    """libvirtd on a host could not be reached."""


def _quiet(_ctx, _err):
    """libvirt prints every error to stderr by default; cloudops reports them itself."""


libvirt.registerErrorHandler(_quiet, None)


def version_string(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


_cache: dict[str, libvirt.virConnect] = {}
_locks: dict[str, threading.Lock] = {}
_guard = threading.Lock()


def _alive(conn: libvirt.virConnect) -> bool:
    """isAlive() alone trusts a transport whose ssh died quietly (sshd restarted, session killed):
    one cheap RPC proves it (it fails at once on a closed pipe)."""
    try:
        if not conn.isAlive():
            return False
        conn.getLibVersion()
        return True
    except libvirt.libvirtError:
        return False


def connection(host, uri: str | None = None) -> libvirt.virConnect:
    """The process's read-write connection to ``host``'s libvirtd, opened on first use."""
    uri = uri or host.libvirt_uri
    with _guard:
        lock = _locks.setdefault(uri, threading.Lock())
    with lock:
        conn = _cache.get(uri)
        if conn is not None and _alive(conn):
            return conn
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            message = (exc.get_error_message() or str(exc)).strip().splitlines()
            raise LibvirtUnavailable(
                f"{host.name}: cannot reach libvirtd at {uri}: {message[-1] if message else exc}") from None
        _cache[uri] = conn
        return conn


@contextlib.contextmanager
def open_host(host, uri: str | None = None):
    """``with open_host(host) as conn``: the cached connection; dropped from the cache if it died meanwhile."""
    conn = connection(host, uri)
    try:
        yield conn
    except libvirt.libvirtError:
        if not _alive(conn):
            forget(host, uri)
        raise


def forget(host, uri: str | None = None) -> None:
    """Close and drop a cached connection (after a fault, or when a daemon was restarted)."""
    conn = _cache.pop(uri or host.libvirt_uri, None)
    if conn is not None:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
