"""The local lab: N hypervisor hosts on this one machine, each in its own namespaces.

Every host is a network namespace (``<prefix>-hvN``) joined to a bridge
(``<prefix>-br``) by a veth pair. A full host also gets private mount and UTS
namespaces held open by an "anchor" process, and inside them: a tmpfs on /run,
overlays of /etc and /root, private /var/lib/libvirt, /var/log,
/var/cache/libvirt and pool directory, its own sshd, virtlogd and libvirtd with
a distinct host_uuid, and virtlockd (disk leases: the lockspace is ``.leases`` on the shared
directory, so a disk running on one host is refused to every other). A ``--bare`` host has only the network namespace and sshd:
cheap, for fan-out tests and benchmarks. One directory (``shared``) is visible at
the same path on every host (``SHARED_PATH``), as shared storage.

A full host does not see the operator's files: its own directory of the lab is bound
at ``INSIDE`` (/run/cloudops-lab/host: its sshd configuration and keys, pid files,
the upper layers of its overlays), and then the checkout, its virtualenv and the
state directory are covered by empty tmpfs mounts (``hidden_paths``). A step that
works only because the control machine's files are visible (a cron entry calling
the checkout, say) fails in the lab as it would on a real host. Commands run into a
host from here (``enter``) use the paths the host sees (``inside``). Bare hosts share
the machine's mount namespace and are not hidden.

``up`` writes, under ``var/lab/<prefix>/``: a state file (pids of everything it
started), a client key, known_hosts with every host key, an ssh_config, and the
lab's inventory; and in every full host's own ~/.ssh the migration and image trust that
``deploy`` installs on real hosts (a lab migration key authorized for migration
only, a lab image key authorized for the image receiver only, and known_hosts), so hosts
never use the operator's key or trust. ``down`` ends the processes it started (by pid: everything in
the lab's namespaces), deletes namespaces, veths and the bridge, and removes the
files. ``up`` over a lab that was never taken down cleans the leftovers first.
"""

import fcntl
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cloudops import atomicfile, cloudkeys, paths
from cloudops.hosts import leases
from cloudops.errors import CloudopsError
from cloudops.lab import links
from cloudops.templating import render

MAX_HOSTS = 32
DEFAULT_PREFIX = "co"
DEFAULT_SUBNETS = {"co": "10.251.0.0/24", "cot": "10.252.0.0/24"}
POOL_PATH = "/var/lib/cloudops"
INSIDE_LAB = "/run/cloudops-lab"  # on the host's private /run: nothing is made on the machine's file systems
INSIDE = f"{INSIDE_LAB}/host"  # the host's own directory of the lab, as the host sees it
SHARED_PATH = f"{INSIDE_LAB}/shared"  # the lab's shared storage, the same path on every host


@dataclass
class LabHost:
    name: str
    address: str
    namespace: str
    veth: str
    bare: bool
    dir: str
    pids: dict = field(default_factory=dict)


@dataclass
class Lab:
    prefix: str
    subnet: str
    gateway: str
    bridge: str
    dir: str
    bare: bool
    hosts: list[LabHost]
    lan: str | None = None  # the LAN's subnet: a bridge LAN_BRIDGE on every host, joined across hosts
    link: dict | None = None  # the hosts' links shaped to a rate (and delay): cloudops.lab.links; None: unshaped

    @property
    def lan_switch(self) -> str:
        """The bridge in this machine's namespace that joins the hosts' LAN bridges, like a datacenter VLAN."""
        return f"{self.prefix}-lan"

    def lan_address(self, index: int) -> str:
        """.1 is the LAN's gateway (the switch's address), hosts are .11, .12, ...; guests get .100 and up."""
        return str(ipaddress.ip_network(self.lan).network_address + index)

    @property
    def inventory_path(self) -> Path:
        return Path(self.dir) / "inventory.yaml"

    @property
    def ssh_config_path(self) -> Path:
        return Path(self.dir) / "ssh_config"

    def host(self, name: str) -> LabHost:
        for host in self.hosts:
            if host.name == name:
                return host
        raise CloudopsError(f"no lab host named {name!r} (lab {self.prefix}: {', '.join(h.name for h in self.hosts)})")


# ---------------------------------------------------------------- small helpers

def _sh(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, input=input, capture_output=True, text=True)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise CloudopsError(f"lab: `{' '.join(argv[:4])}` failed: {detail[-1] if detail else proc.returncode}")
    return proc


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise CloudopsError(f"lab: timed out after {timeout:.0f}s waiting for {what}")


def _port_open(address: str, port: int = 22) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


def default_subnet(prefix: str) -> str:
    """The /24 a lab of ``prefix`` asks for first, so labs of different prefixes can run side by side."""
    return DEFAULT_SUBNETS.get(prefix) or f"10.{200 + zlib.crc32(prefix.encode()) % 50}.0.0/24"


def candidate_subnets(prefix: str) -> list[str]:
    """``default_subnet(prefix)`` first, then the other /24s of 10.200-249 after it (two prefixes can hash
    to the same one: the second lab takes the next free one instead of failing)."""
    first = default_subnet(prefix)
    start = int(first.split(".")[1])
    others = [f"10.{200 + (start - 200 + i) % 50}.0.0/24" for i in range(1, 50)] if 200 <= start < 250 else []
    return [first, *others]


def _routed(net) -> str:
    """The machine's route for exactly ``net``, or "" when it has none."""
    return _sh("ip", "route", "show", "exact", str(net), check=False).stdout.strip()


def _pick_subnet(prefix: str, subnet: str | None, bare: bool):
    """The lab's subnet: ``subnet`` when given (refused if routed here), else the first free candidate."""
    def wanted(net):
        return [net, *([] if bare else [ipaddress.ip_network(lan_subnet(str(net)))])]

    if subnet:
        net = ipaddress.ip_network(subnet)
        for each in wanted(net):
            if routed := _routed(each):  # another lab, or the machine's own network
                raise CloudopsError(f"subnet {each} is already routed on this machine ({routed.splitlines()[0]}): "
                                    f"lab {prefix!r} would collide with it; choose another subnet")
        return net
    for candidate in candidate_subnets(prefix):
        net = ipaddress.ip_network(candidate)
        if not any(_routed(each) for each in wanted(net)):
            return net
    raise CloudopsError(f"every lab subnet of 10.200.0.0-10.249.0.0 is routed on this machine; give lab {prefix!r} "
                        "a subnet of its own")


SUBNET_LOCK = Path("/run/cloudops-lab-subnets.lock")


def _subnet_lock():
    """An exclusive lock of this machine's lab subnets, held from picking a free one until the lab's bridge
    routes it, so two labs coming up at once never pick the same (closing the file releases it)."""
    lock = open(SUBNET_LOCK, "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


LAN_BRIDGE = "lan0"  # on every full lab host: the host's side of the LAN (as br0 would be on a real hypervisor)


def lan_subnet(subnet: str) -> str:
    """The LAN of a lab: the /24 after the lab's own subnet (10.218.0.0/24 -> 10.218.1.0/24)."""
    net = ipaddress.ip_network(subnet)
    return str(ipaddress.ip_network(f"{net.network_address + 256}/24"))


def lab_dir(prefix: str) -> Path:
    return paths.lab_dir() / prefix


def inside(host: LabHost, name: str) -> str:
    """The path of ``name`` in the host's own lab directory as the host sees it (for commands run in it)."""
    return str(Path(host.dir) / name) if host.bare else f"{INSIDE}/{name}"


def hidden_paths() -> list[str]:
    """What a full host must not see: the checkout, the virtualenv cloudops runs from, the state directory.

    An installed (not editable) cloudops has no checkout; its virtualenv holds it. The Python of the
    system is never hidden (the host needs it). Nested paths collapse to the outermost."""
    import sys

    wanted = [paths.var_dir()]
    if paths.in_checkout():
        wanted.append(paths.ROOT)
    if sys.prefix != sys.base_prefix:
        wanted.append(Path(sys.prefix).resolve())
    needed = [Path(p) for p in ("/", "/etc", "/root", "/opt", "/run", "/usr", "/var", "/var/lib", "/var/lib/libvirt",
                                "/var/log", "/var/cache", "/var/cache/libvirt", "/tmp", POOL_PATH)]
    chosen: list[Path] = []
    for path in sorted({p.resolve() for p in wanted}, key=lambda p: len(p.parts)):
        if any(path.is_relative_to(outer) for outer in chosen):
            continue
        if path in needed[:-1] or any(n.is_relative_to(path) and n != path for n in needed):
            raise CloudopsError(f"lab: cannot hide {path} from the hosts (they need what is under it); "
                                "move the checkout or set CLOUDOPS_STATE_DIR elsewhere")
        chosen.append(path)
    return [str(p) for p in chosen]


def _state_file(prefix: str) -> Path:
    return lab_dir(prefix) / "state.json"


def _validate(prefix: str, count: int) -> None:
    if not prefix.isalnum() or not prefix.islower() or len(prefix) > 6:
        raise CloudopsError(f"lab prefix {prefix!r} must be 1-6 lower-case letters or digits")
    if not isinstance(count, int) or count < 1:
        raise CloudopsError(f"lab needs at least 1 host (got {count})")
    if count > MAX_HOSTS:
        raise CloudopsError(f"lab supports at most {MAX_HOSTS} hosts on one machine (got {count})")


# ---------------------------------------------------------------- state

def load(prefix: str = DEFAULT_PREFIX) -> Lab | None:
    """The lab recorded in the state file, or None when there is none."""
    try:
        data = json.loads(_state_file(prefix).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise CloudopsError(f"lab state file {_state_file(prefix)} is corrupt; run `invoke lab.down`") from None
    data["hosts"] = [LabHost(**h) for h in data["hosts"]]
    return Lab(**data)


def _save(lab: Lab) -> None:
    atomicfile.write(_state_file(lab.prefix), json.dumps(asdict(lab), indent=2))


def _namespaces(prefix: str) -> list[str]:
    out = _sh("ip", "netns", "list", check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(f"{prefix}-hv")]


def status(prefix: str = DEFAULT_PREFIX) -> dict:
    """What is up: per host its namespace and daemons, alive or not."""
    lab = load(prefix)
    if lab is None:
        return {"prefix": prefix, "up": False, "hosts": [], "stale_namespaces": _namespaces(prefix)}
    namespaces = set(_namespaces(prefix))
    hosts = []
    for host in lab.hosts:
        # a daemon restarted inside the host (libvirtd by `invoke deploy`) writes its new pid to its pid file
        daemons = {name: _alive(_read_pid(Path(host.dir) / f"{name}.pid") or pid) for name, pid in host.pids.items()}
        hosts.append({
            "name": host.name, "address": host.address, "bare": host.bare,
            "namespace": host.namespace in namespaces, **daemons,
            "ok": host.namespace in namespaces and all(daemons.values()),
        })
    return {"prefix": prefix, "up": all(h["ok"] for h in hosts), "hosts": hosts,
            "inventory": str(lab.inventory_path), "ssh_config": str(lab.ssh_config_path),
            "link": {**lab.link, **links.shown(lab)} if lab.link else {"shaping": links.describe(None)}}


# ---------------------------------------------------------------- up

def up(hosts: int = 2, bare: bool = False, prefix: str = DEFAULT_PREFIX, subnet: str | None = None,
       progress=lambda msg: None, link_rate: str | None = None, link_delay: str | None = None) -> Lab:
    """Bring up a lab of ``hosts`` hypervisor hosts (sshd only with ``bare``); ``link_rate``/``link_delay``
    shape every host's link (``cloudops.lab.links``)."""
    _validate(prefix, hosts)
    link = links.spec(link_rate, link_delay)  # refused before anything is made
    current = status(prefix)
    if current["up"]:
        raise CloudopsError(f"lab {prefix!r} is already up with {len(current['hosts'])} hosts; run `invoke lab.down` first")
    if current["hosts"] or current["stale_namespaces"] or lab_dir(prefix).exists():
        other = _foreign_owner(prefix)
        if other:
            raise CloudopsError(f"namespaces {prefix}-hv* belong to a running lab of another checkout ({other}); "
                                "take that one down or choose another prefix")
        progress("cleaning up a lab that was not taken down")
        down(prefix)

    if subnet and hosts + 10 > ipaddress.ip_network(subnet).num_addresses:
        raise CloudopsError(f"subnet {subnet} is too small for {hosts} hosts")
    subnet_lock = _subnet_lock()
    try:
        return _up(prefix, hosts, bare, _pick_subnet(prefix, subnet, bare), link, subnet_lock, progress)
    finally:
        subnet_lock.close()


def _up(prefix: str, hosts: int, bare: bool, net, link, subnet_lock, progress) -> Lab:
    """``up`` once the subnet is picked; ``subnet_lock`` is let go as soon as the lab's bridge routes it."""
    base = lab_dir(prefix)
    base.mkdir(parents=True)
    addresses = list(net.hosts())
    lab = Lab(prefix=prefix, subnet=str(net), gateway=str(addresses[0]), bridge=f"{prefix}-br",
              dir=str(base), bare=bare, hosts=[], lan=None if bare else lan_subnet(str(net)), link=link)
    for i in range(1, hosts + 1):
        name = f"hv{i}"
        lab.hosts.append(LabHost(name=name, address=str(addresses[9 + i]), namespace=f"{prefix}-{name}",
                                 veth=f"{prefix}-{name}", bare=bare, dir=str(base / name)))
    _save(lab)  # from here on, a failure leaves a state file that `down` can clean up
    try:
        progress(f"writing keys and configuration for {hosts} hosts")
        _write_client_files(lab)
        progress(f"creating bridge {lab.bridge} and {hosts} network namespaces")
        _create_network(lab)
        subnet_lock.close()
        if link:
            progress(f"shaping every host's link: {links.describe(link)}")
            links.apply(lab)
        progress("starting sshd" + ("" if bare else ", virtlogd, virtlockd and libvirtd") + " on every host")
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda h: _start_host(lab, h), lab.hosts))
        _save(lab)
        progress("waiting for every host to answer")
        for host in lab.hosts:
            _wait_for(lambda: _port_open(host.address), 20, f"sshd on {host.name}")
            if not host.bare:
                _wait_for(lambda: _libvirt_answers(host), 30, f"libvirtd on {host.name}", 0.3)
        if not bare:
            progress("probing QEMU on every host (cached for the next lab)")
            _warm_qemu_capabilities(lab)
        _install_ssh_block(lab)
        if prefix == DEFAULT_PREFIX:
            _link_default_inventory(lab)
    except BaseException:
        progress("lab.up failed; taking down what was made")
        down(prefix)
        raise
    return lab


def _write_client_files(lab: Lab) -> None:
    base = Path(lab.dir)
    (base / "shared").mkdir()
    key = base / "id_ed25519"
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"cloudops-lab-{lab.prefix}", "-f", str(key))
    (base / "authorized_keys").write_text((base / "id_ed25519.pub").read_text())
    os.chmod(base / "authorized_keys", 0o600)
    known = []
    hosts_file = ["127.0.0.1 localhost"]
    for host in lab.hosts:
        hdir = Path(host.dir)
        for sub in ("etc.upper", "etc.work", "root.upper", "root.work", "opt.upper", "opt.work", "var-lib-libvirt",
                    "var-log/libvirt/qemu", "var-cache-libvirt", "var-lib-cloudops"):
            (hdir / sub).mkdir(parents=True, exist_ok=True)
        hostkey = hdir / "ssh_host_ed25519_key"
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.name, "-f", str(hostkey))
        pub = " ".join((hdir / "ssh_host_ed25519_key.pub").read_text().split()[:2])
        known.append(f"{host.name},{host.address} {pub}")
        hosts_file.append(f"{host.address} {host.name}")
        common = dict(name=host.name, address=host.address, host_dir=host.dir, lab_dir=lab.dir)
        # what the host's sshd reads, at the paths the host sees (a full host sees its files at INSIDE)
        seen = dict(host_dir=host.dir, lab_dir=lab.dir) if host.bare else dict(host_dir=INSIDE, lab_dir=INSIDE_LAB)
        (hdir / "sshd_config").write_text(render("lab/sshd_config.j2", port=22, **{**common, **seen}))
        if not host.bare:
            host_uuid = uuid.uuid5(uuid.NAMESPACE_URL, f"cloudops-lab:{lab.prefix}:{host.name}")
            (hdir / "libvirtd.conf").write_text(render("lab/libvirtd.conf.j2", host_uuid=host_uuid, **common))
            (hdir / "qemu.conf").write_text(leases.qemu_conf(render("lab/qemu.conf.j2", **common)))
            (hdir / "qemu-lockd.conf").write_text(leases.lockd_conf(SHARED_PATH))
            (hdir / "setup.sh").write_text(render(
                "lab/host-setup.sh.j2", pool_path=POOL_PATH, inside=INSIDE, inside_lab=INSIDE_LAB, shared=SHARED_PATH,
                lockspace=leases.lockspace(SHARED_PATH), hidden=hidden_paths(), **common))
            _seed_qemu_capabilities(host)
    (base / "known_hosts").write_text("\n".join(known) + "\n")
    (base / "hosts").write_text("\n".join(hosts_file) + "\n")
    _write_migration_trust(lab, known)
    (base / "ssh_config").write_text(render(
        "lab/ssh_config.j2", prefix=lab.prefix, hosts=lab.hosts, key=str(key), known_hosts=str(base / "known_hosts"),
        names=lab.prefix == DEFAULT_PREFIX))
    (base / "inventory.yaml").write_text(render(
        "lab/inventory.yaml.j2", prefix=lab.prefix, hosts=lab.hosts, bare=lab.bare, key=str(key),
        known_hosts=str(base / "known_hosts"), pool_path=POOL_PATH, inside=INSIDE,
        shared_path=str(base / "shared") if lab.bare else SHARED_PATH,
        group="bare" if lab.bare else "hypervisors", lan=_lan_network(lab), fence_command=fence_command(lab.prefix),
        link=links.describe(lab.link)))


def fence_command(prefix: str) -> list[str]:
    """The lab's fence_command: this Python cuts the lab host's power (``cloudops.lab.power``)."""
    return [sys.executable, "-m", "cloudops.lab.power", "off", "--prefix", prefix, "{host}"]


def _lan_network(lab: Lab) -> dict | None:
    """The inventory's "lan" network: bridge mode on every host's LAN_BRIDGE, static addresses from .100."""
    if not lab.lan:
        return None
    return {"name": "lan", "mode": "bridge", "bridge": LAN_BRIDGE, "cidr": lab.lan, "gateway": lab.lan_address(1),
            "reserved": [f"{lab.lan_address(2)}-{lab.lan_address(99)}"]}


def _write_migration_trust(lab: Lab, known: list[str]) -> None:
    """What `deploy` gives real hypervisors, so live migration and host-to-host image copies work on a fresh
    lab: the lab's migration key in each full host's own ~/.ssh, authorized for migration only
    (cloudkeys.authorized_migration_key), the lab's image key beside it, authorized for the image receiver
    only (installed in the host's own /opt), and every lab host's key in its known_hosts. The host's ~/.ssh
    is opaque over the machine's: a lab host never sees the operator's keys, ssh_config or known_hosts
    (migration and image copies must not depend on them)."""
    full = [host for host in lab.hosts if not host.bare]
    if not full:
        return
    key = Path(lab.dir) / "migration_key"
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"cloudops-lab-{lab.prefix}-migration", "-f", str(key))
    public = key.with_name("migration_key.pub").read_text().strip()
    image_key = Path(lab.dir) / "image_key"
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"cloudops-lab-{lab.prefix}-image", "-f", str(image_key))
    image_public = image_key.with_name("image_key.pub").read_text().strip()
    sources = [host.address for host in full]
    authorized = "\n".join([cloudkeys.authorized_migration_key(public, sources),
                            cloudkeys.authorized_image_key(image_public, sources)])
    receiver = cloudkeys.receiver_script(POOL_PATH)
    for host in full:
        ssh_dir = Path(host.dir) / "root.upper" / ".ssh"
        ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            os.setxattr(ssh_dir, "trusted.overlay.opaque", b"y")
        except OSError:
            pass  # a file system without trusted xattrs: the machine's ~/.ssh shows through, the files below win
        files = {"cloudops_migration": (key.read_text(), 0o600), "cloudops_migration.pub": (public + "\n", 0o644),
                 "cloudops_images": (image_key.read_text(), 0o600), "cloudops_images.pub": (image_public + "\n", 0o644),
                 "authorized_keys": (authorized + "\n", 0o600), "known_hosts": ("\n".join(known) + "\n", 0o644)}
        bin_dir = Path(host.dir) / "opt.upper" / Path(cloudkeys.RECEIVER).parent.relative_to("/opt")
        bin_dir.mkdir(parents=True, exist_ok=True)
        for path, (content, mode) in {**{ssh_dir / n: f for n, f in files.items()},
                                      bin_dir / Path(cloudkeys.RECEIVER).name: (receiver, 0o755)}.items():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "w") as out:
                out.write(content)


def _create_network(lab: Lab) -> None:
    plen = ipaddress.ip_network(lab.subnet).prefixlen
    _sh("ip", "link", "add", lab.bridge, "type", "bridge")
    _sh("ip", "addr", "add", f"{lab.gateway}/{plen}", "dev", lab.bridge)
    _sh("ip", "link", "set", lab.bridge, "up")
    for host in lab.hosts:
        ns = host.namespace
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _sh("ip", "link", "set", host.veth, "master", lab.bridge, "up")
        _sh("ip", "-n", ns, "addr", "add", f"{host.address}/{plen}", "dev", "eth0")
        _sh("ip", "-n", ns, "link", "set", "eth0", "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "-n", ns, "route", "add", "default", "via", lab.gateway)
    if lab.lan:
        _create_lan(lab)


def _create_lan(lab: Lab) -> None:
    """Every host's bridge LAN_BRIDGE (with the host's LAN address) joined by a veth to the lab's LAN switch."""
    _sh("ip", "link", "add", lab.lan_switch, "type", "bridge")
    _sh("ip", "addr", "add", f"{lab.lan_address(1)}/24", "dev", lab.lan_switch)
    _sh("ip", "link", "set", lab.lan_switch, "up")
    for i, host in enumerate(lab.hosts, start=1):
        ns, uplink = host.namespace, f"{host.veth}l"
        _sh("ip", "link", "add", uplink, "type", "veth", "peer", "name", "lanup", "netns", ns)
        _sh("ip", "link", "set", uplink, "master", lab.lan_switch, "up")
        _sh("ip", "-n", ns, "link", "add", LAN_BRIDGE, "type", "bridge")
        _sh("ip", "-n", ns, "link", "set", "lanup", "master", LAN_BRIDGE, "up")
        _sh("ip", "-n", ns, "addr", "add", f"{lab.lan_address(10 + i)}/24", "dev", LAN_BRIDGE)
        _sh("ip", "-n", ns, "link", "set", LAN_BRIDGE, "up")


def _start_host(lab: Lab, host: LabHost) -> None:
    hdir = Path(host.dir)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    if host.bare:
        _sh("ip", "netns", "exec", host.namespace, "/usr/sbin/sshd", "-f", str(hdir / "sshd_config"))
        _wait_for(lambda: _read_pid(hdir / "sshd.pid"), 10, f"sshd pid on {host.name}")
        host.pids = {"sshd": _read_pid(hdir / "sshd.pid")}
        return
    Path(POOL_PATH).mkdir(parents=True, exist_ok=True)  # mount point for each host's private pool
    anchor_pidfile = hdir / "anchor.pid"
    subprocess.Popen(
        ["ip", "netns", "exec", host.namespace, "unshare", "--mount", "--uts", "--propagation", "private",
         "--fork", "sh", "-c", 'echo $$ > "$0"; exec sleep infinity', str(anchor_pidfile)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for(lambda: _read_pid(anchor_pidfile), 10, f"namespace anchor on {host.name}")
    anchor = _read_pid(anchor_pidfile)
    _sh("nsenter", "-t", str(anchor), "-m", "-u", "-n", "sh", "-s", input=(hdir / "setup.sh").read_text())
    pids = {"anchor": anchor}
    for daemon in ("sshd", "virtlogd", "virtlockd", "libvirtd"):
        _wait_for(lambda: _read_pid(hdir / f"{daemon}.pid"), 15, f"{daemon} pid on {host.name}")
        pids[daemon] = _read_pid(hdir / f"{daemon}.pid")
    host.pids = pids


def enter(host: LabHost) -> list[str]:
    """The argv prefix that runs a command inside a lab host's namespaces."""
    if host.bare:
        return ["ip", "netns", "exec", host.namespace]
    return ["nsenter", "-t", str(host.pids["anchor"]), "-m", "-u", "-n"]


def _libvirt_answers(host: LabHost) -> bool:
    return _sh(*enter(host), "virsh", "-c", "qemu:///system", "uri", check=False).returncode == 0


def _caps_cache() -> Path:
    """libvirt's QEMU capabilities cache, kept across labs: probing QEMU costs ~9 s per host under TCG."""
    return paths.var_dir() / "cache" / "qemu-capabilities"


def _seed_qemu_capabilities(host: LabHost) -> None:
    if _caps_cache().is_dir():
        shutil.copytree(_caps_cache(), Path(host.dir) / "var-cache-libvirt/qemu/capabilities", dirs_exist_ok=True)


def _warm_qemu_capabilities(lab: Lab) -> None:
    with ThreadPoolExecutor(max_workers=len(lab.hosts)) as pool:
        list(pool.map(lambda h: _sh(*enter(h), "virsh", "-c", "qemu:///system", "version"), lab.hosts))
    fresh = Path(lab.hosts[0].dir) / "var-cache-libvirt/qemu/capabilities"
    if fresh.is_dir() and any(fresh.iterdir()):
        _caps_cache().mkdir(parents=True, exist_ok=True)
        shutil.copytree(fresh, _caps_cache(), dirs_exist_ok=True)


def _install_ssh_block(lab: Lab) -> None:
    """Let plain `ssh hv1`, `fab -H hv1` and libvirt's qemu+ssh find the lab: its Host blocks, between
    markers, at the top of ~/.ssh/config (inline, not an Include: paramiko, under Fabric, has no Include)."""
    begin, end = _marks(lab.prefix)
    block = f"{begin}\n{lab.ssh_config_path.read_text().rstrip()}\n{end}\n"
    _edit_ssh_config(lambda text: block + _without_block(text, lab.prefix))


def _edit_ssh_config(change) -> None:
    """Read-modify-write ~/.ssh/config under a lock: labs of other prefixes may be going up or down at once."""
    config = Path.home() / ".ssh" / "config"
    config.parent.mkdir(mode=0o700, exist_ok=True)
    atomicfile.update(config, change, lock_path=config.parent / ".cloudops-lab.lock", mode=0o600)


def _marks(prefix: str) -> tuple[str, str]:
    return f"# cloudops lab {prefix} begin (written by lab.up, removed by lab.down)", f"# cloudops lab {prefix} end"


def _without_block(text: str, prefix: str) -> str:
    begin, end = _marks(prefix)
    out, inside = [], False
    for line in text.splitlines(keepends=True):
        if line.rstrip("\n") == begin:
            inside = True
        elif inside and line.rstrip("\n") == end:
            inside = False
        elif not inside:
            out.append(line)
    return "".join(out)


def _link_default_inventory(lab: Lab) -> None:
    link = paths.lab_inventory()
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(lab.inventory_path)


# ---------------------------------------------------------------- down and faults

def down(prefix: str = DEFAULT_PREFIX, progress=lambda msg: None) -> dict:
    """Take the lab down: processes (by pid), namespaces, veths, bridge, files. Safe to repeat."""
    lab = load_quietly(prefix)
    namespaces = set(_namespaces(prefix))
    if lab:
        namespaces |= {h.namespace for h in lab.hosts}
    killed = _kill_namespace_processes(sorted(namespaces))
    for ns in sorted(namespaces):
        _sh("ip", "netns", "del", ns, check=False)
    links = _links(prefix)
    for link in links:
        _sh("ip", "link", "del", link, check=False)
    _edit_ssh_config(lambda text: _without_block(text, prefix))
    default_inventory = paths.lab_inventory()
    if prefix == DEFAULT_PREFIX and default_inventory.is_symlink():
        default_inventory.unlink()
    from cloudops.lab import etcd  # the lab's etcd members (lab.up --etcd) live under its directory too

    etcd_members = etcd.down(prefix)
    shutil.rmtree(lab_dir(prefix), ignore_errors=True)
    summary = {"prefix": prefix, "processes": killed, "namespaces": len(namespaces), "links": len(links),
               "etcd_members": etcd_members}
    progress(f"lab {prefix}: ended {killed} processes, removed {len(namespaces)} namespaces and {len(links)} links"
             + (f", stopped {etcd_members} etcd members" if etcd_members else ""))
    return summary


def load_quietly(prefix: str) -> Lab | None:
    try:
        return load(prefix)
    except CloudopsError:
        return None


def _links(prefix: str) -> list[str]:
    out = _sh("ip", "-o", "link", "show", check=False).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    mine = [n for n in names if n.startswith(f"{prefix}-hv")]
    return mine + [n for n in names if n in (f"{prefix}-br", f"{prefix}-lan")]


def _foreign_owner(prefix: str) -> str | None:
    """The lab directory of another checkout whose live processes hold this prefix's namespaces, if any.

    Namespaces are machine-wide but lab state is per checkout: a lab of the same prefix run from
    another clone (CI's, say) is not stale, and must not be cleaned up from here.
    """
    mine = str(lab_dir(prefix))
    marker = f"/lab/{prefix}/"
    for ns in _namespaces(prefix):
        for pid in namespace_pids(ns):
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            tokens = [t for a in args for t in a.decode(errors="replace").split()]  # sshd rewrites its argv
            for arg in tokens:
                if marker in arg:
                    owner = arg[: arg.index(marker) + len(marker) - 1]
                    if owner != mine and _alive(pid):
                        return owner
    return None


def namespace_pids(namespace: str) -> list[int]:
    out = _sh("ip", "netns", "pids", namespace, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_namespace_processes(namespaces: list[str], grace: float = 5.0) -> int:
    pids = {pid for ns in namespaces for pid in namespace_pids(ns)}
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
    return len(pids)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop_sshd(prefix: str, name: str) -> int:
    """Fault injection: end one host's sshd and its sessions. Returns how many processes ended."""
    lab = load(prefix)
    host = lab.host(name) if lab else None
    if host is None:
        raise CloudopsError(f"lab {prefix!r} is not up")
    sshd = [p for p in namespace_pids(host.namespace) if _comm(p) == "sshd"]
    for pid in sshd:
        _signal(pid, signal.SIGKILL)
    return len(sshd)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def start_sshd(prefix: str, name: str) -> None:
    """Undo ``stop_sshd``: start the host's sshd again in its namespaces."""
    lab = load(prefix)
    host = lab.host(name) if lab else None
    if host is None:
        raise CloudopsError(f"lab {prefix!r} is not up")
    pidfile = Path(host.dir) / "sshd.pid"
    pidfile.unlink(missing_ok=True)
    _sh(*enter(host), "/usr/sbin/sshd", "-f", inside(host, "sshd_config"))
    _wait_for(lambda: _port_open(host.address), 10, f"sshd on {host.name}")
    host.pids["sshd"] = _read_pid(pidfile)
    _save(lab)


def replace_host_key(prefix: str, name: str) -> str:
    """Fault injection: the host presents a new SSH host key (as a reinstalled host or an impostor would);
    sshd restarts with it, the old key is kept for ``restore_host_key``. Returns the new public key."""
    key = _host_key(prefix, name)
    saved = key.with_name(key.name + ".orig")
    if not saved.exists():
        for suffix in ("", ".pub"):
            os.replace(key.with_name(key.name + suffix), saved.with_name(saved.name + suffix))
    else:
        for suffix in ("", ".pub"):
            key.with_name(key.name + suffix).unlink(missing_ok=True)
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key))
    stop_sshd(prefix, name)
    start_sshd(prefix, name)
    return key.with_name(key.name + ".pub").read_text().strip()


def restore_host_key(prefix: str, name: str) -> None:
    """Undo ``replace_host_key``: the host's original key again, sshd restarted."""
    key = _host_key(prefix, name)
    saved = key.with_name(key.name + ".orig")
    if saved.exists():
        for suffix in ("", ".pub"):
            os.replace(saved.with_name(saved.name + suffix), key.with_name(key.name + suffix))
        stop_sshd(prefix, name)
        start_sshd(prefix, name)


def _host_key(prefix: str, name: str) -> Path:
    lab = load(prefix)
    if lab is None:
        raise CloudopsError(f"lab {prefix!r} is not up")
    return Path(lab.host(name).dir) / "ssh_host_ed25519_key"


def restart_libvirtd(prefix: str, name: str) -> int:
    """Fault injection and recovery: start the host's libvirtd again (after it was killed). Returns its pid."""
    lab = load(prefix)
    host = lab.host(name) if lab else None
    if host is None:
        raise CloudopsError(f"lab {prefix!r} is not up")
    old = host.pids.get("libvirtd")
    if _alive(old):
        _signal(old, signal.SIGTERM)
        _wait_for(lambda: not _alive(old), 15, f"libvirtd on {host.name} to stop")
    pidfile = Path(host.dir) / "libvirtd.pid"
    pidfile.unlink(missing_ok=True)
    _sh(*enter(host), "libvirtd", "-d", "-p", inside(host, "libvirtd.pid"))
    _wait_for(lambda: _read_pid(pidfile), 15, f"libvirtd pid on {host.name}")
    _wait_for(lambda: _libvirt_answers(host), 30, f"libvirtd on {host.name}", 0.3)
    host.pids["libvirtd"] = _read_pid(pidfile)
    _save(lab)
    return host.pids["libvirtd"]
