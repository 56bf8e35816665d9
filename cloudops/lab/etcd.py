"""The lab's etcd: an N-member etcd v3 cluster on this machine, with TLS, as the cloud's shared state store.

Member ``etcdN`` of lab ``<prefix>`` listens on a loopback address of its own, ``127.A.B.N`` (A and B
derived from the prefix; every 127/8 address is the machine's loopback, so nothing leaves it and
every member is reachable from the root namespace where cloudops runs), with the standard ports
2379 (clients) and 2380 (peers). ``up`` makes, under ``var/lab/<prefix>/etcd/``: a CA, one server
certificate per member (serving clients and peers, which authenticate each other with it), a client
certificate for cloudops (private keys 0600), each member's data directory and log, a state file
with every member's pid; and ``var/lab/<prefix>/state.yaml``, the matching ``state:`` configuration.
``down`` stops the members it started (by pid, checked against the command line) and removes it all.
Debian's ``etcd-server`` provides ``/usr/bin/etcd``.
"""

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from cloudops.errors import CloudopsError
from cloudops.lab.hosts import _alive, _wait_for, lab_dir

ETCD = "/usr/bin/etcd"
CLIENT_PORT = 2379
PEER_PORT = 2380
STORE_PREFIX = "/cloudops/"


@dataclass
class Member:
    name: str
    address: str
    dir: str
    pid: int | None = None

    @property
    def client_url(self) -> str:
        return f"https://{self.address}:{CLIENT_PORT}"

    @property
    def peer_url(self) -> str:
        return f"https://{self.address}:{PEER_PORT}"


def etcd_dir(prefix: str) -> Path:
    return lab_dir(prefix) / "etcd"


def config_path(prefix: str) -> Path:
    """The ``state:`` configuration that points cloudops at this lab's etcd."""
    return lab_dir(prefix) / "state.yaml"


def base_address(prefix: str) -> str:
    """127.A.B.0 for a prefix: distinct per lab, never 127.0.0.x (where other servers of the machine listen)."""
    crc = zlib.crc32(prefix.encode())
    return f"127.{64 + crc % 128}.{(crc >> 8) % 256}.0"


def settings(prefix: str) -> dict:
    """The ``state:`` settings for this lab's etcd (what ``state.yaml`` holds)."""
    base = etcd_dir(prefix)
    return {"backend": "etcd", "endpoints": [m.client_url for m in _load(prefix)],
            "ca": str(base / "ca.pem"), "cert": str(base / "client.pem"), "key": str(base / "client-key.pem"),
            "prefix": STORE_PREFIX}


# ---------------------------------------------------------------- state

def _state_file(prefix: str) -> Path:
    return etcd_dir(prefix) / "members.json"


def _load(prefix: str) -> list[Member]:
    try:
        return [Member(**m) for m in json.loads(_state_file(prefix).read_text())["members"]]
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError):
        raise CloudopsError(f"lab etcd state file {_state_file(prefix)} is corrupt; run `invoke lab.down`") from None


def _save(prefix: str, members: list[Member]) -> None:
    path = _state_file(prefix)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"members": [asdict(m) for m in members]}, indent=2))
    tmp.rename(path)


def _ours(member: Member) -> bool:
    """The member's pid is alive and still the etcd we started on its data directory (pids get reused)."""
    if not _alive(member.pid):
        return False
    try:
        cmdline = Path(f"/proc/{member.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(Path(member.dir) / "data").encode() in cmdline


def status(prefix: str) -> dict:
    members = _load(prefix)
    rows = [{"name": m.name, "endpoint": m.client_url, "pid": m.pid, "alive": _ours(m)} for m in members]
    return {"prefix": prefix, "up": bool(rows) and all(r["alive"] for r in rows), "members": rows,
            "config": str(config_path(prefix)) if members else None}


# ---------------------------------------------------------------- up

def up(prefix: str, members: int = 3, progress=lambda msg: None) -> dict:
    """Start a ``members``-member cluster for lab ``prefix``; ``already_up`` in the result when it was running."""
    if not prefix.isalnum() or not prefix.islower() or len(prefix) > 6:
        raise CloudopsError(f"lab prefix {prefix!r} must be 1-6 lower-case letters or digits")
    if not isinstance(members, int) or members < 1 or members > 9:
        raise CloudopsError(f"lab etcd needs 1-9 members (got {members}); 3 or 5 tolerate failures")
    if not Path(ETCD).is_file():
        raise CloudopsError(f"{ETCD} is missing: install Debian's etcd-server (`make setup`)")
    current = status(prefix)
    if current["up"]:
        if len(current["members"]) != members:
            raise CloudopsError(f"lab {prefix!r} already runs etcd with {len(current['members'])} members; "
                                "run `invoke lab.down` first")
        return {**current, "already_up": True}
    if current["members"]:
        progress("cleaning up an etcd that was not taken down")
        down(prefix)

    base = ipaddress.ip_address(base_address(prefix))
    cluster = [Member(name=f"etcd{i}", address=str(base + i), dir=str(etcd_dir(prefix) / f"etcd{i}"))
               for i in range(1, members + 1)]
    deadline = time.monotonic() + PORT_WAIT  # an etcd of this prefix killed just before may still be exiting
    while not all(_port_free(m.address, p) for m in cluster for p in (CLIENT_PORT, PEER_PORT)) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    for member in cluster:
        for port in (CLIENT_PORT, PEER_PORT):
            if not _port_free(member.address, port):
                raise CloudopsError(f"lab etcd: {member.address}:{port} is already in use (another lab's etcd "
                                    "with a colliding address?); choose another prefix")
    etcd_dir(prefix).mkdir(parents=True, mode=0o700, exist_ok=True)
    _save(prefix, cluster)  # from here on `down` can clean up
    try:
        progress(f"making a CA and certificates for {members} etcd members and the client")
        _write_certificates(etcd_dir(prefix), cluster)
        progress(f"starting {members} etcd members on {', '.join(m.address for m in cluster)}")
        token = f"cloudops-lab-{prefix}"
        for member in cluster:
            member.pid = _start(member, cluster, token)
        _save(prefix, cluster)
        progress("waiting for the cluster to elect a leader")
        _wait_for(lambda: _healthy(prefix, cluster), 30, f"etcd of lab {prefix} to elect a leader", 0.3)
        _write_config(prefix)
    except BaseException:
        progress("lab etcd failed to start; taking down what was made")
        logs = _log_tails(cluster)
        down(prefix)
        if logs:
            raise CloudopsError(f"lab etcd did not start: {logs}") from None
        raise
    return {**status(prefix), "already_up": False}


PORT_WAIT = 30  # seconds up() waits for a member address's ports to be free


def _port_free(address: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as etcd does: TIME_WAIT is no obstacle
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


def _argv(member: Member, cluster: list[Member], token: str) -> list[str]:
    d = Path(member.dir)
    ca = str(Path(member.dir).parent / "ca.pem")
    tls = {"cert-file": d / "server.pem", "key-file": d / "server-key.pem", "trusted-ca-file": ca}
    argv = [ETCD, "--name", member.name, "--data-dir", str(d / "data"),
            "--listen-client-urls", member.client_url, "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", ",".join(f"{m.name}={m.peer_url}" for m in cluster),
            "--initial-cluster-token", token, "--initial-cluster-state", "new",
            "--client-cert-auth", "--peer-client-cert-auth", "--logger", "zap", "--log-outputs", "stderr"]
    for flag, path in tls.items():
        argv += [f"--{flag}", str(path), f"--peer-{flag}", str(path)]
    return argv


def _start(member: Member, cluster: list[Member], token: str) -> int:
    """Start one member; return once its process runs etcd (or has exited), never in between.

    Between fork and exec the child still shows Python's command line, so ``_ours`` would call a
    member that is only slow to exec (a loaded machine) one that "exited at start".
    """
    Path(member.dir).mkdir(mode=0o700, exist_ok=True)
    with open(Path(member.dir) / "etcd.log", "ab") as log:
        proc = subprocess.Popen(_argv(member, cluster, token), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    started = Member(name=member.name, address=member.address, dir=member.dir, pid=proc.pid)
    deadline = time.monotonic() + 30
    while proc.poll() is None and not _ours(started) and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc.pid


def _healthy(prefix: str, cluster: list[Member]) -> bool:
    """Every member runs and a linearizable read through the first one succeeds (there is a leader)."""
    from cloudops.state.etcd import EtcdStore
    from cloudops.state.store import StoreError

    if not all(_ours(m) for m in cluster):
        dead = [m.name for m in cluster if not _ours(m)]
        raise CloudopsError(f"lab etcd: {', '.join(dead)} exited at start ({_log_tails(cluster)})")
    base = etcd_dir(prefix)
    store = EtcdStore([cluster[0].client_url], ca=base / "ca.pem", cert=base / "client.pem",
                      key=base / "client-key.pem", timeout=2)
    try:
        store.get("lab/probe")
        return True
    except StoreError:
        return False
    finally:
        store.close()


def _log_tails(cluster: list[Member]) -> str:
    """The last error line of each member's log (for a member that failed to start)."""
    tails = []
    for member in cluster:
        try:
            lines = (Path(member.dir) / "etcd.log").read_text(errors="replace").splitlines()
        except OSError:
            continue
        errors = [line for line in lines if '"level":"error"' in line or '"level":"fatal"' in line]
        if not errors and lines:  # an error that is not zap's JSON (a flag, an exec failure)
            errors = [lines[-1]]
        if not lines:
            tails.append(f"{member.name}: nothing in its log")
        if errors:
            try:
                tails.append(f"{member.name}: {json.loads(errors[-1]).get('msg')}")
            except ValueError:
                tails.append(f"{member.name}: {errors[-1][:200]}")
    return "; ".join(tails)


def _write_config(prefix: str) -> None:
    import yaml

    text = ("# The lab's etcd as cloudops' state store (written by `lab.up --etcd`, removed by `lab.down`).\n"
            f"# Use it: `invoke -f {config_path(prefix)} TASK`, or copy this block into cloudops.yaml.\n"
            + yaml.safe_dump({"state": settings(prefix)}, default_flow_style=False, sort_keys=False))
    config_path(prefix).write_text(text)


# ---------------------------------------------------------------- certificates

def _write_certificates(base: Path, cluster: list[Member]) -> None:
    ca_key, ca_cert = make_ca(base, "cloudops lab etcd CA")
    for member in cluster:
        Path(member.dir).mkdir(mode=0o700, exist_ok=True)
        _issue(ca_key, ca_cert, Path(member.dir) / "server", member.name, server=True,
               addresses=[member.address, "127.0.0.1"])
    _issue(ca_key, ca_cert, base / "client", "cloudops-lab-operator", server=False, addresses=[])


def make_ca(base: Path, name: str):
    """A self-signed CA in ``base`` (ca.pem, ca-key.pem 0600): its key and certificate objects."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write_pair(base / "ca", key, cert)
    return key, cert


def _issue(ca_key, ca_cert, stem: Path, name: str, server: bool, addresses: list[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    # a member's certificate serves clients and peers and is its client certificate towards peers
    # (and towards its own gRPC gateway): both usages
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server \
        else [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=365))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
    if addresses:
        sans = [x509.DNSName("localhost")] + [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    _write_pair(stem, key, builder.sign(ca_key, hashes.SHA256()))


def _write_pair(stem: Path, key, cert) -> None:
    """``<stem>.pem`` (0644) and ``<stem>-key.pem``, created 0600 before a byte of the key is written."""
    from cryptography.hazmat.primitives import serialization

    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    fd = os.open(stem.with_name(stem.name + "-key.pem"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key_bytes)
    stem.with_name(stem.name + ".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# ---------------------------------------------------------------- down and faults

def down(prefix: str, grace: float = 2.0) -> int:
    """Stop the members this lab started (by pid) and remove their files; how many were running.

    Members get SIGTERM and ``grace`` seconds, then SIGKILL (their data goes with them anyway), and
    ``down`` returns once they are gone, so their addresses are free for the next ``up``.
    """
    members = []
    try:
        members = _load(prefix)
    except CloudopsError:
        pass
    running = [m for m in members if _ours(m)]
    for member in running:
        _signal(member.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_ours(m) for m in running):
        _reap(running)
        time.sleep(0.1)
    for member in running:
        if _ours(member):
            _signal(member.pid, signal.SIGKILL)
    # a killed etcd stuck in an fsync dies only when it returns, and holds its ports until then
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_ours(m) for m in running):
        _reap(running)
        time.sleep(0.1)
    shutil.rmtree(etcd_dir(prefix), ignore_errors=True)
    config_path(prefix).unlink(missing_ok=True)
    try:
        lab_dir(prefix).rmdir()  # a lab of etcd only: nothing else lives there
    except OSError:
        pass
    return len(running)


def kill_member(prefix: str, name: str, sig: int = signal.SIGKILL) -> int:
    """Fault injection: kill one member (by its pid). Returns the pid."""
    member = _member(prefix, name)
    if not _ours(member):
        raise CloudopsError(f"lab etcd member {name} of lab {prefix!r} is not running")
    _signal(member.pid, sig)
    _wait_for(lambda: (_reap([member]), not _ours(member))[1], 30, f"etcd member {name} to exit")
    return member.pid


def start_member(prefix: str, name: str) -> int:
    """Undo ``kill_member``: start the member again on its data directory (it rejoins the cluster)."""
    members = _load(prefix)
    member = _member(prefix, name)
    if _ours(member):
        return member.pid
    member.pid = _start(member, members, f"cloudops-lab-{prefix}")
    _save(prefix, [member if m.name == name else m for m in members])
    return member.pid


def _member(prefix: str, name: str) -> Member:
    for member in _load(prefix):
        if member.name == name:
            return member
    raise CloudopsError(f"lab {prefix!r} has no etcd member {name!r}")


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(members: list[Member]) -> None:
    """Collect members that were this process's children (lab.up in the same process, as in tests)."""
    for member in members:
        try:
            os.waitpid(member.pid, os.WNOHANG)
        except (ChildProcessError, OSError, TypeError):
            pass
