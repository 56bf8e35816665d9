"""Guests on a bridged LAN (no DHCP from libvirt): a static network-config, the tiny image's parser of it,
IPAM keeping the LAN's likely gateway, libvirt reservations skipped."""

import shutil

import libvirt
import pytest
import yaml

from cloudops.compute import seed, vms
from cloudops.errors import CloudopsError
from cloudops.net import ipam, networks
from tests.unit.tiny_guest import guest_root, seed_apply

needs_busybox = pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox not installed")
MAC = "52:54:00:12:34:56"


def lan(**extra):
    return networks.NetworkSpec(name="lan", mode="bridge", bridge="br0", cidr="10.20.0.0/24", **extra)


def test_static_config_is_the_address_gateway_and_dns_by_mac():
    net = lan(gateway="10.20.0.1", dns=["10.20.0.53"])
    allocation = ipam.Allocation(ip="10.20.0.100", mac=MAC)
    config = vms.guest_network_config(net, allocation)
    eth = config["ethernets"]["eth0"]
    assert eth["match"] == {"macaddress": MAC} and eth["set-name"] == "eth0" and eth["dhcp4"] is False
    assert eth["addresses"] == ["10.20.0.100/24"]
    assert eth["routes"] == [{"to": "default", "via": "10.20.0.1"}]
    assert eth["nameservers"] == {"addresses": ["10.20.0.53"]}
    nat = networks.NetworkSpec(name="web", cidr="192.168.160.0/24")
    assert vms.guest_network_config(nat, allocation) == seed.dhcp_config([MAC])


def test_dns_defaults_to_the_gateway_and_no_gateway_means_no_route():
    assert lan(gateway="10.20.0.1").static_guest_config("10.20.0.7") == {
        "address": "10.20.0.7/24", "gateway": "10.20.0.1", "dns": ["10.20.0.1"]}
    assert lan().static_guest_config("10.20.0.7") == {"address": "10.20.0.7/24"}
    with pytest.raises(CloudopsError, match="dns entries must be IPv4 addresses"):
        lan(dns=["ns1.example"])


def test_ipam_never_hands_out_a_lans_first_address_when_its_gateway_is_not_given():
    assert ipaddress_first(lan()) == "10.20.0.2"
    assert ipaddress_first(lan(gateway="10.20.0.254")) == "10.20.0.1"  # the gateway given is elsewhere


def ipaddress_first(net) -> str:
    return str(net.static_pool()[0])


@needs_busybox
@pytest.mark.parametrize("gateway", ["10.20.0.1", None])
def test_the_tiny_image_reads_the_static_address_and_gateway(tmp_path, gateway):
    root = guest_root(tmp_path)
    net = lan(gateway=gateway) if gateway else lan()
    files = seed.seed_files("vm-7", network_config=vms.guest_network_config(net, ipam.Allocation("10.20.0.100", MAC)))
    proc = seed_apply(tmp_path, files, root)
    assert proc.returncode == 0, proc.stderr
    assert (root / "etc/cloudops/static-net").read_text() == f"eth0 10.20.0.100/24 {gateway or '-'}\n"
    # a later seed with DHCP removes it
    proc = seed_apply(tmp_path, seed.seed_files("vm-7", network_config=seed.dhcp_config([MAC])), root)
    assert proc.returncode == 0 and not (root / "etc/cloudops/static-net").exists()


MAC2 = "52:54:00:65:43:21"


def two_nics(**lan_extra):
    """A VM's primary NIC on a NAT network (DHCP), its second on a bridged LAN (static)."""
    nat = networks.NetworkSpec(name="web", cidr="192.168.160.0/24")
    return vms.nics_network_config([(nat, ipam.Allocation("192.168.160.10", MAC)),
                                    (lan(**lan_extra), ipam.Allocation("10.20.0.100", MAC2))])


def test_each_nic_gets_its_own_config_and_only_the_first_the_default_route():
    config = two_nics(gateway="10.20.0.1")
    assert list(config["ethernets"]) == ["eth0", "eth1"]
    eth0, eth1 = config["ethernets"]["eth0"], config["ethernets"]["eth1"]
    assert eth0 == {"match": {"macaddress": MAC}, "set-name": "eth0", "dhcp4": True}
    assert eth1["match"] == {"macaddress": MAC2} and eth1["set-name"] == "eth1" and eth1["dhcp4"] is False
    assert eth1["addresses"] == ["10.20.0.100/24"] and "routes" not in eth1  # one default route: the primary's
    assert eth1["nameservers"] == {"addresses": ["10.20.0.1"]}


@needs_busybox
def test_the_tiny_image_sets_a_second_nic_statically_and_leaves_the_first_to_dhcp(tmp_path):
    root = guest_root(tmp_path)
    proc = seed_apply(tmp_path, seed.seed_files("vm-7", network_config=two_nics(gateway="10.20.0.1")), root)
    assert proc.returncode == 0, proc.stderr
    assert (root / "etc/cloudops/static-net").read_text() == "eth1 10.20.0.100/24 -\n"


@needs_busybox
def test_the_tiny_image_reads_two_static_nics(tmp_path):
    root = guest_root(tmp_path)
    other = networks.NetworkSpec(name="lan2", mode="bridge", bridge="br1", cidr="10.30.0.0/24", gateway="10.30.0.1")
    config = vms.nics_network_config([(other, ipam.Allocation("10.30.0.5", MAC)),
                                      (lan(gateway="10.20.0.1"), ipam.Allocation("10.20.0.100", MAC2))])
    proc = seed_apply(tmp_path, seed.seed_files("vm-7", network_config=config), root)
    assert proc.returncode == 0, proc.stderr
    assert (root / "etc/cloudops/static-net").read_text() == "eth0 10.30.0.5/24 10.30.0.1\neth1 10.20.0.100/24 -\n"


def test_network_names_are_one_nic_each():
    assert vms.network_names(None) == [None] and vms.network_names("") == [None]
    assert vms.network_names("cloudops, lan") == ["cloudops", "lan"] == vms.network_names(["cloudops", "lan"])
    with pytest.raises(CloudopsError, match="network lan named twice: a VM has one NIC on each network"):
        vms.network_names("lan,cloudops,lan")
    with pytest.raises(CloudopsError, match="one network name, or several separated by commas"):
        vms.network_names("lan,,web")
    with pytest.raises(CloudopsError, match="at most 8 NICs"):
        vms.network_names([f"n{i}" for i in range(9)])


def test_a_domains_nics_come_from_its_metadata_the_primary_first():
    meta = {"network": "cloudops", "ip": "192.168.150.10", "mac": MAC,
            "nics": [{"network": "lan", "ip": "10.20.0.100", "mac": MAC2}]}
    assert vms.nics_of(meta) == [{"network": "cloudops", "ip": "192.168.150.10", "mac": MAC},
                                 {"network": "lan", "ip": "10.20.0.100", "mac": MAC2}]
    assert vms.nics_of({"network": "cloudops", "ip": "", "mac": ""}) == [{"network": "cloudops", "ip": None,
                                                                          "mac": None}]
    assert vms.nics_of({}) == []


@needs_busybox
def test_the_tiny_image_refuses_a_static_address_that_is_not_one(tmp_path):
    root = guest_root(tmp_path)
    bad = {"version": 2, "ethernets": {"eth0": {"dhcp4": False, "addresses": ["10.0.0.5/24; reboot"]}}}
    files = seed.seed_files("vm-7", network_config=bad)
    proc = seed_apply(tmp_path, files, root)
    assert proc.returncode == 1 and "bad static address" in proc.stderr
    assert not (root / "etc/cloudops/static-net").exists()


def test_the_network_config_is_yaml_cloud_init_reads():
    files = seed.seed_files("vm-7", network_config=vms.guest_network_config(lan(gateway="10.20.0.1"),
                                                                            ipam.Allocation("10.20.0.100", MAC)))
    assert yaml.safe_load(files["network-config"])["ethernets"]["eth0"]["addresses"] == ["10.20.0.100/24"]


def test_a_reservation_on_a_bridged_network_is_no_change_not_an_error():
    conn = libvirt.open("test:///default")
    try:
        conn.networkDefineXML(networks.network_xml(lan()))
        changed, message = networks.add_reservation(conn, "lan", MAC, "10.20.0.100", "web1")
        assert changed is False and "is bridged (no DHCP from libvirt): 10.20.0.100 is static in the guest" in message
    finally:
        conn.close()
