"""The ssh command libvirt runs for cloudops: OpenSSH that trusts exactly one known_hosts file.

libvirt's ``qemu+ssh://`` transport runs ``ssh`` (or the URI's ``command=``) with arguments of
its own, and OpenSSH reads ~/.ssh/config and /etc/ssh/ssh_config, which may loosen host key
checking. Options on the command line win over both, so cloudops's URIs name, as ``command=``,
a small script (``templates/ssh/libvirt-ssh.sh.j2``) that adds them: the inventory's known_hosts
and nothing else, strict checking, batch mode, and keepalives so that a dead peer ends the
connection instead of leaving a call waiting. One script per known_hosts file, named by a hash
of its path, in ``var/cloud/ssh/``.

Why not libvirt's libssh2 transport, which takes a known_hosts file itself: on a connection
whose libvirtd was killed, a libvirt call over libssh2 waits forever (seen with libvirt 9.0),
for the operator's connections and for a source host's peer-to-peer migration connection alike.
"""

import hashlib
import os
from pathlib import Path

from cloudops import atomicfile, paths, templating

CONNECT_TIMEOUT = 10
ALIVE_INTERVAL = 5  # seconds between keepalives; the connection ends after ALIVE_COUNT unanswered
ALIVE_COUNT = 3


def path_for(known_hosts: str) -> Path:
    """Where the script for ``known_hosts`` lives (pure: nothing is written)."""
    digest = hashlib.sha256(os.path.abspath(known_hosts).encode()).hexdigest()[:16]
    return paths.var_dir() / "cloud" / "ssh" / f"libvirt-ssh-{digest}"


def render(known_hosts: str) -> str:
    return templating.render("ssh/libvirt-ssh.sh.j2", known_hosts=os.path.abspath(known_hosts),
                             connect_timeout=CONNECT_TIMEOUT, alive_interval=ALIVE_INTERVAL, alive_count=ALIVE_COUNT)


def ensure(known_hosts: str) -> Path:
    """Write the script for ``known_hosts`` when it is missing or differs; returns its path."""
    path = path_for(known_hosts)
    text = render(known_hosts)
    try:
        if path.read_text() == text:
            return path
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomicfile.write(path, text, mode=0o755)  # hosts opened in parallel never see half a script

