"""The cloud's SSH trust between hypervisors: a migration keypair, an image keypair, and every host's verified host keys.

The migration key is generated once on this machine (``var/cloud/migration_key``)
and installed on every host, so each host's libvirtd can reach every other over
``qemu+ssh`` (peer-to-peer migration) with the host's own key and known_hosts
(``migration_uri``: paths on the hypervisor, never on this machine). Each host authorizes
that key for migration only (``authorized_migration_key``): ``restrict``, ``from=`` the
cloud's hosts, and a forced command that is libvirt's remote helper, so a peer holding it
reaches libvirtd and nothing else. Host keys are collected with ``ssh-keyscan``
from this machine and kept only when they match the trusted known_hosts of the
inventory (the keys cloudops itself verifies every connection against): a key
that differs is an error, a key that cannot be verified is left out, never
accepted blindly.

The image key (``var/cloud/image_key``, on every host ``~/.ssh/cloudops_images``) lets a host that holds an
image copy it to the next (``cloudops.imaging.distribution``). Each host authorizes it for that only
(``authorized_image_key``): ``restrict``, ``from=`` the cloud's hosts, and a forced command that is the image
receiver (``receiver_script``, installed at ``RECEIVER``): it takes one file of the image store's names with
its sha256 on stdin, and drops it into the pool's images directory only once it is verified.
"""

import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from cloudops import inventory, paths, ssh
from cloudops.errors import CloudopsError

KEY_TYPES = "ed25519,ecdsa,rsa"
KEY_PRESENT = "migration key present"
HOST_MIGRATION_KEY = ".ssh/cloudops_migration"  # under the home of the user libvirtd runs as, on every host
HOST_HOME = "/root"  # libvirtd runs as root: its ssh transport reads root's files (inventory var migration_home)
REMOTE_HELPER = "virt-ssh-helper qemu:///system"  # what libvirt's ssh transports run on the far side
HOST_IMAGE_KEY = ".ssh/cloudops_images"  # under the same home: what a host copies images to its peers with
RECEIVER = "/opt/cloudops/bin/cloudops-receive-image"  # the image key's forced command on every host
IMAGE_FILE_RE = re.compile(r"^[0-9a-f]{64}\.(qcow2|raw|kernel|initrd)$")  # store.Image.files(): the receiver's names
SOURCE_RE = re.compile(r"^[A-Za-z0-9.:_*?/\[\]-]+$")  # an sshd from= pattern: no quotes, commas or spaces


def migration_uri(dest) -> str:
    """The URI a source host's libvirtd opens to reach ``dest`` for a peer-to-peer migration.

    OpenSSH on the source with the source's own migration key, checking the destination's host key
    against the source's own known_hosts (what deploy, or the lab, put there; ``no_tty``: batch mode,
    so an unknown key is refused, never asked about). No file of the operator's machine is involved.
    """
    home = str(dest.vars.get("migration_home") or HOST_HOME).rstrip("/")
    return inventory.ssh_uri(dest.user, dest.address, dest.port, f"{home}/{HOST_MIGRATION_KEY}")


def migration_sources(peers: list) -> list[str]:
    """The addresses the cloud's hosts connect from: each address, and its migration_address if set."""
    found = []
    for peer in peers:
        for value in (peer.address, peer.vars.get("migration_address")):
            if value and str(value) not in found:
                found.append(str(value))
    return found


def authorized_migration_key(public: str, sources: list[str]) -> str:
    """The authorized_keys line of the migration key: from the cloud's hosts only, libvirt's helper only."""
    return _authorized("migration", public, sources, REMOTE_HELPER)


def authorized_image_key(public: str, sources: list[str], receiver: str = RECEIVER) -> str:
    """The authorized_keys line of the image key: from the cloud's hosts only, the image receiver only."""
    if not re.match(r"^/[A-Za-z0-9._/-]+$", receiver):
        raise CloudopsError(f"image receiver {receiver!r} must be an absolute path of plain characters")
    return _authorized("image", public, sources, receiver)


def _authorized(what: str, public: str, sources: list[str], command: str) -> str:
    bad = [s for s in sources if not SOURCE_RE.match(s)]
    if bad or not sources:
        raise CloudopsError(f"cannot authorize the {what} key from {bad or 'no host'}: "
                            "addresses must be plain host names, IPs or patterns")
    key = public.strip()
    if not re.match(r"^[a-z0-9@.-]+ [A-Za-z0-9+/=]+( [^\n\"]*)?$", key):
        raise CloudopsError(f"the {what} public key is not one 'type base64 [comment]' line")
    return f'restrict,from="{",".join(sources)}",command="{command}" {key}'


def receiver_script(pool_path: str) -> str:
    """The image receiver for a host whose pool is at ``pool_path`` (templates/ssh/receive-image.sh.j2)."""
    from cloudops import templating

    return templating.render("ssh/receive-image.sh.j2", images_dir=f"{pool_path.rstrip('/')}/images",
                             name_re=IMAGE_FILE_RE.pattern)


def migration_key_path() -> Path:
    return paths.var_dir() / "cloud" / "migration_key"


def image_key_path() -> Path:
    return paths.var_dir() / "cloud" / "image_key"


@dataclass(frozen=True)
class KeyPair:
    private: str
    public: str  # one line "ssh-ed25519 AAAA... comment"


def read_migration_key(path: Path | None = None, what: str = "migration") -> KeyPair | None:
    path = path or migration_key_path()
    if not path.exists():
        return None
    pub = path.with_name(path.name + ".pub")
    if not pub.exists():
        raise CloudopsError(f"{what} key {path} has no public half {pub}: remove it or restore the .pub file")
    return KeyPair(path.read_text(), pub.read_text().strip())


def read_image_key(path: Path | None = None) -> KeyPair | None:
    return read_migration_key(path or image_key_path(), "image")


def ensure_image_key(cloud: str, path: Path | None = None) -> tuple[KeyPair, str]:
    """The cloud's image keypair, generated when missing; returns (keypair, message: KEY_PRESENT when it was there)."""
    return ensure_migration_key(cloud, path=path or image_key_path(), what="image")


def ensure_migration_key(cloud: str, rotate: bool = False, path: Path | None = None,
                         what: str = "migration") -> tuple[KeyPair, str]:
    """The cloud's keypair, generated when missing (or replaced with ``rotate``); returns (keypair, message)."""
    path = path or migration_key_path()
    message = KEY_PRESENT
    if rotate and path.exists():
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for suffix in ("", ".pub"):
            old = path.with_name(path.name + suffix)
            if old.exists():
                shutil.move(old, old.with_name(f"{old.name}.{stamp}"))
        message = f"{what} key rotated (old key kept as {path.name}.{stamp})"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"cloudops-{what}@{cloud}",
                               "-f", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise CloudopsError(f"ssh-keygen failed: {proc.stderr.strip() or proc.returncode}")
        if not rotate:
            message = f"{what} key generated at {path}"
    return read_migration_key(path, what), message


# ---------------------------------------------------------------- host keys

@dataclass
class HostKeys:
    """One host's verified public keys as known_hosts lines, and how they were verified."""

    name: str
    lines: list[str] = field(default_factory=list)
    note: str = ""


def known_hosts_pattern(address: str, port: int) -> str:
    return address if port == 22 else f"[{address}]:{port}"


def parse_keyscan(text: str) -> list[tuple[str, str]]:
    """ssh-keyscan output -> [(keytype, base64)]; comments and blank lines skipped."""
    keys = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and not line.startswith("#"):
            keys.append((parts[1], parts[2]))
    return keys


def trusted_keys(host) -> dict[str, str]:
    """keytype -> base64 of the keys the inventory's known_hosts (or the user's) holds for ``host``."""
    known = paramiko.HostKeys()
    for path in ssh.known_hosts_files(host):
        if Path(path).is_file():
            known.load(path)
    found = {}
    for pattern in (known_hosts_pattern(host.address, host.port), host.name):
        for keytype, key in (known.lookup(pattern) or {}).items():
            found.setdefault(keytype, key.get_base64())
    return found


def verify(host, scanned: list[tuple[str, str]] | None) -> HostKeys:
    """Keep the scanned keys that the trusted known_hosts confirms; a mismatch is an error."""
    trusted = trusted_keys(host)
    if not trusted:
        raise CloudopsError(f"{host.name}: no trusted host key in {', '.join(ssh.known_hosts_files(host))}: "
                            f"add it (verified out of band); cloudops never accepts unknown keys")
    names = ",".join(dict.fromkeys([host.name, known_hosts_pattern(host.address, host.port)]))
    if scanned is None:  # the host did not answer: the trusted keys are verified by definition
        return HostKeys(host.name, [f"{names} {t} {k}" for t, k in sorted(trusted.items())],
                        "not answering ssh-keyscan; using the trusted known_hosts entries")
    verified, unverified = [], []
    for keytype, key in scanned:
        if keytype not in trusted:
            unverified.append(keytype)
        elif trusted[keytype] != key:
            raise CloudopsError(f"{host.name}: {keytype} host key differs from the trusted known_hosts: "
                                "possible impostor, or a replaced host whose new key is not yet trusted")
        else:
            verified.append(f"{names} {keytype} {key}")
    if not verified:
        raise CloudopsError(f"{host.name}: none of the keys it presents ({', '.join(unverified) or 'none'}) "
                            "is in the trusted known_hosts")
    note = f"left out unverified {', '.join(unverified)}" if unverified else "verified"
    return HostKeys(host.name, sorted(verified), note)


def keyscan(host, timeout: int = 5) -> list[tuple[str, str]] | None:
    """The keys ``host`` presents, seen from this machine; None when it does not answer."""
    proc = subprocess.run(["ssh-keyscan", "-T", str(timeout), "-p", str(host.port), "-t", KEY_TYPES, host.address],
                          capture_output=True, text=True)
    keys = parse_keyscan(proc.stdout)
    return keys or None


def collect_host_keys(hosts: list, workers: int = 8) -> dict[str, HostKeys]:
    """Every host's verified keys (scanned in parallel); raises on the first key that contradicts known_hosts."""
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(hosts)))) as pool:
        scans = dict(zip([h.name for h in hosts], pool.map(keyscan, hosts)))
    return {host.name: verify(host, scans[host.name]) for host in hosts}
