"""Load the YAML inventory of hypervisor hosts (native or Ansible style) and select hosts from it."""

import dataclasses
import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import yaml

from cloudops import paths
from cloudops.errors import CloudopsError

ENV_VAR = "CLOUDOPS_INVENTORY"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
NATIVE_TOP_KEYS = ("vars", "groups", "hosts")
NATIVE_HOST_KEYS = ("address", "user", "port", "key", "libvirt_uri", "tags", "capacity", "vars")
CAPACITY_KEYS = ("memory_mb", "vcpus")


@dataclass(frozen=True)
class Capacity:
    """Capacity overrides for a host; None means "ask the host"."""

    memory_mb: int | None = None
    vcpus: int | None = None


BARE_TAG = "bare"  # a host that runs sshd only, no libvirtd (a lab's --bare hosts): never a hypervisor


@dataclass(frozen=True)
class Host:
    """One hypervisor host after precedence: connection fields, capacity, tags, groups and merged vars."""

    name: str
    address: str
    user: str = "root"
    port: int = 22
    key: str | None = None
    libvirt_uri: str = ""
    capacity: Capacity = Capacity()
    tags: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    vars: dict = field(default_factory=dict, hash=False)

    def __post_init__(self):
        if not self.libvirt_uri:
            object.__setattr__(self, "libvirt_uri", derived_libvirt_uri(
                self.user, self.address, self.port, self.key, known_hosts_file(self.vars)))

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["tags"], data["groups"] = list(self.tags), list(self.groups)
        return data


def is_hypervisor(host) -> bool:
    """Whether ``host`` runs libvirtd and VMs: every host but those tagged ``bare``."""
    return BARE_TAG not in host.tags


def hypervisors(hosts) -> list:
    """The hypervisors among ``hosts`` (a selection), in their order."""
    return [h for h in hosts if is_hypervisor(h)]


def known_hosts_file(host_vars: dict | None) -> str:
    """The one known_hosts file a host's key is checked against: the inventory's ``known_hosts``
    variable, else ~/.ssh/known_hosts."""
    configured = (host_vars or {}).get("known_hosts")
    return os.path.expanduser(str(configured)) if configured else os.path.expanduser("~/.ssh/known_hosts")


def ssh_uri(user: str, address: str, port: int, key: str | None, *, command: str | None = None) -> str:
    """``qemu+ssh://user@address:port/system?...``: ``keyfile=`` when a key is set, ``command=`` for the ssh
    program libvirt runs, ``no_tty=1`` (never a prompt). Every value is URI-quoted."""
    host = f"[{address}]" if ":" in address else address
    params = [("keyfile", key), ("command", command), ("no_tty", "1")]
    query = "&".join(f"{name}={quote(str(value), safe='/')}" for name, value in params if value)
    return f"qemu+ssh://{quote(user, safe='')}@{host}:{int(port)}/system?{query}"


def derived_libvirt_uri(user: str, address: str, port: int, key: str | None, known_hosts: str | None = None) -> str:
    """The operator's URI for a host: OpenSSH through ``sshcommand``'s script, which checks the host key
    against the trusted known_hosts only (the one Fabric connections use too)."""
    from cloudops import sshcommand

    return ssh_uri(user, address, port, key, command=str(sshcommand.path_for(known_hosts or known_hosts_file(None))))


@dataclass(frozen=True)
class Inventory:
    """The hosts of one inventory file, in file order, and the host names of every group ('all' included)."""

    path: Path
    hosts: dict[str, Host]
    groups: dict[str, list[str]]

    def select(self, hosts=None, groups=None, limit=None) -> list[Host]:
        """Hosts named or matched by ``hosts`` plus members of ``groups`` (all if neither), narrowed by ``limit``.

        Each selector is a list or a comma-separated string of names or fnmatch patterns;
        ``limit`` entries may name hosts or groups, and ``!entry`` excludes.
        """
        host_entries, group_entries = _entries(hosts), _entries(groups)
        chosen = set(self.hosts) if not (host_entries or group_entries) else set()
        chosen |= self._expand(host_entries, by_host=True, by_group=False, what="host")
        chosen |= self._expand(group_entries, by_host=False, by_group=True, what="group")
        limit_entries = _entries(limit)
        if limit_entries:
            include = [e for e in limit_entries if not e.startswith("!")]
            exclude = [e[1:] for e in limit_entries if e.startswith("!")]
            if include:
                chosen &= self._expand(include, by_host=True, by_group=True, what="host or group")
            chosen -= self._expand(exclude, by_host=True, by_group=True, what="host or group")
            if not chosen:
                raise CloudopsError(f"limit {','.join(limit_entries)!r} leaves no host selected (inventory {self.path})")
        return [host for name, host in self.hosts.items() if name in chosen]

    def hypervisors(self) -> list[Host]:
        """Every host that runs libvirtd and VMs (not tagged ``bare``), in file order."""
        return hypervisors(self.hosts.values())

    def _expand(self, entries, *, by_host, by_group, what) -> set[str]:
        universe: dict[str, set[str]] = {}
        if by_group:
            for name, members in self.groups.items():
                universe.setdefault(name, set()).update(members)
        if by_host:
            for name in self.hosts:
                universe.setdefault(name, set()).add(name)
        chosen = set()
        for entry in entries:
            if any(c in entry for c in "*?["):
                matched = [name for name in universe if fnmatch.fnmatchcase(name, entry)]
                if not matched:
                    raise CloudopsError(f"{what} pattern {entry!r} matches nothing (inventory {self.path}; known: {_sample(universe)})")
                chosen.update(*(universe[name] for name in matched))
            elif entry in universe:
                chosen |= universe[entry]
            else:
                raise CloudopsError(f"unknown {what} {entry!r} (inventory {self.path}; known: {_sample(universe)})")
        return chosen


def _entries(selector) -> list[str]:
    """None, "a,b" or ["a", "b,c"] -> ["a", "b", "c"]."""
    if not selector:
        return []
    items = [selector] if isinstance(selector, str) else selector
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def _sample(names, shown=10) -> str:
    names = list(names)
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return (", ".join(names[:shown]) or "none") + more


def lab_inventory_path() -> Path:
    """The inventory that ``invoke lab.up`` writes (git-ignored in a checkout)."""
    return paths.lab_inventory()


def default_path(explicit=None, config_value=None) -> Path:
    """The inventory to use: explicit > $CLOUDOPS_INVENTORY > invoke config ``inventory`` > the lab's."""
    sources = ((explicit, "given explicitly"), (os.environ.get(ENV_VAR), f"from ${ENV_VAR}"),
               (config_value, "from invoke config 'inventory'"))
    for value, source in sources:
        if value:
            path = Path(value).expanduser()
            if not path.exists():
                raise CloudopsError(f"inventory {path} ({source}) does not exist")
            return path
    path = lab_inventory_path()
    if not path.exists():
        raise CloudopsError(f"no inventory given and the lab inventory {path} does not exist: "
                            f"run `invoke lab.up`, pass --inventory or set ${ENV_VAR}")
    return path


def load(path) -> Inventory:
    """Read and check one inventory file; every problem is a CloudopsError naming the file and the key."""
    path = Path(path).expanduser()
    data = _read_yaml(path)
    if data is None:
        raise CloudopsError(f"inventory {path}: file is empty (expected 'hosts', or an Ansible-style 'all')")
    if not isinstance(data, dict):
        raise CloudopsError(f"inventory {path}: top level must be a mapping, got {_kind(data)}")
    is_ansible = "all" in data or not data.keys() & set(NATIVE_TOP_KEYS)
    parser = _AnsibleParser(path) if is_ansible else _NativeParser(path)
    parser.parse(data)
    return parser.inventory()


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice in one mapping (safe_load silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a '<<' merge may repeat keys on purpose; non-scalar keys are refused later
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CloudopsError(f"inventory {path}: file not found") from None
    except (OSError, UnicodeError) as exc:
        raise CloudopsError(f"inventory {path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        syntax = "" if isinstance(exc, yaml.constructor.ConstructorError) else "YAML syntax error: "
        raise CloudopsError(f"inventory {path}{where}: {syntax}{exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise CloudopsError(f"inventory {path}: invalid YAML: {exc}") from None


def _kind(value) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"


@dataclass
class _Group:
    name: str
    hosts: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    layers: list[tuple[str, dict]] = field(default_factory=list)  # (where written, vars)


class _Parser:
    """Shared part of both formats: type checks, precedence and building the Host objects."""

    FIELD_VARS = {name: name for name in ("address", "user", "port", "key", "libvirt_uri", "tags", "capacity")}

    def __init__(self, path: Path):
        self.path = path
        self.groups: dict[str, _Group] = {"all": _Group("all")}
        self.hosts: dict[str, list[tuple[str, dict]]] = {}  # host -> its own vars layers, file order

    def fail(self, where: str, message: str) -> CloudopsError:
        return CloudopsError(f"inventory {self.path}: {where}: {message}")

    def mapping(self, value, where: str, allowed=None) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a mapping, got {_kind(value)}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(where, f"key {key!r} must be a string")
            if allowed is not None and key not in allowed:
                raise self.fail(f"{where}.{key}", f"unknown key (expected one of: {', '.join(allowed)})")
        return value

    def name(self, value, where: str, kind: str) -> str:
        if not isinstance(value, str) or not NAME_RE.match(value):
            raise self.fail(where, f"invalid {kind} name {value!r} (letters, digits, '_', '.', '-'; 1 to 63)")
        return value

    def inventory(self) -> Inventory:
        ranks = self.ranks()  # per group, a sort key: a higher rank's vars win
        members = {name: self._members(name) for name in self.groups}
        members["all"] = list(self.hosts)
        hosts = {}
        for name in self.hosts:
            in_groups = sorted((g for g in self.groups if name in members[g]), key=ranks.__getitem__)
            hosts[name] = self._host(name, in_groups)
        return Inventory(self.path, hosts, members)

    def _members(self, group: str) -> list[str]:
        found, seen, pending = set(), set(), [group]
        while pending:
            current = self.groups[pending.pop()]
            seen.add(current.name)
            found.update(current.hosts)
            pending.extend(child for child in current.children if child not in seen)
        return [name for name in self.hosts if name in found]

    def _host(self, name: str, in_groups: list[str]) -> Host:
        merged, origin = {}, {}
        for where, values in [layer for g in in_groups for layer in self.groups[g].layers] + self.hosts[name]:
            for key, value in values.items():
                merged[key], origin[key] = value, f"{where}.{key}"

        def get(field_name, check, default=None):
            var = self.FIELD_VARS[field_name]
            return check(merged[var], origin[var]) if var in merged else default

        return Host(
            name=name,
            address=get("address", self._text) or self.default_address(name, f"hosts.{name}"),
            user=get("user", self._text, "root"),
            port=get("port", self._port, 22),
            key=get("key", self._key_path),
            libvirt_uri=get("libvirt_uri", self._text, ""),
            capacity=get("capacity", self._capacity, Capacity()),
            tags=get("tags", self._tags, ()),
            groups=tuple(g for g in in_groups if g != "all"),
            vars=merged,
        )

    def _text(self, value, where, spaces=False) -> str:
        if not isinstance(value, str) or not value.strip() or (not spaces and any(c.isspace() for c in value)):
            raise self.fail(where, f"must be a non-empty string{'' if spaces else ' without spaces'}, got {_kind(value)}")
        return value

    def _port(self, value, where) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
            raise self.fail(where, f"must be an integer in 1..65535, got {_kind(value)}")
        return value

    def _key_path(self, value, where) -> str:
        key = Path(self._text(value, where, spaces=True)).expanduser()
        return os.path.abspath(self.path.parent / key)  # relative to the inventory file

    def _tags(self, value, where) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(tag, str) and tag for tag in value):
            raise self.fail(where, f"must be a list of strings, got {_kind(value)}")
        return tuple(value)

    def _capacity(self, value, where) -> Capacity:
        for key, number in self.mapping(value, where, CAPACITY_KEYS).items():
            if not isinstance(number, int) or isinstance(number, bool) or number <= 0:
                raise self.fail(f"{where}.{key}", f"must be a positive integer, got {_kind(number)}")
        return Capacity(**value) if value else Capacity()


class _NativeParser(_Parser):
    """``vars`` / ``groups`` / ``hosts``; a later group in the file wins over an earlier one."""

    def parse(self, data: dict):
        self.mapping(data, "top level", NATIVE_TOP_KEYS)
        self.groups["all"].layers.append(("vars", self.mapping(data.get("vars"), "vars")))
        for name, entry in self.mapping(data.get("hosts"), "hosts").items():
            where = f"hosts.{self.name(name, 'hosts', 'host')}"
            entry = self.mapping(entry, where, NATIVE_HOST_KEYS)
            own = {key: value for key, value in entry.items() if key != "vars"}
            extra = self.mapping(entry.get("vars"), f"{where}.vars")
            for key in sorted(own.keys() & extra.keys()):
                raise self.fail(f"{where}.vars.{key}", f"also set as {where}.{key}; set it once")
            self.hosts[name] = [(f"{where}.vars", extra), (where, own)]
        for name, entry in self.mapping(data.get("groups"), "groups").items():
            where = f"groups.{self.name(name, 'groups', 'group')}"
            if name == "all":
                raise self.fail(where, "'all' is reserved: put vars for every host under the top-level 'vars'")
            entry = self.mapping(entry, where, ("hosts", "vars"))
            members = entry.get("hosts") or []
            if not isinstance(members, list) or not all(isinstance(host, str) for host in members):
                raise self.fail(f"{where}.hosts", f"must be a list of host names, got {_kind(members)}")
            for host in members:
                if host not in self.hosts:
                    raise self.fail(f"{where}.hosts", f"unknown host {host!r} (not defined under the top-level 'hosts')")
            self.groups[name] = _Group(name, list(dict.fromkeys(members)), [],
                                       [(f"{where}.vars", self.mapping(entry.get("vars"), f"{where}.vars"))])

    def ranks(self) -> dict[str, tuple]:
        return {name: (index,) for index, name in enumerate(self.groups)}  # 'all' first

    def default_address(self, name, where) -> str:
        raise self.fail(where, "missing 'address'")


class _AnsibleParser(_Parser):
    """Ansible YAML inventory: ``all`` / ``children`` / ``hosts`` / ``vars``, ranked like Ansible does."""

    FIELD_VARS = {**_Parser.FIELD_VARS, "address": "ansible_host", "user": "ansible_user", "port": "ansible_port",
                  "key": "ansible_ssh_private_key_file", "tags": "cloudops_tags"}  # 'tags' is reserved in Ansible

    def parse(self, data: dict):
        self.mapping(data, "top level")
        for name, body in data.items():
            self.group(name, body, name, parent=None if name == "all" else "all")

    def group(self, name, body, where: str, parent: str | None):
        self.name(name, where, "group")
        group = self.groups.setdefault(name, _Group(name))
        if parent is not None and name not in self.groups[parent].children:
            self.groups[parent].children.append(name)
        body = self.mapping(body, where, ("hosts", "children", "vars"))
        group.layers.append((f"{where}.vars", self.mapping(body.get("vars"), f"{where}.vars")))
        for host, host_vars in self.mapping(body.get("hosts"), f"{where}.hosts").items():
            host_where = f"{where}.hosts.{self.name(host, f'{where}.hosts', 'host')}"
            self.hosts.setdefault(host, []).append((host_where, self.mapping(host_vars, host_where)))
            if host not in group.hosts:
                group.hosts.append(host)
        for child, child_body in self.mapping(body.get("children"), f"{where}.children").items():
            self.group(child, child_body, f"{where}.children.{child}", parent=name)

    def ranks(self) -> dict[str, tuple]:
        """(depth below 'all', ansible_group_priority, name): deeper groups win, then priority, then name."""
        depths: dict[str, int] = {}

        def visit(name, depth, ancestors):
            if name in ancestors:
                raise self.fail(f"group {name}", f"is its own descendant ({' > '.join(ancestors + (name,))})")
            if depths.get(name, -1) >= depth:
                return
            depths[name] = depth
            for child in self.groups[name].children:
                visit(child, depth + 1, ancestors + (name,))

        visit("all", 0, ())
        return {name: (depths[name], self._priority(name), name) for name in self.groups}

    def _priority(self, name) -> int:
        priority = 1
        for where, values in self.groups[name].layers:
            if "ansible_group_priority" in values:
                priority = values["ansible_group_priority"]
                if not isinstance(priority, int) or isinstance(priority, bool):
                    raise self.fail(f"{where}.ansible_group_priority", f"must be an integer, got {_kind(priority)}")
        return priority

    def default_address(self, name, where) -> str:
        return name  # like Ansible: no ansible_host means the inventory name is the address
