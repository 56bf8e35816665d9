"""Turn plain Debian hosts into hypervisors of the cloud, and keep them so: an idempotent deploy.

``plan`` checks every selected host's inventory variables and renders every template
before anything changes anywhere (one clear line per problem). ``prepare`` makes the
cloud-wide pieces once: the migration keypair, the image keypair (host-to-host image copies:
cloudops.imaging.distribution) and every hypervisor's verified host keys.
``deploy_host`` then reads the host's facts (packages, init system, managed files) and
runs the steps in order; each compares what is wanted with what is there, acts only on a
difference and reports changed or unchanged; ``check`` reports what would change and
changes nothing. A second run reports no change.

Inventory variables (all optional; the defaults are in ``DEFAULTS``):
``cloud_name``, ``role``, ``packages``, ``pool_path``, ``networks``,
``libvirtd_keepalive_interval``, ``libvirtd_keepalive_count``, ``libvirtd_log_level``,
``libvirtd_log_filters``, ``libvirtd_restart`` (shell command; default systemctl or service),
``shared_path`` (the shared storage: disk leases with their lockspace there, see cloudops.hosts.leases),
``virtlockd_start`` (shell command starting virtlockd where there is no systemd or ``service``),
``metrics`` (``carbon``, ``prefix``, ``interval_minutes``: installs the host's own cloudops in
/opt/cloudops/venv, the Debian packages it needs, and the metrics cron entry that runs it; see
cloudops.hosts.toolkit for what comes from where),
``deploy_templates`` (a directory whose files override templates/deploy/*.j2).
"""

import ipaddress
import posixpath
import re
import shlex
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import jinja2
import libvirt

from cloudops import cloudkeys, fleet, hostfiles, paths, ssh, storage, virt
from cloudops.errors import CloudopsError
from cloudops.hosts import leases, toolkit
from cloudops.net import networks

DEFAULTS = {
    "cloud_name": "cloudops",
    "role": "hypervisor",
    "packages": ["libvirt-daemon-system", "libvirt-clients", "qemu-system-x86", "qemu-utils", "dnsmasq-base",
                 "openssh-client", "ovmf", "python3-scapy",
                 "libvirt-daemon-driver-lxc", "openssl"],  # openssl: the image receiver's sha256 (SHA instructions)
    "pool_path": "/var/lib/cloudops",
    "libvirtd_keepalive_interval": 5,
    "libvirtd_keepalive_count": 5,
    "libvirtd_log_level": 3,
    "libvirtd_log_filters": "3:remote 4:event 3:util.json 3:rpc",
    "libvirtd_restart": None,
    "shared_path": None,
    "virtlockd_start": None,
    "metrics": None,
    "deploy_templates": None,
}
STEPS = ("packages", "libvirtd", "leases", "pool", "networks", "migration-key", "image-key", "known-hosts", "cloudops-venv",
         "metrics-cron", "banner")
LIBVIRTD_CONF = "/etc/libvirt/libvirtd.conf"
MOTD = "/etc/motd"
METRICS_CRON = "/etc/cron.d/cloudops-metrics"  # metrics_cron.CRON_PATH
MIGRATION_KEY = cloudkeys.HOST_MIGRATION_KEY  # under the login user's home on every host
IMAGE_KEY = cloudkeys.HOST_IMAGE_KEY  # beside it: host-to-host image copies (cloudops.imaging.distribution)
RECEIVER = cloudkeys.RECEIVER  # the image key's forced command
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
TEXT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.,:/()-]{0,62}$")
UUID_RE = re.compile(r'^\s*host_uuid\s*=\s*"([0-9a-fA-F-]{36})"', re.MULTILINE)


# ---------------------------------------------------------------- settings: inventory variables, checked

@dataclass(frozen=True)
class Settings:
    """One host's deploy settings after defaults and checks."""

    cloud: str
    role: str
    packages: tuple[str, ...]
    pool_path: str
    networks: tuple[networks.NetworkSpec, ...]
    keepalive_interval: int
    keepalive_count: int
    log_level: int
    log_filters: str
    restart: str | None
    shared_path: str | None
    virtlockd_start: str | None
    metrics: dict | None
    templates: str | None


def _int(host, key, value, low, high) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise CloudopsError(f"{host.name}: {key} must be an integer in {low}..{high}, got {value!r}")
    return value


def _text(host, key, value) -> str:
    if not isinstance(value, str) or not TEXT_RE.match(value):
        raise CloudopsError(f"{host.name}: {key} must be a short text (letters, digits, spaces, _.,:/()-), got {value!r}")
    return value


def settings_for(host, base_dir: Path | None = None) -> Settings:
    """The host's settings from its inventory vars; a wrong type or value is a CloudopsError naming host and key."""
    v = {**DEFAULTS, **{k: val for k, val in host.vars.items() if k in DEFAULTS and val is not None}}
    packages = v["packages"]
    if not isinstance(packages, list) or not all(isinstance(p, str) and PACKAGE_RE.match(p) for p in packages):
        raise CloudopsError(f"{host.name}: packages must be a list of Debian package names, got {packages!r}")
    pool = v["pool_path"]
    if not isinstance(pool, str) or not pool.startswith("/") or any(c.isspace() for c in pool) or "'" in pool:
        raise CloudopsError(f"{host.name}: pool_path must be an absolute path without spaces, got {pool!r}")
    try:
        specs = tuple(networks.specs_from(host.vars))
    except CloudopsError as exc:
        raise CloudopsError(f"{host.name}: {exc}") from None
    restart = v["libvirtd_restart"]
    if restart is not None and (not isinstance(restart, str) or not restart.strip() or "\n" in restart):
        raise CloudopsError(f"{host.name}: libvirtd_restart must be a one-line shell command, got {restart!r}")
    shared = v["shared_path"]
    if shared is not None and (not isinstance(shared, str) or not shared.startswith("/")
                               or any(c.isspace() for c in shared) or '"' in shared):
        raise CloudopsError(f"{host.name}: shared_path must be an absolute path without spaces, got {shared!r}")
    lockd_start = v["virtlockd_start"]
    if lockd_start is not None and (not isinstance(lockd_start, str) or not lockd_start.strip() or "\n" in lockd_start):
        raise CloudopsError(f"{host.name}: virtlockd_start must be a one-line shell command, got {lockd_start!r}")
    filters = v["libvirtd_log_filters"]
    if not isinstance(filters, str) or not re.match(r"^[0-9a-z_.: +-]*$", filters):
        raise CloudopsError(f"{host.name}: libvirtd_log_filters must look like '3:remote 4:event', got {filters!r}")
    templates = v["deploy_templates"]
    if templates is not None:
        if not isinstance(templates, str):
            raise CloudopsError(f"{host.name}: deploy_templates must be a directory path, got {templates!r}")
        templates = str((base_dir or Path.cwd()) / Path(templates).expanduser())
        if not Path(templates).is_dir():
            raise CloudopsError(f"{host.name}: deploy_templates {templates} is not a directory")
    metrics = _metrics(host, v["metrics"])
    if metrics:  # the host's own cloudops (the metrics job) needs these, whatever `packages` says
        packages = list(dict.fromkeys([*packages, *toolkit.PACKAGES]))
    return Settings(
        cloud=_text(host, "cloud_name", v["cloud_name"]), role=_text(host, "role", v["role"]),
        packages=tuple(packages), pool_path=posixpath.normpath(pool), networks=specs,
        keepalive_interval=_int(host, "libvirtd_keepalive_interval", v["libvirtd_keepalive_interval"], -1, 3600),
        keepalive_count=_int(host, "libvirtd_keepalive_count", v["libvirtd_keepalive_count"], 0, 100),
        log_level=_int(host, "libvirtd_log_level", v["libvirtd_log_level"], 1, 4), log_filters=filters,
        restart=restart, shared_path=posixpath.normpath(shared) if shared else None, virtlockd_start=lockd_start,
        metrics=metrics, templates=templates)


def _metrics(host, value) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not {"carbon", "prefix"} <= set(value) or set(value) - {"carbon", "prefix", "interval_minutes"}:
        raise CloudopsError(f"{host.name}: metrics must be a mapping with carbon, prefix and optionally "
                            f"interval_minutes, got {value!r}")
    carbon = str(value["carbon"])
    address, _, port = carbon.rpartition(":")
    try:
        ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        pass  # a host name is fine; metrics.cron_entry checks the rest
    if port.isdigit() and not 1 <= int(port) <= 65535:
        raise CloudopsError(f"{host.name}: metrics.carbon port must be in 1..65535, got {carbon!r}")
    return {"carbon": carbon, "prefix": value["prefix"], "interval_minutes": value.get("interval_minutes", 1)}


# ---------------------------------------------------------------- templates (an override directory may replace any)

@lru_cache(maxsize=None)
def _environment(override: str | None) -> jinja2.Environment:
    loaders = [jinja2.FileSystemLoader(override)] if override else []
    loaders.append(jinja2.FileSystemLoader(str(paths.TEMPLATES / "deploy")))
    return jinja2.Environment(loader=jinja2.ChoiceLoader(loaders), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)


def render(settings: Settings, template: str, **context) -> str:
    where = f"{settings.templates}/{template}" if settings.templates and (Path(settings.templates) / template).exists() \
        else f"templates/deploy/{template}"
    try:
        return _environment(settings.templates).get_template(template).render(**context)
    except jinja2.UndefinedError as exc:
        raise CloudopsError(f"template {where}: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise CloudopsError(f"template {where}: {exc}") from None


def libvirtd_conf(host, settings: Settings, host_uuid: str) -> str:
    return render(settings, "libvirtd.conf.j2", host=host.name, cloud=settings.cloud, host_uuid=host_uuid,
                  keepalive_interval=settings.keepalive_interval, keepalive_count=settings.keepalive_count,
                  log_level=settings.log_level, log_filters=settings.log_filters)


def banner(host, settings: Settings) -> str:
    return render(settings, "motd.j2", host=host.name, cloud=settings.cloud, role=settings.role,
                  groups=list(host.groups))


def ssh_peers(settings: Settings, peers: list, home: str) -> list[str]:
    text = render(settings, "ssh_peers.j2", peers=peers, key_path=f"{home}/{MIGRATION_KEY}",
                  known_hosts=f"{home}/.ssh/known_hosts")
    return text.rstrip("\n").splitlines()


def metrics_cron(host, settings: Settings) -> str:
    """The host's metrics cron file, rendered by the metrics capability's one renderer (metrics.install-cron's too)."""
    from cloudops.metrics import cron

    m = settings.metrics
    return cron.host_entry(host, *cron.host_settings(host, m["carbon"], m["prefix"], m["interval_minutes"]))


def plan(hosts: list, peers: list, base_dir: Path | None = None) -> dict[str, Settings]:
    """Every host's settings, every template rendered once: all problems surface before any host changes."""
    planned = {}
    for host in hosts:
        settings = settings_for(host, base_dir)
        try:
            libvirtd_conf(host, settings, str(uuid.uuid4()))
            banner(host, settings)
            ssh_peers(settings, peers, "/root")
            if settings.metrics:
                metrics_cron(host, settings)
        except CloudopsError as exc:
            raise CloudopsError(f"{host.name}: {exc}") from None
        planned[host.name] = settings
    return planned


# ---------------------------------------------------------------- cloud-wide pieces

@dataclass
class Cloud:
    """What every host's deploy shares: the migration and image keypairs and the hypervisors' verified host keys."""

    peers: list
    keypair: cloudkeys.KeyPair | None
    host_keys: dict[str, cloudkeys.HostKeys]
    notes: list[str] = field(default_factory=list)
    image_keypair: cloudkeys.KeyPair | None = None


def prepare(peers: list, cloud_name: str, check: bool = False, rotate: bool = False) -> Cloud:
    """The migration key (generated once; replaced with ``rotate``), the image key (generated once) and the
    verified host keys of ``peers``."""
    notes = []
    if check:
        keypair = None if rotate else cloudkeys.read_migration_key()
        if keypair is None:
            notes.append("would " + ("rotate" if rotate else "generate") + " the cloud's migration key")
        image_keypair = cloudkeys.read_image_key()
        if image_keypair is None:
            notes.append("would generate the cloud's image key")
    else:
        keypair, message = cloudkeys.ensure_migration_key(cloud_name, rotate=rotate)
        if message != cloudkeys.KEY_PRESENT:
            notes.append(message)
        image_keypair, message = cloudkeys.ensure_image_key(cloud_name)
        if message != cloudkeys.KEY_PRESENT:
            notes.append(message)
    host_keys = cloudkeys.collect_host_keys(peers)
    notes += [f"{name}: host key {keys.note}" for name, keys in host_keys.items() if keys.note != "verified"]
    return Cloud(peers, keypair, host_keys, notes, image_keypair)


# ---------------------------------------------------------------- one host

@dataclass
class Step:
    name: str
    changed: bool
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Facts:
    home: str
    init: str  # systemd, service or none
    packages: dict[str, bool]
    files: dict[str, hostfiles.RemoteFile]


FACTS_SCRIPT = r"""
printf 'home\t%s\n' "$HOME"
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then printf 'init\tsystemd\n'
elif command -v service >/dev/null; then printf 'init\tservice\n'; else printf 'init\tnone\n'; fi
dpkg-query -W -f='pkg\t${Package}\t${db:Status-Abbrev}\n' PACKAGES 2>/dev/null || true
"""


def parse_facts(text: str, packages) -> tuple[str, str, dict[str, bool]]:
    home, init, installed = "/root", "none", {p: False for p in packages}
    for line in text.splitlines():
        parts = line.split("\t")
        if parts[0] == "home" and len(parts) == 2 and parts[1]:
            home = parts[1]
        elif parts[0] == "init" and len(parts) == 2:
            init = parts[1]
        elif parts[0] == "pkg" and len(parts) == 3 and parts[1] in installed:
            installed[parts[1]] = parts[2].startswith("ii")
    return home, init, installed


def managed_paths(home: str) -> list[str]:
    ssh_dir = f"{home}/.ssh"
    return [LIBVIRTD_CONF, leases.QEMU_CONF, leases.LOCKD_CONF, MOTD, METRICS_CRON, f"{home}/{MIGRATION_KEY}", f"{home}/{MIGRATION_KEY}.pub",
            f"{home}/{IMAGE_KEY}", f"{home}/{IMAGE_KEY}.pub", RECEIVER, f"{ssh_dir}/authorized_keys", f"{ssh_dir}/known_hosts", f"{ssh_dir}/config"]


def gather_facts(conn, settings: Settings) -> Facts:
    script = FACTS_SCRIPT.replace("PACKAGES", " ".join(shlex.quote(p) for p in settings.packages))
    out = conn.run(script, hide=True, warn=False, in_stream=False).stdout
    home, init, installed = parse_facts(out, settings.packages)
    return Facts(home, init, installed, hostfiles.read_files(conn, managed_paths(home)))


def restart_command(settings: Settings, init: str) -> str:
    if settings.restart:
        return settings.restart
    if init == "systemd":
        return "systemctl restart libvirtd"
    if init == "service":
        return "service libvirtd restart"
    raise CloudopsError("no systemd and no `service` on the host: set the inventory variable libvirtd_restart")


class _Run:
    """One host's deploy: its connection, settings, facts and the steps it ran."""

    def __init__(self, host, settings: Settings, cloud: Cloud, conn, check: bool):
        self.host, self.settings, self.cloud, self.conn, self.check = host, settings, cloud, conn, check
        self.facts: Facts | None = None

    def file(self, path: str, content: str, mode: str, dir_mode: str = "755") -> tuple[bool, str]:
        return hostfiles.ensure_file(self.conn, self.facts.files[path], content, mode, self.check, dir_mode)

    # -- steps: each returns (changed, message)

    def packages(self):
        missing = [p for p, ok in self.facts.packages.items() if not ok]
        if not missing:
            return False, f"{len(self.settings.packages)} packages installed"
        if self.check:
            return True, f"would install {' '.join(missing)}"
        self.conn.run("DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
                      + " ".join(shlex.quote(p) for p in missing), hide=True, in_stream=False, timeout=900)
        return True, f"installed {' '.join(missing)}"

    def libvirtd(self):
        current = self.facts.files[LIBVIRTD_CONF]
        found = UUID_RE.search(current.content or "")
        host_uuid = found.group(1) if found else str(uuid.uuid4())
        changed, message = self.file(LIBVIRTD_CONF, libvirtd_conf(self.host, self.settings, host_uuid), "644")
        if not changed:
            return False, f"{LIBVIRTD_CONF} up to date (host_uuid {host_uuid})"
        command = restart_command(self.settings, self.facts.init)
        if self.check:
            return True, f"{message}; would restart libvirtd"
        self.conn.run(command, hide=True, in_stream=False, timeout=60)
        virt.forget(self.host)
        self._wait_for_libvirtd()
        return True, f"{message}; libvirtd restarted"

    def leases(self):
        """Disk leases (cloudops.hosts.leases): the lockspace on the shared path, qemu-lockd.conf, the lockd plugin
        in qemu.conf, virtlockd running; libvirtd restarted when its configuration changed (virtlockd first)."""
        shared = self.settings.shared_path
        if not shared:
            return False, "no shared_path in the inventory: disk leases not configured"
        q = shlex.quote
        if not self.conn.run(f"test -d {q(shared)}", warn=True, hide=True, in_stream=False).ok:
            raise CloudopsError(f"shared path {shared} does not exist on the host (mount the shared storage first)")
        results = []
        space = leases.lockspace(shared)
        if not self.conn.run(f"test -d {q(space)}", warn=True, hide=True, in_stream=False).ok:
            if not self.check:
                self.conn.run(f"mkdir -p -m 700 {q(space)}", hide=True, in_stream=False)
            results.append((True, f"{space}: {'would create' if self.check else 'created'}"))
        results.append(self.file(leases.LOCKD_CONF, leases.lockd_conf(shared), "644"))
        results.append(self.file(leases.QEMU_CONF, leases.qemu_conf(self.facts.files[leases.QEMU_CONF].content), "600"))
        if not leases.virtlockd_running(self.conn):
            command = leases.virtlockd_start_command(self.facts.init, self.settings.virtlockd_start)
            if command is None:
                raise CloudopsError("virtlockd is not running, and there is no systemd or `service` to start it: "
                                    "set the inventory variable virtlockd_start")
            if not self.check:
                self.conn.run(command, hide=True, in_stream=False, timeout=60)
            results.append((True, f"{'would start' if self.check else 'started'} virtlockd"))
        changed = any(c for c, _ in results)
        message = "; ".join(m for c, m in results if c) if changed else f"disk leases on, lockspace {space}"
        if not any(c for c, m in results if m.startswith("/etc/libvirt/")):  # libvirtd reads them when it starts
            return changed, message
        if self.check:
            return True, f"{message}; would restart libvirtd"
        self.conn.run(restart_command(self.settings, self.facts.init), hide=True, in_stream=False, timeout=60)
        virt.forget(self.host)
        self._wait_for_libvirtd()
        return True, f"{message}; libvirtd restarted"

    def _wait_for_libvirtd(self, seconds: float = 30):
        deadline = time.monotonic() + seconds
        while self.conn.run("virsh -c qemu:///system uri", hide=True, warn=True, in_stream=False).exited != 0:
            if time.monotonic() > deadline:
                raise CloudopsError(f"libvirtd did not answer within {seconds:g}s of its restart")
            time.sleep(0.3)

    def pool(self):
        path = storage.disks_dir(self.settings.pool_path)
        with virt.open_host(self.host) as conn:
            return ensure_pool(conn, path, self.check)

    def networks(self):
        if not self.settings.networks:
            return False, "no networks configured"
        with virt.open_host(self.host) as conn:
            results = [networks.ensure_network(conn, spec, check=self.check) for spec in self.settings.networks]
        return any(c for c, _ in results), "; ".join(m for _, m in results)

    def migration_key(self):
        home = self.facts.home
        if self.cloud.keypair is None:  # check mode before the key exists (or a rotation)
            return True, "would install the cloud's new migration key and authorize it"
        key = self.cloud.keypair
        results = [
            self.file(f"{home}/{MIGRATION_KEY}", key.private, "600", "700"),
            self.file(f"{home}/{MIGRATION_KEY}.pub", key.public + "\n", "644", "700"),
            self._block(f"{home}/.ssh/authorized_keys", "migration key", [cloudkeys.authorized_migration_key(
                key.public, cloudkeys.migration_sources(self.cloud.peers))], "600"),
            self._block(f"{home}/.ssh/config", "peers", ssh_peers(self.settings, self.cloud.peers, home), "600",
                        top=True),
        ]
        return _combine(results, "migration key installed and authorized")

    def image_key(self):
        """The image key and its receiver: a peer holding the key can drop a verified image file, nothing else."""
        home = self.facts.home
        if self.cloud.image_keypair is None:  # check mode before the key exists
            return True, f"would install the cloud's new image key, {RECEIVER} and authorize the key for it"
        key = self.cloud.image_keypair
        results = [
            self.file(f"{home}/{IMAGE_KEY}", key.private, "600", "700"),
            self.file(f"{home}/{IMAGE_KEY}.pub", key.public + "\n", "644", "700"),
            self.file(RECEIVER, cloudkeys.receiver_script(self.settings.pool_path), "755"),
            self._block(f"{home}/.ssh/authorized_keys", "image key", [cloudkeys.authorized_image_key(
                key.public, cloudkeys.migration_sources(self.cloud.peers))], "600"),
        ]
        return _combine(results, f"image key installed and authorized for {RECEIVER} only")

    def known_hosts(self):
        lines = [line for name in sorted(self.cloud.host_keys) for line in self.cloud.host_keys[name].lines]
        return self._block(f"{self.facts.home}/.ssh/known_hosts", "hypervisors", lines, "644",
                           quiet=f"{len(self.cloud.host_keys)} hypervisors' host keys known")

    def cloudops_venv(self):
        if not self.settings.metrics:
            return False, "metrics not configured: no cloudops needed on the host"
        return toolkit.ensure_toolkit(self.conn, check=self.check)  # this cloudops; wheels built only if needed

    def metrics_cron(self):
        if not self.settings.metrics:
            return False, "metrics not configured (inventory variable `metrics`)"
        from cloudops.metrics import cron  # the one writer of the file, shared with metrics.install-cron

        return cron.ensure_cron(self.conn, metrics_cron(self.host, self.settings), METRICS_CRON, check=self.check)

    def banner(self):
        return self.file(MOTD, banner(self.host, self.settings), "644")

    def _block(self, path, name, body, mode, top=False, quiet=None):
        current = self.facts.files[path]
        wanted = hostfiles.with_block(current.content, name, body, top=top)
        changed, message = hostfiles.ensure_file(self.conn, current, wanted, mode, self.check, "700")
        # the next block of the same file (authorized_keys holds two) starts from this one's result
        self.facts.files[path] = hostfiles.RemoteFile(path, wanted, mode)
        return changed, message if changed or quiet is None else quiet

    def run(self, progress=None) -> list[Step]:
        self.facts = gather_facts(self.conn, self.settings)
        steps = []
        for name in STEPS:
            try:
                changed, message = getattr(self, name.replace("-", "_"))()
            except Exception as exc:
                done = [s.name for s in steps if s.changed]
                after = f" (after changing: {', '.join(done)})" if done else ""
                raise CloudopsError(f"step {name}: {ssh.describe(exc)}{after}") from None
            steps.append(Step(name, changed, message))
            if progress:
                progress(f"{self.host.name}: {name}: {message}")
        return steps


def _combine(results, quiet: str) -> tuple[bool, str]:
    changed = [m for c, m in results if c]
    return (True, "; ".join(changed)) if changed else (False, quiet)


def ensure_pool(conn, path: str, check: bool = False, name: str = storage.POOL_NAME) -> tuple[bool, str]:
    """The cloudops pool at ``path``, active and autostarted; a pool of that name elsewhere is an error."""
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError:
        if check:
            return True, f"pool {name}: would define at {path}, build, start, autostart"
        storage.ensure_pool(conn, path, name)
        return True, f"pool {name}: defined at {path}, started, autostart on"
    current = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
    if current and posixpath.normpath(current) != path:
        raise CloudopsError(f"pool {name} is at {current} but the inventory says pool_path {path}: "
                            "move it by hand (VM disks live there)")
    todo = (["start"] if not pool.isActive() else []) + (["autostart on"] if not pool.autostart() else [])
    if not todo:
        return False, f"pool {name} active at {path}, autostart on"
    if not check:
        storage.ensure_pool(conn, path, name)
    return True, f"pool {name}: {'would ' if check else ''}{', '.join(todo)}"


def deploy_host(host, settings: Settings, cloud: Cloud, check: bool = False, conn=None, progress=None,
                timeout: float | None = None, live: dict | None = None):
    """Deploy one host (over ``conn`` if given, else a verified connection); fleet.Changed when a step changed.

    With ``timeout`` every remote command ends by the host's deadline (fleet.Bounded) and no step
    starts after it; ``live`` (host name -> connection) lets the fleet stop it from outside."""
    own = conn is None
    conn = conn or ssh.connect(host, timeout=10)
    if timeout is not None:
        conn = fleet.Bounded(conn, time.monotonic() + timeout, timeout)
        if live is not None:
            live[host.name] = conn
    try:
        steps = _Run(host, settings, cloud, conn, check).run(progress)
    finally:
        if own:
            conn.close()
    value = [s.to_dict() for s in steps]
    return fleet.Changed(value) if any(s.changed for s in steps) else value


def deploy(hosts: list, inventory, check: bool = False, rotate_key: bool = False, workers: int = 16,
           timeout: float = 600, progress=None) -> tuple[fleet.FleetResult, list[str]]:
    """Validate everything, prepare the cloud-wide keys, then deploy every host in parallel."""
    peers = inventory.hypervisors()
    planned = plan(hosts, peers, Path(inventory.path).parent)
    cloud = prepare(peers, next(iter(planned.values())).cloud if planned else "cloudops", check, rotate_key)
    live = {}
    result = fleet.run(hosts, lambda h: deploy_host(h, planned[h.name], cloud, check, progress=progress,
                                                    timeout=timeout, live=live),
                       workers=workers, timeout=timeout, grace=fleet.GRACE,
                       on_timeout=lambda name: live[name].stop() if name in live else None)
    return result, cloud.notes


# ---------------------------------------------------------------- reporting

def counts(value) -> tuple[int, int]:
    steps = value or []
    changed = sum(1 for s in steps if s["changed"])
    return changed, len(steps) - changed


def describe(value) -> str:
    """One line per host for the summary table: which steps changed."""
    changed = [s["name"] for s in value or [] if s["changed"]]
    return f"changed: {', '.join(changed)}" if changed else "no changes"
