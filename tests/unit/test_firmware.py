"""--firmware: bios (default) or uefi, checked before anything is made; the domain XML libvirt's own schema accepts."""

import subprocess
import types
import xml.etree.ElementTree as ET

import pytest

from cloudops import virt
from cloudops.compute import vms
from cloudops.errors import CloudopsError
from cloudops.templating import render


def domain_xml(firmware: str, boot=None, **extra) -> str:
    vm = dict(name="web1", uuid="3e1b0b52-6d0b-4f1b-9d6e-0c7f0d5e6a11", virt_type="qemu", memory=512, vcpus=1,
              image_id="ab" * 32, network="cloudops", ip="192.168.150.2", mac="52:54:00:00:00:02",
              customize="seed", group=None, created=0, disk_path="/var/lib/cloudops/disks/web1.qcow2",
              seed_path="/var/lib/cloudops/disks/web1-seed.iso", console_log="/var/log/libvirt/qemu/web1-console.log",
              boot=boot, firmware=firmware, **extra)
    return render("libvirt/domain.xml.j2", vm=vm, metadata_ns=virt.METADATA_NS)


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_the_domain_is_valid_for_libvirts_schema(firmware, tmp_path):
    path = tmp_path / "domain.xml"
    path.write_text(domain_xml(firmware))
    proc = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_uefi_asks_libvirt_for_efi_firmware_without_secure_boot():
    os_ = ET.fromstring(domain_xml("uefi")).find("os")
    assert os_.get("firmware") == "efi"
    assert {f.get("name"): f.get("enabled") for f in os_.find("firmware")} == {"secure-boot": "no", "enrolled-keys": "no"}
    bios = ET.fromstring(domain_xml("bios")).find("os")
    assert bios.get("firmware") is None and bios.find("firmware") is None


@pytest.mark.parametrize("firmware", ["efi", "UEFI", "", "coreboot"])
def test_another_firmware_is_one_clear_error(firmware):
    with pytest.raises(CloudopsError, match=f"^firmware must be one of bios, uefi, got {firmware!r}$"):
        vms.validate(vms.VMSpec(name="web1", image="tiny", firmware=firmware))


def test_uefi_is_refused_for_a_direct_boot_image():
    tiny = types.SimpleNamespace(name="tiny", direct_boot=True)
    with pytest.raises(CloudopsError, match="image tiny boots its kernel directly .*--firmware uefi needs an image "
                                            "that boots from its disk"):
        vms.check_firmware("uefi", tiny)
    vms.check_firmware("bios", tiny)
    vms.check_firmware("uefi", types.SimpleNamespace(name="debian", direct_boot=False))
