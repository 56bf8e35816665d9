"""Reaching a VM: the cloud's SSH key, the VM's host key from its console, and Fabric through the hypervisor.

VMs sit on networks private to their hypervisor, so every SSH connection to a VM
goes through the hypervisor as a jump host (itself verified). The VM's own host
key is read from its serial console log on the hypervisor, where the image prints
it at boot (the cloudops tiny image's ``hostkey`` line, or cloud-init's
``BEGIN SSH HOST KEY KEYS`` block), and kept in the cloud's state store
(``hostkeys/<vm>``), so every operator verifies it: never accepted blindly. SSH
libraries read a file, so ``known_hosts()`` writes the store's keys to
``<state_dir>/cloud/known_hosts`` before each use.

Each control machine has its own cloud key (the private half never leaves it); its
public half is registered in the store (``trust/<fingerprint>``) and every new VM
trusts all the registered keys, so any operator of the cloud can reach any VM.
"""

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shlex
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import paramiko
from fabric import Config, Connection

from cloudops import atomicfile, paths, state
from cloudops.errors import CloudopsError
from cloudops.ssh import verify_host_keys

_TINY_HOSTKEY = re.compile(r"cloudops-tiny: hostkey (ssh-ed25519) (\S+)")
HOSTKEYS = "hostkeys/"
_CLOUD_INIT_KEYS = re.compile(r"-----BEGIN SSH HOST KEY KEYS-----(.*?)-----END SSH HOST KEY KEYS-----", re.S)


def cloud_dir() -> Path:
    path = paths.var_dir() / "cloud"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cloud_key() -> Path:
    """The cloud's own SSH key (made once), put into every VM so the toolkit can always reach it."""
    key = cloud_dir() / "id_ed25519"
    public = key.with_name("id_ed25519.pub")
    if not (key.exists() and public.exists()):
        with open(cloud_dir() / "id_ed25519.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if key.exists() and not public.exists():  # a crash between the two files: the key decides
                derived = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], check=True, capture_output=True,
                                         text=True).stdout.strip()
                atomicfile.write(public, f"{derived} cloudops\n")
            elif not key.exists():  # made aside, then moved in: the key never exists without its .pub
                with tempfile.TemporaryDirectory(prefix=".key-", dir=cloud_dir()) as tmp:
                    made = Path(tmp) / "id_ed25519"
                    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cloudops", "-f", str(made)],
                                   check=True)
                    os.replace(made.with_name("id_ed25519.pub"), public)
                    os.replace(made, key)
    return key


def cloud_public_key() -> str:
    return (cloud_key().parent / "id_ed25519.pub").read_text().strip()


def trusted_public_keys() -> list[str]:
    """Every control machine's cloud key (this one's registered first): what a new VM must trust."""
    own = cloud_public_key()
    blob = own.split()[1]
    key = f"trust/{hashlib.sha256(blob.encode()).hexdigest()[:32]}"
    store = state.current()
    entries = store.items("trust/")
    if entries.get(key) is None or entries[key].value.get("key") != own:
        store.put(key, {"key": own})
        entries = store.items("trust/")
    keys = [entry.value.get("key") for entry in entries.values()]
    if not all(isinstance(k, str) and k.startswith("ssh-") for k in keys):
        raise state.StoreCorrupt("state store: an entry under trust/ is not an SSH public key")
    return sorted(set(keys), key=lambda k: (k != own, k))


def known_hosts() -> Path:
    """``<state_dir>/cloud/known_hosts`` with every VM host key of the store (rewritten when they changed).

    An address reused by a newer VM makes the older record stale: only the newest record of an
    address is trusted (and the stale one is removed from the store).
    """
    store = state.current()
    newest: dict[str, tuple[str, object]] = {}
    for key, entry in store.items(HOSTKEYS).items():
        ip, keys = entry.value.get("ip"), entry.value.get("keys")
        if not isinstance(ip, str) or not isinstance(keys, list):
            raise state.StoreCorrupt(f"state store: {key} is not a VM's host keys")
        if ip in newest and newest[ip][1].version > entry.version:
            store.delete(key, entry.version)
            continue
        if ip in newest:
            store.delete(newest[ip][0], newest[ip][1].version)
        newest[ip] = (key, entry)
    lines = []
    for key, entry in sorted(newest.values(), key=lambda pair: pair[0]):
        name = key[len(HOSTKEYS):]
        lines += [f"{name},{entry.value['ip']} {ktype} {kdata}" for ktype, kdata in entry.value["keys"]]
    path = cloud_dir() / "known_hosts"
    text = "\n".join(lines) + ("\n" if lines else "")
    if not path.exists() or path.read_text() != text:
        atomicfile.write(path, text)  # several processes may write it at once: each a whole file
    return path


def console_log_path(name: str) -> str:
    return f"/var/log/libvirt/qemu/{name}-console.log"


def host_keys_from_console(text: str) -> list[tuple[str, str]]:
    """(type, base64) host keys printed on a console by the tiny image or by cloud-init."""
    keys = _TINY_HOSTKEY.findall(text)
    for block in _CLOUD_INIT_KEYS.findall(text):
        for line in block.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].startswith(("ssh-", "ecdsa-")):
                keys.append((parts[0], parts[1]))
    return keys


def read_console(hv_conn: Connection, name: str) -> str:
    path = shlex.quote(console_log_path(name))
    return hv_conn.run(f"cat {path} 2>/dev/null || true", hide=True, in_stream=False).stdout


def record_host_keys(name: str, ip: str, keys: list[tuple[str, str]]) -> None:
    """Replace what the store says about this VM with ``keys`` (none: forget); one write."""
    store = state.current()  # an older VM's record of the same address is dropped by known_hosts()
    if keys:
        store.put(HOSTKEYS + name, {"ip": ip, "keys": [list(k) for k in keys]})
    else:
        store.delete(HOSTKEYS + name)


def forget_host_keys(name: str, ip: str | None) -> None:
    record_host_keys(name, ip or name, [])


def make_host_key() -> tuple[str, tuple[str, str]]:
    """A new ed25519 SSH host key for a VM: (private key in OpenSSH format, (type, base64) of its public half).

    cloudops makes it and passes it in the seed, so it knows the VM's host key before the VM boots: SSH
    answering with exactly this key is proof enough, no need to wait for the guest to print its key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    ktype, kdata = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH).decode().split()[:2]
    return private, (ktype, kdata)


def _tunnel(hv_conn: Connection, ip: str, port: int, timeout: float):
    """A direct-tcpip channel to ip:port through the hypervisor's SSH connection; None when it cannot be opened."""
    try:
        transport = hv_conn.client.get_transport() if hv_conn.is_connected else None
        if transport is None:
            hv_conn.open()
            transport = hv_conn.client.get_transport()
        return transport.open_channel("direct-tcpip", (ip, port), ("127.0.0.1", 0), timeout=timeout)
    except (paramiko.ChannelException, paramiko.SSHException, socket.error, EOFError):
        return None


@contextlib.contextmanager
def quiet_tunnels():
    """paramiko's "Secsh channel N open FAILED" lines kept off stderr while a wait expects refusals (a guest
    whose network is not up yet answers each tunnel with "No route to host")."""
    logger = logging.getLogger("paramiko.transport")
    before = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(before)


def presents_host_key(hv_conn: Connection, ip: str, key: tuple[str, str], port: int = 22, timeout: float = 5.0) -> bool:
    """True when the SSH server at ip:port (seen from the hypervisor) proves it holds ``key`` (type, base64):
    a key exchange asking for that key type, whose host key signature paramiko verifies."""
    chan = _tunnel(hv_conn, ip, port, timeout)
    if chan is None:
        return False
    guest_transport = paramiko.Transport(chan)
    try:
        guest_transport.get_security_options().key_types = [key[0]]
        guest_transport.start_client(timeout=timeout)
        offered = guest_transport.get_remote_server_key()
        return (offered.get_name(), offered.get_base64()) == tuple(key)
    except (paramiko.SSHException, socket.error, EOFError, ValueError):
        return False
    finally:
        guest_transport.close()
        chan.close()


def ssh_banner(hv_conn: Connection, ip: str, port: int = 22, timeout: float = 2.0) -> bool:
    """True when an SSH server answers at ip:port, seen from the hypervisor (a direct-tcpip channel)."""
    chan = _tunnel(hv_conn, ip, port, timeout)
    if chan is None:
        return False
    try:
        chan.settimeout(timeout)
        return chan.recv(64).startswith(b"SSH-")
    except (socket.timeout, OSError):
        return False
    finally:
        chan.close()


def connect_vm(hv_conn: Connection, ip: str, user: str = "root", key: Path | None = None,
               timeout: float = 15) -> Connection:
    """A Fabric Connection to a VM through its hypervisor, its host key checked against var/cloud/known_hosts."""
    conn = Connection(ip, user=user, gateway=hv_conn, connect_timeout=timeout, config=Config(lazy=True),
                      connect_kwargs={"key_filename": str(key or cloud_key()), "look_for_keys": False,
                                      "allow_agent": False, "banner_timeout": timeout, "auth_timeout": timeout})
    return verify_host_keys(conn, [str(known_hosts())])


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll ``predicate`` until it returns something truthy; CloudopsError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise CloudopsError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
