"""vm.resize: bad input refused before anything changes, a stopped VM's definition changed as asked,
and the domain template's room to grow (max memory, max vCPUs) off by default.

libvirt's in-process test driver stands in for a host (it changes definitions, but cannot grow a
disk or a balloon: the live paths are tested on the lab, tests/lab/test_disks_resize.py)."""

import xml.etree.ElementTree as ET
from types import SimpleNamespace

import libvirt
import pytest

from cloudops import virt
from cloudops.compute import placement, resize, vms
from cloudops.errors import CloudopsError
from tests.unit.libvirt_fake import pool_test_host

META = f"<metadata><cloudops:vm xmlns:cloudops='{virt.METADATA_NS}'><cloudops:image>x</cloudops:image></cloudops:vm></metadata>"
DOMAIN = ("<domain type='test'><name>{name}</name><memory unit='MiB'>{memory}</memory>"
          "<currentMemory unit='MiB'>{current}</currentMemory><vcpu{vcpu_current}>{vcpus}</vcpu>"
          "<os><type>hvm</type></os>" + META + "<devices><disk type='file' device='disk'>"
          "<source file='/default-pool/{name}.qcow2'/><target dev='vda' bus='virtio'/></disk></devices></domain>")


@pytest.mark.parametrize("args, why", [
    ({}, "needs --memory, --vcpus or --disk-size"),
    ({"memory": 0}, "memory .MiB. must be a whole number from 32"),
    ({"memory": "lots"}, "memory .MiB. must be a whole number"),
    ({"memory": 1 << 21}, "memory .MiB. must be a whole number"),
    ({"vcpus": 0}, "vCPUs must be a whole number from 1 to 64"),
    ({"vcpus": 65}, "vCPUs must be a whole number"),
    ({"disk_size": "0"}, "more than 0"),
    ({"disk_size": "big"}, "not a size"),
])
def test_bad_requests_are_one_line(args, why):
    with pytest.raises(CloudopsError, match=why) as info:
        resize.check_request(**args)
    assert "\n" not in str(info.value)


@pytest.fixture
def host(monkeypatch):
    conn, hv, inventory, pool = pool_test_host(monkeypatch)
    free = SimpleNamespace(memory_free_mb=4096)
    monkeypatch.setattr(placement, "host_state", lambda host, down: free)
    return SimpleNamespace(conn=conn, hv=hv, hosts=[hv], pool=pool, free=free)


def define(host, name, memory=128, current=None, vcpus=1, vcpu_current=None):
    host.pool.createXML(f"<volume><name>{name}.qcow2</name><capacity>1073741824</capacity></volume>", 0)
    return host.conn.defineXML(DOMAIN.format(name=name, memory=memory, current=current or memory, vcpus=vcpus,
                                             vcpu_current=f" current='{vcpu_current}'" if vcpu_current else ""))


def config(dom) -> tuple[int, int, int, int]:
    """(max MiB, current MiB, max vCPUs, current vCPUs) of the persistent definition, as libvirt has it."""
    root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    vcpu = root.find("vcpu")
    return (int(root.findtext("memory")) // 1024, int(root.findtext("currentMemory")) // 1024, int(vcpu.text),
            int(vcpu.get("current", vcpu.text)))


def test_a_stopped_vm_is_resized_in_its_definition_for_its_next_boot(host):
    dom = define(host, "u-web")
    result = resize.resize_vm("u-web", host.hosts, memory=256, vcpus=2)
    assert result.changed and [c.what for c in result.changes] == ["memory", "vcpus"]
    assert all(not c.live and "applied at the next boot" in c.note for c in result.changes)
    assert config(dom) == (256, 256, 2, 2)
    again = resize.resize_vm("u-web", host.hosts, memory=256, vcpus=2)
    assert not again.changed and "nothing to do" in again.message
    resize.resize_vm("u-web", host.hosts, memory=96, vcpus=1)
    assert config(dom) == (96, 96, 1, 1)  # no room to grow before, none after


def test_room_to_grow_is_kept_while_the_new_size_fits_in_it(host):
    dom = define(host, "u-roomy", memory=256, current=128, vcpus=4, vcpu_current=1)
    resize.resize_vm("u-roomy", host.hosts, memory=192, vcpus=2)
    assert config(dom) == (256, 192, 4, 2)
    resize.resize_vm("u-roomy", host.hosts, memory=512, vcpus=6)
    assert config(dom) == (512, 512, 6, 6)


def test_memory_the_host_does_not_have_free_is_refused(host):
    dom = define(host, "u-big")
    host.free.memory_free_mb = 100
    with pytest.raises(CloudopsError, match="hv1 has only 100 MiB of memory free") as info:
        resize.resize_vm("u-big", host.hosts, memory=512)
    assert "\n" not in str(info.value) and config(dom) == (128, 128, 1, 1)


def test_a_shrinking_disk_is_refused_and_nothing_else_changes(host):
    dom = define(host, "u-shrink")
    with pytest.raises(CloudopsError, match="shrinking it to 512M is refused"):
        resize.resize_vm("u-shrink", host.hosts, memory=256, vcpus=2, disk_size="512M")
    assert config(dom) == (128, 128, 1, 1)


def test_a_foreign_domain_is_refused(host):
    host.pool.createXML("<volume><name>u-foreign.qcow2</name><capacity>1048576</capacity></volume>", 0)
    host.conn.defineXML(DOMAIN.format(name="u-foreign", memory=64, current=64, vcpus=1, vcpu_current="")
                        .replace(META, ""))
    with pytest.raises(CloudopsError, match="not made by cloudops"):
        resize.resize_vm("u-foreign", host.hosts, memory=96)


@pytest.mark.parametrize("output, says", [
    ("disk /dev/vda 268435456\nverdict grown /dev/vda1 ext4\n", "grown in the guest"),
    ("disk /dev/vda 268435456\nverdict no-growpart /dev/vda1 ext4\n", "the guest has no growpart"),
    ("verdict unknown-fs /dev/vda1 zfs\n", "of a kind cloudops does not grow"),
    ("verdict grow-failed /dev/vda1 ext4\n", "failed"),
    ("", "could not be found"),
])
def test_what_the_guest_said_about_its_root_filesystem(output, says):
    assert says in resize.grow_note(output)


def template(**extra):
    from cloudops.templating import render

    vm = dict(name="web1", uuid="3e1b0b52-6d0b-4f1b-9d6e-0c7f0d5e6a11", virt_type="qemu", memory=96, vcpus=1,
              image_id="ab" * 32, network="cloudops", ip="192.168.150.2", mac="52:54:00:00:00:02", customize="seed",
              group=None, created=0, disk_path="/d/web1.qcow2", seed_path=None, console_log="/l/web1.log", boot=None,
              firmware="bios", **extra)
    return ET.fromstring(render("libvirt/domain.xml.j2", vm=vm, metadata_ns=virt.METADATA_NS))


def test_a_new_vm_has_no_room_to_grow_unless_asked():
    plain = template()
    assert (plain.findtext("memory"), plain.findtext("currentMemory")) == ("96", "96")
    assert plain.find("vcpu").text == "1" and plain.find("vcpu").get("current") is None
    roomy = template(max_memory=256, max_vcpus=4)
    assert (roomy.findtext("memory"), roomy.findtext("currentMemory")) == ("256", "96")
    assert (roomy.find("vcpu").text, roomy.find("vcpu").get("current")) == ("4", "1")


@pytest.mark.parametrize("field, value, why", [("max_memory", 64, "max memory"), ("max_vcpus", 0, "max vCPUs"),
                                               ("max_vcpus", 65, "max vCPUs"), ("max_memory", "x", "max memory")])
def test_a_maximum_below_the_vms_own_size_is_refused(field, value, why):
    with pytest.raises(CloudopsError, match=why):
        vms.validate(vms.VMSpec(name="web1", image="tiny", memory=96, **{field: value}))
