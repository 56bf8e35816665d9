"""vm.delete and cloud.down delete only domains cloudops made; another is refused, its disks never touched.

libvirt's in-process test driver stands in for a host; its storage volumes are files only it knows."""

from types import SimpleNamespace

import pytest

from cloudops import virt
from cloudops.compute import stack, vms
from cloudops.errors import CloudopsError
from tests.unit.libvirt_fake import libvirt_test_host

DOMAIN = """<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type>hvm</type></os>{metadata}<devices>
<disk type='file' device='disk'><source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
</devices></domain>"""
META = f"<metadata><cloudops:vm xmlns:cloudops='{virt.METADATA_NS}'><cloudops:image>x</cloudops:image></cloudops:vm></metadata>"


@pytest.fixture
def host(monkeypatch, tmp_path):
    conn, hv, inventory = libvirt_test_host(monkeypatch)
    monkeypatch.setattr(vms.guest, "cloud_dir", lambda: tmp_path)
    monkeypatch.setattr(vms.guest, "forget_host_keys", lambda *a: None)
    deleted = []
    monkeypatch.setattr(vms, "_delete_path", lambda _conn, path: deleted.append(path))
    return SimpleNamespace(conn=conn, hv=hv, inventory=inventory, deleted=deleted)


def define(host, name, ours, disk):
    return host.conn.defineXML(DOMAIN.format(name=name, disk=disk, metadata=META if ours else ""))


def test_foreign_domain_is_refused_in_one_line(host):
    define(host, "u-foreign", False, "/srv/foreign.qcow2")
    with pytest.raises(CloudopsError, match="not made by cloudops") as info:
        vms.delete_vm("u-foreign", host.inventory)
    assert "\n" not in str(info.value) and "--force" in str(info.value)
    assert vms.defined_on(host.conn, "u-foreign")
    assert host.deleted == []


def test_force_undefines_a_foreign_domain_but_leaves_its_disks(host):
    define(host, "u-foreign", False, "/srv/foreign.qcow2")
    vms.delete_vm("u-foreign", host.inventory, force=True)
    assert not vms.defined_on(host.conn, "u-foreign")
    assert host.deleted == []


def test_cloudops_domain_loses_only_the_disks_cloudops_made(host):
    dom = define(host, "u-ours", True, "/pool/disks/u-ours.qcow2")
    xml = dom.XMLDesc(0).replace("</devices>", "<disk type='file' device='disk'><source file='/srv/data.img'/>"
                                 "<target dev='vdb' bus='virtio'/></disk></devices>")
    host.conn.defineXML(xml)
    vms.delete_vm("u-ours", host.inventory)
    assert not vms.defined_on(host.conn, "u-ours")
    assert host.deleted == ["/pool/disks/u-ours.qcow2"]


def test_cloud_down_deletes_nothing_when_a_stack_name_is_foreign(host, tmp_path):
    define(host, "u-ours", True, "/pool/disks/u-ours.qcow2")
    define(host, "u-foreign", False, "/srv/foreign.qcow2")
    path = tmp_path / "stack.yaml"
    path.write_text("vms:\n  - {name: u-ours, image: tiny}\n  - {name: u-foreign, image: tiny}\n")
    with pytest.raises(CloudopsError, match="u-foreign.*not made by cloudops"):
        stack.down(stack.load(path), host.inventory)
    assert vms.defined_on(host.conn, "u-ours") and vms.defined_on(host.conn, "u-foreign")
    assert host.deleted == []
