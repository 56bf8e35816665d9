"""vm.disk: which disks are a VM's extra disks, names and sizes refused, and what --add/--remove undo or keep.

Pure XML facts (cloudops/compute/diskfacts.py), plus libvirt's in-process test driver as a host
for the refusals and the undo (it cannot hot-plug: the real attach, unplug and migration are
tested on the lab, tests/lab/test_disks_resize.py)."""

import contextlib
from types import SimpleNamespace

import libvirt
import pytest

from cloudops import storage, virt
from cloudops.compute import diskfacts, disks, power, vms
from cloudops.errors import CloudopsError
from cloudops.templating import render
from tests.unit.libvirt_fake import pool_test_host

META = f"<metadata><cloudops:vm xmlns:cloudops='{virt.METADATA_NS}'><cloudops:image>x</cloudops:image></cloudops:vm></metadata>"
DISK = "<disk type='file' device='disk'><source file='{path}'/><target dev='{target}' bus='virtio'/>{alias}</disk>"


def domain(name, *extra, pool="/default-pool"):
    devices = DISK.format(path=f"{pool}/{name}.qcow2", target="vda", alias="") + "".join(extra)
    return (f"<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            f"<os><type>hvm</type></os>{META}<devices>{devices}</devices></domain>")


def extra(vm, disk, target, pool="/default-pool", alias=None):
    alias = diskfacts.alias(disk) if alias is None else alias
    return DISK.format(path=f"{pool}/{diskfacts.volume_name(vm, disk)}", target=target,
                       alias=f"<alias name='{alias}'/>" if alias else "")


# ---------------------------------------------------------------- facts

@pytest.mark.parametrize("name", ["", "Data", "1data", "da ta", "data;rm", "a" * 21, "../x", None, 3])
def test_bad_disk_names_are_refused_in_one_line(name):
    with pytest.raises(CloudopsError, match="invalid disk name") as info:
        diskfacts.validate_disk_name(name)
    assert "\n" not in str(info.value)


def test_an_extra_disk_needs_both_its_alias_and_its_volume_name():
    xml = domain("web1", extra("web1", "data", "vdb"),
                 extra("web1", "hand", "vdc", alias=""),                      # attached by hand: no alias
                 extra("other", "logs", "vdd", alias=diskfacts.alias("logs")),  # the alias, another VM's file name
                 DISK.format(path="/srv/web1-disk-x.qcow2", target="vde", alias="<alias name='ua-cloudops-y'/>"))
    assert [(d.name, d.target, d.volume) for d in diskfacts.extra_disks(xml, "web1")] == [
        ("data", "vdb", "web1-disk-data.qcow2")]
    assert diskfacts.root_disk(xml, "web1").path == "/default-pool/web1.qcow2"
    assert diskfacts.free_target(xml) == "vdf"
    assert diskfacts.free_target(domain("web1")) == "vdb"


def test_the_disk_device_is_a_virtio_disk_with_its_serial_and_alias():
    import xml.etree.ElementTree as ET

    xml = render("libvirt/disk.xml.j2", path="/p/web1-disk-data.qcow2", target="vdb", name="data",
                 alias=diskfacts.alias("data"))
    disk = ET.fromstring(xml)
    assert disk.find("target").attrib == {"dev": "vdb", "bus": "virtio"}
    assert disk.findtext("serial") == "data" and disk.find("alias").get("name") == "ua-cloudops-data"
    assert [d.name for d in diskfacts.extra_disks(f"<domain><devices>{xml}</devices></domain>", "web1")] == ["data"]


# ---------------------------------------------------------------- on the test driver

@pytest.fixture
def host(monkeypatch):
    conn, hv, inventory, pool = pool_test_host(monkeypatch)
    monkeypatch.setattr(storage, "refresh_pool", lambda pool, wait=0: None)
    return SimpleNamespace(conn=conn, hv=hv, inventory=inventory, hosts=[hv], pool=pool)


@pytest.mark.parametrize("size, why", [("0", "more than 0"), ("lots", "not a size"), ("-1G", "not a size"),
                                       (None, "needs --size")])
def test_a_bad_size_is_refused_before_any_host_is_asked(host, size, why):
    with pytest.raises(CloudopsError, match=why):
        disks.add_disk("u-nohost", host.hosts, size)


def test_a_taken_disk_name_is_refused_and_nothing_is_made(host):
    volume(host, "u-web.qcow2")
    host.conn.defineXML(domain("u-web", extra("u-web", "data", "vdb")))
    with pytest.raises(CloudopsError, match="already has a disk named 'data'"):
        disks.add_disk("u-web", host.hosts, "1G", name="data")
    assert "u-web-disk-data.qcow2" not in host.pool.listVolumes()


def test_a_failed_attach_deletes_the_new_volume(host):
    volume(host, "u-web.qcow2")
    host.conn.defineXML(domain("u-web"))  # the test driver cannot attach devices: the attach fails
    with pytest.raises(CloudopsError, match="cannot attach disk data to u-web on hv1"):
        disks.add_disk("u-web", host.hosts, "64M")
    assert not [v for v in host.pool.listVolumes() if v.startswith("u-web-disk-")]


def test_removing_an_unknown_disk_is_refused(host):
    volume(host, "u-web.qcow2")
    host.conn.defineXML(domain("u-web", extra("u-web", "data", "vdb")))
    with pytest.raises(CloudopsError, match=r"has no disk named 'logs' \(its extra disks: data\)"):
        disks.remove_disk("u-web", host.hosts, "logs")


def volume(host, name):
    host.pool.createXML(f"<volume><name>{name}</name><capacity>1048576</capacity></volume>", 0)


def test_a_leftover_volume_goes_but_a_hand_attached_one_with_that_name_stays(host):
    volume(host, "u-web.qcow2")  # the root disk: its pool is where the VM's extra disks are
    volume(host, "u-web-disk-old.qcow2")
    host.conn.defineXML(domain("u-web"))
    result = disks.remove_disk("u-web", host.hosts, "old")
    assert (result.changed, result.action) == (True, "volume deleted")
    assert "u-web-disk-old.qcow2" not in host.pool.listVolumes()

    volume(host, "u-web-disk-mine.qcow2")
    host.conn.lookupByName("u-web").undefine()
    host.conn.defineXML(domain("u-web", extra("u-web", "mine", "vdb", alias="")))  # same file, attached by hand
    with pytest.raises(CloudopsError, match="attached by hand"):
        disks.remove_disk("u-web", host.hosts, "mine")
    assert "u-web-disk-mine.qcow2" in host.pool.listVolumes()


def test_a_foreign_domain_is_refused(host):
    host.conn.defineXML(domain("u-foreign").replace(META, ""))
    for call in (lambda: disks.add_disk("u-foreign", host.hosts, "1G"), lambda: disks.list_disks("u-foreign", host.hosts),
                 lambda: disks.remove_disk("u-foreign", host.hosts, "data")):
        with pytest.raises(CloudopsError, match="not made by cloudops"):
            call()


class _HeldDisk:
    """A running domain whose guest never releases a hot-unplugged disk."""

    def __init__(self, xml, snapshots=()):
        self.xml, self.detached, self.snapshots = xml, [], list(snapshots)

    def listAllSnapshots(self, flags=0):
        return [SimpleNamespace(getName=lambda n=n: n, getXMLDesc=lambda f=0, x=x: x) for n, x in self.snapshots]

    def isActive(self):
        return True

    def XMLDesc(self, flags=0):
        return self.xml

    def detachDeviceFlags(self, device, flags):
        self.detached.append(flags)


def test_an_unplug_the_guest_does_not_finish_keeps_the_volume_and_says_so(monkeypatch):
    dom = _HeldDisk(domain("u-web", extra("u-web", "data", "vdb")))
    deleted = []
    conn = SimpleNamespace(storageVolLookupByPath=lambda path: SimpleNamespace(delete=lambda f: deleted.append(path)))

    @contextlib.contextmanager
    def own_vm(name, hosts, doing):
        yield SimpleNamespace(name="hv1"), conn, dom

    monkeypatch.setattr(power, "_own_vm", own_vm)
    result = disks.remove_disk("u-web", [], "data", timeout=0.5)
    assert dom.detached == [libvirt.VIR_DOMAIN_AFFECT_CONFIG | libvirt.VIR_DOMAIN_AFFECT_LIVE]
    assert result.action == "detached from the config" and deleted == []
    assert "stays attached until the next boot" in result.message and "is kept" in result.message


def test_a_disk_in_a_snapshot_is_not_removed(monkeypatch):
    xml = domain("u-web", extra("u-web", "data", "vdb"))
    dom = _HeldDisk(xml, snapshots=[("before", f"<domainsnapshot><name>before</name>{xml}</domainsnapshot>"),
                                    ("bare", f"<domainsnapshot><name>bare</name>{domain('u-web')}</domainsnapshot>")])

    @contextlib.contextmanager
    def own_vm(name, hosts, doing):
        yield SimpleNamespace(name="hv1"), None, dom

    monkeypatch.setattr(power, "_own_vm", own_vm)
    with pytest.raises(CloudopsError, match="disk data of u-web is in its snapshot before: delete it first"):
        disks.remove_disk("u-web", [], "data")
    assert dom.detached == []


def test_delete_takes_the_extra_disks_and_leaves_one_attached_by_hand(monkeypatch, tmp_path, host):
    monkeypatch.setattr(vms.guest, "forget_host_keys", lambda *a: None)
    deleted = []
    monkeypatch.setattr(vms, "_delete_path", lambda _conn, path: deleted.append(path))
    host.conn.defineXML(domain("u-web", extra("u-web", "data", "vdb"), extra("u-web", "hand", "vdc", alias="")))
    vms.delete_vm("u-web", host.inventory)
    assert sorted(deleted) == ["/default-pool/u-web-disk-data.qcow2", "/default-pool/u-web.qcow2"]
