"""The VM lifecycle: start a VM from an image on a host of the inventory, stop it, delete it.

``start_vm`` validates everything first, then places the VM (scheduler), and
builds it step by step: image on the host, network, address (cloud-wide IPAM and
a static DHCP reservation), a qcow2 overlay, customization (a NoCloud seed, or
libguestfs on the overlay), the domain from the template, and waits for the IP
and for SSH. Every step registers its undo; any failure undoes what was made, so
a failed start leaves no overlay, definition or reservation behind.
"""

import contextlib
import ipaddress
import os
import re
import secrets
import shlex
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from cloudops import hostfiles, kvm, passwords, sharedstorage, state, storage, virt
from cloudops.compute import console, guest, placement, records, seed, sizing, userdata
from cloudops.errors import CloudopsError, NotFound
from cloudops.imaging import store as images
from cloudops.net import defined, ipam, networks, probe
from cloudops.progress import bar_for
from cloudops.ssh import connect
from cloudops.templating import render

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
MEMORY_RANGE = (32, 1 << 20)  # MiB
MAX_NICS = 8
VCPU_RANGE = (1, 64)
CUSTOMIZE_WAYS = ("seed", "guestfs")
FIRMWARES = ("bios", "uefi")
NAME_LOCK_TTL = 30  # seconds a dead holder can block a VM name


@dataclass
class VMSpec:
    name: str
    image: str
    memory: int = 128
    vcpus: int = 1
    host: str | None = None
    network: "str | list[str] | None" = None  # one network, or several ("a,b"): a NIC on each, the first primary
    root_password: str | None = field(default=None, repr=False)  # plain text: hashed at once, never stored
    ssh_keys: tuple[str, ...] = ()
    hostname: str | None = None
    customize: str = "seed"
    group: str | None = None  # anti-affinity group
    wait: bool = True
    timeout: float = 180
    disk_size: int | str | None = None  # root disk bytes (or "4G"); None: the image's virtual size
    user_data: "str | Path | userdata.UserData | None" = field(default=None, repr=False)  # a file; loaded by validate
    firmware: str = "bios"  # or "uefi" (OVMF): see check_firmware
    ip: str | None = None  # ask IPAM for this address on the (first) network (checked against it by start_vm)
    max_memory: int | None = None  # MiB the running VM can be grown to (vm.resize); None: ``memory``
    max_vcpus: int | None = None  # vCPUs it can be grown to by CPU hotplug; None: ``vcpus``
    disk_file: str | None = None  # vm.import: a standalone qcow2 here, uploaded as the disk (no overlay on the image)
    storage: str = "local"  # or "shared": overlay, seed and image on the inventory's shared_path (sharedstorage)

    @property
    def networks(self) -> list:
        """The network of each NIC, in order ([None]: the default network); see ``network_names``."""
        return network_names(self.network)


@dataclass
class VM:
    name: str
    host: str
    ip: str | None
    state: str = "running"
    memory: int = 0
    vcpus: int = 0
    image: str | None = None
    network: str | None = None
    mac: str | None = None
    customize: str | None = None
    group: str | None = None
    nics: list = field(default_factory=list)  # every NIC ({network, ip, mac}), the primary (network/ip/mac) first
    storage: str = "local"  # where its disks are: "local" (the host's pool) or "shared" (the shared path)
    kind: str = "vm"  # or "container" (libvirt's LXC driver: cloudops.compute.containers)
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "timings" or v}


# ---------------------------------------------------------------- validation

def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise CloudopsError(f"invalid VM name {name!r}: 1-40 of a-z 0-9 -, starting with a letter")
    return name


def validate(spec: VMSpec) -> VMSpec:
    validate_name(spec.name)
    for what, value, (low, high) in (("memory (MiB)", spec.memory, MEMORY_RANGE), ("vCPUs", spec.vcpus, VCPU_RANGE)):
        if not isinstance(value, int) or not low <= value <= high:
            raise CloudopsError(f"{what} must be a whole number from {low} to {high}, got {value!r}")
    for what, top, now, (_low, high) in (("max memory (MiB)", spec.max_memory, spec.memory, MEMORY_RANGE),
                                         ("max vCPUs", spec.max_vcpus, spec.vcpus, VCPU_RANGE)):
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not now <= top <= high):
            raise CloudopsError(f"{what} must be a whole number from {now} (the VM's own) to {high}, got {top!r}")
    sharedstorage.validate_kind(spec.storage)
    if spec.firmware not in FIRMWARES:
        raise CloudopsError(f"firmware must be one of {', '.join(FIRMWARES)}, got {spec.firmware!r}")
    if spec.customize not in CUSTOMIZE_WAYS:
        raise CloudopsError(f"customize must be one of {', '.join(CUSTOMIZE_WAYS)}, got {spec.customize!r}")
    if spec.group is not None:
        validate_name(spec.group)
    if spec.disk_size is not None:
        spec.disk_size = sizing.parse_size(spec.disk_size)
    if spec.hostname is not None:
        from cloudops.compute.guestconfig import validate_hostname
        validate_hostname(spec.hostname)
    if spec.ssh_keys:
        from cloudops.compute.guestconfig import normalize_ssh_keys
        spec.ssh_keys = tuple(normalize_ssh_keys(spec.ssh_keys))
    if spec.ip is not None:
        spec.ip = validate_ip(spec.ip)
    names = network_names(spec.network)  # refused now when malformed
    spec.network = None if names == [None] else ",".join(names)
    if spec.user_data is not None:
        if spec.customize == "guestfs":
            raise CloudopsError("--user-data needs --customize seed: it travels in the NoCloud seed, "
                                "and guestfs customization attaches none")
        if not isinstance(spec.user_data, userdata.UserData):
            spec.user_data = userdata.load(spec.user_data)  # read and checked now, before anything is made
    if spec.disk_file is not None and spec.customize != "seed":
        raise CloudopsError("a VM from an existing disk (vm.import) is customized by its seed only")
    return spec


def check_firmware(firmware: str, image) -> None:
    """UEFI needs an image that boots from its disk (an EFI system partition); a direct-boot image's
    kernel is loaded by QEMU itself, as an uncompressed PVH ELF that UEFI firmware cannot start."""
    if firmware == "uefi" and image.direct_boot:
        raise CloudopsError(f"image {image.name} boots its kernel directly (no bootloader, no EFI system "
                            "partition): --firmware uefi needs an image that boots from its disk, such as the "
                            "debian recipe's")


def validate_ip(value) -> str:
    """An IPv4 address as written (normalized); whether the network allows it is ``ipam.check_address``'s to say."""
    try:
        return str(ipaddress.IPv4Address(str(value).strip()))
    except ValueError:
        raise CloudopsError(f"ip {value!r} is not an IPv4 address (e.g. 192.168.150.10)") from None


def network_names(value) -> list:
    """The networks of a VM's NICs from ``--network``: None (the default network), "a", "a,b" or a list.

    One NIC per network: IPAM gives a VM one address per network, so a network named twice is refused."""
    if value is None or value == "" or value == [None]:
        return [None]
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value)]
    if any(not isinstance(n, str) or not n for n in names):
        raise CloudopsError(f"network {value!r}: one network name, or several separated by commas (e.g. cloudops,lan)")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CloudopsError(f"network {', '.join(twice)} named twice: a VM has one NIC on each network")
    if len(names) > MAX_NICS:
        raise CloudopsError(f"{len(names)} networks: a VM has at most {MAX_NICS} NICs")
    return names


def nics_of(meta: dict) -> list[dict]:
    """Every NIC a cloudops domain's metadata records, the primary first: [{network, ip, mac}]."""
    first = [{"network": meta["network"], "ip": meta.get("ip") or None, "mac": meta.get("mac") or None}] \
        if meta.get("network") else []
    return first + [{"network": n.get("network"), "ip": n.get("ip") or None, "mac": n.get("mac") or None}
                    for n in meta.get("nics") or [] if n.get("network")]


def network_spec(name: str | None, host, extra=(), hosts=None) -> "networks.NetworkSpec":
    """The network called ``name``: a stack's (``extra``), the inventory's, the built-in "cloudops" (default),
    else the one libvirt has defined on ``hosts`` (default: ``host``), e.g. by ``net.define``."""
    specs = [*extra, *networks.specs_from(host.vars)]
    if name is None:
        return specs[len(extra)]
    for spec in specs + [networks.DEFAULT_NETWORK]:
        if spec.name == name:
            return spec
    unique = list({h.name: h for h in hosts or [host]}.values())  # each host asked once
    return defined.from_hosts(name, unique, known=[s.name for s in specs])


# ---------------------------------------------------------------- finding VMs

STATES = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
          libvirt.VIR_DOMAIN_PAUSED: "paused", libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
          libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended"}


KINDS = ("vm", "container")


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise CloudopsError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}")
    return kind


def describe(dom: libvirt.virDomain, host_name: str, kind: str = "vm") -> VM:
    """A domain as cloudops lists it; ``kind``: what the connection it came from runs (an LXC connection's
    domains are containers, whether cloudops made them or not)."""
    state, max_mem_kib, _mem, vcpus, _cpu = dom.info()
    meta = virt.metadata(dom)
    return VM(name=dom.name(), host=host_name, ip=meta.get("ip") or None, state=STATES.get(state, str(state)),
              memory=max_mem_kib // 1024, vcpus=vcpus, image=meta.get("image"), network=meta.get("network"),
              mac=meta.get("mac"), customize=meta.get("customize"), group=meta.get("group"), nics=nics_of(meta),
              storage=sharedstorage.kind_of(meta), kind=meta.get("kind") or kind)


def details(dom: libvirt.virDomain) -> dict:
    """What vm.info adds to a VM's listing: its firmware and each disk's size (libvirt's own block info)."""
    root = ET.fromstring(dom.XMLDesc(0))
    os_ = root.find("os")
    firmware = "uefi" if os_ is not None and (os_.get("firmware") == "efi" or os_.find("loader") is not None) else "bios"
    disks = []
    for disk in root.findall("devices/disk"):
        source, target = disk.find("source"), disk.find("target")
        path = source.get("file") if source is not None else None
        if not path or target is None:
            continue
        entry = {"target": target.get("dev"), "device": disk.get("device", "disk"), "path": path}
        with contextlib.suppress(libvirt.libvirtError):
            capacity, allocation, _physical = dom.blockInfo(path)
            entry.update(size=sizing.format_size(capacity), allocated=sizing.format_size(allocation))
        disks.append(entry)
    return {"firmware": firmware, "disks": disks}


def list_on_host(host) -> list[VM]:
    """The host's VMs, then its containers (none on a host whose libvirtd has no LXC driver)."""
    with virt.open_host(host) as conn:
        found = [describe(d, host.name) for d in conn.listAllDomains()]
    containers = virt.container_connection(host)
    if containers is not None:
        found += [describe(d, host.name, "container") for d in containers.listAllDomains()]
    return found


def defined_on(conn, name: str) -> bool:
    """Whether ``conn``'s libvirtd has a domain ``name`` (other libvirt errors propagate)."""
    try:
        conn.lookupByName(name)
        return True
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise


def kind_on(host, name: str) -> str | None:
    """Whether ``host`` has a guest ``name``: "vm", "container" or None. One name is one guest in the whole
    cloud, whichever driver runs it."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        opening = pool.submit(virt.container_connection, host)  # its own SSH: opened while QEMU's is asked
        with virt.open_host(host) as conn:
            if defined_on(conn, name):
                return "vm"
        containers = opening.result()
    if containers is not None and defined_on(containers, name):
        return "container"
    return None


def find_guests(name: str, hosts: list) -> tuple[list, list[str]]:
    """([(host, kind)] of the hosts that have a guest ``name``, each host that could not be asked as "name: why"),
    asked in parallel. The reason goes along (a changed host key, say), so a caller's one-line error can say it."""
    from cloudops import fleet

    validate_name(name)  # before any host is asked: names reach virsh and shells on the hosts
    result = fleet.run(hosts, lambda host: kind_on(host, name), timeout=60)
    why = [r.error if (r.error or "").startswith(f"{r.host}: ") else f"{r.host}: {r.error}" for r in result.failed]
    return [(h, r.value) for h, r in zip(hosts, result) if r.value], why


def find(name: str, hosts: list) -> tuple[list, list[str]]:
    """(the hosts that have a VM ``name``, the hosts that could not be asked): ``find_guests`` for VMs only."""
    found, why = find_guests(name, hosts)
    return [h for h, kind in found if kind == "vm"], why


def locate_guest(name: str, hosts: list) -> tuple:
    """(host, kind) of the guest called ``name``; NotFound when no host has one, CloudopsError when several have."""
    found, unreachable = find_guests(name, hosts)
    if not found:
        extra = f" (unreachable: {', '.join(unreachable)})" if unreachable else ""
        raise NotFound(f"unknown VM {name!r}: no selected host has it{extra}", unreachable=unreachable)
    if len(found) > 1:
        raise CloudopsError(f"VM {name!r} is defined on several hosts: {', '.join(h.name for h, _ in found)}")
    return found[0]


CONTAINER_VERBS = "vm.list, vm.info, vm.stop, vm.poweron, vm.delete, vm.run, vm.ssh and vm.migrate --cold"


def locate(name: str, hosts: list):
    """The inventory host that has a VM called ``name``; NotFound when none has, CloudopsError when several have,
    and when ``name`` is a container (what it can do is named: this is a VM's verb)."""
    host, kind = locate_guest(name, hosts)
    if kind != "vm":
        raise CloudopsError(f"{name!r} is a container on {host.name}: this is for VMs (a container has "
                            f"{CONTAINER_VERBS})")
    return host


# ---------------------------------------------------------------- start

def _name_lock(name: str):
    """One start/delete of a VM name at a time in the whole cloud: a leased lock in the state store.

    The lease expires by itself when the holder dies, so a killed ``vm.start`` never blocks the
    name for longer than ``NAME_LOCK_TTL``.
    """
    return state.current().lock(f"vm/{name}", ttl=NAME_LOCK_TTL,
                                busy_message=f"VM {name!r} is being changed by another cloudops command right now")


class _Undo:
    """Undo steps, run newest first when the start fails."""

    def __init__(self):
        self.steps = []

    def push(self, func, *args):
        self.steps.append((func, args))

    def run(self) -> list[str]:
        """Every step is tried; the ones that failed are returned, so a leftover is named, never silent."""
        failed = []
        for func, args in reversed(self.steps):
            try:
                func(*args)
            except Exception as exc:  # noqa: BLE001 - the next steps must still run
                what = " ".join(a for a in args if isinstance(a, str))
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                failed.append(f"{func.__name__} {what}: {reason}")
        return failed


def start_vm(spec: VMSpec, inventory, progress=lambda m: None, extra_networks=(), image=None) -> VM:
    """Start a VM from an image; returns it with its host and IP once SSH answers.

    ``image``: the Image already resolved (vm.import passes a stand-in for an image this cloud lacks)."""
    validate(spec)
    image = image or images.resolve(spec.image)
    sizing.check_disk_size(spec.disk_size, image.virtual_size, image.name)  # before anything is made
    sizing.check_memory(spec.memory, image)
    check_firmware(spec.firmware, image)
    all_hosts = list(inventory.hosts.values())
    if spec.host and spec.host not in inventory.hosts:
        raise CloudopsError(f"unknown host {spec.host!r} (inventory {inventory.path}; known: {', '.join(inventory.hosts)})")
    candidates = [inventory.hosts[spec.host]] if spec.host else inventory.hypervisors()
    if spec.storage == "shared":
        candidates = shared_candidates(candidates, bool(spec.host))
    nets = start_networks(spec, candidates, inventory, extra_networks)
    if spec.ip is not None:  # a read, before anything is made; allocate checks again, atomically
        ipam.peek(nets[0], spec.name, ip=spec.ip)
    password_hash = passwords.hash_password(spec.root_password) if spec.root_password else None
    keys = (*spec.ssh_keys, *guest.trusted_public_keys())
    timings = {}
    t0 = time.monotonic()

    with _name_lock(spec.name):
        progress(f"checking that the name {spec.name} is free on {len(all_hosts)} hosts")
        _ensure_name_free(spec.name, inventory.hypervisors())
        timings["name_check"] = round(time.monotonic() - t0, 3)
        progress("placing the VM")
        host = placement.choose(spec, candidates)
        timings["placement"] = round(time.monotonic() - t0, 3)
        progress(f"building {spec.name} on {host.name}")
        undo = _Undo()
        try:
            vm = _build(spec, image, host, nets, password_hash, keys, undo, progress, timings, t0)
        except BaseException:
            progress("start failed; removing what was made")
            for leftover in undo.run():
                progress(f"could not undo {leftover}")
            raise
    timings["total"] = round(time.monotonic() - t0, 3)
    vm.timings = timings
    return vm


def shared_candidates(candidates: list, named: bool) -> list:
    """The hosts that can hold a shared-storage VM: those with a shared_path (the one named must have it)."""
    if named:
        sharedstorage.path_of(candidates[0])  # one clear line when it has none
        return candidates
    usable = [h for h in candidates if (h.vars or {}).get("shared_path")]
    if not usable:
        raise CloudopsError("no hypervisor has a shared_path in the inventory: --storage shared needs one")
    return usable


def start_networks(spec, candidates, inventory, extra_networks=()) -> list:
    """The NetworkSpec of each of the VM's NICs (``spec.networks``), the primary first."""
    hosts = network_hosts(candidates, inventory)
    return [network_spec(name, candidates[0], extra_networks, hosts=hosts) for name in spec.networks]


def network_hosts(candidates: list, inventory) -> list:
    """Where a network outside the inventory is looked up: the candidate hosts first, then the other hypervisors."""
    return [*candidates, *(h for h in inventory.hypervisors() if h not in candidates)]


def _ensure_name_free(name: str, hosts: list) -> None:
    try:
        holder, kind = locate_guest(name, hosts)
    except NotFound as exc:
        if not exc.unreachable:
            return
        raise CloudopsError(f"cannot check that VM name {name!r} is free: unreachable: {', '.join(exc.unreachable)}") from None
    raise CloudopsError(f"{'VM' if kind == 'vm' else 'a container called'} {name!r} already exists on {holder.name}")


def _build(spec, image, host, nets, password_hash, keys, undo, progress, timings, t0) -> VM:
    def checkpoint(name):  # timings: seconds since the start began, at the end of each phase
        timings[name] = round(time.monotonic() - t0, 3)

    shared = spec.storage == "shared"
    with connect(host) as hv, virt.open_host(host) as conn, ThreadPoolExecutor(max_workers=1) as background:
        if shared:
            sharedstorage.check_present(host, hv)  # before anything is made
        for net in nets:
            networks.ensure_network(conn, net)
        if shared:
            pool, _ = sharedstorage.ensure_pool(conn, host)
            storage.refresh_pool(pool)  # other hosts add and delete volumes there: libvirt's list may be stale
            backing, boot = sharedstorage.image_path(image, host), sharedstorage.boot_files(image, host)
        else:
            pool, _ = storage.ensure_pool(conn, storage.disks_dir(images.pool_path(host)))
            backing, boot = image.remote_path(host), image.remote_boot(host)
        pool_dir = storage.target_path(pool)

        allocations = []
        for i, net in enumerate(nets):
            allocation = ipam.allocate(net, spec.name, ip=spec.ip if i == 0 else None)
            undo.push(ipam.release, net, spec.name)
            if net.mode == "bridge":  # the guest sets this address itself: nothing else on the LAN may hold it
                progress(f"probing {allocation.ip} on {net.name} (ARP, from {host.name})")
                probe.ensure_free(hv, host.name, net, allocation.ip, requested=spec.ip is not None and i == 0)
            allocations.append(allocation)
        # The DHCP reservations are a live network update (libvirt rewrites dnsmasq's hosts and signals it,
        # about 0.4 s), made in the background; libvirt serializes the calls of one connection, so what
        # overlaps it is the work over SSH: the image's check (or copy) and the seed's upload. The domain is
        # defined once the reservations are in place.
        reserving = background.submit(_reserve, conn, nets, allocations, spec.name)
        undo.push(_unreserve, reserving, conn, nets, allocations, spec.name)
        net, allocation = nets[0], allocations[0]  # the primary NIC: its address is the VM's
        checkpoint("address")

        needs_image = spec.disk_file is None or image.direct_boot  # an imported disk stands alone; a kernel does not
        if needs_image:
            images.ensure_on_host(image, host, hv, progress)  # its bar's last line says what was copied
        if needs_image and shared and sharedstorage.ensure_image(image, host, hv, progress):
            progress(f"copied image {image.name} to the shared path")
        checkpoint("host_ready")

        network_config = nics_network_config(list(zip(nets, allocations)))
        disk_name = f"{spec.name}.qcow2"
        capacity = sizing.check_disk_size(spec.disk_size, image.virtual_size, image.name)
        seed_path = None
        host_key = None  # (private, (type, base64)): made here and passed in the seed, so known before the boot
        hostname = spec.hostname or spec.name
        if spec.customize == "guestfs":
            _guestfs_overlay(spec, image, backing, hv, pool_dir, disk_name, keys, hostname, progress, capacity,
                             network_config)
            undo.push(storage.delete_volume, pool, disk_name)
            storage.refresh_pool(pool)
            disk_path = pool.storageVolLookupByName(disk_name).path()
        else:
            if spec.disk_file is not None:
                _upload_disk(hv, spec.disk_file, f"{pool_dir}/{disk_name}", host.name, progress)
                undo.push(storage.delete_volume, pool, disk_name)
                storage.refresh_pool(pool)
                disk_path = pool.storageVolLookupByName(disk_name).path()
            seed_path = f"{pool_dir}/{spec.name}-seed.iso"
            host_key = guest.make_host_key()
            _upload_seed(hv, seed_path, hostname, keys, password_hash, spec.name, network_config, spec.user_data,
                         progress, host_key=host_key[0])  # over SSH: before the overlay, a libvirt call
            undo.push(storage.delete_volume, pool, f"{spec.name}-seed.iso")
            if spec.disk_file is None:
                disk_path = storage.create_overlay(pool, disk_name, backing, image.format, capacity).path()
                undo.push(storage.delete_volume, pool, disk_name)
            storage.refresh_pool(pool)

        checkpoint("disks")
        reserving.result()  # the reservations are in place (or their error ends the start here)
        vm_vars = dict(
            name=spec.name, uuid=str(uuid.uuid4()), virt_type=kvm.domain_type(conn), memory=spec.memory,
            vcpus=spec.vcpus, image_id=image.id, network=net.name, ip=allocation.ip, mac=allocation.mac,
            customize=spec.customize, group=spec.group, created=int(time.time()),
            extra_nics=[{"network": n.name, "ip": a.ip, "mac": a.mac} for n, a in zip(nets[1:], allocations[1:])],
            disk_path=disk_path, seed_path=seed_path, console_log=guest.console_log_path(spec.name),
            boot=boot, firmware=spec.firmware, storage=spec.storage,
            max_memory=spec.max_memory if (spec.max_memory or 0) > spec.memory else None,
            max_vcpus=spec.max_vcpus if (spec.max_vcpus or 0) > spec.vcpus else None)
        xml = render("libvirt/domain.xml.j2", vm=vm_vars, metadata_ns=virt.METADATA_NS)
        dom = conn.defineXML(xml)
        undo.push(_undefine, dom)
        dom.create()
        undo.push(_destroy, dom)
        checkpoint("started")
        progress(f"{spec.name} started on {host.name}")
        vm = describe(dom, host.name)
        if spec.wait:
            wait_ready(dom, conn, hv, net.name, allocation, spec.name, spec.timeout, progress,
                       static=net.mode == "bridge", host_key=host_key[1] if host_key else None)
            checkpoint("ssh")
        records.save_domain(dom, host.name)  # last: a failed start leaves no record; a dead host's VM is known
    return vm


def _reserve(conn, nets, allocations, name) -> None:
    """Each NIC's DHCP reservation on its network (none on a bridged one: the guest sets its address)."""
    for net, allocation in zip(nets, allocations):
        networks.add_reservation(conn, net.name, allocation.mac, allocation.ip, name)


def _unreserve(reserving, conn, nets, allocations, name) -> None:
    """Undo of ``_reserve``: once it has ended (it may still be running), each reservation it made removed."""
    with contextlib.suppress(Exception):
        reserving.result()
    for net, allocation in zip(nets, allocations):
        networks.remove_reservation(conn, net.name, allocation.mac, allocation.ip, name)


def guest_network_config(net, allocation) -> dict:
    """The seed's network-config for one NIC: see ``nics_network_config``."""
    return nics_network_config([(net, allocation)])


def nics_network_config(nics) -> dict:
    """The seed's network-config for the VM's NICs [(network spec, allocation)], eth0 the first: each gets
    DHCP by MAC from libvirt's dnsmasq, or on a bridged LAN (no DHCP from libvirt) its allocated address
    set statically with the network's DNS; only the first NIC's gateway becomes the default route."""
    ethernets = {}
    for i, (net, allocation) in enumerate(nics):
        if net.mode != "bridge":
            ethernets.update(seed.dhcp_config([allocation.mac], first=i)["ethernets"])
            continue
        config = net.static_guest_config(allocation.ip)
        ethernets.update(seed.static_config(allocation.mac, config["address"], config.get("gateway") if i == 0
                                            else None, config.get("dns", ()), name=f"eth{i}")["ethernets"])
    return {"version": 2, "ethernets": ethernets}


def _guestfs_overlay(spec, image, backing, hv, pool_dir, disk_name, keys, hostname, progress, capacity,
                     network_config):
    """Overlay made and customized here with libguestfs, then rebased onto ``backing`` (the image as the host
    sees it: its pool's copy, or the shared path's) and uploaded.

    A cloud-init guest also gets the seed as files on its disk, for its network and first boot."""
    from cloudops.imaging.customize import customize_image

    with tempfile.TemporaryDirectory(prefix="cloudops-") as tmp:
        local = Path(tmp) / disk_name
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", image.format, "-b",
                        str(image.local_path), str(local), str(capacity)], check=True, umask=0o077)  # it will hold a hash
        progress("customizing the disk with libguestfs (one appliance launch)")
        in_guest = seed.files_in_guest(hostname, keys, network_config,
                                       instance_id=f"{spec.name}-{secrets.token_hex(4)}")
        customize_image(local, root_password=spec.root_password, ssh_keys=keys, hostname=hostname, files=in_guest)
        subprocess.run(["qemu-img", "rebase", "-u", "-F", image.format, "-b", backing, str(local)],
                       check=True)
        hv.run(f"mkdir -p {shlex.quote(pool_dir)}", hide=True, in_stream=False)
        hostfiles.put_private(hv, str(local), f"{pool_dir}/{disk_name}")  # holds root's hash: 0600 from creation


def _upload_disk(hv, local: str, remote_path: str, host_name: str, progress) -> None:
    """An imported disk into the pool, with a progress bar (the guest's data: 0600 from creation)."""
    label = f"{os.path.basename(local)} to {host_name}"
    with bar_for(progress, label, os.path.getsize(local), verb=("uploading", "uploaded")) as bar:
        hostfiles.put_private(hv, local, remote_path, callback=lambda done, _total: bar.update(done))


def _upload_seed(hv, remote_path, hostname, keys, password_hash, name, network_config, user_data=None,
                 progress=lambda m: None, host_key=None):
    with tempfile.TemporaryDirectory(prefix="cloudops-") as tmp:
        local = Path(tmp) / "seed.iso"
        if user_data is not None:
            progress(f"passing {user_data.describe()}")
        seed.make_seed(local, hostname, ssh_keys=keys, password_hash=password_hash,
                       network_config=network_config, instance_id=f"{name}-{secrets.token_hex(4)}",
                       user_data=user_data, progress=progress, host_key=host_key)
        hv.run(f"mkdir -p {shlex.quote(os.path.dirname(remote_path))}", hide=True, in_stream=False)
        hostfiles.put_private(hv, str(local), remote_path)  # root's hash, the host key: 0600 from creation


def wait_ready(dom, conn, hv, net_name, allocation, name, timeout, progress=lambda m: None,
               console_offset: int = 0, static: bool = False, host_key: tuple[str, str] | None = None) -> str:
    """Wait for the VM's IP (DHCP lease, then guest agent, then ARP), its host key, and SSH.

    ``static``: the guest sets its allocated address itself (a bridged LAN), so there is no
    lease to wait for; SSH answering at that address is the proof.

    ``host_key`` (type, base64): the key cloudops passed in the seed. An SSH server at the address
    that proves it holds that key ends the host-key wait as the key on the console does; a guest
    that ignored it (the tiny image makes its own) is still read from its console.

    The console is read every few seconds meanwhile: a kernel panic, a failed network and the
    like end the wait at once with the console's last lines (cloudops.compute.console).
    """
    watch = console.BootWatch(name, lambda: guest.read_console(hv, name), lambda: _running(dom), progress,
                              offset=console_offset)
    start = time.monotonic()

    def step(what, predicate, interval=0.2):
        remaining = max(5.0, timeout - (time.monotonic() - start))
        progress(f"waiting for {what}")
        announced = [time.monotonic()]

        def poll():
            value = predicate()
            if not value:
                watch.check()
                if time.monotonic() - announced[0] >= 30:
                    announced[0] = time.monotonic()
                    progress(f"still waiting for {what} ({time.monotonic() - start:.0f}s of {timeout:g}s)")
            return value

        try:
            return guest.wait_until(poll, remaining, what, interval=interval)
        except CloudopsError as exc:
            if str(exc).startswith("timed out"):
                watch.check(force=True)  # a failure printed just now says more than the timeout
                tail = console.last_lines(watch.text(), 5)
                if tail:
                    raise CloudopsError(f"{exc}; the console's last lines:\n"
                                        + "\n".join(f"  | {line}" for line in tail)) from None
            raise

    if static:
        ip = allocation.ip
    else:
        ip = step(f"an IP address for {name} ({allocation.ip})", lambda: _address(dom, conn, net_name, allocation.mac))
    if ip != allocation.ip:
        raise CloudopsError(f"{name} got {ip}, not its reserved address {allocation.ip}")
    def host_keys():
        found = guest.host_keys_from_console(guest.read_console(hv, name)[console_offset:])
        if found or host_key is None:
            return found
        if time.monotonic() >= next_probe[0] and guest.ssh_banner(hv, ip):
            next_probe[0] = time.monotonic() + 1  # a key exchange costs more than a console read
            if guest.presents_host_key(hv, ip, host_key):
                return [tuple(host_key)]
        return []

    next_probe = [0.0]
    keys = step(f"{name}'s SSH host key" + (" (its console, or SSH with the key cloudops made)" if host_key
                                            else " on its console"), host_keys, interval=0.3)
    guest.record_host_keys(name, ip, keys)
    step(f"SSH on {name} ({ip})", lambda: guest.ssh_banner(hv, ip))
    return ip


def _running(dom) -> bool:
    try:
        return dom.isActive() == 1
    except libvirt.libvirtError:
        return False


def _address(dom, conn, net_name, mac) -> str | None:
    with contextlib.suppress(libvirt.libvirtError):
        for lease in conn.networkLookupByName(net_name).DHCPLeases(mac):
            if lease.get("ipaddr") and lease.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4:
                return lease["ipaddr"]
    for source in (libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT, libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP):
        with contextlib.suppress(libvirt.libvirtError):
            for iface in dom.interfaceAddresses(source).values():
                if (iface.get("hwaddr") or "").lower() == mac.lower():
                    for addr in iface.get("addrs") or []:
                        if addr.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4:
                            return addr["addr"]
    return None


def _undefine(dom):
    with contextlib.suppress(libvirt.libvirtError):
        try:
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                              | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)  # snapshots go with the disk
        except libvirt.libvirtError:
            dom.undefine()  # a driver that knows neither flag (libvirt's test driver)


def _destroy(dom):
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()


# ---------------------------------------------------------------- stop and delete

def stop_vm(name: str, hosts: list, timeout: float = 60, progress=lambda m: None) -> tuple[VM, bool]:
    """ACPI shutdown, destroy after ``timeout``. Returns (vm, changed); a stopped VM changes nothing."""
    validate_name(name)
    host = locate(name, hosts)
    with virt.open_host(host) as conn:
        dom = conn.lookupByName(name)
        if not dom.isActive():
            return describe(dom, host.name), False
        progress(f"shutting {name} down on {host.name}")
        with contextlib.suppress(libvirt.libvirtError):
            dom.shutdown()
        deadline = time.monotonic() + timeout
        while dom.isActive() and time.monotonic() < deadline:
            time.sleep(0.3)
        if dom.isActive():
            progress(f"{name} did not shut down within {timeout:g}s; destroying it")
            _destroy(dom)
        records.set_running(name, False)  # a failover leaves it stopped
        return describe(dom, host.name), True


def made_by_cloudops(dom) -> bool:
    """Whether cloudops defined this domain (its metadata element is there)."""
    return bool(virt.metadata(dom))


def foreign_refusal(name: str, host_name: str) -> CloudopsError:
    return CloudopsError(f"VM {name!r} on {host_name} was not made by cloudops (no cloudops metadata): refusing to "
                         "delete it; --force undefines it and still leaves its disks alone")


def check_deletable(name: str, hosts: list, force: bool = False):
    """The host that has ``name`` (None when no host has it); refused when cloudops did not make it, unless ``force``."""
    found, unreachable = find(name, hosts)
    if not found:
        if unreachable:
            raise CloudopsError(f"cannot check VM {name!r}: unreachable: {', '.join(unreachable)}")
        return None
    if len(found) > 1:
        raise CloudopsError(f"VM {name!r} is defined on several hosts: {', '.join(h.name for h in found)}")
    host = found[0]
    if not force:
        with virt.open_host(host) as conn:
            if not made_by_cloudops(conn.lookupByName(name)):
                raise foreign_refusal(name, host.name)
    return host


def delete_vm(name: str, inventory, hosts: list | None = None, progress=lambda m: None, extra_networks=(),
              force: bool = False) -> VM:
    """Destroy and undefine a VM cloudops made, remove its disks, its reservation and its address.

    A domain without cloudops metadata is refused; with ``force`` it is destroyed and
    undefined, but its disks (which cloudops did not create) are never deleted. Even for a
    cloudops VM only the disks cloudops makes (``<name>.qcow2``, ``<name>-seed.iso``, and the
    extra disks of ``vm.disk --add``) are deleted: a disk attached by hand stays."""
    validate_name(name)
    hosts = hosts or inventory.hypervisors()
    with _name_lock(name):
        host = locate(name, hosts)
        with virt.open_host(host) as conn:
            dom = conn.lookupByName(name)
            ours = made_by_cloudops(dom)
            if not ours and not force:
                raise foreign_refusal(name, host.name)
            vm = describe(dom, host.name)
            disks = [p for p in _disk_paths(dom) if ours and os.path.basename(p) in _own_disk_names(name, dom)]
            _destroy(dom)
            _undefine(dom)
            if not ours:
                progress(f"undefined {name} on {host.name} (--force; not made by cloudops: its disks are left alone)")
                return vm
            progress(f"undefined {name} on {host.name}; removing its disks and address")
            if vm.storage == "shared":  # its host may never have used the shared pool (it came by migration)
                _activate_shared_pool(conn, host)
            for path in disks:
                _delete_path(conn, path)
            for nic in vm.nics:
                if not (nic["mac"] and nic["ip"]):
                    continue
                net = network_spec(nic["network"], host, extra_networks)
                with contextlib.suppress(CloudopsError, libvirt.libvirtError):
                    networks.remove_reservation(conn, nic["network"], nic["mac"], nic["ip"], name)
                ipam.release(net, name)
        guest.forget_host_keys(name, vm.ip)
        records.forget(name)
    return vm


def _activate_shared_pool(conn, host) -> None:
    """The shared pool defined and refreshed on ``host``, so libvirt knows the shared disks it is to delete;
    a host without shared_path any more leaves them (the next lines' lookups find nothing)."""
    with contextlib.suppress(CloudopsError, libvirt.libvirtError):
        pool, _ = sharedstorage.ensure_pool(conn, host)
        storage.refresh_pool(pool)


def _own_disk_names(name: str, dom=None) -> set[str]:
    """The file names of the disks ``start_vm`` makes for a VM, and those ``vm.disk --add`` gave ``dom``."""
    from cloudops.compute import diskfacts

    extra = {d.volume for d in diskfacts.extra_disks(dom.XMLDesc(0), name)} if dom is not None else set()
    return {f"{name}.qcow2", f"{name}-seed.iso", *extra}


def _disk_paths(dom) -> list[str]:
    root = ET.fromstring(dom.XMLDesc(0))
    return [s.get("file") for s in root.findall("./devices/disk/source") if s.get("file")]


def _delete_path(conn, path: str) -> None:
    try:
        vol = conn.storageVolLookupByPath(path)
    except libvirt.libvirtError:
        return
    with contextlib.suppress(libvirt.libvirtError):
        vol.delete(0)
