"""Images, customization and the VM lifecycle on a real lab: real libvirtd, QEMU (TCG), libguestfs.

The tiny image is built once per session (cached by recipe hash) and added to the store.
VM names start with "t" so they never meet a demo VM's.
"""

import json
import shlex
import threading
from pathlib import Path

import pytest

from cloudops import passwords, virt
from cloudops.compute import guest, vms
from cloudops.errors import CloudopsError
from cloudops.imaging import store as images
from cloudops.net import ipam
from cloudops.ssh import connect
from tests.conftest import invoke

PASSWORD = "correct horse battery staple"


def leftovers(lab_inventory, name: str) -> list[str]:
    """Everything a VM called ``name`` could have left behind, on every host and in IPAM."""
    found = []
    for host in lab_inventory.hosts.values():
        with virt.open_host(host) as conn:
            if name in [d.name() for d in conn.listAllDomains()]:
                found.append(f"domain on {host.name}")
            for net in conn.listAllNetworks():
                if f"name='{name}'" in net.XMLDesc(0):
                    found.append(f"reservation in {net.name()} on {host.name}")
        with connect(host) as hv:
            out = hv.run(f"ls {images.pool_path(host)}/disks 2>/dev/null || true", hide=True, in_stream=False).stdout
            found += [f"disk {n} on {host.name}" for n in out.split() if n.startswith(f"{name}.") or n.startswith(f"{name}-")]
    net = vms.network_spec(None, next(iter(lab_inventory.hosts.values())))
    if ipam.lookup(net, name):
        found.append("IPAM allocation")
    return found


def ssh_vm(lab_inventory, vm, key, command):
    host = lab_inventory.hosts[vm.host]
    with connect(host) as hv, guest.connect_vm(hv, vm.ip, key=key) as conn:
        return conn.run(command, hide=True, in_stream=False).stdout


@pytest.mark.parametrize("way, host", [("seed", "hv1"), ("guestfs", "hv2")])
def test_vm_lifecycle_both_ways_of_customization(lab, lab_inventory, tiny_image, user_key, way, host):
    name = f"t-{way}"
    spec = vms.VMSpec(name=name, image="tiny", memory=128, host=host, root_password=PASSWORD,
                      ssh_keys=(Path(f"{user_key}.pub").read_text().strip(),), hostname=f"{name}-box",
                      customize=way, timeout=240)
    vm = vms.start_vm(spec, lab_inventory)
    try:
        assert (vm.host, vm.state) == (host, "running")
        assert vm.ip and vm.ip.startswith("192.168.150.")
        # SSH with the user's own key, through the hypervisor, host key verified from the console
        out = ssh_vm(lab_inventory, vm, user_key, "hostname; grep '^root:' /etc/shadow")
        hostname, shadow = out.split("\n", 1)
        assert hostname == f"{name}-box"
        root_hash = shadow.split(":")[1]
        assert root_hash.startswith("$6$") and passwords.verify(PASSWORD, root_hash)
        assert not passwords.verify("wrong password", root_hash)
        # listed from every host, with its address
        proc = invoke("vm.list", "--inventory", str(lab.inventory_path), "--json")
        assert proc.returncode == 0, proc.stderr
        listed = {v["name"]: v for v in json.loads(proc.stdout)["vms"]}
        assert listed[name]["host"] == host and listed[name]["ip"] == vm.ip
        # the password is nowhere on the hypervisor's disk outside the guest
        with connect(lab_inventory.hosts[host]) as hv:
            grep = hv.run(f"grep -rlF {shlex.quote(PASSWORD)} /var/lib/cloudops /var/log /etc/libvirt /run 2>/dev/null || true",
                          hide=True, in_stream=False)
        assert grep.stdout.strip() == ""
        stopped, changed = vms.stop_vm(name, list(lab_inventory.hosts.values()), timeout=60)
        assert changed and stopped.state == "shut off"
        assert vms.stop_vm(name, list(lab_inventory.hosts.values()))[1] is False
    finally:
        vms.delete_vm(name, lab_inventory)
    assert leftovers(lab_inventory, name) == []


@pytest.mark.parametrize("name", ["a<b>", "x';rm -rf /;'", "$(reboot)", "UPPER", "a" * 41, "-lead", ""])
def test_bad_vm_names_are_refused_before_anything_is_made(lab, lab_inventory, tiny_image, name):
    with pytest.raises(CloudopsError, match="invalid VM name"):
        vms.start_vm(vms.VMSpec(name=name, image="tiny"), lab_inventory)


@pytest.mark.parametrize("field, value, message", [
    ("memory", 0, "memory"), ("memory", 10**9, "memory"), ("vcpus", 0, "vCPUs"), ("vcpus", 999, "vCPUs"),
    ("image", "no-such-image", "unknown image"), ("network", "nonet", "unknown network"),
    ("host", "hv9", "unknown host"), ("memory", 900000, "no host can take"),
    ("customize", "magic", "customize must be"),
])
def test_bad_vm_input_is_one_clear_error_and_leaves_nothing(lab, lab_inventory, tiny_image, field, value, message):
    spec = vms.VMSpec(**{"name": "t-bad", "image": "tiny", field: value})
    with pytest.raises(CloudopsError, match=message):
        vms.start_vm(spec, lab_inventory)
    assert leftovers(lab_inventory, "t-bad") == []


def test_cli_bad_input_is_one_line(lab, tiny_image):
    proc = invoke("vm.start", "--name", "t<x>", "--inventory", str(lab.inventory_path))
    assert proc.returncode != 0
    assert "invalid VM name" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_not_a_disk_image_is_refused(tmp_path):
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\x01\x02 definitely not a disk" * 1000)
    with pytest.raises(CloudopsError, match="not a disk image"):
        images.add_image(junk, name="junk")
    assert all(i.name != "junk" for i in images.list_images())


def test_name_taken_also_when_two_start_at_the_same_moment(lab, lab_inventory, tiny_image):
    name = "t-race"
    args = ["vm.start", "--name", name, "--no-wait", "--inventory", str(lab.inventory_path)]
    procs = []
    barrier = threading.Barrier(2)

    def go():
        barrier.wait()
        procs.append(invoke(*args))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        codes = sorted(p.returncode for p in procs)
        assert codes[0] == 0 and codes[1] != 0, [p.stderr for p in procs]
        loser = next(p for p in procs if p.returncode != 0)
        assert "already exists" in loser.stderr or "being changed by another" in loser.stderr
        # and a later third attempt is refused with the holder named
        third = invoke(*args)
        assert third.returncode != 0 and "already exists on hv" in third.stderr
        domains = [d for h in lab_inventory.hosts.values() for d in vms.list_on_host(h) if d.name == name]
        assert len(domains) == 1
    finally:
        vms.delete_vm(name, lab_inventory)
    assert leftovers(lab_inventory, name) == []


def test_image_in_use_cannot_be_removed(lab, lab_inventory, tiny_image):
    name = "t-user"
    vms.start_vm(vms.VMSpec(name=name, image="tiny", host="hv1", wait=False), lab_inventory)
    try:
        in_use = {}
        for host in lab_inventory.hosts.values():
            for vm in vms.list_on_host(host):
                in_use.setdefault(vm.image, []).append(vm.name)
        with pytest.raises(CloudopsError, match="used by VM"):
            images.remove_image("tiny", list(lab_inventory.hosts.values()), in_use)
        assert images.resolve("tiny").id == tiny_image.id
    finally:
        vms.delete_vm(name, lab_inventory)


def test_cloud_up_twice_changes_nothing_the_second_time(lab, tiny_image, tmp_path, lab_inventory):
    stack = tmp_path / "stack.yaml"
    stack.write_text("networks:\n  - {name: tnet, mode: nat, cidr: 192.168.171.0/24}\n"
                     "vms:\n  - {name: t-stack, image: tiny, memory: 96, network: tnet}\n")
    inv = ["--inventory", str(lab.inventory_path)]
    try:
        first = invoke("cloud.up", str(stack), *inv, "--json")
        assert first.returncode == 0, first.stderr
        assert json.loads(first.stdout)["changed"] is True
        second = invoke("cloud.up", str(stack), *inv, "--json")
        assert second.returncode == 0, second.stderr
        report = json.loads(second.stdout)
        assert report["changed"] is False and report["changes"] == []
        assert any("t-stack" in line for line in report["unchanged"])
    finally:
        down = invoke("cloud.down", str(stack), *inv)
        assert down.returncode == 0, down.stderr
    assert leftovers(lab_inventory, "t-stack") == []
    for host in lab_inventory.hosts.values():
        with virt.open_host(host) as conn:
            assert "tnet" not in [n.name() for n in conn.listAllNetworks()]
