"""VM sizes: --disk-size parsing (binary units), the image's virtual size as the floor, refusal before anything is made."""

import types

import pytest

from cloudops.compute import sizing, vms
from cloudops.errors import CloudopsError

G = 1 << 30


@pytest.mark.parametrize("text, size", [
    ("4G", 4 * G), ("4g", 4 * G), ("4GiB", 4 * G), ("4GB", 4 * G), ("512M", 512 << 20), ("1.5G", 3 * G // 2),
    ("1T", 1 << 40), ("64K", 64 << 10), ("1048576", 1 << 20), (" 2G ", 2 * G), (3 * G, 3 * G)])
def test_parse_size_binary_units(text, size):
    assert sizing.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "4X", "four", "-1G", "0", "0G", "4 G B", "1e3", "2P", True, None, "4G;id"])
def test_parse_size_refuses_in_one_line(text):
    with pytest.raises(CloudopsError) as err:
        sizing.parse_size(text)
    assert "\n" not in str(err.value) and "disk size" in str(err.value)


@pytest.mark.parametrize("size, text", [(4 * G, "4G"), (3 * G // 2, "1.5G"), (128 << 20, "128M"), (1 << 40, "1T")])
def test_format_size(size, text):
    assert sizing.format_size(size) == text


def test_disk_size_defaults_to_the_image_and_may_not_be_smaller():
    assert sizing.check_disk_size(None, 128 << 20, "tiny") == 128 << 20
    assert sizing.check_disk_size(128 << 20, 128 << 20, "tiny") == 128 << 20
    assert sizing.check_disk_size(4 * G, 128 << 20, "tiny") == 4 * G
    with pytest.raises(CloudopsError, match=r"disk size 64M is smaller than image tiny's virtual size 128M"):
        sizing.check_disk_size(64 << 20, 128 << 20, "tiny")


def test_validate_parses_the_disk_size():
    spec = vms.validate(vms.VMSpec(name="web1", image="tiny", disk_size="2G"))
    assert spec.disk_size == 2 * G
    with pytest.raises(CloudopsError, match="disk size 'lots'"):
        vms.validate(vms.VMSpec(name="web1", image="tiny", disk_size="lots"))


def test_start_refuses_a_disk_smaller_than_the_image_before_anything(monkeypatch):
    image = types.SimpleNamespace(name="tiny", id="a" * 64, format="qcow2", virtual_size=128 << 20)
    monkeypatch.setattr(vms.images, "resolve", lambda ref: image)

    def untouched(*args, **kwargs):
        raise AssertionError("something was done for a refused start")

    monkeypatch.setattr(vms, "_name_lock", untouched)
    monkeypatch.setattr(vms.placement, "choose", untouched)
    monkeypatch.setattr(vms.ipam, "allocate", untouched)
    inventory = types.SimpleNamespace(hosts={}, hypervisors=untouched, path="inv.yaml")
    with pytest.raises(CloudopsError, match="smaller than image tiny's virtual size 128M"):
        vms.start_vm(vms.VMSpec(name="web1", image="tiny", disk_size="100M"), inventory)


def test_stack_accepts_disk_size(tmp_path):
    from cloudops.compute import stack

    path = tmp_path / "stack.yaml"
    path.write_text("vms:\n  - {name: web1, image: tiny, disk_size: 1G}\n")
    assert stack.load(path).vms[0].disk_size == G
    path.write_text("vms:\n  - {name: web1, image: tiny, disk_size: huge}\n")
    with pytest.raises(CloudopsError, match=r"vms\[0\]: disk size 'huge'"):
        stack.load(path)
