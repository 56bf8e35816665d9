"""libvirt networks: validated specs, XML from templates/libvirt/network.xml.j2, idempotent operations on one connection.

A ``NetworkSpec`` is checked when it is made, so bad input fails before any host is
touched. Every operation takes one libvirt connection, looks first and acts only when
needed, and returns ``(changed, message)``; the message says what was done or why
nothing was ("network cloudops already active"). Live objects are read and edited
through ``XMLDesc()`` parsed with ElementTree and ``network.update()``, never by
editing XML strings.
"""

import hashlib
import ipaddress
import re
import xml.etree.ElementTree as ET
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields

import libvirt

from cloudops.errors import CloudopsError
from cloudops.templating import render

TEMPLATE = "libvirt/network.xml.j2"
MODES = ("nat", "isolated", "bridge")
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
BRIDGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")  # Linux IFNAMSIZ: at most 15 characters
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
MIN_PREFIX, MAX_PREFIX = 8, 30
BRIDGE_PREFIX = "co-"


def _fail(message: str) -> CloudopsError:
    return CloudopsError(message)


@dataclass(frozen=True)
class Reservation:
    """A static DHCP host entry: this MAC always gets this IP and name."""

    mac: str
    ip: str
    name: str

    def __post_init__(self):
        mac = str(self.mac).lower()
        if not MAC_RE.match(mac) or int(mac[:2], 16) & 1:
            raise _fail(f"invalid MAC address {self.mac!r} (expected unicast aa:bb:cc:dd:ee:ff)")
        try:
            ip = ipaddress.IPv4Address(str(self.ip))
        except ValueError:
            raise _fail(f"invalid IPv4 address {self.ip!r} for reservation {mac}") from None
        if not isinstance(self.name, str) or not HOSTNAME_RE.match(self.name):
            raise _fail(f"invalid host name {self.name!r} for reservation {mac} (letters, digits, '-'; 1 to 63)")
        object.__setattr__(self, "mac", mac)
        object.__setattr__(self, "ip", str(ip))

    def to_xml(self) -> str:
        return ET.tostring(ET.Element("host", mac=self.mac, ip=self.ip, name=self.name), encoding="unicode")

    def __str__(self) -> str:
        return f"{self.mac} -> {self.ip} ({self.name})"


def check_name(name) -> str:
    """``name`` if it is a valid network name (no markup or shell metacharacters, at most 31), else CloudopsError."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise _fail(f"invalid network name {name!r} (a lower-case letter, then letters, digits or '-'; at most 31)")
    return name


def derived_bridge(name: str) -> str:
    """``co-<name>``, or when that is over 15 characters ``co-<first 7>-<4 hex of sha256(name)>``."""
    bridge = BRIDGE_PREFIX + name
    if len(bridge) <= 15:
        return bridge
    return f"{BRIDGE_PREFIX}{name[:7]}-{hashlib.sha256(name.encode()).hexdigest()[:4]}"


@dataclass(frozen=True)
class NetworkSpec:
    """One network as wanted on every host; defaults filled in and everything checked on creation.

    ``cidr`` is required except in bridge mode (where it only serves IPAM). ``gateway``
    defaults to the first host address, the DHCP range to the upper half of the subnet
    (nat and isolated only; in bridge mode a range is the LAN's own, kept out of IPAM).
    ``reserved``: addresses (``10.0.0.5``) and ranges (``10.0.0.2-10.0.0.9``) IPAM never
    hands out, neither on its own nor when asked for one; nothing of them reaches libvirt.
    """

    name: str
    mode: str = "nat"
    cidr: str | None = None
    gateway: str | None = None
    dhcp_start: str | None = None
    dhcp_end: str | None = None
    bridge: str | None = None
    autostart: bool = True
    reservations: tuple[Reservation, ...] = field(default=())
    reserved: tuple[str, ...] = field(default=())
    dns: tuple[str, ...] = field(default=())  # name servers for static guests (bridge mode); default: the gateway

    def __post_init__(self):
        set_ = lambda key, value: object.__setattr__(self, key, value)  # noqa: E731 (frozen dataclass)
        check_name(self.name)
        where = f"network {self.name}"
        if self.mode not in MODES:
            raise _fail(f"{where}: unknown mode {self.mode!r} (expected one of: {', '.join(MODES)})")
        if not isinstance(self.autostart, bool):
            raise _fail(f"{where}: autostart must be true or false, got {self.autostart!r}")
        set_("bridge", self._checked_bridge(where))
        net = self._checked_cidr(where)
        set_("reservations", tuple(r if isinstance(r, Reservation) else Reservation(**r) for r in self.reservations))
        if isinstance(self.dns, str) or not isinstance(self.dns, (list, tuple)):
            raise _fail(f"{where}: dns must be a list of IPv4 addresses")
        try:
            set_("dns", tuple(str(ipaddress.IPv4Address(str(a))) for a in self.dns))
        except ValueError:
            raise _fail(f"{where}: dns entries must be IPv4 addresses, got {list(self.dns)!r}") from None
        if isinstance(self.reserved, str) or not isinstance(self.reserved, (list, tuple)):
            raise _fail(f"{where}: reserved must be a list of addresses or ranges (A.B.C.D or A.B.C.D-A.B.C.E)")
        if net is None:
            if self.gateway or self.dhcp_start or self.dhcp_end or self.reservations or self.reserved:
                raise _fail(f"{where}: gateway, DHCP range, reservations and reserved need a cidr")
            set_("reserved", ())
            return
        set_("cidr", str(net))
        hosts = (net.network_address + 1, net.broadcast_address - 1)
        gateway = self._address(self.gateway, "gateway", net, where) if self.gateway else hosts[0]
        set_("gateway", None if self.mode == "bridge" and not self.gateway else str(gateway))
        start, end = self._checked_range(net, gateway, where)
        set_("dhcp_start", start and str(start))
        set_("dhcp_end", end and str(end))
        self._check_reservations(net, where)
        set_("reserved", tuple(self._checked_reserved(net, where)))

    def _checked_bridge(self, where) -> str:
        if self.bridge is None or self.bridge == "":
            if self.mode == "bridge":
                raise _fail(f"{where}: bridge mode needs the host's bridge device (bridge: br0)")
            return derived_bridge(self.name)
        if not isinstance(self.bridge, str) or not BRIDGE_RE.match(self.bridge):
            raise _fail(f"{where}: invalid bridge device {self.bridge!r} (letters, digits, '_', '.', '-'; at most 15)")
        return self.bridge

    def _checked_cidr(self, where):
        if self.cidr is None or self.cidr == "":
            if self.mode != "bridge":
                raise _fail(f"{where}: mode {self.mode} needs a cidr (e.g. 192.168.150.0/24)")
            return None
        try:
            net = ipaddress.ip_network(str(self.cidr), strict=False)
        except ValueError:
            raise _fail(f"{where}: invalid cidr {self.cidr!r} (expected an IPv4 network like 192.168.150.0/24)") from None
        if net.version != 4:
            raise _fail(f"{where}: cidr {self.cidr} is IPv6; only IPv4 networks are supported")
        if "/" not in str(self.cidr):
            raise _fail(f"{where}: cidr {self.cidr!r} lacks a prefix length (e.g. {self.cidr}/24)")
        if str(net) != str(self.cidr):
            raise _fail(f"{where}: cidr {self.cidr} has host bits set; did you mean {net}?")
        if not MIN_PREFIX <= net.prefixlen <= MAX_PREFIX:
            raise _fail(f"{where}: cidr {net} must have a prefix length between /{MIN_PREFIX} and /{MAX_PREFIX}")
        return net

    @staticmethod
    def _address(value, what, net, where) -> ipaddress.IPv4Address:
        try:
            address = ipaddress.IPv4Address(str(value))
        except ValueError:
            raise _fail(f"{where}: invalid {what} {value!r} (expected an IPv4 address)") from None
        if address not in net or address in (net.network_address, net.broadcast_address):
            raise _fail(f"{where}: {what} {address} is not a host address of {net}")
        return address

    def _checked_range(self, net, gateway, where):
        if self.mode == "bridge" and not (self.dhcp_start or self.dhcp_end):
            return None, None
        if bool(self.dhcp_start) != bool(self.dhcp_end):
            raise _fail(f"{where}: give both dhcp_start and dhcp_end, or neither")
        if self.dhcp_start:
            start = self._address(self.dhcp_start, "dhcp_start", net, where)
            end = self._address(self.dhcp_end, "dhcp_end", net, where)
            if start > end:
                raise _fail(f"{where}: DHCP range {start}-{end} is empty (start after end)")
        else:  # the upper half, minus the gateway when it sits at an edge
            start = net.network_address + net.num_addresses // 2
            end = net.broadcast_address - 1
            if gateway == end:
                end -= 1
            elif gateway == start:
                start += 1
            if start > end:
                raise _fail(f"{where}: {net} is too small for a default DHCP range; give dhcp_start and dhcp_end")
        if start <= gateway <= end:
            raise _fail(f"{where}: DHCP range {start}-{end} contains the gateway {gateway}")
        return start, end

    def _check_reservations(self, net, where):
        seen = {}
        for res in self.reservations:
            ip = ipaddress.IPv4Address(res.ip)
            if ip not in net or ip in (net.network_address, net.broadcast_address) or res.ip == self.gateway:
                raise _fail(f"{where}: reservation {res} is not a free host address of {net}")
            for key in ("mac", "ip", "name"):
                other = seen.setdefault((key, getattr(res, key)), res)
                if other is not res:
                    raise _fail(f"{where}: reservations {other} and {res} share the {key}")

    def _checked_reserved(self, net, where):
        """Each ``reserved`` entry as "A.B.C.D" or "A.B.C.D-A.B.C.E", every address a host address of ``net``."""
        for entry in self.reserved:
            parts = str(entry).split("-")
            if len(parts) > 2 or not isinstance(entry, str):
                raise _fail(f"{where}: reserved entry {entry!r} is neither an address nor a range A.B.C.D-A.B.C.E")
            first, last = (self._address(p.strip(), "reserved address", net, where) for p in (parts[0], parts[-1]))
            if first > last:
                raise _fail(f"{where}: reserved range {first}-{last} is empty (start after end)")
            yield str(first) if first == last else f"{first}-{last}"

    # ------------------------------------------------------------ derived values

    @property
    def network(self) -> ipaddress.IPv4Network | None:
        return ipaddress.IPv4Network(self.cidr) if self.cidr else None

    @property
    def prefix(self) -> int | None:
        return self.network.prefixlen if self.cidr else None

    def dhcp_range(self) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None:
        if not self.dhcp_start:
            return None
        return ipaddress.IPv4Address(self.dhcp_start), ipaddress.IPv4Address(self.dhcp_end)

    def reserved_ranges(self) -> list[tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]]:
        """``reserved`` as (first, last) pairs; a single address is a range of one."""
        pairs = []
        for entry in self.reserved:
            first, _, last = entry.partition("-")
            pairs.append((ipaddress.IPv4Address(first), ipaddress.IPv4Address(last or first)))
        return pairs

    def static_pool(self) -> list[ipaddress.IPv4Address]:
        """Addresses IPAM may hand out: host addresses minus gateway, DHCP range, static reservations and ``reserved``."""
        if not self.cidr:
            return []
        ranges = self.reserved_ranges()
        if rng := self.dhcp_range():
            ranges.append(rng)
        taken = {ipaddress.IPv4Address(r.ip) for r in self.reservations}
        if self.gateway:
            taken.add(ipaddress.IPv4Address(self.gateway))
        elif self.mode == "bridge":  # a LAN whose gateway is not given: its first address usually is one
            taken.add(self.network.network_address + 1)
        return [a for a in self.network.hosts()
                if a not in taken and not any(first <= a <= last for first, last in ranges)]

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["reservations"] = [vars(r).copy() for r in self.reservations]
        data["reserved"] = list(self.reserved)
        data["dns"] = list(self.dns)
        return data

    def static_guest_config(self, ip: str) -> dict:
        """What a guest with ``ip`` on this network configures itself (bridge mode: no DHCP from libvirt)."""
        config = {"address": f"{ip}/{self.prefix}"}
        if self.gateway:
            config["gateway"] = self.gateway
        dns = list(self.dns) or ([self.gateway] if self.gateway else [])
        if dns:
            config["dns"] = dns
        return config


DEFAULT_NETWORK = NetworkSpec(name="cloudops", mode="nat", cidr="192.168.150.0/24")
SPEC_KEYS = tuple(f.name for f in fields(NetworkSpec))


def spec_from_mapping(data, where: str = "network") -> NetworkSpec:
    """One spec from a mapping (inventory or stack file); unknown keys are errors."""
    if not isinstance(data, dict):
        raise _fail(f"{where}: must be a mapping with at least 'name', got {type(data).__name__} {data!r}")
    unknown = sorted(str(k) for k in data if k not in SPEC_KEYS)
    if unknown:
        raise _fail(f"{where}: unknown key {unknown[0]!r} (expected: {', '.join(SPEC_KEYS)})")
    if "name" not in data:
        raise _fail(f"{where}: missing 'name'")
    reservations = data.get("reservations") or []
    if not isinstance(reservations, list) or not all(isinstance(r, dict) for r in reservations):
        raise _fail(f"{where}.reservations: must be a list of mappings with mac, ip, name")
    try:
        for r in reservations:
            if set(r) != {"mac", "ip", "name"}:
                raise _fail(f"each reservation needs exactly mac, ip and name, got {sorted(map(str, r))}")
        reserved = () if data.get("reserved") is None else data["reserved"]
        return NetworkSpec(**{**data, "reservations": tuple(Reservation(**r) for r in reservations),
                              "reserved": reserved})
    except CloudopsError as exc:
        raise _fail(f"{where}: {exc}") from None


def specs_from(source) -> list[NetworkSpec]:
    """Specs from a host's vars / a stack mapping (key ``networks``) or a list of mappings.

    Nothing configured (None, or a mapping without ``networks``) means ``[DEFAULT_NETWORK]``;
    an explicit empty list means no networks. Names, bridges and subnets must not collide.
    """
    if source is None:
        return [DEFAULT_NETWORK]
    if isinstance(source, dict):
        if source.get("networks") is None:
            return [DEFAULT_NETWORK]
        source = source["networks"]
    if not isinstance(source, list):
        raise _fail(f"networks: must be a list of mappings, got {type(source).__name__}")
    specs = [spec_from_mapping(item, f"networks[{i}]") for i, item in enumerate(source)]
    check_distinct(specs)
    return specs


def check_distinct(specs: list[NetworkSpec]) -> None:
    """Two networks may not share a name or a bridge, nor overlap in subnet or DHCP range."""
    for i, a in enumerate(specs):
        for b in specs[i + 1:]:
            if a.name == b.name:
                raise _fail(f"networks: {a.name} is defined twice")
            if a.bridge == b.bridge:
                raise _fail(f"networks: {a.name} and {b.name} both use bridge {a.bridge}")
            if a.cidr and b.cidr and a.network.overlaps(b.network):
                ra, rb = a.dhcp_range(), b.dhcp_range()
                what = "DHCP ranges" if ra and rb and ra[0] <= rb[1] and rb[0] <= ra[1] else "subnets"
                raise _fail(f"networks: {what} of {a.name} ({a.cidr}) and {b.name} ({b.cidr}) overlap")


def network_xml(spec: NetworkSpec, *, uuid: str | None = None, mac: str | None = None,
                reservations=None) -> str:
    """The libvirt XML of ``spec``; ``uuid``/``mac`` keep an existing definition's identity."""
    hosts = spec.reservations if reservations is None else reservations
    return render(TEMPLATE, net=spec, uuid=uuid or "", mac=mac or "", reservations=list(hosts))


# ---------------------------------------------------------------- facts: what a network's XML says

def owned(root: ET.Element) -> dict:
    """The parts of a network cloudops manages: mode, bridge, gateway/prefix, DHCP range."""
    forward = root.find("forward")
    bridge = root.find("bridge")
    ip = _ipv4(root)
    facts = {"mode": "isolated" if forward is None else forward.get("mode", "nat"),
             "bridge": None if bridge is None else bridge.get("name"),
             "gateway": None, "prefix": None, "dhcp_range": None}
    if ip is not None:
        facts["gateway"] = ip.get("address")
        prefix = ip.get("prefix")
        if prefix is None and ip.get("netmask"):
            prefix = ipaddress.IPv4Network(f"0.0.0.0/{ip.get('netmask')}").prefixlen
        facts["prefix"] = None if prefix is None else int(prefix)
        rng = ip.find("dhcp/range")
        if rng is not None:
            facts["dhcp_range"] = f"{rng.get('start')}-{rng.get('end')}"
    return facts


def reservations_in(root: ET.Element) -> list[Reservation | ET.Element]:
    """The static DHCP hosts of a network's XML (entries cloudops cannot parse stay raw elements)."""
    ip = _ipv4(root)
    found = []
    for host in ([] if ip is None else ip.findall("dhcp/host")):
        try:
            found.append(Reservation(host.get("mac", ""), host.get("ip", ""), host.get("name", "")))
        except CloudopsError:
            found.append(host)
    return found


def subnet_of(root: ET.Element) -> ipaddress.IPv4Network | None:
    facts = owned(root)
    if not facts["gateway"] or facts["prefix"] is None:
        return None
    return ipaddress.IPv4Network(f"{facts['gateway']}/{facts['prefix']}", strict=False)


def _ipv4(root: ET.Element):
    for ip in root.findall("ip"):
        if ip.get("family", "ipv4") == "ipv4":
            return ip
    return None


def _xml(net, live: bool = False) -> ET.Element:
    return ET.fromstring(net.XMLDesc(0 if live else libvirt.VIR_NETWORK_XML_INACTIVE))


@contextmanager
def _libvirt(what: str):
    """libvirt errors become one-line CloudopsErrors saying what was being done."""
    try:
        yield
    except libvirt.libvirtError as exc:
        lines = (exc.get_error_message() or str(exc)).strip().splitlines()
        raise _fail(f"{what}: {lines[-1] if lines else exc}") from None


def lookup(conn, name: str):
    """The libvirt network named ``name``, or None."""
    try:
        return conn.networkLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
            return None
        raise _fail(f"looking up network {name}: {exc.get_error_message()}") from None


def _require(conn, name: str):
    net = lookup(conn, name)
    if net is None:
        raise _fail(f"network {name} is not defined on this host")
    return net


def running_users(conn, name: str) -> list[str]:
    """Names of running domains with an interface on network ``name``."""
    users = []
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        root = ET.fromstring(dom.XMLDesc(0))
        if any(src.get("network") == name for src in root.findall("devices/interface[@type='network']/source")):
            users.append(dom.name())
    return sorted(users)


def _check_no_overlap(conn, spec: NetworkSpec) -> None:
    if not spec.cidr or spec.mode == "bridge":
        return
    for other in conn.listAllNetworks():
        if other.name() == spec.name:
            continue
        subnet = subnet_of(_xml(other))
        if subnet is not None and subnet.overlaps(spec.network):
            raise _fail(f"network {spec.name}: subnet {spec.cidr} overlaps network {other.name()} ({subnet}) on this host")


# ---------------------------------------------------------------- operations

def ensure_network(conn, spec: NetworkSpec, check: bool = False) -> tuple[bool, str]:
    """Define (or redefine what we own), start and set autostart as needed; ``check`` only says what it would do."""
    done = []
    net = lookup(conn, spec.name)
    if net is None:
        _check_no_overlap(conn, spec)
        if check:
            return True, f"network {spec.name}: would define and start ({spec.mode}, {spec.cidr or spec.bridge})"
        net = _define_unless_raced(conn, spec)
        done.append("defined")
    elif diffs := (["transient"] if not net.isPersistent() else _differences(net, spec)):
        _check_no_overlap(conn, spec)
        done.append(f"{'would redefine' if check else 'redefined'} ({', '.join(diffs)})")
        if not check:
            net = _redefine(conn, net, spec)
        if net.isActive():
            users = running_users(conn, spec.name)
            if users:
                done.append(f"restart pending: in use by {', '.join(users)}")
            elif check:
                done.append("would restart")
            else:
                with _libvirt(f"restarting network {spec.name}"):
                    net.destroy()
                done.append("restarted")
    if not net.isActive():
        if not check:
            _start_or_roll_back(net, spec.name, defined_now=done == ["defined"])
        if "restarted" not in done:
            done.append("would start" if check else "started")
    if net.isPersistent() and bool(net.autostart()) != spec.autostart:  # (a transient one: after redefine)
        if not check:
            with _libvirt(f"setting autostart of network {spec.name}"):
                net.setAutostart(int(spec.autostart))
        done.append(f"{'would set' if check else 'set'} autostart {'on' if spec.autostart else 'off'}")
    for res in spec.reservations:
        changed, message = add_reservation(conn, spec.name, res.mac, res.ip, res.name, check=check)
        if changed:
            done.append(message)
    if not done:
        return False, f"network {spec.name} already active" + (", autostart on" if spec.autostart else "")
    return True, f"network {spec.name}: {', '.join(done)}"


def _define_unless_raced(conn, spec: NetworkSpec):
    """Define ``spec``; when another cloudops process defined it in the meantime, take that one.

    Two ``vm.start`` on a fresh host both find the network missing; the one whose define loses
    finds it there on a second look, and checks it is what it would have defined.
    """
    try:
        return conn.networkDefineXML(network_xml(spec))
    except libvirt.libvirtError as exc:
        raced = lookup(conn, spec.name)
        if raced is None or _differences(raced, spec):
            lines = (exc.get_error_message() or str(exc)).strip().splitlines()
            raise _fail(f"defining network {spec.name}: {lines[-1] if lines else exc}") from None
        return raced


def _start_or_roll_back(net, name: str, defined_now: bool) -> None:
    """Start ``net``; if it cannot start and this call defined it, undefine it again so nothing is left behind.

    A start that fails because another process started it at the same moment is no failure.
    """
    try:
        with _libvirt(f"starting network {name}"):
            net.create()
    except CloudopsError:
        with suppress(libvirt.libvirtError):
            if net.isActive():
                return
        if defined_now:
            with suppress(libvirt.libvirtError):
                net.undefine()
        raise


def _differences(net, spec: NetworkSpec) -> list[str]:
    have, want = owned(_xml(net)), owned(ET.fromstring(network_xml(spec)))
    return [f"{key} {have[key]} -> {want[key]}" for key in want if have[key] != want[key]]


def _redefine(conn, net, spec: NetworkSpec):
    """Define ``spec`` over ``net``, keeping its UUID, bridge MAC and the reservations that still fit."""
    config = _xml(net)
    uuid = config.findtext("uuid")
    mac = config.find("mac")
    keep = list(spec.reservations)
    if spec.mode != "bridge":
        taken = {(key, getattr(r, key)) for r in keep for key in ("mac", "ip", "name")}
        pool = set(map(str, spec.static_pool()))
        for res in reservations_in(config):
            if isinstance(res, Reservation) and res.ip in pool and not any(
                    (key, getattr(res, key)) in taken for key in ("mac", "ip", "name")):
                keep.append(res)
    with _libvirt(f"redefining network {spec.name}"):
        return conn.networkDefineXML(network_xml(spec, uuid=uuid, mac=None if mac is None else mac.get("address"),
                                                 reservations=keep))


def start_network(conn, name: str, check: bool = False) -> tuple[bool, str]:
    """Start an already defined network."""
    net = _require(conn, name)
    if net.isActive():
        return False, f"network {name} already active"
    if not check:
        with _libvirt(f"starting network {name}"):
            net.create()
    return True, f"network {name}: {'would start' if check else 'started'}"


def delete_network(conn, name: str, check: bool = False, force: bool = False) -> tuple[bool, str]:
    """Stop and undefine ``name``; refuses while running VMs use it unless ``force``."""
    net = lookup(conn, name)
    if net is None:
        return False, f"network {name} not defined"
    users = running_users(conn, name) if net.isActive() else []
    if users and not force:
        raise _fail(f"network {name} is in use by running VMs {', '.join(users)} (stop them, or force)")
    done = []
    if net.isActive():
        if not check:
            with _libvirt(f"stopping network {name}"):
                net.destroy()
        done.append("would stop" if check else "stopped")
    if net.isPersistent():
        if not check:
            with _libvirt(f"undefining network {name}"):
                net.undefine()
        done.append("would undefine" if check else "undefined")
    return True, f"network {name}: {', '.join(done)}"


def list_networks(conn) -> list[dict]:
    """Every network of the connection: name, active, autostart, persistent, mode, bridge, cidr, reservations."""
    rows = []
    for net in sorted(conn.listAllNetworks(), key=lambda n: n.name()):
        root = _xml(net, live=net.isActive())
        facts = owned(root)
        subnet = subnet_of(root)
        rows.append({"name": net.name(), "active": bool(net.isActive()), "autostart": bool(net.autostart()),
                     "persistent": bool(net.isPersistent()), "mode": facts["mode"], "bridge": facts["bridge"],
                     "cidr": None if subnet is None else str(subnet), "dhcp_range": facts["dhcp_range"],
                     "reservations": len(reservations_in(root))})
    return rows


def _targets(net) -> list[tuple[str, int, ET.Element]]:
    """(label, update flag, XML) for every place a reservation lives: config always, live when active."""
    targets = []
    if net.isPersistent():
        targets.append(("config", libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG, _xml(net)))
    if net.isActive():
        targets.append(("live", libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE, _xml(net, live=True)))
    return targets


def add_reservation(conn, net_name: str, mac: str, ip: str, hostname: str, check: bool = False) -> tuple[bool, str]:
    """Make ``mac`` always get ``ip`` and ``hostname`` (config, and live when active); a clash is an error."""
    res = Reservation(mac, ip, hostname)
    net = _require(conn, net_name)
    if owned(ET.fromstring(net.XMLDesc(0)))["mode"] == "bridge":
        return False, f"network {net_name} is bridged (no DHCP from libvirt): {res.ip} is static in the guest"
    missing = 0
    for label, flag, root in _targets(net):
        subnet, ip_element = subnet_of(root), _ipv4(root)
        if subnet is None or ip_element is None or ip_element.find("dhcp") is None:
            raise _fail(f"network {net_name} has no DHCP from libvirt ({owned(root)['mode']}): cannot reserve {res}")
        if ipaddress.IPv4Address(res.ip) not in subnet or res.ip == owned(root)["gateway"]:
            raise _fail(f"network {net_name}: {res.ip} is not a free host address of {subnet}")
        present = False
        for other in reservations_in(root):
            if other == res:
                present = True
            elif isinstance(other, Reservation) and (other.mac == res.mac or other.ip == res.ip or other.name == res.name):
                raise _fail(f"network {net_name}: reservation {res} conflicts with {other} ({label})")
        if not present:
            missing |= flag
    if not missing:
        return False, f"reservation {res} already on network {net_name}"
    if not check:
        with _libvirt(f"adding reservation {res} to network {net_name}"):
            net.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST,
                       -1, res.to_xml(), missing)
    return True, f"{'would add' if check else 'added'} reservation {res} to network {net_name}"


def remove_reservation(conn, net_name: str, mac: str, ip: str | None = None, hostname: str | None = None,
                       check: bool = False) -> tuple[bool, str]:
    """Remove the reservation of ``mac`` (and ``ip``/``hostname`` when given) wherever it is; absent is no change."""
    mac = str(mac).lower()
    net = lookup(conn, net_name)
    if net is None:
        return False, f"network {net_name} not defined: no reservation for {mac}"
    found, flags = None, 0
    for _label, flag, root in _targets(net):
        for other in reservations_in(root):
            if (isinstance(other, Reservation) and other.mac == mac and ip in (None, other.ip)
                    and hostname in (None, other.name)):
                found, flags = other, flags | flag
    if found is None:
        return False, f"no reservation for {mac} on network {net_name}"
    if not check:
        with _libvirt(f"removing reservation {found} from network {net_name}"):
            net.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST,
                       -1, found.to_xml(), flags)
    return True, f"{'would remove' if check else 'removed'} reservation {found} from network {net_name}"

