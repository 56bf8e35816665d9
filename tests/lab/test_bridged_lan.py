"""VMs on the lab's bridged LAN: static addresses from the seed, reaching each other across hosts, kept through
live migration.

`lab.up` gives every full host a bridge lan0 joined to the lab's LAN switch (like a datacenter VLAN),
and the inventory a bridge-mode network "lan" (no DHCP from libvirt). Two tiny guests, one customized
by the seed ISO and one by libguestfs (the seed's files on its disk), take their addresses statically.
Oracles outside cloudops: `ip -4 addr` and `ping` in the guests, `virsh net-dumpxml` on the hosts
(no DHCP reservation on a bridged network), `virsh domstate` after the migration.
"""

import ipaddress
import json
import shlex

import pytest

from cloudops.compute import vms
from cloudops.net import ipam
from cloudops.ssh import connect
from tests.conftest import cli
from tests.lab.test_vms import leftovers

NAMES = ("t-lan1", "t-lan2")


def in_guest(lab, name, command) -> str:
    proc = cli(lab, "vm.run", name, command)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def on_host(host, command) -> str:
    with connect(host) as hv:
        return hv.run(command, hide=True, in_stream=False).stdout


@pytest.fixture(scope="module")
def lan_vms(lab, lab_inventory, tiny_image):
    started = {}
    try:
        for name, host, way in ((NAMES[0], "hv1", "seed"), (NAMES[1], "hv2", "guestfs")):
            proc = cli(lab, "vm.start", "--name", name, "--network", "lan", "--memory", "96", "--host", host,
                       "--customize", way, "--timeout", "300", "--json")
            assert proc.returncode == 0, proc.stderr
            started[name] = json.loads(proc.stdout)
        yield started
    finally:
        for name in NAMES:
            cli(lab, "vm.delete", name)
        for name in NAMES:
            assert leftovers(lab_inventory, name) == []
            assert ipam.lookup(vms.network_spec("lan", lab_inventory.hosts["hv1"]), name) is None


def test_bridged_vms_have_static_addresses_and_reach_each_other_across_hosts(lab, lab_inventory, lan_vms):
    lan = vms.network_spec("lan", lab_inventory.hosts["hv1"])
    for name, vm in lan_vms.items():
        address = ipaddress.IPv4Address(vm["ip"])
        assert address in lan.network and int(address) - int(lan.network.network_address) >= 100  # past reserved
        assert f"inet {vm['ip']}/24" in in_guest(lab, name, "ip -4 addr show eth0")
        assert f"default via {lan.gateway}" in in_guest(lab, name, "ip route")
    for host in ("hv1", "hv2"):  # libvirt hands out nothing on a bridged network
        assert "<host " not in on_host(lab_inventory.hosts[host], "virsh -c qemu:///system net-dumpxml lan")
    one, two = (lan_vms[n]["ip"] for n in NAMES)
    assert " 0% packet loss" in in_guest(lab, NAMES[0], f"ping -c 2 -W 5 {shlex.quote(two)}")
    assert " 0% packet loss" in in_guest(lab, NAMES[1], f"ping -c 2 -W 5 {shlex.quote(one)}")


def test_a_bridged_vm_migrates_live_and_keeps_its_address_and_its_neighbour(lab, lab_inventory, lan_vms):
    name, ip = NAMES[0], lan_vms[NAMES[0]]["ip"]
    in_guest(lab, name, "echo before-migration > /root/mark")
    proc = cli(lab, "vm.migrate", name, "--to", "hv3", "--json")
    assert proc.returncode == 0, proc.stderr
    assert on_host(lab_inventory.hosts["hv3"], f"virsh -c qemu:///system domstate {name}").strip() == "running"
    assert in_guest(lab, name, "cat /root/mark").strip() == "before-migration"  # the same running guest
    assert f"inet {ip}/24" in in_guest(lab, name, "ip -4 addr show eth0")
    assert " 0% packet loss" in in_guest(lab, NAMES[1], f"ping -c 2 -W 5 {shlex.quote(ip)}")
