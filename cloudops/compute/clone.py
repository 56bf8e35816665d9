"""Clone a cloudops VM: a new VM with the source's disk content and an identity of its own.

``vm.clone SRC NEW [--snapshot SNAP]`` is an export, an identity reset and an import, in that order:

1. ``export.export_vm`` of the stopped source (refused while it runs: a running guest's disk is
   still changing, and its keys would be copied mid-use), or of its internal snapshot ``SNAP``
   (``vm.snapshot``; the source may run: a snapshot's content does not change), into a temporary
   directory of this machine's state directory: a flattened copy made on the source's host and
   streamed here;
2. ``customize.forget_identity`` with libguestfs on that copy: SSH host keys removed (the tiny
   image's dropbear key, OpenSSH's) and the systemd machine id emptied, so the clone makes its own
   at its first boot;
3. ``vms.start_vm`` on the copy (``vmimport.spec_for``), which gives it what every new VM gets: the
   name lock, the scheduler or ``--host``, its own MAC and address from IPAM, a NoCloud seed with its
   name as hostname and a new instance-id (cloud-init sees a new instance), and learns its new host
   key from its console.

The source is not changed and can be powered on again at once; clone and source run side by side.
The temporary copy is removed whatever happens; a failed start undoes itself as any ``vm.start``.
"""

import tempfile
from pathlib import Path

from cloudops import paths
from cloudops.compute import export, snapshots, vmimport, vms
from cloudops.errors import CloudopsError


def clone_vm(source: str, name: str, inventory, host: str | None = None, timeout: float = 180, wait: bool = True,
             progress=lambda m: None, snapshot: str | None = None) -> vms.VM:
    """Start ``name`` as a clone of the stopped cloudops VM ``source`` (or of its snapshot ``snapshot``,
    running or not); returns it once SSH answers."""
    from cloudops.imaging.customize import forget_identity

    vms.validate_name(source)
    vms.validate_name(name)
    if snapshot is not None:
        snapshots.validate_snapshot_name(snapshot)
    if source == name:
        raise CloudopsError(f"a clone needs a name of its own, not {source!r}")
    if host and host not in inventory.hosts:
        raise CloudopsError(f"unknown host {host!r} (inventory {inventory.path}; known: {', '.join(inventory.hosts)})")
    vms._ensure_name_free(name, inventory.hypervisors())  # before the copy; start_vm checks again under the lock
    work = paths.var_dir() / "tmp"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"clone-{name}-", dir=work) as tmp:
        disk = Path(tmp) / f"{name}.qcow2"
        exported = export.export_vm(source, disk, inventory.hypervisors(), progress=progress,
                                    stopped_for="clone it", snapshot=snapshot)
        for note in exported.notes:
            progress(note)
        progress("giving the copy an identity of its own (libguestfs): new SSH host keys and machine id at boot")
        forget_identity(disk, progress)
        data = exported.description
        image = vmimport.image_for(data)
        spec = vmimport.spec_for(data, name, disk, image, host=host, timeout=timeout, wait=wait)
        return vms.start_vm(spec, inventory, progress=progress, image=image)
