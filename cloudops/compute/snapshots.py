"""Snapshots of a cloudops VM: create, list, revert and delete internal qcow2 snapshots, on libvirt 9.0.

Every snapshot is internal: it lives inside the VM's own qcow2 disk(s), next to the data, so deleting
one in the middle of a chain touches no other (qcow2 snapshots share clusters by reference count,
they are not layers) and the disk file alone carries all of them. libvirt keeps the metadata
(``virsh snapshot-list``); cloudops writes what it knows about consistency into the snapshot's
description (``cloudops: <consistency>``). Three kinds, by how the VM is when it is taken:

- **stopped VM** (``powered-off``): libvirt's own inactive internal snapshot (``qemu-img snapshot -c``);
  reverted by libvirt (``qemu-img snapshot -a``).
- **running VM with --memory** (``memory``): libvirt's full system checkpoint (QEMU ``savevm``: the
  guest pauses while its RAM is written into the qcow2). Disk and memory are of one instant, so no
  freeze is needed; revert (libvirt, ``loadvm``) brings back the running guest and its processes.
- **running VM, disk only** (``quiesced`` or ``crash-consistent``): libvirt 9.0 refuses internal
  disk-only snapshots of an active domain ("active qemu domains require external disk snapshots"),
  and cannot revert external ones (that came in 9.9). So cloudops asks QEMU itself:
  ``blockdev-snapshot-internal-sync`` on every writable qcow2 disk (instant, the guest does not
  pause), between ``fsFreeze``/``fsThaw`` when the guest agent answers (``quiesced``), else
  ``crash-consistent`` (as if the power had been cut); then it gives libvirt the metadata with
  ``VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE`` (state ``disk-snapshot``, disks ``internal``). libvirt
  9.0 refuses to revert a ``disk-snapshot``, so cloudops reverts those itself, the way libvirt
  reverts an inactive one: destroy the domain, ``qemu-img snapshot -a`` on each disk, mark the
  snapshot current (redefine), start the domain again if it ran. Deleting goes through libvirt
  for every kind (``delvm`` on a running domain, ``qemu-img snapshot -d`` on a stopped one).

A host lost in the middle (``_lost_host``) is one line saying the outcome is unknown. libvirt's own
snapshots are all or nothing on the host; for the disk-only kind cloudops records the snapshot in
libvirt *before* QEMU takes it, marked ``unfinished``, and rewrites the record once it is taken, so
an interruption leaves something listed (``--list`` says so) that the next verb on the VM clears:
QEMU's internal snapshots of that name, the record, and a freeze the guest may have been left in
(``clear_unfinished``).

Revert keeps the VM's power state, except a memory snapshot, which brings back the running guest
it saved. A live migration carries the snapshots (``cloudops.migration.snapcarry``). Every verb
takes the VM's name lock, refuses a VM with an unfinished migration and domains cloudops did not
make, and says when it changed nothing.
"""

import contextlib
import json
import re
import shlex
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import libvirt

from cloudops.compute import power, vms
from cloudops.compute.disks import reattach_missing
from cloudops.errors import CloudopsError, NotFound
from cloudops.ssh import connect

SNAPSHOT_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")  # never all digits: qemu-img takes "1" for an ID
DESCRIPTION = "cloudops: "  # + consistency, in the snapshot's <description>
KINDS = ("powered-off", "memory", "quiesced", "crash-consistent")
UNFINISHED = "unfinished"  # a disk-only snapshot's record while QEMU takes it: left only by a lost host


@dataclass
class Snapshot:
    name: str
    state: str          # libvirt's: shutoff, running, paused, disk-snapshot
    memory: bool        # memory state saved (revert brings back the running guest)
    consistency: str    # one of KINDS, or "unknown" (not taken by cloudops)
    created: int        # seconds since the epoch
    parent: str | None = None
    current: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class SnapshotResult:
    vm: vms.VM
    changed: bool
    action: str         # "created", "reverted", "deleted", "listed"
    message: str
    snapshot: Snapshot | None = None
    snapshots: list = field(default_factory=list)

    def to_dict(self) -> dict:
        data = {**self.vm.to_dict(), "changed": self.changed, "action": self.action, "message": self.message}
        if self.snapshot is not None:
            data["snapshot"] = self.snapshot.to_dict()
        if self.action == "listed":
            data["snapshots"] = [s.to_dict() for s in self.snapshots]
        return data


def validate_snapshot_name(name: str) -> str:
    if not isinstance(name, str) or not SNAPSHOT_RE.match(name):
        raise CloudopsError(f"invalid snapshot name {name!r}: 1-64 of A-Z a-z 0-9 . _ -, starting with a letter")
    return name


# ---------------------------------------------------------------- facts

def parse(xml: str, current: bool = False) -> Snapshot:
    """A Snapshot from libvirt's snapshot XML."""
    root = ET.fromstring(xml)
    description = root.findtext("description") or ""
    consistency = description[len(DESCRIPTION):].strip() if description.startswith(DESCRIPTION) else "unknown"
    memory = root.find("memory")
    state = root.findtext("state") or "unknown"
    return Snapshot(name=root.findtext("name"), state=state,
                    memory=state in ("running", "paused") and (memory is None or memory.get("snapshot") != "no"),
                    consistency=consistency, created=int(root.findtext("creationTime") or 0),
                    parent=root.findtext("parent/name"), current=current)


def snapshots_of(dom) -> list[Snapshot]:
    """Every snapshot of a domain, parents before children (libvirt's topological order)."""
    found = dom.listAllSnapshots(libvirt.VIR_DOMAIN_SNAPSHOT_LIST_TOPOLOGICAL)
    return [parse(s.getXMLDesc(0), current=bool(s.isCurrent())) for s in found]


def qcow2_disks(domain_xml: str) -> list[tuple[str, str]]:
    """(target, path) of the writable qcow2 file disks of a domain: the ones a snapshot covers."""
    found = []
    for disk in ET.fromstring(domain_xml).findall("./devices/disk"):
        driver, source, target = disk.find("driver"), disk.find("source"), disk.find("target")
        if (disk.get("device", "disk") == "disk" and disk.find("readonly") is None and driver is not None
                and driver.get("type") == "qcow2" and source is not None and source.get("file")):
            found.append((target.get("dev"), source.get("file")))
    return found


def snapshot_xml(name: str, consistency: str, domain_xml: str, *, memory: bool, redefine_state: str | None = None,
                 parent: str | None = None) -> str:
    """The <domainsnapshot> to create (or, with ``redefine_state``, to give libvirt as metadata)."""
    covered = {target for target, _ in qcow2_disks(domain_xml)}
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "description").text = DESCRIPTION + consistency
    if redefine_state:
        ET.SubElement(root, "state").text = redefine_state
        ET.SubElement(root, "creationTime").text = str(int(time.time()))
        if parent:
            ET.SubElement(ET.SubElement(root, "parent"), "name").text = parent
    ET.SubElement(root, "memory", snapshot="internal" if memory else "no")
    disks = ET.SubElement(root, "disks")
    for disk in ET.fromstring(domain_xml).findall("./devices/disk"):
        target = disk.find("target").get("dev")
        ET.SubElement(disks, "disk", name=target, snapshot="internal" if target in covered else "no")
    if redefine_state:
        root.append(ET.fromstring(domain_xml))
    return ET.tostring(root, encoding="unicode")


# ---------------------------------------------------------------- QEMU, for what libvirt 9.0 does not do

def _qmp(dom, command: str, **arguments) -> dict:
    import libvirt_qemu

    request = {"execute": command, **({"arguments": arguments} if arguments else {})}
    answer = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(request), 0))
    if "error" in answer:
        raise CloudopsError(f"QEMU refused {command} on {dom.name()}: {answer['error'].get('desc', answer['error'])}")
    return answer.get("return")


def _node_names(dom, paths: list[str]) -> dict[str, str]:
    """path -> the block node QEMU opened it as (the format node of the disk's top layer)."""
    nodes = {}
    for device in _qmp(dom, "query-block"):
        inserted = device.get("inserted") or {}
        if inserted.get("file") in paths:
            nodes[inserted["file"]] = inserted["node-name"]
    missing = [p for p in paths if p not in nodes]
    if missing:
        raise CloudopsError(f"{dom.name()}: QEMU has no block node for {missing[0]}")
    return nodes


def _freeze(dom) -> bool:
    """Freeze the guest's filesystems through its agent; False when no agent answers."""
    try:
        dom.fsFreeze(None, 0)
        return True
    except libvirt.libvirtError:
        return False


def _disk_snapshot_running(dom, snap: str, disks: list[tuple[str, str]]) -> bool:
    """Internal snapshot ``snap`` of every disk of a running domain, all or none. Returns quiesced?"""
    paths = [path for _, path in disks]
    nodes = _node_names(dom, paths)
    frozen = _freeze(dom)
    made = []
    try:
        for path in paths:
            _qmp(dom, "blockdev-snapshot-internal-sync", device=nodes[path], name=snap)
            made.append(path)
    except BaseException:
        for path in made:
            with contextlib.suppress(Exception):
                _qmp(dom, "blockdev-snapshot-delete-internal-sync", device=nodes[path], name=snap)
        raise
    finally:
        if frozen:
            with contextlib.suppress(libvirt.libvirtError):
                dom.fsThaw(None, 0)
    return frozen


# ---------------------------------------------------------------- a host lost in the middle

@contextlib.contextmanager
def _lost_host(conn, host, name: str, doing: str):
    """A libvirt error on a connection that died (the host stopped answering) is one line saying what may
    be left, not libvirt's "End of file while reading data"."""
    try:
        yield
    except libvirt.libvirtError as exc:
        if conn.isAlive():
            raise
        raise CloudopsError(f"{host.name} stopped answering during {doing} of {name} ({exc.get_error_message()}): "
                            f"whether it was done is unknown; `vm.snapshot {name} --list` once {host.name} answers "
                            "(a disk snapshot left unfinished is removed by the next vm.snapshot)") from None


def _tags_on_disks(dom, host, snap: str) -> list[tuple[str, str]]:
    """(path, block node or "") of the VM's qcow2 disks whose file holds an internal snapshot ``snap``."""
    paths = [path for _, path in qcow2_disks(dom.XMLDesc(0))]
    if dom.isActive():
        return [(inserted["file"], inserted["node-name"]) for inserted in
                (device.get("inserted") or {} for device in _qmp(dom, "query-block"))
                if inserted.get("file") in paths
                and any(s.get("name") == snap for s in (inserted.get("image") or {}).get("snapshots") or [])]
    found = []
    with connect(host) as hv:
        for path in paths:
            listed = hv.run(f"qemu-img snapshot -l {shlex.quote(path)}", hide=True, warn=True, in_stream=False).stdout
            if any(line.split()[1:2] == [snap] for line in listed.splitlines() if line[:1].isdigit()):
                found.append((path, ""))
    return found


def clear_unfinished(dom, host, progress=lambda m: None) -> list[str]:
    """Remove what a disk-only snapshot interrupted by a lost host left: QEMU's internal snapshots of that
    name and libvirt's ``unfinished`` record; thaw the guest's filesystems, which it may have left frozen.
    Returns the names cleared."""
    cleared = []
    for handle in dom.listAllSnapshots(0):
        if parse(handle.getXMLDesc(0)).consistency != UNFINISHED:
            continue
        snap = handle.getName()
        if dom.isActive():
            with contextlib.suppress(libvirt.libvirtError):
                dom.fsThaw(None, 0)  # a no-op unless the freeze outlived the lost connection
        for path, node in _tags_on_disks(dom, host, snap):
            if node:
                _qmp(dom, "blockdev-snapshot-delete-internal-sync", device=node, name=snap)
            else:
                with connect(host) as hv:
                    hv.run(f"qemu-img snapshot -d {shlex.quote(snap)} {shlex.quote(path)}", hide=True, in_stream=False)
        handle.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
        cleared.append(snap)
    if cleared:
        progress(f"removed snapshot(s) {', '.join(cleared)} of {dom.name()}, left unfinished when {host.name} "
                 "stopped answering during their creation")
    return cleared


# ---------------------------------------------------------------- verbs

def _lookup(dom, name: str, snap: str):
    try:
        return dom.snapshotLookupByName(snap, 0)
    except libvirt.libvirtError:
        names = [s.getName() for s in dom.listAllSnapshots(0)]
        has = f"its snapshots: {', '.join(names)}" if names else "it has none"
        raise NotFound(f"VM {name} has no snapshot named {snap!r} ({has})") from None


def create_snapshot(name: str, snap: str, hosts: list, memory: bool = False, progress=lambda m: None) -> SnapshotResult:
    """Take snapshot ``snap`` of VM ``name`` (see the module docstring for the kinds)."""
    validate_snapshot_name(snap)
    with power._own_vm(name, hosts, "snapshot it") as (host, conn, dom), _lost_host(conn, host, name, f"snapshot {snap}"):
        clear_unfinished(dom, host, progress)
        with contextlib.suppress(libvirt.libvirtError):
            dom.snapshotLookupByName(snap, 0)
            raise CloudopsError(f"VM {name} already has a snapshot named {snap!r}: delete it first or choose another name")
        domain_xml = dom.XMLDesc(0)
        disks = qcow2_disks(domain_xml)
        if not disks:
            raise CloudopsError(f"VM {name} has no qcow2 disk to snapshot")
        active = bool(dom.isActive())
        if memory and not active:
            raise CloudopsError(f"VM {name} on {host.name} is stopped: it has no memory state to save "
                                "(without --memory the snapshot is of its disk)")
        if not active:
            progress(f"snapshot {snap} of stopped {name} on {host.name}")
            dom.snapshotCreateXML(snapshot_xml(snap, "powered-off", domain_xml, memory=False), 0)
            kind = "powered-off"
        elif memory:
            progress(f"snapshot {snap} of {name} on {host.name} with its memory (the guest pauses meanwhile)")
            dom.snapshotCreateXML(snapshot_xml(snap, "memory", domain_xml, memory=True), 0)
            kind = "memory"
        else:
            progress(f"snapshot {snap} of {name} on {host.name}, disk only (the guest goes on running)")
            kind = _create_disk_only(dom, snap, domain_xml, disks)
        made = parse(dom.snapshotLookupByName(snap, 0).getXMLDesc(0), current=True)
        what = {"powered-off": "of its disk, taken stopped", "memory": "with memory (disk and memory of one instant)",
                "quiesced": "of its disk, quiesced by the guest agent",
                "crash-consistent": "of its disk, crash-consistent (no guest agent answered to freeze its "
                                    "filesystems)"}[kind]
        return SnapshotResult(vms.describe(dom, host.name), True, "created",
                              f"{name} on {host.name}: snapshot {snap} created, {what}", snapshot=made)


def _current_name(dom) -> str | None:
    with contextlib.suppress(libvirt.libvirtError):
        if dom.hasCurrentSnapshot(0):
            return dom.snapshotCurrent(0).getName()
    return None


def _create_disk_only(dom, snap, domain_xml, disks) -> str:
    """QEMU's internal snapshot of every disk, between two records in libvirt: first one marked
    ``unfinished``, then the real one. A host lost in between leaves a record cloudops knows how to
    clear (``clear_unfinished``), never an internal snapshot nothing lists."""
    parent = _current_name(dom)
    pending = snapshot_xml(snap, UNFINISHED, domain_xml, memory=False, redefine_state="disk-snapshot", parent=parent)
    try:
        dom.snapshotCreateXML(pending, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE)
    except libvirt.libvirtError as exc:
        if not dom.connect().isAlive():
            raise
        raise CloudopsError(f"libvirt refused the metadata of snapshot {snap} of {dom.name()}: "
                            f"{exc.get_error_message()}") from None
    try:
        quiesced = _disk_snapshot_running(dom, snap, disks)  # all disks or none
    except BaseException:
        with contextlib.suppress(libvirt.libvirtError):
            if dom.connect().isAlive():
                dom.snapshotLookupByName(snap, 0).delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
        raise
    kind = "quiesced" if quiesced else "crash-consistent"
    metadata = snapshot_xml(snap, kind, domain_xml, memory=False, redefine_state="disk-snapshot", parent=parent)
    try:
        dom.snapshotCreateXML(metadata, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE |
                              libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT)
    except libvirt.libvirtError as exc:  # nothing half-made: take the disk snapshots and the record back
        if not dom.connect().isAlive():
            raise  # the host is gone: the unfinished record says what to clear once it answers
        nodes = _node_names(dom, [p for _, p in disks])
        for _, path in disks:
            with contextlib.suppress(Exception):
                _qmp(dom, "blockdev-snapshot-delete-internal-sync", device=nodes[path], name=snap)
        with contextlib.suppress(libvirt.libvirtError):
            dom.snapshotLookupByName(snap, 0).delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
        raise CloudopsError(f"libvirt refused the metadata of snapshot {snap} of {dom.name()}: "
                            f"{exc.get_error_message()}") from None
    return kind


def list_snapshots(name: str, hosts: list) -> SnapshotResult:
    """The snapshots of VM ``name``, parents first."""
    with power._own_vm(name, hosts, "list its snapshots") as (host, _conn, dom):
        found = snapshots_of(dom)
        unfinished = [s.name for s in found if s.consistency == UNFINISHED]
        note = (f" ({', '.join(unfinished)} left unfinished by a lost host: the next vm.snapshot removes it)"
                if unfinished else "")
        return SnapshotResult(vms.describe(dom, host.name), False, "listed",
                              f"{name} on {host.name}: {len(found)} snapshot(s){note}", snapshots=found)


def revert_snapshot(name: str, snap: str, hosts: list, progress=lambda m: None) -> SnapshotResult:
    """Bring back the disk(s) of snapshot ``snap`` (and the running guest, for a memory snapshot)."""
    validate_snapshot_name(snap)
    with power._own_vm(name, hosts, "revert it") as (host, conn, dom), _lost_host(conn, host, name, f"the revert to {snap}"):
        clear_unfinished(dom, host, progress)
        handle = _lookup(dom, name, snap)
        xml = handle.getXMLDesc(0)
        target = parse(xml)
        was_running = bool(dom.isActive())
        kept = []
        if target.state == "disk-snapshot":  # the definition stays: disks added since stay attached
            _revert_disk_only(dom, host, handle, xml, was_running, progress)
        else:
            before = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            flags = libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING if was_running and not target.memory else 0
            progress(f"reverting {name} on {host.name} to {snap}")
            dom.revertToSnapshot(handle, flags)
            kept = reattach_missing(dom, name, before)
        running = bool(dom.isActive())
        how = ("running again from its saved memory" if target.memory else
               "booting from the snapshot's disk" if running else "stopped, with the snapshot's disk")
        also = (f"; disk{'s' if len(kept) > 1 else ''} {', '.join(kept)}, added after the snapshot, attached again "
                "as they are now" if kept else "")
        return SnapshotResult(vms.describe(dom, host.name), True, "reverted",
                              f"{name} on {host.name}: reverted to {snap}, {how}{also}",
                              snapshot=parse(handle.getXMLDesc(0), current=True))


def _revert_disk_only(dom, host, handle, xml, was_running, progress):
    """What libvirt does for an inactive snapshot, for a disk-snapshot it refuses: stop, qemu-img -a, start."""
    snap = handle.getName()
    root = ET.fromstring(xml)
    inner = root.find("domain")
    disks = qcow2_disks(ET.tostring(inner, encoding="unicode")) if inner is not None else qcow2_disks(dom.XMLDesc(0))
    covered = {d.get("name") for d in root.findall("disks/disk") if d.get("snapshot") == "internal"}
    paths = [path for target, path in disks if target in covered]
    if was_running:
        progress(f"stopping {dom.name()} on {host.name} to revert its disk to {snap}")
        dom.destroy()
    with connect(host) as hv:
        for path in paths:
            result = hv.run(f"qemu-img snapshot -a {shlex.quote(snap)} {shlex.quote(path)}", warn=True, hide=True,
                            in_stream=False)
            if not result.ok:
                raise CloudopsError(f"{host.name}: qemu-img could not revert {path} to {snap}: "
                                    f"{(result.stderr.strip().splitlines() or ['?'])[-1]}"
                                    + (" (the VM is left stopped)" if was_running else ""))
    dom.snapshotCreateXML(xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT)
    if was_running:
        progress(f"starting {dom.name()} again from the snapshot's disk")
        dom.create()


def delete_snapshot(name: str, snap: str, hosts: list, progress=lambda m: None) -> SnapshotResult:
    """Delete snapshot ``snap``; its children (if any) keep their data and get its parent as theirs."""
    validate_snapshot_name(snap)
    with power._own_vm(name, hosts, "delete its snapshot") as (host, conn, dom), \
            _lost_host(conn, host, name, f"the deletion of snapshot {snap}"):
        clear_unfinished(dom, host, progress)
        handle = _lookup(dom, name, snap)
        gone = parse(handle.getXMLDesc(0), current=bool(handle.isCurrent()))
        progress(f"deleting snapshot {snap} of {name} on {host.name}")
        handle.delete(0)
        return SnapshotResult(vms.describe(dom, host.name), True, "deleted",
                              f"{name} on {host.name}: snapshot {snap} deleted", snapshot=gone)
