"""SSH connections to inventory hosts, with host keys verified, never accepted blindly.

Fabric's Connection accepts unknown host keys by default (paramiko's AutoAddPolicy).
Everything cloudops opens goes through ``connect`` or ``verify_host_keys``, which
switch to RejectPolicy and load the known_hosts files: the inventory's
``known_hosts`` variable, else ~/.ssh/known_hosts and /etc/ssh/ssh_known_hosts.
libvirt connections check the same file (``inventory.known_hosts_file``; without the variable,
~/.ssh/known_hosts only: OpenSSH's UserKnownHostsFile, set by cloudops.sshcommand, takes one file).
"""

import os
import socket
from pathlib import Path

import paramiko
from fabric import Config, Connection

from cloudops.errors import CloudopsError

SYSTEM_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"


def known_hosts_files(host=None) -> list[str]:
    configured = (getattr(host, "vars", None) or {}).get("known_hosts")
    if configured:
        return [str(configured)]
    return [os.path.expanduser("~/.ssh/known_hosts"), SYSTEM_KNOWN_HOSTS]


def verify_host_keys(conn: Connection, files: list[str]) -> Connection:
    """Make ``conn`` refuse any host key that is not in ``files``."""
    conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    for path in files:
        if Path(path).is_file():
            conn.client.load_host_keys(path)
    return conn


def connect(host, timeout: float = 10) -> Connection:
    """A Fabric Connection to an inventory Host, key-only auth, host key verified."""
    connect_kwargs = {"allow_agent": False, "banner_timeout": timeout, "auth_timeout": timeout}
    if host.key:
        connect_kwargs.update(key_filename=str(host.key), look_for_keys=False)
    conn = Connection(
        host.address, user=host.user, port=host.port, connect_timeout=timeout,
        connect_kwargs=connect_kwargs, config=Config(lazy=True),
    )
    return verify_host_keys(conn, known_hosts_files(host))


def describe(exc: BaseException) -> str:
    """One line saying why an SSH step failed."""
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        return "connection refused (is sshd running?)"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out connecting"
    if isinstance(exc, paramiko.AuthenticationException):
        return "authentication failed (check the key)"
    if isinstance(exc, paramiko.BadHostKeyException):
        return (f"SSH host key of {exc.hostname} does not match the trusted known_hosts: possible impostor or a "
                "reinstalled host; cloudops never accepts a changed key")
    if isinstance(exc, paramiko.SSHException) and "known_hosts" in str(exc):
        return f"host key not verified: {exc} (add it to known_hosts; cloudops never accepts unknown keys)"
    if isinstance(exc, CloudopsError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}".rstrip(": ")
