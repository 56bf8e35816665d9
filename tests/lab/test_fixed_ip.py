"""vm.start --ip and networks from net.define, through the real CLI on the lab: the tiny guest has exactly the address
it asked for (ip -4 addr in the guest, the DHCP reservation in virsh net-dumpxml on its host), every bad --ip and an
unknown network is one line with nothing left anywhere, and a network made with net.define on one host and absent
from the inventory carries a VM started on another host, and goes with it when it migrates to a third.

VM names start with "ti" so they never meet another test's.
"""

import ipaddress
import json
import xml.etree.ElementTree as ET

from cloudops.compute import vms
from cloudops.net import ipam, networks
from cloudops.ssh import connect
from tests.conftest import invoke
from tests.lab.test_vms import leftovers

ASKED = "192.168.150.77"  # the lab's cloudops network: gateway .1, DHCP range .128-.254


def dumpxml(lab_inventory, host: str, network: str) -> ET.Element:
    with connect(lab_inventory.hosts[host]) as hv:
        out = hv.run(f"virsh -c qemu:///system net-dumpxml {network}", hide=True, in_stream=False).stdout
    return ET.fromstring(out)


def guest_addresses(lab, name: str) -> list[ipaddress.IPv4Interface]:
    run = invoke("vm.run", name, "ip -4 addr", "--inventory", str(lab.inventory_path))
    assert run.returncode == 0, run.stderr
    return [ipaddress.IPv4Interface(line.split()[1]) for line in run.stdout.splitlines()
            if line.strip().startswith("inet ") and not line.split()[1].startswith("127.")]


def test_a_vm_gets_the_address_it_asked_for_and_bad_ones_are_one_line(lab, lab_inventory, tiny_image):
    inv = ("--inventory", str(lab.inventory_path))
    name = "ti-fixed"
    proc = invoke("vm.start", "--name", name, "--memory", "96", "--host", "hv1", "--ip", ASKED, "--timeout", "300",
                  "--json", *inv)
    try:
        assert proc.returncode == 0, proc.stderr
        started = json.loads(proc.stdout)
        assert (started["host"], started["ip"]) == ("hv1", ASKED)
        assert guest_addresses(lab, name) == [ipaddress.IPv4Interface(f"{ASKED}/24")]
        hosts = {(h.get("name"), h.get("ip"), h.get("mac")) for h in dumpxml(lab_inventory, "hv1", "cloudops")
                 .findall("ip/dhcp/host")}
        assert (name, ASKED, started["mac"]) in hosts
        dry = invoke("vm.start", "--name", "ti-dry", "--ip", "192.168.150.78", "--dry-run", "--json", *inv)
        assert dry.returncode == 0 and json.loads(dry.stdout)["ip"] == "192.168.150.78", dry.stderr

        for ip, message in [
            ("192.168.150", "ip '192.168.150' is not an IPv4 address"),
            ("10.1.2.3", "address 10.1.2.3 for ti-bad is outside network cloudops (192.168.150.0/24)"),
            ("192.168.150.0", "is the network address of network cloudops"),
            ("192.168.150.255", "is the broadcast address of network cloudops"),
            ("192.168.150.1", "address 192.168.150.1 for ti-bad is the gateway of network cloudops"),
            ("192.168.150.200", "is in the DHCP range 192.168.150.128-192.168.150.254 of network cloudops"),
            (ASKED, f"address {ASKED} for ti-bad is already allocated to VM {name} on network cloudops"),
        ]:
            bad = invoke("vm.start", "--name", "ti-bad", "--memory", "96", "--ip", ip, *inv)
            lines = bad.stderr.strip().splitlines()
            assert bad.returncode != 0 and len(lines) == 1, bad.stderr
            assert message in lines[0], lines[0]
            assert leftovers(lab_inventory, "ti-bad") == []
        bad = invoke("vm.start", "--name", "ti-bad", "--memory", "96", "--network", "nosuch", *inv)
        assert bad.returncode != 0 and bad.stderr.strip() == (
            "cloudops: unknown network 'nosuch': not in the inventory's networks (cloudops, lan) nor defined on "
            "hv1, hv2, hv3"), bad.stderr
        assert leftovers(lab_inventory, "ti-bad") == []
    finally:
        vms.delete_vm(name, lab_inventory)
    assert leftovers(lab_inventory, name) == []


def test_a_network_from_net_define_is_usable_by_vm_start(lab, lab_inventory, tiny_image):
    inv = ("--inventory", str(lab.inventory_path))
    name, net, cidr = "ti-lan", "tilan", "192.168.171.0/24"
    made = invoke("net.define", "--name", net, "--cidr", cidr, "--hosts", "hv2", *inv)
    assert made.returncode == 0, made.stdout + made.stderr
    try:
        # defined on hv2 only, not in the inventory; the VM goes to hv3, which gets the same network
        proc = invoke("vm.start", "--name", name, "--memory", "96", "--host", "hv3", "--network", net,
                      "--timeout", "300", "--json", *inv)
        try:
            assert proc.returncode == 0, proc.stderr
            started = json.loads(proc.stdout)
            assert started["network"] == net and ipaddress.IPv4Address(started["ip"]) in ipaddress.IPv4Network(cidr)
            assert guest_addresses(lab, name) == [ipaddress.IPv4Interface(f"{started['ip']}/24")]
            on2, on3 = (networks.owned(dumpxml(lab_inventory, h, net)) for h in ("hv2", "hv3"))
            assert on3 == on2 and on2["gateway"] == "192.168.171.1"  # one network, as hv2 defined it
            spec = networks.NetworkSpec(name=net, cidr=cidr)
            assert ipam.lookup(spec, name).ip == started["ip"]
            # live-migrated to hv1, which lacks the network: it is defined there as the source has it, same address
            moved = invoke("vm.migrate", name, "--to", "hv1", "--json", *inv)
            assert moved.returncode == 0, moved.stderr
            assert (json.loads(moved.stdout)["target"], json.loads(moved.stdout)["ip"]) == ("hv1", started["ip"])
            assert networks.owned(dumpxml(lab_inventory, "hv1", net)) == on2
            assert guest_addresses(lab, name) == [ipaddress.IPv4Interface(f"{started['ip']}/24")]
        finally:
            gone = invoke("vm.delete", name, *inv)
            assert gone.returncode == 0, gone.stderr
        assert ipam.lookup(networks.NetworkSpec(name=net, cidr=cidr), name) is None
        assert leftovers(lab_inventory, name) == []
    finally:
        deleted = invoke("net.delete", "--name", net, *inv)
        assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    for host in lab_inventory.hosts.values():
        with connect(host) as hv:
            listed = hv.run("virsh -c qemu:///system net-list --all --name", hide=True, in_stream=False).stdout
        assert net not in listed.split(), host.name
