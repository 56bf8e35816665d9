"""A VM with two NICs (``vm.start --network cloudops,lan``): one on the host's NAT network (DHCP from
libvirt), one on the lab's bridged LAN (static from the seed), each with its own address, through a
live migration, a stop and power-on, and its deletion.

Oracles outside cloudops: ``ip -4 addr`` in the guest, ``ping`` from another host on the LAN,
``virsh domiflist`` and ``virsh net-dumpxml`` on the hosts.
"""

import json
import shlex

import pytest

from cloudops.compute import vms
from cloudops.net import ipam
from cloudops.ssh import connect
from tests.conftest import cli
from tests.lab.test_vms import leftovers

NAME = "t-nics"


def in_guest(lab, command) -> str:
    proc = cli(lab, "vm.run", NAME, command)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def on_host(host, command, warn=False) -> str:
    with connect(host) as hv:
        return hv.run(command, hide=True, warn=warn, in_stream=False).stdout


def reservations(host, network) -> str:
    """The network's XML on the host (nothing when the host never had that network)."""
    return on_host(host, f"virsh -c qemu:///system net-dumpxml {shlex.quote(network)}", warn=True)


@pytest.fixture(scope="module")
def two_nics(lab, lab_inventory, tiny_image):
    proc = cli(lab, "vm.start", "--name", NAME, "--network", "cloudops,lan", "--memory", "96", "--host", "hv1",
               "--timeout", "300", "--json")
    assert proc.returncode == 0, proc.stderr
    yield json.loads(proc.stdout)
    cli(lab, "vm.delete", NAME)


def test_each_nic_has_its_address_in_the_guest_and_on_its_network(lab, lab_inventory, two_nics):
    primary, second = two_nics["nics"]
    assert (primary["network"], second["network"]) == ("cloudops", "lan")
    assert two_nics["ip"] == primary["ip"] and two_nics["mac"] == primary["mac"]
    hv1 = lab_inventory.hosts["hv1"]
    macs = on_host(hv1, f"virsh -c qemu:///system domiflist {NAME}").lower()
    assert primary["mac"].lower() in macs and second["mac"].lower() in macs
    assert f"inet {primary['ip']}/" in in_guest(lab, "ip -4 addr show eth0")
    assert f"inet {second['ip']}/24" in in_guest(lab, "ip -4 addr show eth1")
    assert primary["mac"].lower() in reservations(hv1, "cloudops").lower()
    # the second NIC is on the LAN: another host reaches it there
    assert " 0% packet loss" in on_host(lab_inventory.hosts["hv2"], f"busybox ping -c 2 -W 5 {shlex.quote(second['ip'])}")
    lan = vms.network_spec("lan", hv1)
    assert ipam.lookup(lan, NAME).ip == second["ip"]


def test_both_nics_go_with_a_live_migration_and_come_back_after_a_power_cycle(lab, lab_inventory, two_nics):
    primary, second = two_nics["nics"]
    in_guest(lab, "echo before-migration > /root/mark")
    proc = cli(lab, "vm.migrate", NAME, "--to", "hv2", "--json")
    assert proc.returncode == 0, proc.stderr
    hv1, hv2 = lab_inventory.hosts["hv1"], lab_inventory.hosts["hv2"]
    assert primary["mac"].lower() in reservations(hv2, "cloudops").lower()
    assert primary["mac"].lower() not in reservations(hv1, "cloudops").lower()
    assert in_guest(lab, "cat /root/mark").strip() == "before-migration"
    assert " 0% packet loss" in on_host(lab_inventory.hosts["hv3"], f"busybox ping -c 2 -W 5 {shlex.quote(second['ip'])}")

    assert cli(lab, "vm.stop", NAME, "--force").returncode == 0
    proc = cli(lab, "vm.poweron", NAME, "--json")
    assert proc.returncode == 0, proc.stderr
    assert f"inet {primary['ip']}/" in in_guest(lab, "ip -4 addr show eth0")
    assert f"inet {second['ip']}/24" in in_guest(lab, "ip -4 addr show eth1")


@pytest.mark.parametrize("networks, says", [
    ("cloudops,cloudops", "network cloudops named twice: a VM has one NIC on each network"),
    ("cloudops,nosuch", "unknown network 'nosuch'"),
])
def test_a_bad_list_of_networks_is_one_line_and_makes_nothing(lab, lab_inventory, tiny_image, networks, says):
    proc = cli(lab, "vm.start", "--name", "t-nics-bad", "--network", networks, "--memory", "96")
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and says in proc.stderr, proc.stderr
    for host in lab_inventory.hypervisors():
        assert on_host(host, "virsh -c qemu:///system list --all --name", warn=True).split().count("t-nics-bad") == 0
    assert leftovers(lab_inventory, "t-nics-bad") == []
    assert ipam.lookup(vms.network_spec("cloudops", lab_inventory.hosts["hv1"]), "t-nics-bad") is None


def test_deleting_the_vm_releases_both_addresses(lab, lab_inventory, two_nics):
    assert cli(lab, "vm.delete", NAME).returncode == 0
    hv = lab_inventory.hosts["hv1"]
    for network in ("cloudops", "lan"):
        assert ipam.lookup(vms.network_spec(network, hv), NAME) is None
    for host in lab_inventory.hypervisors():
        assert two_nics["mac"].lower() not in reservations(host, "cloudops").lower()
    assert leftovers(lab_inventory, NAME) == []
