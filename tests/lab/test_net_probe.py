"""Network probes with real packets on the lab's bridges: scapy on the hosts (cloudops/net/packets.py).

One tiny guest on the lab's bridged LAN (hv1) also holds an address cloudops never gave it, as a
machine the cloud does not know would. From hv2, across the lab's LAN switch: ``vm.start --ip`` of
that address is refused by the ARP probe naming the guest's MAC, and nothing is made; ``net.probe``
finds no DHCP server on the bare LAN, the VM under its name and the foreign address as unknown. On
hv1's NAT network it finds libvirt's dnsmasq. Oracles outside cloudops: ``virsh domiflist`` (the
MAC), ``virsh net-dumpxml`` (the NAT network's gateway and range), ``ip link`` on the hosts (no
probe port left behind).
"""

import ipaddress
import json
import shlex
import xml.etree.ElementTree as ET

import pytest
import yaml

from cloudops.compute import vms
from cloudops.net import ipam
from cloudops.ssh import connect
from tests.conftest import cli, invoke, ok_json, one_line_error
from tests.lab.test_vms import leftovers

NAME = "t-probe"


def on_host(host, command) -> str:
    with connect(host) as hv:
        return hv.run(command, hide=True, in_stream=False).stdout


def probe_ports(lab_inventory) -> dict[str, str]:
    """host -> the probe's veth ports still there (``ip -o link``: none once a probe ended)."""
    return {name: on_host(host, "ip -o link | grep -o 'cprb[0-9a-f]*' || true").strip()
            for name, host in lab_inventory.hosts.items()}


@pytest.fixture(scope="module")
def lan(lab_inventory):
    return vms.network_spec("lan", lab_inventory.hosts["hv1"])


@pytest.fixture(scope="module")
def lan_vm(lab, lab_inventory, tiny_image, lan):
    """The VM on the LAN, and an address on its eth0 that IPAM never gave: (vm, foreign address, MAC)."""
    vm = ok_json(cli(lab, "vm.start", "--name", NAME, "--network", "lan", "--memory", "96", "--host", "hv1",
                     "--timeout", "300", "--json"))
    foreign = str(lan.network.broadcast_address - 2)  # in the LAN, far from what IPAM hands out first
    assert ipam.check_address(lan, foreign, "t-any") == foreign  # IPAM would give it: only ARP can tell
    added = cli(lab, "vm.run", NAME, f"ip addr add {foreign}/{lan.prefix} dev eth0")
    assert added.returncode == 0, added.stderr
    iflist = on_host(lab_inventory.hosts["hv1"], f"virsh -q -c qemu:///system domiflist {shlex.quote(NAME)}")
    mac = iflist.split()[4].lower()
    try:
        yield vm, foreign, mac
    finally:
        cli(lab, "vm.delete", NAME)
        assert leftovers(lab_inventory, NAME) == []


def test_an_address_another_machine_holds_is_refused_by_the_arp_probe(lab, lab_inventory, lan, lan_vm):
    _vm, foreign, mac = lan_vm
    proc = cli(lab, "vm.start", "--name", "t-probe2", "--network", "lan", "--ip", foreign, "--memory", "96",
               "--host", "hv2", "--timeout", "300")
    one_line_error(proc, f"address {foreign} on network lan is taken: {mac} answered ARP on hv2's lan0")
    assert leftovers(lab_inventory, "t-probe2") == []
    assert ipam.lookup(lan, "t-probe2") is None  # the allocation was given back
    assert set(probe_ports(lab_inventory).values()) == {""}


def test_net_probe_lists_the_lan_with_no_dhcp_and_the_unknown_address(lab, lab_inventory, lan_vm):
    vm, foreign, mac = lan_vm
    report = ok_json(cli(lab, "net.probe", "--name", "lan", "--hosts", "hv2", "--json"))
    (row,) = report["hosts"]
    assert row["status"] == "ok", row
    found = row["value"]
    assert found["dhcp_servers"] == []  # a bare bridge: libvirt serves no DHCP on a bridged network
    answering = {a["ip"]: a for a in found["answering"]}
    assert answering[vm["ip"]]["known"] == NAME and answering[vm["ip"]]["macs"] == [mac]
    assert answering[foreign]["known"] is None and answering[foreign]["macs"] == [mac]
    assert foreign in [a["ip"] for a in found["unknown"]]  # (other machines of the lab's LAN may be there too)
    assert NAME not in [a["known"] for a in found["unknown"]]
    assert set(probe_ports(lab_inventory).values()) == {""}


def test_net_probe_finds_libvirts_dhcp_on_the_nat_network(lab, lab_inventory):
    assert cli(lab, "net.define", "--hosts", "hv1").returncode == 0  # the inventory's networks, idempotent
    xml = ET.fromstring(on_host(lab_inventory.hosts["hv1"], "virsh -c qemu:///system net-dumpxml cloudops"))
    gateway = xml.find("ip").get("address")
    dhcp_range = xml.find("ip/dhcp/range")
    low, high = (ipaddress.IPv4Address(dhcp_range.get(k)) for k in ("start", "end"))
    report = ok_json(cli(lab, "net.probe", "--name", "cloudops", "--hosts", "hv1", "--json"))
    found = report["hosts"][0]["value"]
    (server,) = found["dhcp_servers"]
    assert server["server"] == gateway and low <= ipaddress.IPv4Address(server["offered"]) <= high, server
    assert {"ip": gateway, "known": "gateway"}.items() <= next(a for a in found["answering"]
                                                                if a["ip"] == gateway).items()


def test_net_probe_bad_input_is_one_line(lab, lab_inventory, tmp_path):
    one_line_error(cli(lab, "net.probe", "--name", "nosuch"), "nosuch")
    one_line_error(cli(lab, "net.probe", "--name", "bad name!"), "bad name!")
    # a network whose bridge this host lacks: that host fails, with the reason, and the exit is non-zero
    inventory = yaml.safe_load(lab.inventory_path.read_text())
    inventory["vars"]["networks"].append({"name": "ghost", "mode": "bridge", "bridge": "nobr0",
                                          "cidr": "10.254.9.0/24"})
    ghost = tmp_path / "inventory.yaml"
    ghost.write_text(yaml.safe_dump(inventory))
    proc = invoke("net.probe", "--name", "ghost", "--hosts", "hv1", "--inventory", str(ghost))
    assert proc.returncode != 0
    assert "no bridge nobr0 on this host" in proc.stdout and "Traceback" not in proc.stderr + proc.stdout
    assert set(probe_ports(lab_inventory).values()) == {""}


def test_vm_info_finds_a_guests_address_from_its_mac_by_arp(lab, lab_inventory, lan, lan_vm):
    """Last in this module: it takes the foreign address off the guest."""
    from cloudops import virt

    vm, foreign, mac = lan_vm
    info = ok_json(cli(lab, "vm.info", NAME, "--arp", "--json"))
    assert info["nics"][0]["mac"] == mac
    assert info["nics"][0]["seen"] == sorted([vm["ip"], foreign], key=ipaddress.IPv4Address)  # both its MAC's
    # A guest whose address cloudops does not know (a LAN's own DHCP server gave it one): its domain's
    # cloudops metadata without the address (virsh), the foreign address gone from the guest.
    hv1 = lab_inventory.hosts["hv1"]
    assert cli(lab, "vm.run", NAME, f"ip addr del {foreign}/{lan.prefix} dev eth0").returncode == 0
    virsh = f"virsh -c qemu:///system metadata {shlex.quote(NAME)} {shlex.quote(virt.METADATA_NS)}"
    original = on_host(hv1, virsh).strip()
    unknown = original.replace(f">{vm['ip']}</", "></")
    assert unknown != original
    on_host(hv1, f"{virsh} --key cloudops --live --config --set {shlex.quote(unknown)}")
    try:
        info = ok_json(cli(lab, "vm.info", NAME, "--json"))  # no --arp: an unknown address is looked for anyway
        assert info["ip"] == vm["ip"] and info["nics"][0]["ip_from"] == "arp" and info["nics"][0]["seen"] == [vm["ip"]]
        assert f"answers ARP for: {vm['ip']}" in cli(lab, "vm.info", NAME).stdout
    finally:
        on_host(hv1, f"{virsh} --key cloudops --live --config --set {shlex.quote(original)}")
    assert ok_json(cli(lab, "vm.info", NAME, "--json")).get("nics")[0].get("ip_from") is None  # known again
