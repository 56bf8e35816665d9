"""Export a cloudops VM: a flattened, self-contained qcow2 of its disk plus a description beside it.

``vm.export NAME FILE`` writes ``FILE`` (qcow2, no backing file: it holds the image's data too)
and ``FILE.json`` (``describe_export``: the disk's virtual size, size and sha256, the image it came
from, its networks and NICs, memory, vCPUs, firmware and the cloudops metadata). How the copy is
consistent:

- **running (or paused) VM**: libvirt's push backup (``virDomainBackupBegin``, a full backup of the
  root disk into a new qcow2 on the VM's host). QEMU copies the disk as it was when the job began
  (copy-before-write), while the guest goes on running and writing to its own file, which never
  changes: nothing to commit back. Between the guest agent's ``fsFreeze``/``fsThaw`` when one
  answers (``quiesced``), else ``crash-consistent`` (as if the power had been cut).
- **stopped VM**: ``qemu-img convert`` of its disk chain on the host, under the VM's name lock, so
  nothing starts it meanwhile (``powered-off``).

The file made on the host (``<disk dir>/<name>.export-<hex>.qcow2``) is checked with ``qemu-img
info`` (no backing file), streamed to this machine through SFTP with a progress bar, checksummed on
the way, and removed from the host whatever happens. Locally the data goes to temporary names
beside ``FILE`` that are renamed into place only once complete, so a failure (a full disk, a host
gone) leaves no partial file; the VM is never touched beyond the backup job. Internal snapshots
(``vm.snapshot``) are not exported: the export is the disk's current state, and says which
snapshots it left out; so are disks other than the root disk.
"""

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shlex
import socket
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import paramiko

from cloudops import atomicfile, virt
from cloudops.compute import power, snapshots, vms
from cloudops.errors import CloudopsError
from cloudops.imaging import store as images
from cloudops.progress import bar_for, no_progress
from cloudops.ssh import connect

FORMAT = "cloudops-export"
VERSION = 1
CHUNK = 1 << 20
STALL = 60  # seconds a read of the host's copy may wait for a byte before the export is given up
BACKUP_TIMEOUT = 3600  # seconds a backup job may run before it is aborted


@dataclass
class ExportResult:
    vm: vms.VM
    path: str
    description: dict
    changed: bool = True
    message: str = ""
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.vm.to_dict(), "changed": self.changed, "file": self.path,
                "description": self.path + ".json", "export": self.description, "message": self.message,
                "notes": self.notes}


def description_path(path) -> Path:
    return Path(str(path) + ".json")


# ---------------------------------------------------------------- facts

def root_disk(domain_xml: str) -> tuple[str, str]:
    """(target, path) of the VM's root disk: vda, else its first writable qcow2 disk."""
    disks = snapshots.qcow2_disks(domain_xml)
    if not disks:
        raise CloudopsError("the VM has no writable qcow2 disk to export")
    return next((d for d in disks if d[0] == "vda"), disks[0])


def other_disks(domain_xml: str, target: str) -> list[str]:
    """Targets of the disks (not CD-ROMs) an export leaves out: every one but the root disk."""
    found = []
    for disk in ET.fromstring(domain_xml).findall("./devices/disk"):
        dev = disk.find("target").get("dev")
        if disk.get("device", "disk") == "disk" and dev != target:
            found.append(dev)
    return found


def backup_xml(domain_xml: str, target: str, out: str) -> str:
    """libvirt's push-backup XML: a full backup of disk ``target`` into a new qcow2 ``out``, no other disk."""
    root = ET.Element("domainbackup", mode="push")
    disks = ET.SubElement(root, "disks")
    for disk in ET.fromstring(domain_xml).findall("./devices/disk"):
        dev = disk.find("target").get("dev")
        if dev == target:
            entry = ET.SubElement(disks, "disk", name=dev, backup="yes", type="file")
            ET.SubElement(entry, "driver", type="qcow2")
            ET.SubElement(entry, "target", file=out)
        else:
            ET.SubElement(disks, "disk", name=dev, backup="no")
    return ET.tostring(root, encoding="unicode")


def parse_qemu_img_info(text: str) -> dict:
    """What an export needs of ``qemu-img info --output=json``: format, virtual size, backing file."""
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        raise CloudopsError("qemu-img info did not print JSON") from None
    return {"format": info.get("format"), "virtual_size": int(info.get("virtual-size") or 0),
            "backing": info.get("backing-filename") or info.get("full-backing-filename")}


def describe_export(vm: vms.VM, meta: dict, firmware: str, disk: dict, image, consistency: str,
                    snapshot_names: list, left_out: list, source_host: str, snapshot: str | None = None) -> dict:
    """The content of ``FILE.json``. ``image`` is the catalog's Image the VM was made from, or None;
    ``snapshot`` the internal snapshot the disk was taken from (None: its state at the export)."""
    return {
        "format": FORMAT, "version": VERSION, "name": vm.name, "exported": int(time.time()),
        "source_host": source_host, "state": vm.state, "consistency": consistency, "snapshot": snapshot,
        "disk": disk,  # {"file", "format", "virtual_size", "size", "sha256"}
        "image": {"id": vm.image, "name": image.name if image else None,
                  "boot": image.boot if image and image.direct_boot else None},
        "memory": vm.memory, "vcpus": vm.vcpus, "firmware": firmware,
        "networks": [nic["network"] for nic in vm.nics], "nics": vm.nics,
        "metadata": meta,
        "not_exported": {"snapshots": snapshot_names, "disks": left_out},
    }


def _image_of(image_id: str | None):
    if not image_id:
        return None
    return next((i for i in images.list_images() if i.id == image_id), None)


# ---------------------------------------------------------------- checks on the target

def check_target(path, force: bool) -> Path:
    """Refuse a target that exists (unless ``force``), is a directory, or whose directory does not exist."""
    path = Path(path)
    desc = description_path(path)
    if path.is_dir():
        raise CloudopsError(f"{path} is a directory: give the export's file name")
    if not path.parent.is_dir():
        raise CloudopsError(f"{path.parent} is not a directory: cannot write {path}")
    if not force:
        for existing in (path, desc):
            if existing.exists() or existing.is_symlink():
                raise CloudopsError(f"{existing} exists: not overwriting it (--force replaces it)")
    return path


def check_free_space(directory: Path, size: int) -> None:
    free = os.statvfs(directory)
    available = free.f_bavail * free.f_frsize
    if available < size:
        raise CloudopsError(f"not enough space in {directory} for the export: it is {_mib(size)}, "
                            f"{_mib(available)} free")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# ---------------------------------------------------------------- on the host

def _wait_backup(dom, progress, timeout: float = BACKUP_TIMEOUT) -> None:
    """Wait for the domain's backup job, its percent on a bar; CloudopsError with libvirt's reason when it failed."""
    deadline = time.monotonic() + timeout
    with bar_for(progress, f"backup of {dom.name()}'s disk on the host", verb=None) as bar:
        while True:
            stats = dom.jobStats(0)
            if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
                break
            bar.update(stats.get("disk_processed") or 0, total=stats.get("disk_total") or None)
            if time.monotonic() > deadline:
                with contextlib.suppress(libvirt.libvirtError):
                    dom.abortJob()
                raise CloudopsError(f"the backup of {dom.name()} did not finish within {timeout:g}s (aborted)")
            time.sleep(0.1)  # a tiny disk is copied in well under a second: poll finely
        done = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        if done.get("type") != libvirt.VIR_DOMAIN_JOB_COMPLETED or not done.get("success", True):
            raise CloudopsError(f"the backup of {dom.name()} failed: {done.get('errmsg') or 'libvirt gave no reason'}")
        bar.update(done.get("disk_processed") or bar.done, total=done.get("disk_total") or bar.total)


def convert_command(disk_path: str, out: str, snapshot: str | None = None, running: bool = False) -> str:
    """The ``qemu-img convert`` that flattens a disk chain (or one internal snapshot of it) into ``out``.

    A snapshot's clusters are never written again (qcow2 copies a cluster shared with a snapshot before
    writing it), so reading them while the VM runs is safe: ``-U`` only lets qemu-img open the file
    QEMU holds; the VM's name lock keeps the snapshot from being deleted meanwhile."""
    share = "-U " if running else ""
    load = f"-l {shlex.quote('snapshot.name=' + snapshot)} " if snapshot else ""
    return f"qemu-img convert {share}{load}-O qcow2 {shlex.quote(disk_path)} {shlex.quote(out)}"


def make_on_host(dom, hv, disk_path: str, target: str, out: str, progress, snapshot=None) -> str:
    """Write the flattened copy ``out`` of disk ``target`` on the VM's host; returns its consistency.

    ``snapshot`` (a ``snapshots.Snapshot``): the disk as that internal snapshot holds it, running VM or not."""
    if snapshot is not None:
        progress(f"converting snapshot {snapshot.name} of {dom.name()}'s disk on the host (qemu-img convert -l)")
        result = hv.run(convert_command(disk_path, out, snapshot.name, running=bool(dom.isActive())),
                        hide=True, warn=True, in_stream=False)
        if not result.ok:
            raise CloudopsError(f"qemu-img convert of snapshot {snapshot.name} failed on {hv.host}: "
                                f"{_first_line(result.stderr)}")
        return snapshot.consistency
    if dom.isActive():
        progress(f"backing up {dom.name()}'s disk {target} on the host (libvirt push backup)")
        xml = backup_xml(dom.XMLDesc(0), target, out)
        frozen = snapshots._freeze(dom)
        try:
            dom.backupBegin(xml, None, 0)  # the backup's point in time is its start: thaw right after
        finally:
            if frozen:
                with contextlib.suppress(libvirt.libvirtError):
                    dom.fsThaw(None, 0)
        try:
            _wait_backup(dom, progress)
        except BaseException:  # interrupted: the job must not go on writing into a file about to be removed
            with contextlib.suppress(libvirt.libvirtError):
                if dom.jobStats(0).get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE:
                    dom.abortJob()
            raise
        return "quiesced" if frozen else "crash-consistent"
    progress(f"converting {dom.name()}'s disk on the host (qemu-img convert of the stopped VM)")
    result = hv.run(convert_command(disk_path, out), hide=True, warn=True, in_stream=False)
    if not result.ok:
        raise CloudopsError(f"qemu-img convert failed on {hv.host}: {_first_line(result.stderr)}")
    return "powered-off"


def _first_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no reason given"


def inspect_on_host(hv, path: str) -> dict:
    """``parse_qemu_img_info`` of a file on the host, plus its size in bytes."""
    result = hv.run(f"qemu-img info --output=json {shlex.quote(path)} && stat -c %s {shlex.quote(path)}",
                    hide=True, warn=True, in_stream=False)
    if not result.ok:
        raise CloudopsError(f"qemu-img info failed on {hv.host}: {_first_line(result.stderr)}")
    text, _, size = result.stdout.strip().rpartition("\n")
    return {**parse_qemu_img_info(text), "size": int(size)}


# ---------------------------------------------------------------- to this machine

def stream(sftp, remote: str, size: int, out, bar) -> str:
    """Copy ``remote`` (``size`` bytes) into the open file ``out`` through SFTP, drawing ``bar`` (a
    ``cloudops.progress.Bar``, whose label names the copy in errors); returns its sha256.

    A short read (the file changed or the host went away) is an error, not a short export."""
    digest = hashlib.sha256()
    done = 0
    bar.start()
    try:
        sftp.get_channel().settimeout(STALL)  # a host gone silent is an error, not a wait without end
        with sftp.open(remote, "rb") as src:
            src.prefetch(size)
            while done < size:
                chunk = src.read(min(CHUNK, size - done))
                if not chunk:
                    break
                out.write(chunk)  # a local write error is an OSError of its own (fetch_to names the file)
                digest.update(chunk)
                done += len(chunk)
                bar.update(done)
    except (EOFError, paramiko.SSHException, socket.error) as exc:
        bar.stop()
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS):
            raise
        reason = str(exc).strip() or type(exc).__name__
        raise CloudopsError(f"{bar.label}: the host stopped answering after {done} of {size} bytes ({reason})") from None
    except BaseException:
        bar.stop()
        raise
    if done != size:
        bar.stop()
        raise CloudopsError(f"{bar.label}: got {done} of {size} bytes")
    bar.finish()
    return digest.hexdigest()


def fetch_to(sftp, remote: str, size: int, tmp: Path, bar, final) -> str:
    """Stream ``remote`` into the new local file ``tmp`` (0600); returns its sha256. On any failure ``tmp``
    is removed; a local write error (a full filesystem) is one line naming ``final``."""
    try:
        with open(tmp, "xb") as local:
            os.fchmod(local.fileno(), 0o600)  # the guest's disk: its secrets too
            return stream(sftp, remote, size, local, bar)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise _write_error(final, exc) from None
        raise


def _write_error(path, exc: OSError) -> CloudopsError:
    why = "the filesystem is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
    return CloudopsError(f"cannot write {path}: {why} (the partial file was removed)")


def _remove_on_host(hv, host, path: str) -> bool:
    """Remove the host's copy, over ``hv`` or else a new connection; False when the host could not be told."""
    for attempt in (lambda: hv, lambda: connect(host)):
        try:
            conn = attempt()
            conn.run(f"rm -f {shlex.quote(path)}", hide=True, in_stream=False, timeout=20)
            return True
        except Exception:  # noqa: BLE001 - the host may be gone: the caller says what is left where
            continue
    return False


def _sweep_earlier_copies(hv, directory: str, name: str, progress) -> None:
    """Remove what an export of ``name`` that lost its host left there (under the VM's name lock: no other
    export of it runs now)."""
    pattern = f"{shlex.quote(directory)}/{shlex.quote(name)}.export-*.qcow2"
    out = hv.run(f"for f in {pattern}; do [ -e \"$f\" ] && rm -f -- \"$f\" && echo \"$f\"; done; true",
                 hide=True, in_stream=False).stdout.split()
    if out:
        progress(f"removed {len(out)} copy(ies) an earlier export of {name} left on the host: {', '.join(out)}")


# ---------------------------------------------------------------- the verb

def export_vm(name: str, path, hosts: list, force: bool = False, progress=no_progress,
              stopped_for: str | None = None, snapshot: str | None = None) -> ExportResult:
    """Write ``path`` (flattened qcow2) and ``path.json`` (its description) of the cloudops VM ``name``.

    ``stopped_for`` (e.g. "clone it"): only a stopped VM, for what that says. ``snapshot``: the disk as
    that internal snapshot holds it instead of its current state (the VM may run: it is not touched)."""
    vms.validate_name(name)
    if snapshot is not None:
        snapshots.validate_snapshot_name(snapshot)
    path = check_target(path, force)
    desc_path = description_path(path)
    with power._own_vm(name, hosts, stopped_for or "export it") as (host, _conn, dom):
        domain_xml = dom.XMLDesc(0)
        target, disk_path = root_disk(domain_xml)
        vm = vms.describe(dom, host.name)
        if vm.state not in ("running", "paused", "shut off"):
            raise CloudopsError(f"VM {name} on {host.name} is {vm.state}: export it running, paused or stopped")
        chosen = snapshots.parse(snapshots._lookup(dom, name, snapshot).getXMLDesc(0)) if snapshot else None
        if chosen is not None and chosen.consistency == snapshots.UNFINISHED:
            raise CloudopsError(f"snapshot {snapshot} of {name} was left unfinished by a lost host: not a copy to "
                                f"trust (the next vm.snapshot {name} removes it)")
        if stopped_for and vm.state != "shut off" and chosen is None:
            raise CloudopsError(f"VM {name} on {host.name} is {vm.state}: stop it first to {stopped_for} "
                                f"(invoke vm.stop {name}), or take it from a snapshot (--snapshot)")
        snapshot_names = [s.name for s in snapshots.snapshots_of(dom)]
        left_out = other_disks(domain_xml, target)
        out = f"{os.path.dirname(disk_path)}/{name}.export-{secrets.token_hex(4)}.qcow2"
        tmp = atomicfile.temp_path(path)
        tmp_desc = atomicfile.temp_path(desc_path)
        with connect(host) as hv:
            _sweep_earlier_copies(hv, os.path.dirname(disk_path), name, progress)
            try:
                consistency = make_on_host(dom, hv, disk_path, target, out, progress, snapshot=chosen)
                info = inspect_on_host(hv, out)
                if info["format"] != "qcow2" or info["backing"]:
                    raise CloudopsError(f"the copy made on {host.name} is not a standalone qcow2 "
                                        f"(format {info['format']}, backing file {info['backing']})")
                check_free_space(path.parent, info["size"])
                bar = bar_for(progress, f"{name}'s disk from {host.name}", info["size"], verb=("copying", "copied"))
                sha256 = fetch_to(hv.sftp(), out, info["size"], tmp, bar, path)
                try:
                    disk = {"file": path.name, "format": "qcow2", "virtual_size": info["virtual_size"],
                            "size": info["size"], "sha256": sha256}
                    description = describe_export(vm, virt.metadata(dom), vms.details(dom)["firmware"], disk,
                                                  _image_of(vm.image), consistency, snapshot_names, left_out,
                                                  host.name, snapshot=snapshot)
                    tmp_desc.write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
                    atomicfile.replace(tmp, path)
                    atomicfile.replace(tmp_desc, desc_path)
                except OSError as exc:
                    raise _write_error(path, exc) from None
            except BaseException as exc:
                for leftover in (tmp, tmp_desc):
                    with contextlib.suppress(OSError):
                        leftover.unlink()
                if not _remove_on_host(hv, host, out) and isinstance(exc, CloudopsError):
                    raise CloudopsError(f"{exc}; the copy made on {host.name} ({out}) could not be removed: the "
                                        f"next vm.export of {name} removes it") from None
                raise
            _remove_on_host(hv, host, out)
        vm = vms.describe(dom, host.name)
    notes = []
    if snapshot:
        snapshot_names = [s for s in snapshot_names if s != snapshot]
    if snapshot_names:
        state = f"snapshot {snapshot}" if snapshot else "the disk's current state"
        notes.append(f"internal snapshots not exported: {', '.join(snapshot_names)} (the export is {state})")
    if left_out:
        notes.append(f"disks not exported: {', '.join(left_out)} (only the root disk {target} is)")
    taken = f"snapshot {snapshot}, " if snapshot else ""
    message = (f"exported {name} from {host.name} ({taken}{consistency}) to {path}: {_mib(disk['size'])}, "
               f"virtual size {_mib(disk['virtual_size'])}, sha256 {disk['sha256'][:12]}...; description {desc_path}")
    return ExportResult(vm, str(path), description, True, message, notes)
