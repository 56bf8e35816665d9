"""libvirt connections to inventory hosts: opened once per process and reused, quiet, clear errors.

Opening a host's URI (``qemu+ssh://`` through ``sshcommand``'s ssh script: the host key is checked
against the inventory's known_hosts only, the same trust as cloudops.ssh) costs an SSH handshake
(~0.5-1 s here); a command that checks names, places a VM and builds it would pay it three times
per host. Connections are cached by URI and checked with ``isAlive()`` and one cheap RPC before reuse.
A host key that is not the trusted one is one line naming the host (``open_error``).
Also what cloudops writes into the domains it makes: its metadata element (``metadata``).
"""

import contextlib
import threading
import time
import xml.etree.ElementTree as ET
from urllib.parse import parse_qs, urlsplit

import libvirt

from cloudops import inventory, sshcommand
from cloudops.errors import CloudopsError


class LibvirtUnavailable(CloudopsError):
    """libvirtd on a host could not be reached."""


def _quiet(_ctx, _err):
    """libvirt prints every error to stderr by default; cloudops reports them itself."""


libvirt.registerErrorHandler(_quiet, None)

METADATA_NS = "https://cloudops.example/xmlns/vm/1"  # the cloudops metadata element of a domain


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
        _ensure_ssh_command(host, uri)
        for attempt in range(OPEN_ATTEMPTS):
            try:
                conn = libvirt.open(uri)
                break
            except libvirt.libvirtError as exc:
                text = exc.get_error_message() or str(exc)
                if attempt + 1 == OPEN_ATTEMPTS or not _transient(text):
                    raise LibvirtUnavailable(open_error(host, uri, text)) from None
                time.sleep(0.5 * (attempt + 1))
        _cache[uri] = conn
        return conn


# An ssh transport that died before libvirt's handshake (a loaded host's sshd dropping a connection
# among many at once) says one of these; opening again is safe. Never a host key or auth refusal.
OPEN_ATTEMPTS = 3
_TRANSIENT = ("Broken pipe", "Connection reset by peer", "End of file while reading data")


def _transient(text: str) -> bool:
    refused = _CHANGED + _UNKNOWN + _UNVERIFIED + ("Permission denied", "authentication")
    return any(t in text for t in _TRANSIENT) and not any(r in text for r in refused)


# what libvirt's ssh transports say when the host key is not the trusted one (OpenSSH; libssh2 and libssh
# for an explicit libvirt_uri that uses them)
_CHANGED = ("HOST KEY VERIFICATION FAILED", "differs from stored identity", "REMOTE HOST IDENTIFICATION HAS CHANGED")
_UNKNOWN = ("Can't verify the session host key", "was not accepted", "you have requested strict checking")
_UNVERIFIED = ("Host key verification failed",)  # OpenSSH (an explicit qemu+ssh libvirt_uri): changed or unknown


def _ensure_ssh_command(host, uri: str) -> None:
    """The ssh script a derived URI names (``sshcommand``) is written on first use."""
    known_hosts = inventory.known_hosts_file(getattr(host, "vars", None))
    if parse_qs(urlsplit(uri).query).get("command", [None])[0] == str(sshcommand.path_for(known_hosts)):
        sshcommand.ensure(known_hosts)


def open_error(host, uri: str, text: str) -> str:
    """One line saying why ``uri`` did not open; a host key that is not the trusted one is named as such."""
    lines = text.strip().splitlines()
    command = parse_qs(urlsplit(uri).query).get("command", [None])[0]
    trusted = inventory.known_hosts_file(getattr(host, "vars", None))
    known = trusted if command == str(sshcommand.path_for(trusted)) else None
    where = f"the trusted known_hosts {known}" if known else "the trusted known_hosts"
    if any(mark in text for mark in _CHANGED):
        return (f"{host.name}: SSH host key of {host.address} does not match {where}: possible impostor or a "
                "reinstalled host; cloudops never accepts a changed key (verify it out of band, then update known_hosts)")
    if any(mark in text for mark in _UNKNOWN):
        return (f"{host.name}: SSH host key of {host.address} is not in {where}; "
                "cloudops never accepts an unknown key (add it, verified out of band)")
    if any(mark in text for mark in _UNVERIFIED):
        return f"{host.name}: SSH host key of {host.address} does not match or is not in the known_hosts ssh uses"
    return f"{host.name}: cannot reach libvirtd at {uri}: {lines[-1] if lines else text}"


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


def container_uri(host) -> str | None:
    """The host's URI for libvirt's LXC driver (its containers): ``libvirt_uri`` with ``lxc`` for ``qemu``,
    the same transport, ssh script and host-key check (``qemu+ssh://h/system`` -> ``lxc+ssh://h/system``).
    None for a host whose URI is not QEMU's (libvirt's ``test://`` driver in unit tests: no containers)."""
    scheme, sep, rest = host.libvirt_uri.partition("://")
    driver, plus, transport = scheme.partition("+")
    if driver != "qemu":
        return None
    return f"lxc{plus}{transport}{sep}{rest}"


NO_LXC_DRIVER = "no connection driver available"  # what libvirtd says for lxc:// when the LXC driver is not installed


_without_lxc: set[str] = set()  # URIs whose libvirtd said it has no LXC driver, in this process


def container_connection(host) -> libvirt.virConnect | None:
    """The process's connection to ``host``'s LXC driver; None when its libvirtd has no LXC driver (a host
    that runs no containers: asked once per process). Unreachable hosts and refused host keys raise, as for VMs."""
    uri = container_uri(host)
    if uri is None or uri in _without_lxc:
        return None
    try:
        return connection(host, uri)
    except LibvirtUnavailable as exc:
        if NO_LXC_DRIVER in str(exc):
            _without_lxc.add(uri)
            return None
        raise


def metadata(dom: libvirt.virDomain) -> dict:
    """The cloudops metadata of a domain ({} for a domain cloudops did not make)."""
    try:
        xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
    except libvirt.libvirtError:
        return {}
    root = ET.fromstring(xml)
    meta = {child.tag.split("}")[-1]: (child.text or "") for child in root if len(child) == 0}
    for child in root:  # a list element, e.g. <cloudops:nics><cloudops:nic network= ip= mac=/>...
        if len(child):
            meta[child.tag.split("}")[-1]] = [dict(item.attrib) for item in child]
    return meta
