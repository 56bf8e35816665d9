"""libvirt storage on a host: the cloudops pool for VM disks, qcow2 overlays on images, empty volumes, removal."""

import time
import xml.etree.ElementTree as ET

import libvirt

from cloudops.errors import CloudopsError
from cloudops.templating import render

POOL_NAME = "cloudops"
BUSY_WAIT = 120  # seconds a refresh waits for another process's volume creation on the same pool


def disks_dir(pool_root: str) -> str:
    """Where a host keeps VM disks: ``<pool_path>/disks`` (images live in ``<pool_path>/images``)."""
    return f"{pool_root.rstrip('/')}/disks"


def target_path(pool: libvirt.virStoragePool) -> str:
    """The directory a pool really is (an operator may have defined it elsewhere)."""
    return ET.fromstring(pool.XMLDesc(0)).findtext("target/path")


def ensure_pool(conn: libvirt.virConnect, path: str, name: str = POOL_NAME) -> tuple[libvirt.virStoragePool, bool]:
    """The dir pool at ``path``: defined, built, active and autostarted. Returns (pool, changed)."""
    changed = False
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError:
        try:
            pool = conn.storagePoolDefineXML(render("libvirt/pool.xml.j2", name=name, path=path), 0)
            pool.build(0)
        except libvirt.libvirtError:  # another vm.start on this host defined it a moment ago
            pool = conn.storagePoolLookupByName(name)
        changed = True
    if not pool.isActive():
        _start_pool(pool)
        changed = True
    if not pool.autostart():
        pool.setAutostart(1)
        changed = True
    return pool, changed


def refresh_pool(pool: libvirt.virStoragePool, wait: float = BUSY_WAIT) -> None:
    """Re-read a pool's directory, waiting while another process is creating a volume in it.

    libvirt refuses a refresh while a volume build runs ("pool ... has asynchronous jobs
    running"); with several vm.start on one host at once that is routine, not a failure.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            pool.refresh(0)
            return
        except libvirt.libvirtError as error:
            if not _busy(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _busy(error: libvirt.libvirtError) -> bool:
    return "asynchronous jobs running" in str(error)


def _start_pool(pool: libvirt.virStoragePool, wait: float = BUSY_WAIT) -> None:
    """Start a defined pool; several vm.start on a fresh host race here.

    Another process may have defined the pool and not built its directory yet ("cannot open
    directory"), or be starting it: build it (a directory pool's build is mkdir, harmless when
    it exists) and try again until it is active or ``wait`` runs out."""
    deadline = time.monotonic() + wait
    while True:
        try:
            pool.create(0)
            return
        except libvirt.libvirtError:
            if pool.isActive():  # started by another process meanwhile
                return
            if time.monotonic() > deadline:
                raise
        try:
            pool.build(0)
        except libvirt.libvirtError:
            pass  # built by the other process, or a real failure that the next create reports
        time.sleep(0.2)


def _refuse_existing(pool: libvirt.virStoragePool, name: str) -> None:
    try:
        pool.storageVolLookupByName(name)
    except libvirt.libvirtError:
        return
    raise CloudopsError(f"volume {name} already exists in pool {pool.name()}")


def create_overlay(pool: libvirt.virStoragePool, name: str, backing_path: str, backing_format: str,
                   capacity: int) -> libvirt.virStorageVol:
    """A qcow2 volume backed by an image (copy-on-write); fails if the name exists."""
    _refuse_existing(pool, name)
    xml = render("libvirt/overlay.xml.j2", name=name, capacity=capacity,
                 backing_path=backing_path, backing_format=backing_format)
    return pool.createXML(xml, 0)


def create_volume(pool: libvirt.virStoragePool, name: str, capacity: int,
                  format: str = "qcow2") -> libvirt.virStorageVol:
    """An empty volume (a data disk, or where a migration copies one); fails if the name exists."""
    _refuse_existing(pool, name)
    return pool.createXML(render("libvirt/volume.xml.j2", name=name, capacity=capacity, format=format), 0)


def delete_volume(pool: libvirt.virStoragePool, name: str) -> bool:
    """Delete a volume if present; True when something was deleted."""
    refresh_pool(pool)  # a busy or broken pool is an error here, never "nothing to delete"
    try:
        vol = pool.storageVolLookupByName(name)
    except libvirt.libvirtError:
        return False
    vol.delete(0)
    return True
