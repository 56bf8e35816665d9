"""Containers' pure logic: the LXC URI beside a host's QEMU one, the refused VM options, the power-off signal of
an image's init, the domain template, dropbear's key format (checked by dropbearkey itself), and metrics'
per-container sampling in the bulk call's naming."""

import shutil
import subprocess
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import libvirt
import pytest

from cloudops import virt
from cloudops.compute import containers, guest, rootfs, vms
from cloudops.errors import CloudopsError
from cloudops.metrics import collect
from cloudops.templating import render


@pytest.mark.parametrize("uri, expected", [
    ("qemu+ssh://root@10.0.0.1:22/system?command=/x&no_tty=1", "lxc+ssh://root@10.0.0.1:22/system?command=/x&no_tty=1"),
    ("qemu:///system", "lxc:///system"),
    ("test:///default", None),
])
def test_the_lxc_uri_is_the_hosts_own_with_lxc_for_qemu(uri, expected):
    assert virt.container_uri(SimpleNamespace(libvirt_uri=uri)) == expected


@pytest.mark.parametrize("change, words", [
    ({"customize": "guestfs"}, "--customize guestfs"), ({"disk_size": 1 << 30}, "--disk-size"),
    ({"firmware": "uefi"}, "--firmware"), ({"max_memory": 256}, "--max-memory"),
    ({"storage": "shared"}, "--storage shared"),
])
def test_what_only_a_vm_has_is_refused_for_a_container(change, words):
    spec = vms.VMSpec(name="ct1", image="tiny", **change)
    with pytest.raises(CloudopsError, match="does not apply to a container") as info:
        containers.check_spec(spec)
    assert str(info.value).startswith(words)
    containers.check_spec(vms.VMSpec(name="ct1", image="tiny"))  # the defaults are a container's too


def test_an_unknown_kind_is_one_line():
    with pytest.raises(CloudopsError, match="unknown kind 'pod': one of vm, container"):
        vms.check_kind("pod")


@pytest.mark.parametrize("target, signal", [("/bin/busybox", "usr2"), ("/lib/systemd/systemd", "rt4"),
                                            ("/sbin/init", "term")])
def test_each_init_is_powered_off_by_its_own_signal(target, signal):
    assert rootfs.stop_signal_of(target) == signal
    assert hasattr(libvirt, f"VIR_DOMAIN_PROCESS_SIGNAL_{signal.upper()}")


def test_the_container_template_is_a_vm_metadata_with_its_kind_and_escaped():
    ct = {"name": "ct1", "uuid": "8c4b6f7e-0000-4000-8000-000000000001", "memory": 64, "vcpus": 1,
          "image_id": "abc", "stop_signal": "usr2", "network": "cloudops", "ip": "192.168.150.2",
          "mac": "52:54:00:00:00:01", "group": None, "created": 1,
          "extra_nics": [{"network": "lan", "ip": "10.0.0.5", "mac": "52:54:00:00:00:02"}],
          "root_dir": "/var/lib/cloudops/containers/ct1/root&<x>"}
    root = ET.fromstring(render("libvirt/container.xml.j2", ct=ct, metadata_ns=virt.METADATA_NS))
    assert root.get("type") == "lxc" and root.findtext("os/init") == "/sbin/init"
    assert root.find("devices/filesystem/source").get("dir").endswith("root&<x>")  # escaped, read back whole
    meta = root.find("metadata")[0]
    fields = {child.tag.split("}")[-1]: child.text for child in meta if len(child) == 0}
    assert fields["kind"] == "container" and fields["ip"] == "192.168.150.2" and fields["stop_signal"] == "usr2"
    assert [i.find("source").get("network") for i in root.findall("devices/interface")] == ["cloudops", "lan"]


@pytest.mark.skipif(shutil.which("dropbearkey") is None, reason="dropbear-bin is not installed")
def test_the_host_key_cloudops_makes_is_read_by_dropbear_as_the_same_key(tmp_path):
    private, (ktype, kdata) = guest.make_host_key()
    path = tmp_path / "key"
    path.write_bytes(rootfs.dropbear_key(private))
    out = subprocess.run(["dropbearkey", "-y", "-f", str(path)], capture_output=True, text=True, check=True).stdout
    assert f"{ktype} {kdata}" in out


class FakeDomain:
    def __init__(self, name, info, error=None):
        self._name, self._info, self._error = name, info, error

    def name(self):
        return self._name

    def UUIDString(self):  # noqa: N802 - libvirt's name
        return f"uuid-{self._name}"

    def ID(self):  # noqa: N802
        return 7

    def info(self):
        if self._error:
            raise self._error
        return self._info


def test_containers_are_sampled_one_by_one_in_the_bulk_calls_names():
    gone = libvirt.libvirtError("no domain")
    gone.err = (libvirt.VIR_ERR_NO_DOMAIN, 0, "Domain not found", 0, "", None, None, -1, -1)
    conn = SimpleNamespace(listAllDomains=lambda: [
        FakeDomain("ct1", [libvirt.VIR_DOMAIN_RUNNING, 65536, 20480, 1, 5_000_000]),
        FakeDomain("ct2", None, gone)])
    sample = collect.HostSample(host="hv1", taken_at=1.0)
    collect.collect_containers(conn, sample)
    assert [v.name for v in sample.vms] == ["ct1"] and sample.problems == []  # one that stopped meanwhile: left out
    assert sample.vms[0].stats == {"state.state": libvirt.VIR_DOMAIN_RUNNING, "cpu.time": 5_000_000,
                                   "vcpu.current": 1, "balloon.current": 20480, "balloon.maximum": 65536}


def test_a_foreign_domains_nics_come_from_its_xml_without_addresses():
    from cloudops.compute import addresses

    xml = """<domain><devices>
      <interface type='network'><source network='lan'/><mac address='52:54:00:AA:00:01'/></interface>
      <interface type='bridge'><source bridge='br0'/><mac address='52:54:00:aa:00:02'/></interface>
    </devices></domain>"""
    dom = SimpleNamespace(XMLDesc=lambda flags: xml)
    assert addresses.interfaces(dom) == [{"network": "lan", "ip": None, "mac": "52:54:00:aa:00:01"}]
