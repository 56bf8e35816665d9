"""libvirt connections to inventory hosts: open, quiet, closed on exit, clear errors."""

import contextlib

import libvirt

from .errors import CloudopsError


class LibvirtUnavailable(CloudopsError):
    """libvirtd on a host could not be reached."""


def _quiet(_ctx, _err):
    """libvirt prints every error to stderr by default; cloudops reports them itself."""


libvirt.registerErrorHandler(_quiet, None)


def version_string(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


@contextlib.contextmanager
def open_host(host, uri: str | None = None):
    """A read-write libvirt connection to ``host`` (its inventory libvirt_uri), closed on exit."""
    uri = uri or host.libvirt_uri
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        message = (exc.get_error_message() or str(exc)).strip().splitlines()
        raise LibvirtUnavailable(f"{host.name}: cannot reach libvirtd at {uri}: {message[-1] if message else exc}") from None
    try:
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
