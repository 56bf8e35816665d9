"""Disk leases on hypervisors: libvirt's lockd plugin, virtlockd, and a lockspace on the shared storage.

QEMU's own image locking only sees processes of one host. With ``lock_manager = "lockd"`` in
qemu.conf every disk a domain opens read-write is leased through the host's virtlockd first;
with ``file_lockspace_dir`` on the cloud's shared storage the lease is a file every host sees,
held with fcntl locks, so a second host that starts a running VM's disk (cloudops, a failover
gone wrong, or a person with ``virsh start``) is refused by virtlockd before QEMU runs. The same
files are written by ``deploy`` (its ``leases`` step) and by ``lab.up``.

A lease is named by the disk's path: two hosts that each keep a *different* disk at the same
local path would be refused as if it were one. cloudops's own disks are named by their VM, whose
name is unique in the cloud; disks made by hand at the same local path on two hosts are the
price of the shared lockspace.
"""

from cloudops import hostfiles
from cloudops.templating import render

QEMU_CONF = "/etc/libvirt/qemu.conf"
LOCKD_CONF = "/etc/libvirt/qemu-lockd.conf"
BLOCK = "disk leases"
LOCKSPACE = ".leases"


def lockspace(shared_path: str) -> str:
    """Where every host's leases are: ``<shared_path>/.leases``."""
    return f"{shared_path.rstrip('/')}/{LOCKSPACE}"


def lockd_conf(shared_path: str) -> str:
    return render("deploy/qemu-lockd.conf.j2", lockspace=lockspace(shared_path))


def qemu_conf(text: str | None) -> str:
    """``text`` (qemu.conf) with cloudops's block that turns the lockd plugin on; the rest is the host's."""
    return hostfiles.with_block(text, BLOCK, ['lock_manager = "lockd"'])


def virtlockd_start_command(init: str, configured: str | None) -> str | None:
    """How to start virtlockd: the inventory's ``virtlockd_start``, else the init system's (None: no way)."""
    if configured:
        return configured
    if init == "systemd":
        return "systemctl enable --now virtlockd.socket virtlockd-admin.socket"
    if init == "service":
        return "service virtlockd start"
    return None


def virtlockd_running(conn) -> bool:
    """virtlockd answers on its admin socket (a socket file alone may be left over by a killed daemon)."""
    return conn.run("virt-admin -c virtlockd:///system srv-list", warn=True, hide=True, in_stream=False).ok
