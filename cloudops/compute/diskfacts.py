"""Facts about a VM's disks in its domain XML: the root disk, and the extra disks of ``vm.disk --add``.

An extra disk is cloudops's when both marks are there: its volume is named
``<vm>-disk-<name>.qcow2`` and its device has the user alias ``ua-cloudops-<name>`` (libvirt
keeps user aliases in the persistent definition and through migration). A disk attached by
hand has neither, so ``vm.disk`` and ``vm.delete`` never touch it. Pure functions over XML
text: no libvirt connection here.
"""

import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass

from cloudops.errors import CloudopsError

# Like VM names, but at most 20 characters: the name is also the disk's virtio serial, which
# the guest sees (/sys/block/vdX/serial, /dev/disk/by-id/virtio-<name>), and virtio keeps 20 bytes.
DISK_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,19}$")
ALIAS_PREFIX = "ua-cloudops-"
TARGETS = [f"vd{letter}" for letter in "bcdefghijklmnopqrstuvwxyz"]  # vda is the root disk


@dataclass
class Disk:
    name: str    # the extra disk's name ("root" for the root disk)
    target: str  # vdb, ...
    path: str
    volume: str  # the file name in the pool

    def to_dict(self) -> dict:
        return asdict(self)


def validate_disk_name(name) -> str:
    if not isinstance(name, str) or not DISK_NAME_RE.match(name):
        raise CloudopsError(f"invalid disk name {name!r}: 1-20 of a-z 0-9 -, starting with a letter")
    return name


def volume_name(vm: str, disk: str) -> str:
    """The file an extra disk of VM ``vm`` is kept in, in the VM's pool."""
    return f"{vm}-disk-{disk}.qcow2"


def alias(disk: str) -> str:
    return ALIAS_PREFIX + disk


def _file_disks(xml: str):
    for element in ET.fromstring(xml).findall("./devices/disk"):
        source, target = element.find("source"), element.find("target")
        if element.get("device", "disk") != "disk" or source is None or target is None or not source.get("file"):
            continue
        yield element, source.get("file"), target.get("dev")


def extra_disks(xml: str, vm: str) -> list[Disk]:
    """The extra disks ``vm.disk --add`` gave VM ``vm``, as this domain XML (live or persistent) has them."""
    found = []
    for element, path, target in _file_disks(xml):
        alias_element = element.find("alias")
        name = (alias_element.get("name") or "") if alias_element is not None else ""
        if not name.startswith(ALIAS_PREFIX):
            continue
        name = name[len(ALIAS_PREFIX):]
        if DISK_NAME_RE.match(name) and path.rsplit("/", 1)[-1] == volume_name(vm, name):
            found.append(Disk(name=name, target=target, path=path, volume=volume_name(vm, name)))
    return found


def root_disk(xml: str, vm: str) -> Disk:
    """The VM's root disk: target vda, else its first file disk that is not an extra disk."""
    extra = {d.path for d in extra_disks(xml, vm)}
    candidates = [(target, path) for _e, path, target in _file_disks(xml) if path not in extra]
    for target, path in sorted(candidates, key=lambda c: c[0] != "vda"):
        return Disk(name="root", target=target, path=path, volume=path.rsplit("/", 1)[-1])
    raise CloudopsError(f"VM {vm} has no disk backed by a file: nothing to resize")


def free_target(*xmls: str) -> str:
    """The first virtio target (vdb, vdc, ...) no disk of these definitions (live and persistent) uses."""
    used = {t.get("dev") for xml in xmls for t in ET.fromstring(xml).findall("./devices/disk/target")}
    for target in TARGETS:
        if target not in used:
            return target
    raise CloudopsError("the VM has no free virtio disk target left (vdb-vdz are all in use)")


def device_xml(xml: str, target: str) -> str | None:
    """The <disk> element with ``target`` in this domain XML, as text (what detachDeviceFlags wants)."""
    for element in ET.fromstring(xml).findall("./devices/disk"):
        t = element.find("target")
        if t is not None and t.get("dev") == target:
            return ET.tostring(element, encoding="unicode")
    return None
