"""--storage shared: its bad input refused before anything is made, where its files go, when UNSAFE is passed."""

import xml.etree.ElementTree as ET

import libvirt
import pytest

from cloudops import sharedstorage, virt
from cloudops.compute import vms
from cloudops.errors import CloudopsError
from cloudops.inventory import Host
from cloudops.migration import migrate
from cloudops.templating import render

NS = {"c": virt.METADATA_NS}


def host(name, **host_vars):
    return Host(name, "10.0.0.1", vars=host_vars)


@pytest.mark.parametrize("kind", ["nfs", "Shared", "", None, "local,shared"])
def test_a_storage_kind_other_than_local_or_shared_is_one_line(kind):
    with pytest.raises(CloudopsError, match="storage must be one of local, shared"):
        vms.validate(vms.VMSpec(name="web1", image="tiny", storage=kind))


@pytest.mark.parametrize("value", [None, "", "relative/dir", 7])
def test_a_host_without_an_absolute_shared_path_is_named(value):
    h = host("hv1", **({} if value is None else {"shared_path": value}))
    with pytest.raises(CloudopsError, match="host hv1 has no shared_path"):
        sharedstorage.path_of(h)


def test_the_shared_layout_is_under_the_shared_path():
    h = host("hv1", shared_path="/srv/shared/")
    assert sharedstorage.disks_dir(h) == "/srv/shared/disks"
    assert sharedstorage.images_dir(h) == "/srv/shared/images"


def test_a_named_host_without_shared_path_is_refused_and_others_are_skipped():
    with pytest.raises(CloudopsError, match="host hv1 has no shared_path"):
        vms.shared_candidates([host("hv1")], named=True)
    both = [host("hv1"), host("hv2", shared_path="/srv/s")]
    assert [h.name for h in vms.shared_candidates(both, named=False)] == ["hv2"]
    with pytest.raises(CloudopsError, match="no hypervisor has a shared_path"):
        vms.shared_candidates([host("hv1")], named=False)


@pytest.mark.parametrize("path, inside", [("/srv/s/disks/a.qcow2", True), ("/srv/s", False),
                                          ("/srv/shared/a.qcow2", False), ("/srv/s/../x/a.qcow2", False),
                                          ("/var/lib/cloudops/disks/a.qcow2", False)])
def test_under_is_about_path_components(path, inside):
    assert sharedstorage.under(path, "/srv/s") is inside


def test_the_metadata_records_the_storage_kind():
    vm = dict(name="web1", uuid="3e1b0b52-6d0b-4f1b-9d6e-0c7f0d5e6a11", virt_type="qemu", memory=128, vcpus=1,
              image_id="ab" * 32, network="cloudops", ip="192.168.150.2", mac="52:54:00:00:00:02",
              customize="seed", group=None, created=0, disk_path="/srv/s/disks/web1.qcow2",
              seed_path="/srv/s/disks/web1-seed.iso", console_log="/var/log/web1.log", boot=None,
              firmware="bios", storage="shared")
    root = ET.fromstring(render("libvirt/domain.xml.j2", vm=vm, metadata_ns=virt.METADATA_NS))
    assert root.findtext("metadata/c:vm/c:storage", namespaces=NS) == "shared"
    assert sharedstorage.kind_of({"storage": "shared"}) == "shared"
    assert sharedstorage.kind_of({}) == "local"  # a VM made before the element existed


def test_unsafe_only_for_a_vm_proven_on_the_shared_path():
    policy = migrate.Policy()
    assert migrate._flags(True, policy, shared_path=True) & libvirt.VIR_MIGRATE_UNSAFE
    assert not migrate._flags(True, policy) & libvirt.VIR_MIGRATE_UNSAFE  # shared by a marker only: libvirt decides
    copying = migrate._flags(False, policy, shared_path=True)
    assert copying & libvirt.VIR_MIGRATE_NON_SHARED_INC and not copying & libvirt.VIR_MIGRATE_UNSAFE
    assert not migrate._flags(True, policy, shared_path=True) & libvirt.VIR_MIGRATE_NON_SHARED_INC


def test_a_shared_vm_to_a_host_with_another_shared_path_is_refused_before_any_host_is_asked():
    disks = [migrate._Disk(target="vda", path="/srv/s/disks/web1.qcow2", readonly=False)]
    with pytest.raises(CloudopsError, match="hv2's shared_path is /srv/other"):
        migrate._check_shared_path("web1", disks, host("hv1", shared_path="/srv/s"),
                                   host("hv2", shared_path="/srv/other"))
    with pytest.raises(CloudopsError, match="on shared storage and host hv2 has no shared_path"):
        migrate._check_shared_path("web1", disks, host("hv1", shared_path="/srv/s"), host("hv2"))
    local = [migrate._Disk(target="vdb", path="/var/lib/cloudops/disks/web1-data.qcow2", readonly=False)]
    with pytest.raises(CloudopsError, match="is not under /srv/s"):
        migrate._check_shared_path("web1", disks + local, host("hv1", shared_path="/srv/s"),
                                   host("hv2", shared_path="/srv/s"))
