"""Snapshots through a migration: libvirt 9.0 carries neither their metadata nor (copying storage) their data.

libvirt refuses to migrate a domain that has snapshot metadata ("cannot migrate domain with N
snapshots"), and a live migration that copies storage (NBD, ``NON_SHARED_INC``) mirrors only the
current data of the disk's top layer into a fresh overlay on the destination: the internal qcow2
snapshots (``cloudops.compute.snapshots``) stay behind in the source's file. So ``migrate_vm``
calls three functions of this module:

- ``before`` (after the preflight, before the destination is prepared): the snapshots' XML is kept
  in the state store (``snapshots-carried/<name>``, so nothing is lost whatever happens next), then
  their metadata is removed from the source (``DELETE_METADATA_ONLY``: the data stays in the disk).
  A running VM whose disks are copied gets a temporary top layer per snapshotted disk
  (``<disk>.migrating``, an external disk-only snapshot without metadata): the qcow2 file holding
  the internal snapshots becomes an immutable backing file and is copied to the destination ahead,
  as the base image is; the migration then mirrors only the small temporary layer, over an
  overlay ``_prepare`` makes on the copied file (the ``_Disk`` entries are pointed at it). A stopped
  VM's files are copied whole by ``_prepare`` with their snapshots; shared storage moves nothing.
- ``after`` (the VM runs, or is defined, on the destination): the temporary layers are committed
  back into the files (active block commit and pivot: the disk is again ``<name>.qcow2``, holding
  its snapshots and the writes made meanwhile) and removed; the metadata is redefined there
  (``VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE``, the current one marked); the record is dropped.
- ``failed`` (the migration did not happen): the same on the source, where the VM still is.

When the outcome is not known (``vm.migrate --recover``), the record stays; ``restore`` redefines
the snapshots wherever the VM then is.
"""

import contextlib
import os
import shlex
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from cloudops import state, storage, virt
from cloudops.compute import snapshots, vms
from cloudops.errors import CloudopsError
from cloudops.ssh import connect

PREFIX = "snapshots-carried/"
SUFFIX = ".migrating"


@dataclass
class Carry:
    name: str
    xmls: list            # snapshot XML, parents first
    current: str | None
    layers: list = field(default_factory=list)  # [target, file with the snapshots, temporary top layer]


def before(dom, disks, shared, source, dest, prepared, message=lambda m: None) -> Carry | None:
    """Take the snapshots of ``dom`` off the source for the migration; None when it has none."""
    handles = dom.listAllSnapshots(libvirt.VIR_DOMAIN_SNAPSHOT_LIST_TOPOLOGICAL)
    if not handles:
        return None
    name = dom.name()
    current = next((h.getName() for h in handles if h.isCurrent()), None)
    carry = Carry(name, [h.getXMLDesc(0) for h in handles], current)
    if not state.current().create(PREFIX + name, _record(carry, source, dest)):
        raise CloudopsError(f"VM {name} has snapshots carried by an earlier migration that did not settle: "
                            f"run `invoke vm.migrate {name} --recover` first")
    message(f"carrying {len(handles)} snapshot(s) of {name} to {dest.name}")
    for handle in reversed(handles):  # children first
        handle.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
    if not dom.isActive() or shared:
        return carry
    covered = {target for target, _ in snapshots.qcow2_disks(dom.XMLDesc(0))}
    moving = [d for d in disks if d.target in covered]
    with connect(dest) as hv:
        for disk in moving:
            if hv.run(f"test -e {shlex.quote(disk.path)}", warn=True, hide=True, in_stream=False).ok:
                raise CloudopsError(f"{dest.name} already has a disk {disk.path}; remove it or choose another host")
    _add_layers(dom, carry, moving)
    for disk in moving:  # the layers are volumes of the disks' pools (migrate._pool_name looks them up)
        with contextlib.suppress(libvirt.libvirtError):
            storage.refresh_pool(dom.connect().storageVolLookupByPath(disk.path).storagePoolLookupByVolume())
    state.current().put(PREFIX + name, _record(carry, source, dest))
    for disk in moving:
        top = disk.path + SUFFIX
        message(f"copying {os.path.basename(disk.path)} (with its snapshots) to {dest.name}")
        prepared.files.append(disk.path)  # removed from the destination again if the migration fails
        _copy(source, dest, disk.path)
        disk.backing, disk.backing_format, disk.path = disk.path, "qcow2", top
    return carry


def _record(carry, source, dest) -> dict:
    return {"name": carry.name, "xmls": carry.xmls, "current": carry.current, "layers": carry.layers,
            "source": source.name, "target": dest.name, "time": round(time.time(), 3)}


def _add_layers(dom, carry, disks) -> None:
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = f"cloudops-migration-{int(time.time())}"
    xml_disks = ET.SubElement(root, "disks")
    targets = {d.target: d for d in disks}
    for disk in ET.fromstring(dom.XMLDesc(0)).findall("./devices/disk"):
        target = disk.find("target").get("dev")
        if target in targets:
            entry = ET.SubElement(xml_disks, "disk", name=target, snapshot="external")
            ET.SubElement(entry, "driver", type="qcow2")
            ET.SubElement(entry, "source", file=targets[target].path + SUFFIX)
        else:
            ET.SubElement(xml_disks, "disk", name=target, snapshot="no")
    dom.snapshotCreateXML(ET.tostring(root, encoding="unicode"),
                          libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                          | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
    carry.layers = [[d.target, d.path, d.path + SUFFIX] for d in disks]


def _copy(source, dest, path) -> None:
    """Copy an immutable disk file between hosts through this machine (the tiny overlays of a lab)."""
    from cloudops import hostfiles

    with tempfile.TemporaryDirectory(prefix="cloudops-") as tmp, connect(source) as src, connect(dest) as dst:
        local = str(Path(tmp) / "disk")
        src.get(path, local)
        dst.run(f"mkdir -p {shlex.quote(os.path.dirname(path))}", hide=True, in_stream=False)
        hostfiles.put_private(dst, local, path)


def after(carry: Carry | None, host, message=lambda m: None, source=None) -> None:
    """On the host that now has the VM: commit the temporary layers, redefine the snapshots; with
    ``source`` (the migration succeeded), remove from there the files the snapshots were copied from."""
    if carry is None:
        return
    if source is not None and carry.layers:
        with virt.open_host(source) as src_conn:
            for _target, base, _top in carry.layers:
                vms._delete_path(src_conn, base)
    with virt.open_host(host) as conn:
        dom = conn.lookupByName(carry.name)
        problems = _commit_layers(dom, host, carry, message)
        redefine(dom, carry.xmls, carry.current)
    state.current().delete(PREFIX + carry.name)
    message(f"{len(carry.xmls)} snapshot(s) of {carry.name} are on {host.name}")
    if problems:
        raise CloudopsError(f"{carry.name} is on {host.name} with its snapshots, but {problems[0]}")


def failed(carry: Carry | None, source, message=lambda m: None) -> None:
    """The migration raised: when the VM is still on the source (and only there is it known to be), put the
    snapshots back there. Never raises: the migration's own fault handling comes next, and whatever is
    not put back stays in the state store for ``restore``."""
    if carry is None:
        return
    try:
        with virt.open_host(source) as conn:
            dom = conn.lookupByName(carry.name)
            if carry.layers and not dom.isActive():
                raise CloudopsError(f"{carry.name} no longer runs on {source.name}")
        after(carry, source, message)
    except Exception as exc:  # noqa: BLE001 - reported, and the record keeps everything
        text = exc.get_error_message() if isinstance(exc, libvirt.libvirtError) else str(exc)
        message(f"the snapshots of {carry.name} were not put back on {source.name} ({text}); they are kept in "
                f"the state store ({PREFIX}{carry.name}) until `invoke vm.migrate {carry.name} --recover`")


def _commit_layers(dom, host, carry, message) -> list[str]:
    problems = []
    if not carry.layers or not dom.isActive():
        return problems
    for target, base, top in carry.layers:
        current, backing = _source_of(dom, target)
        if current != top:
            continue  # this disk never got its layer (or it was committed already)
        if backing != base:
            problems.append(f"its disk {target} runs on {top}, whose backing file is {backing}, not {base}")
            continue
        message(f"{host.name}: committing {os.path.basename(top)} back into {os.path.basename(base)}")
        try:
            # SHALLOW: into the layer right below (base=None alone would mean the bottom of the chain: the image)
            dom.blockCommit(target, None, None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE |
                            libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW)
            _wait_ready(dom, target)
            dom.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
            _wait_gone(dom, target)
        except (libvirt.libvirtError, CloudopsError) as exc:
            text = exc.get_error_message() if isinstance(exc, libvirt.libvirtError) else str(exc)
            problems.append(f"its disk {target} still runs on the temporary layer {top}: {text}")
            continue
        with contextlib.suppress(Exception), connect(host) as hv:
            hv.run(f"rm -f {shlex.quote(top)}", hide=True, in_stream=False)
    return problems


def _source_of(dom, target) -> tuple[str | None, str | None]:
    """(file, its backing file) of a disk of the running domain."""
    for disk in ET.fromstring(dom.XMLDesc(0)).findall("./devices/disk"):
        if disk.find("target").get("dev") == target and disk.find("source") is not None:
            backing = disk.find("backingStore/source")
            return disk.find("source").get("file"), backing.get("file") if backing is not None else None
    return None, None


def _wait_ready(dom, target, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = dom.blockJobInfo(target, 0)
        if info and info.get("end", 0) and info.get("cur") == info.get("end"):
            return
        time.sleep(0.2)
    raise CloudopsError(f"the block commit of {target} was not ready within {timeout:g}s")


def _wait_gone(dom, target, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while dom.blockJobInfo(target, 0) and time.monotonic() < deadline:
        time.sleep(0.2)


def redefine(dom, xmls: list, current: str | None) -> None:
    """Give libvirt the snapshots' metadata again (parents first); the data is already in the disks."""
    have = {h.getName() for h in dom.listAllSnapshots(0)}
    for xml in xmls:
        snap_name = ET.fromstring(xml).findtext("name")
        if snap_name in have:
            continue
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
        if snap_name == current:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
        dom.snapshotCreateXML(xml, flags)


def restore(name: str, hosts: list, message=lambda m: None) -> bool:
    """After a recovered migration: redefine carried snapshots on the host that has the VM. True if it did."""
    record = state.current().value(PREFIX + name)
    if not record:
        return False
    host = vms.locate(name, hosts)
    after(Carry(name, record["xmls"], record.get("current"), record.get("layers") or []), host, message)
    return True
