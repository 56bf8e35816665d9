"""vm.disk and vm.resize on a real lab, through the CLI, with one tiny VM (96 MiB, room to grow to 160 MiB
and 2 vCPUs).

Oracles are outside cloudops: the guest's own /proc/meminfo, /proc/cpuinfo, /sys/block and df; on
the host, ``ls`` of the pool directory, ``qemu-img info`` and ``virsh domblklist`` / ``dumpxml
--inactive``. The tests run in order on the same VM: refusals first, then live growth, a data disk,
growth beyond the maximum (at the next power-on), a migration, an unplug, an unplug the paused guest
cannot answer, the delete.

What the tiny guest allows: its kernel has ACPI PCI hotplug and CPU hotplug built in, and the image
loads virtio_balloon, so memory, vCPUs and disks change live; its root is ext4 on a partition and it
has no growpart, so the filesystem is grown at its next boot (by its initramfs), not live.
"""

import json
import shlex
import xml.etree.ElementTree as ET

import pytest

from cloudops.compute import vms
from cloudops.errors import NotFound
from cloudops.imaging import store as images
from cloudops.ssh import connect
from tests.conftest import cli, ok_json, one_line_error, run_in_vm

NAME = "dr-vm"
MARK = "cloudops-data-disk-mark"


def where(lab_inventory):
    return vms.locate(NAME, lab_inventory.hypervisors())


def sh(host, command, warn=False) -> str:
    with connect(host) as hv:
        return hv.run(command, hide=True, warn=warn, in_stream=False).stdout


def in_guest(lab_inventory, command) -> str:
    return run_in_vm(lab_inventory, NAME, command)


def mem_total_kib(lab_inventory) -> int:
    return int(in_guest(lab_inventory, "awk '/^MemTotal:/ {print $2}' /proc/meminfo"))


def cpus(lab_inventory) -> int:
    return int(in_guest(lab_inventory, "grep -c ^processor /proc/cpuinfo"))


def guest_disk(lab_inventory, serial: str, present: bool = True) -> str:
    """The guest's block device whose virtio serial is ``serial`` (waiting up to 20 s for a hot-plug or
    unplug to reach it); "" when there is none."""
    want = "-n" if present else "-z"
    script = (f"for i in $(seq 20); do d=''; for b in /sys/block/vd*; do [ \"$(cat $b/serial 2>/dev/null)\" = "
              f"{shlex.quote(serial)} ] && d=${{b##*/}}; done; [ {want} \"$d\" ] && break; sleep 1; done; echo $d")
    return in_guest(lab_inventory, script)


def pool_dir(host) -> str:
    return f"{images.pool_path(host)}/disks"


def files(host) -> set[str]:
    return {n for n in sh(host, f"ls {shlex.quote(pool_dir(host))} 2>/dev/null || true").split()
            if n.startswith(f"{NAME}.") or n.startswith(f"{NAME}-")}


def virsh(host, command) -> str:
    return sh(host, f"virsh -q -c qemu:///system {command}")


def inactive(host) -> ET.Element:
    return ET.fromstring(virsh(host, f"dumpxml --inactive {NAME}"))


@pytest.fixture(scope="module")
def vm(lab, lab_inventory, tiny_image):
    started = vms.start_vm(vms.VMSpec(name=NAME, image="tiny", memory=96, max_memory=160, vcpus=1, max_vcpus=2,
                                      host="hv1", timeout=240), lab_inventory)
    yield started
    try:
        vms.delete_vm(NAME, lab_inventory)
    except NotFound:
        pass


def test_bad_input_is_one_line_and_changes_nothing(lab, lab_inventory, vm):
    host = lab_inventory.hosts["hv1"]
    before = virsh(host, f"dumpxml --inactive {NAME}")
    for args, text in [
        (("vm.disk", NAME, "--add", "--size", "0"), "must be more than 0"),
        (("vm.disk", NAME, "--add", "--size", "lots"), "is not a size like 4G"),
        (("vm.disk", NAME, "--add", "--size", "1G", "--name", "Bad_Name"), "invalid disk name 'Bad_Name'"),
        (("vm.disk", NAME, "--remove", "nope"), "has no disk named 'nope'"),
        (("vm.disk", "dr-nosuch", "--list"), "unknown VM 'dr-nosuch'"),
        (("vm.resize", NAME, "--memory", "112", "--disk-size", "64M"), "shrinking it to 64M is refused"),
        (("vm.resize", NAME, "--memory", "900000"), "of memory free"),
        (("vm.resize", NAME, "--vcpus", "0"), "vCPUs must be a whole number from 1 to 64"),
        (("vm.resize", NAME), "needs --memory, --vcpus or --disk-size"),
    ]:
        one_line_error(cli(lab, *args), text)
    assert virsh(host, f"dumpxml --inactive {NAME}") == before  # the refused memory change was not made either
    assert files(host) == {f"{NAME}.qcow2", f"{NAME}-seed.iso"}


def test_memory_vcpus_and_root_disk_grow_live(lab, lab_inventory, vm):
    host = lab_inventory.hosts["hv1"]
    memory, sectors = mem_total_kib(lab_inventory), int(in_guest(lab_inventory, "cat /sys/block/vda/size"))
    assert cpus(lab_inventory) == 1 and sectors * 512 < 256 << 20
    report = ok_json(cli(lab, "vm.resize", NAME, "--memory", "128", "--vcpus", "2", "--disk-size", "256M", "--json"))
    changes = {c["what"]: c for c in report["changes"]}
    assert report["changed"] and all(changes[w]["live"] for w in ("memory", "vcpus", "disk")), report
    assert abs(mem_total_kib(lab_inventory) - memory - 32 * 1024) <= 1024  # the balloon gave back 32 MiB
    assert cpus(lab_inventory) == 2
    assert int(in_guest(lab_inventory, "cat /sys/block/vda/size")) * 512 == 256 << 20
    assert "2 online in the guest" in changes["vcpus"]["note"]
    assert "no growpart" in changes["disk"]["note"]  # the tiny guest's root is a partition: grown at its next boot
    config = inactive(host)
    vcpu = config.find("vcpu")
    assert int(config.findtext("currentMemory")) == 128 * 1024 and vcpu.get("current", vcpu.text) == "2"
    again = ok_json(cli(lab, "vm.resize", NAME, "--memory", "128", "--vcpus", "2", "--json"))
    assert again["changed"] is False and "nothing to do" in again["message"]


def test_a_data_disk_is_hot_plugged_and_written(lab, lab_inventory, vm):
    host = lab_inventory.hosts["hv1"]
    report = ok_json(cli(lab, "vm.disk", NAME, "--add", "--size", "64M", "--name", "data", "--json"))
    assert (report["changed"], report["action"]) == (True, "attached")
    one_line_error(cli(lab, "vm.disk", NAME, "--add", "--size", "8M", "--name", "data"), "already has a disk named 'data'")
    dev = guest_disk(lab_inventory, "data")
    assert dev and int(in_guest(lab_inventory, f"cat /sys/block/{dev}/size")) * 512 == 64 << 20
    in_guest(lab_inventory, f"printf %s {MARK} | dd of=/dev/{dev} bs=512 conv=sync 2>/dev/null && sync")
    assert in_guest(lab_inventory, f"head -c {len(MARK)} /dev/{dev}") == MARK
    path = f"{pool_dir(host)}/{NAME}-disk-data.qcow2"
    assert files(host) == {f"{NAME}.qcow2", f"{NAME}-seed.iso", f"{NAME}-disk-data.qcow2"}
    info = json.loads(sh(host, f"qemu-img info -U --output=json {shlex.quote(path)}"))
    assert (info["format"], info["virtual-size"]) == ("qcow2", 64 << 20) and "backing-filename" not in info
    assert path in virsh(host, f"domblklist {NAME}")
    listed = ok_json(cli(lab, "vm.disk", NAME, "--list", "--json"))["disks"]
    assert [(d["name"], d["size"], d["attached"], d["path"]) for d in listed] == [
        ("data", "64M", "live and config", path)]


def test_beyond_the_maximum_is_applied_at_the_next_power_on(lab, lab_inventory, vm):
    host = lab_inventory.hosts["hv1"]
    memory = mem_total_kib(lab_inventory)
    root_kib = int(in_guest(lab_inventory, "df -k / | awk 'NR == 2 {print $2}'"))
    report = ok_json(cli(lab, "vm.resize", NAME, "--memory", "176", "--vcpus", "3", "--json"))
    assert all(not c["live"] and "applied at the next boot" in c["note"] for c in report["changes"]), report
    assert mem_total_kib(lab_inventory) == memory and cpus(lab_inventory) == 2  # the running guest: unchanged
    config = inactive(host)
    assert int(config.findtext("memory")) == 176 * 1024 and config.find("vcpu").text == "3"

    assert cli(lab, "vm.stop", NAME).returncode == 0
    assert cli(lab, "vm.poweron", NAME).returncode == 0
    assert mem_total_kib(lab_inventory) - memory >= 40 * 1024  # 48 MiB more than before
    assert cpus(lab_inventory) == 3
    assert int(in_guest(lab_inventory, "df -k / | awk 'NR == 2 {print $2}'")) > root_kib * 3 // 2  # 128M -> 256M
    dev = guest_disk(lab_inventory, "data")  # the data disk is in the definition: back after the power-on
    assert in_guest(lab_inventory, f"head -c {len(MARK)} /dev/{dev}") == MARK


def test_the_data_disk_goes_with_a_live_migration(lab, lab_inventory, vm):
    source, dest = lab_inventory.hosts["hv1"], lab_inventory.hosts["hv2"]
    proc = cli(lab, "vm.migrate", NAME, "--to", "hv2")
    assert proc.returncode == 0, proc.stderr
    assert where(lab_inventory).name == "hv2"
    dev = guest_disk(lab_inventory, "data")
    assert in_guest(lab_inventory, f"head -c {len(MARK)} /dev/{dev}") == MARK
    assert f"{NAME}-disk-data.qcow2" in files(dest) and files(source) == set()
    assert f"{pool_dir(dest)}/{NAME}-disk-data.qcow2" in virsh(dest, f"domblklist {NAME}")


def test_remove_hot_unplugs_the_disk_and_deletes_its_volume(lab, lab_inventory, vm):
    host = lab_inventory.hosts["hv2"]
    added = ok_json(cli(lab, "vm.disk", NAME, "--add", "--size", "16M", "--name", "scratch", "--json"))
    assert added["disk"]["target"] == "vdc"
    assert guest_disk(lab_inventory, "scratch")
    report = ok_json(cli(lab, "vm.disk", NAME, "--remove", "scratch", "--json"))
    assert (report["changed"], report["action"]) == (True, "removed"), report
    assert guest_disk(lab_inventory, "scratch", present=False) == ""
    assert f"{NAME}-disk-scratch.qcow2" not in files(host)
    assert "scratch" not in virsh(host, f"domblklist {NAME}")
    assert "scratch" not in ET.tostring(inactive(host), encoding="unicode")
    one_line_error(cli(lab, "vm.disk", NAME, "--remove", "scratch"), "has no disk named 'scratch' (its extra disks: data)")
    assert guest_disk(lab_inventory, "data")  # the other disk stays


def test_an_unplug_the_guest_does_not_answer_is_said_and_the_volume_kept(lab, lab_inventory, vm):
    host = lab_inventory.hosts["hv2"]
    ok_json(cli(lab, "vm.disk", NAME, "--add", "--size", "8M", "--name", "held", "--json"))
    assert guest_disk(lab_inventory, "held")
    virsh(host, f"suspend {NAME}")  # a paused guest cannot answer the PCI eject
    try:
        report = ok_json(cli(lab, "vm.disk", NAME, "--remove", "held", "--timeout", "2", "--json"))
    finally:
        virsh(host, f"resume {NAME}")
    assert report["action"] == "detached from the config", report
    assert "stays attached until the next boot" in report["message"] and "is kept" in report["message"]
    assert f"{NAME}-disk-held.qcow2" in files(host)
    assert "held" not in ET.tostring(inactive(host), encoding="unicode")
    again = ok_json(cli(lab, "vm.disk", NAME, "--remove", "held", "--json"))  # the guest let go once it ran again
    assert again["changed"] is True and f"{NAME}-disk-held.qcow2" not in files(host), again
    assert guest_disk(lab_inventory, "held", present=False) == ""


def test_delete_removes_the_extra_disks_and_leaves_one_attached_by_hand(lab, lab_inventory, vm):
    host = lab_inventory.hosts["hv2"]
    hand = f"{pool_dir(host)}/dr-hand.qcow2"
    sh(host, f"qemu-img create -q -f qcow2 {hand} 8M && virsh -q -c qemu:///system attach-disk {NAME} {hand} vdz "
             "--subdriver qcow2 --config")
    try:
        proc = cli(lab, "vm.delete", NAME)
        assert proc.returncode == 0, proc.stderr
        assert files(host) == set()
        assert f"{NAME}-disk-data" not in sh(host, "virsh -q -c qemu:///system vol-list cloudops")
        assert sh(host, f"ls {hand}").strip() == hand  # attached by hand: not cloudops's to delete
    finally:
        sh(host, f"rm -f {hand}; virsh -q -c qemu:///system pool-refresh cloudops", warn=True)
