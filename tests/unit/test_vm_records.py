"""VM records in the state store: made from a domain's XML and metadata, moved, forgotten, and vm.delete drops one.

libvirt's in-process test driver stands in for a host."""

import pytest

from cloudops import virt
from cloudops.compute import records, vms
from tests.unit.libvirt_fake import libvirt_test_host

DOMAIN = """<domain type='test'><name>{name}</name><memory unit='MiB'>96</memory><vcpu>2</vcpu>
<os><type>hvm</type></os><metadata><cloudops:vm xmlns:cloudops='{ns}'><cloudops:image>x</cloudops:image>
<cloudops:network>cloudops</cloudops:network><cloudops:ip>192.168.150.7</cloudops:ip>
<cloudops:mac>52:54:00:aa:bb:cc</cloudops:mac>{extra}</cloudops:vm></metadata><devices>
<interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/></interface>
</devices></domain>"""


def define(conn, name, extra=""):
    return conn.defineXML(DOMAIN.format(name=name, ns=virt.METADATA_NS, extra=extra))


@pytest.fixture
def host(monkeypatch, tmp_path):
    conn, hv, inventory = libvirt_test_host(monkeypatch)
    monkeypatch.setattr(vms.guest, "cloud_dir", lambda: tmp_path)
    monkeypatch.setattr(vms.guest, "forget_host_keys", lambda *a: None)
    monkeypatch.setattr(vms, "_delete_path", lambda _conn, path: None)
    monkeypatch.setattr(vms.ipam, "release", lambda *a: None)
    monkeypatch.setattr(vms, "network_spec", lambda *a, **k: None)
    return conn, inventory


def test_a_record_holds_what_a_restart_elsewhere_needs(host):
    conn, _inventory = host
    record = records.save_domain(define(conn, "u-rec", "<cloudops:group>web</cloudops:group>"), "hv1")
    stored = records.get("u-rec")
    assert stored == record
    assert (stored["host"], stored["memory_mb"], stored["vcpus"], stored["group"]) == ("hv1", 96, 2, "web")
    assert stored["nics"] == [{"network": "cloudops", "ip": "192.168.150.7", "mac": "52:54:00:aa:bb:cc"}]
    assert "<name>u-rec</name>" in stored["xml"] and "52:54:00:aa:bb:cc" in stored["xml"]
    assert stored["storage"] == "local" and not records.is_shared(stored)


def test_the_storage_kind_comes_from_the_metadata(host):
    conn, _inventory = host
    shared = records.save_domain(define(conn, "u-shared", "<cloudops:storage>shared</cloudops:storage>"), "hv1")
    assert records.is_shared(shared)
    assert not records.is_shared({"storage": "local"}) and not records.is_shared({}) and not records.is_shared(None)


def test_moved_and_on_host(host):
    conn, _inventory = host
    records.save_domain(define(conn, "u-a"), "hv1")
    records.save_domain(define(conn, "u-b"), "hv1")
    records.moved("u-a", "hv2")
    assert [r["name"] for r in records.on_host("hv1")] == ["u-b"]
    assert [r["name"] for r in records.on_host("hv2")] == ["u-a"]
    records.moved("u-none", "hv2")  # a VM without a record gets none
    assert records.get("u-none") is None


def test_vm_delete_forgets_the_record(host):
    conn, inventory = host
    records.save_domain(define(conn, "u-gone"), "hv1")
    vms.delete_vm("u-gone", inventory)
    assert records.get("u-gone") is None and not vms.defined_on(conn, "u-gone")


@pytest.mark.parametrize("unit, amount, mib", [("KiB", 98304, 96), ("MiB", 96, 96), ("GiB", 1, 1024)])
def test_memory_in_any_unit(unit, amount, mib):
    xml = f"<domain><name>u-m</name><memory unit='{unit}'>{amount}</memory><vcpu>1</vcpu></domain>"
    assert records.from_xml(xml, "hv1", {})["memory_mb"] == mib


def test_a_resize_rewrites_the_record(host, monkeypatch):
    from types import SimpleNamespace

    from cloudops.compute import placement, resize

    conn, inventory = host
    monkeypatch.setattr(placement, "host_state", lambda host, down: SimpleNamespace(memory_free_mb=4096))
    records.save_domain(define(conn, "u-grow"), "hv1")
    resize.resize_vm("u-grow", [inventory.hosts["hv1"]], memory=128)
    assert records.get("u-grow")["memory_mb"] == 128
