"""Snapshot facts and XML, without a hypervisor: names, the disks a snapshot covers, the XML given to libvirt."""

import xml.etree.ElementTree as ET

import pytest

from cloudops.compute import snapshots
from cloudops.errors import CloudopsError

DOMAIN = """<domain type='qemu'><name>vm1</name><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/d/vm1.qcow2'/><target dev='vda'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/d/raw.img'/><target dev='vdb'/></disk>
<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='/d/vm1-seed.iso'/><target dev='hdc'/>
<readonly/></disk></devices></domain>"""


@pytest.mark.parametrize("name", ["s1", "before-upgrade", "v1.2_rc", "A" * 64])
def test_good_snapshot_names(name):
    assert snapshots.validate_snapshot_name(name) == name


@pytest.mark.parametrize("name", ["", "1", "12", "-x", ".x", "a b", "a;rm", "a/b", "A" * 65, None])
def test_bad_snapshot_names_are_refused(name):
    with pytest.raises(CloudopsError, match="invalid snapshot name"):
        snapshots.validate_snapshot_name(name)


def test_only_writable_qcow2_disks_are_covered():
    assert snapshots.qcow2_disks(DOMAIN) == [("vda", "/d/vm1.qcow2")]


def test_disk_only_metadata_names_every_disk_and_carries_the_domain():
    root = ET.fromstring(snapshots.snapshot_xml("s1", "crash-consistent", DOMAIN, memory=False,
                                                redefine_state="disk-snapshot", parent="s0"))
    assert root.findtext("name") == "s1" and root.findtext("state") == "disk-snapshot"
    assert root.findtext("parent/name") == "s0" and root.find("memory").get("snapshot") == "no"
    assert {d.get("name"): d.get("snapshot") for d in root.findall("disks/disk")} == {
        "vda": "internal", "vdb": "no", "hdc": "no"}
    assert root.find("domain/name").text == "vm1"
    parsed = snapshots.parse(ET.tostring(root, encoding="unicode"), current=True)
    assert (parsed.consistency, parsed.memory, parsed.parent, parsed.current) == ("crash-consistent", False, "s0", True)


def test_memory_snapshot_xml_asks_for_internal_memory_and_no_state():
    root = ET.fromstring(snapshots.snapshot_xml("m1", "memory", DOMAIN, memory=True))
    assert root.find("memory").get("snapshot") == "internal" and root.find("state") is None
    assert root.find("domain") is None  # libvirt fills it in when it takes the snapshot itself


def test_user_text_is_escaped_not_markup():
    xml = snapshots.snapshot_xml("s1", "<x>&", DOMAIN, memory=False)
    assert ET.fromstring(xml).findtext("description") == "cloudops: <x>&"


def test_parse_a_snapshot_cloudops_did_not_describe():
    parsed = snapshots.parse("<domainsnapshot><name>old</name><state>running</state>"
                             "<creationTime>5</creationTime></domainsnapshot>")
    assert (parsed.name, parsed.memory, parsed.consistency, parsed.created) == ("old", True, "unknown", 5)
