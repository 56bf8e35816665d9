"""Live migration on a real lab: a running VM moves and does not notice; faults and bad input move nothing.

VM names start with "t" so they never meet a demo VM's. Maintenance state is kept in a
temporary file per test, apart from the developer's and other test runs'.
"""

import json

import libvirt
import pytest

from cloudops import virt
from cloudops.compute import guest, records, vms
from cloudops.errors import CloudopsError
from cloudops.hosts import maintenance
from cloudops.lab import guestload
from cloudops.migration import migrate
from cloudops.ssh import connect
from tests.conftest import invoke, own_inventory, own_lab

WRITER = guestload.start()


# kills and restarts libvirtd: a lab of its own, not the session's
lab = own_lab("m")
lab_inventory = own_inventory()


@pytest.fixture(autouse=True)
def own_maintenance(no_maintenance):
    """No host of the test lab starts (or stays) in maintenance."""


def start(lab_inventory, name, host, memory=96):
    spec = vms.VMSpec(name=name, image="tiny", memory=memory, host=host, timeout=300)
    vm = vms.start_vm(spec, lab_inventory)
    guest.wait_until(lambda: _answers(lab_inventory, name), 180, f"a shell on {name}")  # generous: a loaded 2-core CI
    return vm


def in_vm(lab_inventory, name, command) -> str:
    """Run ``command`` in VM ``name`` through whichever host has it now."""
    host = vms.locate(name, list(lab_inventory.hosts.values()))
    vm = next(v for v in vms.list_on_host(host) if v.name == name)
    with connect(host) as hv, guest.connect_vm(hv, vm.ip) as conn:
        return conn.run(command, hide=True, in_stream=False).stdout.strip()


def holders(lab_inventory, name) -> dict[str, bool]:
    """Host name -> is the VM running there, for every host that has it defined."""
    found = {}
    for host in lab_inventory.hosts.values():
        with virt.open_host(host) as conn:
            try:
                found[host.name] = bool(conn.lookupByName(name).isActive())
            except libvirt.libvirtError:
                pass
    return found


def traces_on(host, name) -> list[str]:
    """What a VM called ``name`` left on ``host``: disks and DHCP reservations."""
    found = []
    with connect(host) as hv:
        out = hv.run("ls /var/lib/cloudops/disks 2>/dev/null || true", hide=True, in_stream=False).stdout
    found += [f"disk {n}" for n in out.split() if n.startswith(f"{name}.") or n.startswith(f"{name}-")]
    with virt.open_host(host) as conn:
        for net in conn.listAllNetworks():
            if f"name='{name}'" in net.XMLDesc(0):
                found.append(f"reservation in {net.name()}")
    return found


@pytest.fixture
def vm_on_hv1(lab, lab_inventory, tiny_image):
    name = "t-mig"
    vm = start(lab_inventory, name, "hv1")
    yield vm
    vms.delete_vm(name, lab_inventory)


def test_live_migration_is_not_noticed_inside_and_back(lab, lab_inventory, vm_on_hv1):
    name, ip = vm_on_hv1.name, vm_on_hv1.ip
    pid = in_vm(lab_inventory, name, "sleep 10000 >/dev/null 2>&1 </dev/null & echo $!")
    uptime_before = float(in_vm(lab_inventory, name, "cut -d' ' -f1 /proc/uptime"))
    in_vm(lab_inventory, name, "echo kept > /root/mark; sync")
    seen = []

    result = migrate.migrate_vm(name, "hv2", lab_inventory, progress=seen.append)

    assert (result.source, result.target, result.mode) == ("hv1", "hv2", "live")
    assert result.shared_storage is False and result.ip == ip
    assert result.downtime_ms is not None and result.bytes_moved > 0
    assert holders(lab_inventory, name) == {"hv2": True}  # defined only on the destination
    assert float(in_vm(lab_inventory, name, "cut -d' ' -f1 /proc/uptime")) > uptime_before  # no reboot
    assert in_vm(lab_inventory, name, f"kill -0 {pid} && echo alive") == "alive"
    assert in_vm(lab_inventory, name, "cat /root/mark") == "kept"  # the disk came along
    assert vms.list_on_host(lab_inventory.hosts["hv2"])[0].ip == ip
    assert traces_on(lab_inventory.hosts["hv1"], name) == []  # disks and reservation left the source
    with virt.open_host(lab_inventory.hosts["hv2"]) as conn:
        assert f"name='{name}'" in conn.networkLookupByName("cloudops").XMLDesc(0)  # the address went along

    # and back, through the CLI
    proc = invoke("vm.migrate", name, "--to", "hv1", "--json", "--inventory", str(lab.inventory_path))
    assert proc.returncode == 0, proc.stderr
    back = json.loads(proc.stdout)
    assert (back["source"], back["target"], back["ip"]) == ("hv2", "hv1", ip)
    assert back["downtime_ms"] is not None and back["bytes_moved"] > 0
    assert holders(lab_inventory, name) == {"hv1": True}
    assert in_vm(lab_inventory, name, f"kill -0 {pid} && echo alive") == "alive"
    assert traces_on(lab_inventory.hosts["hv2"], name) == []
    last = migrate.history()[-1]  # the state store's history, written by the vm.migrate process
    assert (last["name"], last["source"], last["target"]) == (name, "hv2", "hv1")


def test_stopped_vm_migrates_offline(lab, lab_inventory, vm_on_hv1):
    name = vm_on_hv1.name
    vms.stop_vm(name, list(lab_inventory.hosts.values()), timeout=30)
    result = migrate.migrate_vm(name, "hv3", lab_inventory)
    assert result.mode == "offline" and result.bytes_moved > 0
    assert holders(lab_inventory, name) == {"hv3": False}
    assert traces_on(lab_inventory.hosts["hv1"], name) == []
    record = records.get(name)  # what a failover would define: where the VM is now, with its disk there
    with connect(lab_inventory.hosts["hv3"]) as hv:
        disks = hv.run(f"virsh -c qemu:///system domblklist {name} --details", hide=True, in_stream=False).stdout
    source = next(p for p in disks.split() if p.endswith(f"{name}.qcow2"))
    assert record["host"] == "hv3" and f"'{source}'" in record["xml"]
    with virt.open_host(lab_inventory.hosts["hv3"]) as conn:
        conn.lookupByName(name).create()
    guest.wait_until(lambda: _answers(lab_inventory, name), 240, f"SSH on {name} after the offline move")


def _answers(lab_inventory, name):
    try:
        return in_vm(lab_inventory, name, "echo up") == "up"
    except Exception:
        return False


def _nothing_moved(lab_inventory, name, dest):
    assert holders(lab_inventory, name) == {"hv1": True}
    assert traces_on(lab_inventory.hosts[dest], name) == []


def test_timeout_aborts_and_the_vm_keeps_running(lab, lab_inventory, vm_on_hv1):
    name = vm_on_hv1.name
    in_vm(lab_inventory, name, WRITER)
    policy = migrate.Policy(downtime_ms=1, downtime_step_ms=0, downtime_max_ms=1, auto_converge=False,
                            postcopy_after=None, bandwidth_mib=4, timeout=15)
    with pytest.raises(CloudopsError, match="did not complete within 15s: aborted, t-mig keeps running on hv1"):
        migrate.migrate_vm(name, "hv2", lab_inventory, policy=policy)
    _nothing_moved(lab_inventory, name, "hv2")
    assert in_vm(lab_inventory, name, "echo still here") == "still here"


@pytest.mark.parametrize("vm_name, dest, message", [
    ("t-nope", "hv2", "unknown VM 't-nope'"),
    ("t-mig", "hv9", "unknown host 'hv9'"),
    ("t-mig", "hv1", "already on hv1"),
    ("t-mig", "maintenance", "hv2: it is in maintenance"),
    ("t-mig", "small", "hv2: needs 96 MiB"),
    ("t-mig", "no-copy", "on storage hv2 cannot reach, and copying storage was refused"),
])
def test_bad_input_is_one_clear_error_and_nothing_moves(lab, lab_inventory, vm_on_hv1, vm_name, dest, message):
    inventory, copy = lab_inventory, True
    if dest == "maintenance":
        maintenance.set_maintenance("hv2", True)
        dest = "hv2"
    elif dest == "small":  # a capacity override leaves hv2 no room (limit = 300 - 256 MiB reserve)
        import dataclasses

        from cloudops.inventory import Capacity
        small = dataclasses.replace(lab_inventory.hosts["hv2"], capacity=Capacity(memory_mb=300))
        inventory = dataclasses.replace(lab_inventory, hosts={**lab_inventory.hosts, "hv2": small})
        dest = "hv2"
    elif dest == "no-copy":
        dest, copy = "hv2", False
    with pytest.raises(CloudopsError, match=message):
        migrate.migrate_vm(vm_name, dest, inventory, copy_storage=copy)
    if dest in inventory.hosts and dest != "hv1":
        _nothing_moved(lab_inventory, "t-mig", dest)


def test_cli_bad_input_is_one_line(lab, lab_inventory, tiny_image):
    proc = invoke("vm.migrate", "t-nope", "--to", "hv2", "--inventory", str(lab.inventory_path))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["cloudops: unknown VM 't-nope': no host has it"]

