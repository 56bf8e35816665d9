"""VMs on the lab's shared storage: started there, migrated without copying a disk, deleted; bad input makes
nothing; and the disk leases (virtlockd, lockspace on the shared storage) refuse the running disk to another host.

The oracles are outside cloudops: ``virsh domblklist`` on the hosts, ``qemu-img info`` of the overlay,
the files in the lab's shared directory and in the hosts' own pools, a file written inside the guest.
"""

import dataclasses
import fcntl
import hashlib
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from cloudops.compute import vms
from cloudops.errors import CloudopsError
from cloudops.lab import hosts as lab_lib
from cloudops.migration import migrate
from tests.conftest import invoke, one_line_error, run_in_vm

NAME = "t-shared"


@pytest.fixture(autouse=True)
def own_maintenance(no_maintenance):
    """No host of the test lab starts (or stays) in maintenance."""


def virsh(lab, host_name, *args) -> subprocess.CompletedProcess:
    """virsh inside a lab host, on its own libvirtd (not through cloudops)."""
    return subprocess.run([*lab_lib.enter(lab.host(host_name)), "virsh", "-c", "qemu:///system", *args],
                          capture_output=True, text=True, timeout=120)


def blklist(lab, host_name, name) -> list[str]:
    out = virsh(lab, host_name, "domblklist", name).stdout
    return [line.split()[1] for line in out.splitlines()[2:] if len(line.split()) == 2]


def local_disks(lab, host_name, name) -> list[str]:
    """The VM's files in the host's own pool (what a copying migration would have made there)."""
    out = subprocess.run([*lab_lib.enter(lab.host(host_name)), "ls", "/var/lib/cloudops/disks"],
                         capture_output=True, text=True).stdout
    return [n for n in out.split() if n.startswith(f"{name}.") or n.startswith(f"{name}-")]


def with_vars(inventory, host_name, **changes):
    """The inventory with one host's vars changed (None removes a variable)."""
    host = inventory.hosts[host_name]
    new_vars = {k: v for k, v in {**host.vars, **changes}.items() if v is not None}
    return dataclasses.replace(inventory, hosts={**inventory.hosts, host_name: dataclasses.replace(host, vars=new_vars)})


@pytest.fixture
def shared_vm(lab, lab_inventory, tiny_image):
    spec = vms.VMSpec(name=NAME, image="tiny", memory=96, host="hv1", timeout=300, storage="shared")
    vm = vms.start_vm(spec, lab_inventory)
    yield vm
    if vms.find(NAME, lab_inventory.hypervisors())[0]:
        vms.delete_vm(NAME, lab_inventory)


def test_a_shared_vm_migrates_without_copying_and_is_deleted_from_the_shared_path(lab, lab_inventory, shared_vm,
                                                                                   tiny_image):
    shared = Path(lab.dir) / "shared"
    inside = lab_inventory.hosts["hv1"].vars["shared_path"]  # the same path on every host
    assert shared_vm.storage == "shared"
    assert blklist(lab, "hv1", NAME) == [f"{inside}/disks/{NAME}.qcow2", f"{inside}/disks/{NAME}-seed.iso"]
    assert (shared / "images" / tiny_image.filename).is_file()  # the image, reachable from every host
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(shared / "disks" / f"{NAME}.qcow2")],
                          capture_output=True, text=True, check=True).stdout
    assert f'"backing-filename": "{inside}/images/{tiny_image.filename}"' in info
    assert local_disks(lab, "hv1", NAME) == []
    run_in_vm(lab_inventory, NAME, "echo kept-on-shared > /root/mark; sync")

    result = migrate.migrate_vm(NAME, "hv2", lab_inventory, progress=lambda p: None)

    assert result.shared_storage is True and result.mode == "live"
    assert not result.disk_bytes  # no NBD copy: libvirt moved memory only
    assert virsh(lab, "hv1", "domstate", NAME).returncode != 0  # gone from the source
    assert virsh(lab, "hv2", "domstate", NAME).stdout.strip() == "running"
    assert blklist(lab, "hv2", NAME) == [f"{inside}/disks/{NAME}.qcow2", f"{inside}/disks/{NAME}-seed.iso"]
    assert local_disks(lab, "hv2", NAME) == []  # no copy of the disk in hv2's own pool
    assert run_in_vm(lab_inventory, NAME, "cat /root/mark") == "kept-on-shared"
    assert (shared / "disks" / f"{NAME}.qcow2").is_file()  # the source's clean-up left the shared disk alone

    vms.delete_vm(NAME, lab_inventory)  # from hv2, which never started it: its shared pool still finds the files
    assert sorted(p.name for p in (shared / "disks").iterdir() if p.name.startswith(NAME)) == []
    assert (shared / "images" / tiny_image.filename).is_file()  # the shared image stays for the next VM


def test_a_migration_to_a_host_with_another_shared_path_is_refused(lab, lab_inventory, shared_vm):
    other = with_vars(lab_inventory, "hv2", shared_path="/run/cloudops-lab/elsewhere")
    with pytest.raises(CloudopsError, match="hv2's shared_path is /run/cloudops-lab/elsewhere"):
        migrate.migrate_vm(NAME, "hv2", other)
    missing = with_vars(lab_inventory, "hv3", shared_path=None)
    with pytest.raises(CloudopsError, match="host hv3 has no shared_path"):
        migrate.migrate_vm(NAME, "hv3", missing)
    assert virsh(lab, "hv1", "domstate", NAME).stdout.strip() == "running"
    for host in ("hv2", "hv3"):
        assert virsh(lab, host, "domstate", NAME).returncode != 0 and local_disks(lab, host, NAME) == []


def test_bad_storage_input_is_one_line_and_makes_nothing(lab, lab_inventory, tiny_image, tmp_path):
    proc = invoke("vm.start", "--name", "t-badst", "--storage", "nfs", "--no-wait", "--inventory",
                  str(lab.inventory_path))
    one_line_error(proc, "storage must be one of local, shared, got 'nfs'")

    for inventory, message in (
            (with_vars(lab_inventory, "hv1", shared_path=None), "host hv1 has no shared_path"),
            (with_vars(lab_inventory, "hv1", shared_path="/run/cloudops-lab/not-mounted"),
             "hv1: shared path /run/cloudops-lab/not-mounted does not exist")):
        spec = vms.VMSpec(name="t-badst", image="tiny", memory=96, host="hv1", storage="shared", wait=False)
        with pytest.raises(CloudopsError, match=message):
            vms.start_vm(spec, inventory)
        assert vms.find("t-badst", lab_inventory.hypervisors())[0] == []  # no domain anywhere
        assert [p for p in (Path(lab.dir) / "shared").rglob("t-badst*")] == []
        assert local_disks(lab, "hv1", "t-badst") == []


@pytest.fixture
def hv2_own_mount(lab, lab_inventory):
    """hv2 sees the shared disks through a FUSE mount of its own (bindfs), at the same path, as a second machine
    does: the lab's hosts share one kernel, so QEMU's own image locks (OFD locks on the disk's inode) would see
    each other across hosts, which QEMU processes on two real machines do not (a SAN LUN, a file system whose
    locks stay on each client). And libvirt 9.0 takes the leases only when the vCPUs start, after QEMU has opened
    its disks: without this, QEMU's "Failed to get write lock" would answer first and hide whether the lease
    works. The lockspace (``.leases``) stays the common directory."""
    disks = f"{lab_inventory.hosts['hv2'].vars['shared_path']}/disks"
    enter = lab_lib.enter(lab.host("hv2"))
    subprocess.run([*enter, "bindfs", "--no-allow-other", disks, disks], check=True, timeout=30)
    yield
    subprocess.run([*enter, "umount", disks], check=True, timeout=30)


def test_a_second_host_starting_the_running_disk_by_hand_is_refused_by_its_lease(lab, lab_inventory, shared_vm,
                                                                                   hv2_own_mount):
    inside = lab_inventory.hosts["hv1"].vars["shared_path"]
    disk = f"{inside}/disks/{NAME}.qcow2"
    lease = Path(lab.dir) / "shared" / ".leases" / hashlib.sha256(disk.encode()).hexdigest()  # virtlockd's name
    assert lease.is_file(), sorted(p.name for p in lease.parent.iterdir())
    with open(lease, "r+") as held:  # virtlockd on hv1 holds it: this process cannot take it
        with pytest.raises(BlockingIOError):
            fcntl.lockf(held, fcntl.LOCK_EX | fcntl.LOCK_NB)

    # a person copies the VM's definition to hv2 and starts it there (same disk, no NIC, another name)
    root = ET.fromstring(virsh(lab, "hv1", "dumpxml", "--inactive", NAME).stdout)
    root.find("name").text = "t-intruder"
    root.remove(root.find("uuid"))
    root.remove(root.find("metadata"))
    devices = root.find("devices")
    for nic in devices.findall("interface"):
        devices.remove(nic)
    for log in devices.findall("serial/log"):
        log.set("file", "/var/log/libvirt/qemu/t-intruder-console.log")
    defined = subprocess.run([*lab_lib.enter(lab.host("hv2")), "virsh", "-c", "qemu:///system", "define",
                              "/dev/stdin"], input=ET.tostring(root, encoding="unicode"), capture_output=True,
                             text=True, timeout=60)
    assert defined.returncode == 0, defined.stderr
    try:
        started = virsh(lab, "hv2", "start", "t-intruder")
        assert started.returncode != 0
        assert "resource busy" in started.stderr and "Lockspace resource" in started.stderr, started.stderr
        assert "Failed to get" not in started.stderr  # the lease refused it, not QEMU's own image locking
        assert virsh(lab, "hv2", "domstate", "t-intruder").stdout.strip() == "shut off"
    finally:
        virsh(lab, "hv2", "undefine", "t-intruder")
    assert virsh(lab, "hv1", "domstate", NAME).stdout.strip() == "running"
    assert run_in_vm(lab_inventory, NAME, "echo unharmed") == "unharmed"
