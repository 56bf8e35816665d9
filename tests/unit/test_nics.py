"""Several NICs (``vm.start --network cloudops,lan``): one interface per network in the domain, in order,
and the cloudops metadata that names each one's network, address and MAC, read back through libvirt."""

import subprocess
import xml.etree.ElementTree as ET

import libvirt

from cloudops import virt
from cloudops.compute import vms
from tests.unit.test_firmware import domain_xml

LAN = {"network": "lan", "ip": "10.20.0.100", "mac": "52:54:00:aa:bb:01"}
WEB = {"network": "web", "ip": "192.168.160.7", "mac": "52:54:00:aa:bb:02"}


def test_every_nic_is_an_interface_in_order_and_valid_for_libvirts_schema(tmp_path):
    xml = domain_xml("bios", extra_nics=[LAN, WEB])
    path = tmp_path / "domain.xml"
    path.write_text(xml)
    proc = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    interfaces = ET.fromstring(xml).findall("devices/interface")
    assert [(i.find("source").get("network"), i.find("mac").get("address")) for i in interfaces] == [
        ("cloudops", "52:54:00:00:00:02"), ("lan", LAN["mac"]), ("web", WEB["mac"])]


def test_one_nic_has_no_nics_element():
    assert "nics" not in domain_xml("bios") and len(ET.fromstring(domain_xml("bios")).findall("devices/interface")) == 1


def test_the_nics_come_back_from_libvirts_metadata_the_primary_first():
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(domain_xml("bios", extra_nics=[LAN, WEB]).replace('type="qemu"', 'type="test"', 1))
        try:
            vm = vms.describe(dom, "hv1")
            assert vm.nics == [{"network": "cloudops", "ip": "192.168.150.2", "mac": "52:54:00:00:00:02"}, LAN, WEB]
            assert (vm.network, vm.ip) == ("cloudops", "192.168.150.2")
            assert virt.metadata(dom)["image"] == "ab" * 32  # the flat fields are as before
        finally:
            dom.undefine()
    finally:
        conn.close()
