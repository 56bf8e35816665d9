"""Extra disks of a VM (``vm.disk``): add an empty virtio disk, list them, remove one.

A disk is a qcow2 volume ``<vm>-disk-<name>.qcow2`` in the pool of the VM's root disk on its
host, attached with the user alias ``ua-cloudops-<name>`` (``diskfacts``): hot-plugged into a
running VM and written into its persistent definition, or only into the definition of a
stopped one. It goes with the VM through ``vm.migrate`` (copied like the root disk, or left
on shared storage) and ``vm.delete`` deletes it.

Removing one from a running VM is a hot-unplug, which the guest must agree to (it releases
the device when the PCI eject reaches it). When it has not within ``timeout``, the disk is
gone from the definition but stays attached until the next boot, and its volume is kept:
the result says so, and ``--remove`` again later deletes the volume.
"""

import contextlib
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field

import libvirt

from cloudops import storage
from cloudops.compute import diskfacts, power, records, sizing, vms
from cloudops.errors import CloudopsError
from cloudops.imaging import store as images
from cloudops.templating import render

DETACH_TIMEOUT = 30  # seconds a guest has to release a hot-unplugged disk
DEFAULT_NAMES = ("data", *(f"data{i}" for i in range(2, 25)))


@dataclass
class DiskResult:
    vm: str
    host: str
    changed: bool
    action: str   # "attached", "added to the config", "removed", "detached from the config", "volume deleted", "none"
    message: str  # one line for the operator
    disk: dict | None = None
    disks: list = field(default_factory=list)  # --list

    def to_dict(self) -> dict:
        return asdict(self)


def _xmls(dom) -> tuple[str, str | None]:
    """(persistent definition, live definition or None when the VM is not running)."""
    config = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    return config, dom.XMLDesc(0) if dom.isActive() else None


def _by_name(config: str, live: str | None, vm: str) -> dict[str, dict]:
    """Every extra disk by name: its Disk and where it is attached ("config", "live")."""
    found = {}
    for where, xml in (("config", config), ("live", live)):
        for disk in diskfacts.extra_disks(xml, vm) if xml else ():
            entry = found.setdefault(disk.name, {"disk": disk, "in": []})
            entry["in"].append(where)
    return found


def _pool(conn, host, dom, vm: str):
    """The pool of the VM's root disk (where its extra disks go); the cloudops pool when libvirt knows none."""
    root = diskfacts.root_disk(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), vm)
    try:
        pool = conn.storageVolLookupByPath(root.path).storagePoolLookupByVolume()
    except libvirt.libvirtError:
        pool, _ = storage.ensure_pool(conn, storage.disks_dir(images.pool_path(host)))
    storage.refresh_pool(pool)
    return pool


def _volume(pool, name: str):
    try:
        return pool.storageVolLookupByName(name)
    except libvirt.libvirtError:
        return None


def _libvirt_line(exc: libvirt.libvirtError) -> str:
    text = (exc.get_error_message() or str(exc)).strip().splitlines()
    return text[-1] if text else str(exc)


# ---------------------------------------------------------------- add

def add_disk(vm: str, hosts: list, size, name: str | None = None, progress=lambda m: None) -> DiskResult:
    """An empty qcow2 disk of ``size`` (``1G``) attached to VM ``vm``: live and persistent when it runs."""
    vms.validate_name(vm)
    if size is None:
        raise CloudopsError("vm.disk --add needs --size (e.g. 1G)")
    capacity = sizing.parse_size(size)
    if name is not None:
        diskfacts.validate_disk_name(name)
    with power._own_vm(vm, hosts, "add a disk to it") as (host, conn, dom):
        config, live = _xmls(dom)
        taken = _by_name(config, live, vm)
        if name is None:
            name = next((n for n in DEFAULT_NAMES if n not in taken), None)
            if name is None:
                raise CloudopsError(f"VM {vm} has {len(taken)} extra disks already: give --name")
        elif name in taken:
            raise CloudopsError(f"VM {vm} already has a disk named {name!r} ({taken[name]['disk'].target})")
        target = diskfacts.free_target(config, *([live] if live else []))
        pool = _pool(conn, host, dom, vm)
        volume_name = diskfacts.volume_name(vm, name)
        if _volume(pool, volume_name) is not None:
            raise CloudopsError(f"{host.name} already has a volume {volume_name} in pool {pool.name()} (left by a "
                                f"disk the guest had not released?): `vm.disk {vm} --remove {name}` deletes it")
        progress(f"creating {volume_name} ({sizing.format_size(capacity)}) on {host.name}")
        volume = storage.create_volume(pool, volume_name, capacity)
        xml = render("libvirt/disk.xml.j2", path=volume.path(), target=target, name=name,
                     alias=diskfacts.alias(name))
        running = live is not None
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if running else 0)
        try:
            dom.attachDeviceFlags(xml, flags)
        except BaseException as exc:
            with contextlib.suppress(libvirt.libvirtError):
                volume.delete(0)
            if isinstance(exc, libvirt.libvirtError):
                raise CloudopsError(f"cannot attach disk {name} to {vm} on {host.name}: {_libvirt_line(exc)}") from None
            raise
        records.refresh(vm, dom, host.name)  # a failover defines the VM with this disk
        disk = {"name": name, "target": target, "size": sizing.format_size(capacity), "path": volume.path()}
        if running:
            return DiskResult(vm, host.name, True, "attached", f"{vm} on {host.name}: disk {name} "
                              f"({sizing.format_size(capacity)}, {target}, serial {name}) hot-plugged and kept in its "
                              "definition", disk=disk)
        return DiskResult(vm, host.name, True, "added to the config", f"{vm} on {host.name}: disk {name} "
                          f"({sizing.format_size(capacity)}, {target}) added to its definition (the VM is stopped: "
                          "the guest sees it when it boots)", disk=disk)


# ---------------------------------------------------------------- list

def list_disks(vm: str, hosts: list) -> DiskResult:
    """The VM's extra disks with their size and where they are attached (the root disk is vm.info's)."""
    vms.validate_name(vm)
    host = vms.locate(vm, hosts)
    from cloudops import virt

    with virt.open_host(host) as conn:
        dom = conn.lookupByName(vm)
        if not vms.made_by_cloudops(dom):
            raise power._foreign(vm, host.name, "list its disks")
        config, live = _xmls(dom)
        rows = []
        for name, entry in sorted(_by_name(config, live, vm).items()):
            disk = entry["disk"]
            row = {"name": name, "target": disk.target, "path": disk.path, "attached": _attached(entry["in"], live)}
            with contextlib.suppress(libvirt.libvirtError):
                _type, capacity, allocation = conn.storageVolLookupByPath(disk.path).info()
                row.update(size=sizing.format_size(capacity), allocated=sizing.format_size(allocation))
            rows.append(row)
        with contextlib.suppress(libvirt.libvirtError, CloudopsError):
            in_use = _sources(config) | (_sources(live) if live else set())
            for name in _leftovers(_pool(conn, host, dom, vm), vm, in_use):
                rows.append({"name": name, "target": None, "path": None,
                             "attached": f"nowhere: a volume left by an unfinished unplug (--remove {name} deletes it)"})
    message = (f"{vm} on {host.name}: " + (f"{len(rows)} extra disk" + ("s" if len(rows) != 1 else "")
                                            if rows else "no extra disks"))
    return DiskResult(vm, host.name, False, "none", message, disks=rows)


def _attached(where: list[str], live) -> str:
    if live is None:
        return "config (stopped)"
    if where == ["config", "live"]:
        return "live and config"
    return "config only (attached at the next boot)" if where == ["config"] else "live only (gone at the next boot)"


# ---------------------------------------------------------------- remove

def remove_disk(vm: str, hosts: list, name: str, timeout: float = DETACH_TIMEOUT,
                progress=lambda m: None) -> DiskResult:
    """Hot-unplug (running VM) or detach (stopped VM) the extra disk ``name``, then delete its volume."""
    vms.validate_name(vm)
    diskfacts.validate_disk_name(name)
    with power._own_vm(vm, hosts, "remove a disk from it") as (host, conn, dom):
        config, live = _xmls(dom)
        entry = _by_name(config, live, vm).get(name)
        if entry is None:
            return _remove_leftover(vm, host, conn, dom, name, config, live)
        disk, where = entry["disk"], entry["in"]
        held = in_snapshots(dom, vm, disk)
        if held:
            raise CloudopsError(f"disk {name} of {vm} is in its snapshot{'s' if len(held) > 1 else ''} "
                                f"{', '.join(held)}: delete {'them' if len(held) > 1 else 'it'} first "
                                f"(vm.snapshot {vm} --delete SNAP), or reverting would miss the disk")
        flags = 0
        if "config" in where:
            flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if "live" in where:
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
            progress(f"hot-unplugging disk {name} ({disk.target}) from {vm} (the guest must release it; "
                     f"waiting up to {timeout:g}s)")
        device = diskfacts.device_xml(live if "live" in where else config, disk.target)
        try:
            dom.detachDeviceFlags(device, flags)
        except libvirt.libvirtError as exc:
            raise CloudopsError(f"cannot detach disk {name} from {vm} on {host.name}: {_libvirt_line(exc)}") from None
        records.refresh(vm, dom, host.name)  # a failover defines the VM without this disk
        if "live" in where and not wait_detached(dom, vm, name, timeout):
            return DiskResult(vm, host.name, True, "detached from the config",
                              f"{vm} on {host.name}: disk {name} detached from its definition only: the guest did not "
                              f"release it within {timeout:g}s, so it stays attached until the next boot; its volume "
                              f"{disk.volume} is kept (`vm.disk {vm} --remove {name}` again after that deletes it)",
                              disk=disk.to_dict())
        _delete(conn, disk.path, vm, host.name)
        how = "hot-unplugged" if "live" in where else "detached"
        return DiskResult(vm, host.name, True, "removed",
                          f"{vm} on {host.name}: disk {name} {how} and its volume {disk.volume} deleted",
                          disk=disk.to_dict())


def reattach_missing(dom, vm: str, before: str) -> list[str]:
    """Attach again the extra disks the persistent definition ``before`` had and the domain's has not.

    A libvirt revert (memory or powered-off snapshot) puts back the definition the snapshot saved: a
    disk added since is not in it, and its volume would stay in the pool outside the VM, where neither
    the guest nor ``vm.delete`` reaches it. The snapshot never held that disk's content, so it comes
    back as it is now, on a free target if the snapshot's definition took its own. Returns their names."""
    config, live = _xmls(dom)
    present = {d.name for d in diskfacts.extra_disks(config, vm)}
    again = []
    for disk in diskfacts.extra_disks(before, vm):
        if disk.name in present:
            continue
        element = ET.fromstring(diskfacts.device_xml(before, disk.target))
        element.find("target").set("dev", diskfacts.free_target(config, *([live] if live else [])))
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0)
        try:
            dom.attachDeviceFlags(ET.tostring(element, encoding="unicode"), flags)
        except libvirt.libvirtError as exc:
            raise CloudopsError(f"{vm} was reverted, but its disk {disk.name} ({disk.volume}), added after the "
                                f"snapshot, could not be attached again: {_libvirt_line(exc)}; `vm.disk {vm} --list` "
                                "shows it as a leftover volume") from None
        again.append(disk.name)
        config, live = _xmls(dom)
    return again


def in_snapshots(dom, vm: str, disk) -> list[str]:
    """Names of the VM's snapshots whose domain has this extra disk (their revert needs its volume)."""
    names = []
    with contextlib.suppress(libvirt.libvirtError):
        for snapshot in dom.listAllSnapshots(0):
            inner = ET.fromstring(snapshot.getXMLDesc(0)).find("domain")
            if inner is not None and any(d.path == disk.path for d in
                                         diskfacts.extra_disks(ET.tostring(inner, encoding="unicode"), vm)):
                names.append(snapshot.getName())
    return sorted(names)


def wait_detached(dom, vm: str, name: str, timeout: float, interval: float = 0.3) -> bool:
    """Whether the running domain's live definition lost disk ``name`` within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if not dom.isActive() or not any(d.name == name for d in diskfacts.extra_disks(dom.XMLDesc(0), vm)):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _remove_leftover(vm, host, conn, dom, name, config, live) -> DiskResult:
    """``--remove`` of a disk attached nowhere: its volume, left by an unplug the guest had not finished, goes;
    anything else is an unknown disk."""
    pool = _pool(conn, host, dom, vm)
    volume = _volume(pool, diskfacts.volume_name(vm, name))
    if volume is None:
        known = sorted(_by_name(config, live, vm))
        raise CloudopsError(f"VM {vm} on {host.name} has no disk named {name!r} (its extra disks: "
                            f"{', '.join(known) if known else 'none'})")
    path = volume.path()
    if any(xml and path in _sources(xml) for xml in (config, live)):
        raise CloudopsError(f"{path} is attached to {vm} on {host.name}, but not as a disk of vm.disk (attached by "
                            "hand?): leaving it alone")
    _delete(conn, path, vm, host.name)
    return DiskResult(vm, host.name, True, "volume deleted",
                      f"{vm} on {host.name}: disk {name} was no longer attached; its volume "
                      f"{diskfacts.volume_name(vm, name)} deleted", disk={"name": name, "path": path})


def _sources(xml: str) -> set[str]:
    return {s.get("file") for s in ET.fromstring(xml).findall("./devices/disk/source") if s.get("file")}


def _leftovers(pool, vm: str, in_use: set[str]) -> list[str]:
    """Names of extra-disk volumes of ``vm`` in the pool that no disk of its definitions uses any more."""
    prefix, names = f"{vm}-disk-", []
    for volume in pool.listVolumes():
        name = volume[len(prefix):-len(".qcow2")] if volume.startswith(prefix) and volume.endswith(".qcow2") else ""
        if diskfacts.DISK_NAME_RE.match(name) and pool.storageVolLookupByName(volume).path() not in in_use:
            names.append(name)
    return sorted(names)


def _delete(conn, path: str, vm: str, host_name: str) -> None:
    try:
        conn.storageVolLookupByPath(path).delete(0)
    except libvirt.libvirtError as exc:
        raise CloudopsError(f"{vm} on {host_name}: the disk is detached, but its volume {path} could not be "
                            f"deleted: {_libvirt_line(exc)}") from None
