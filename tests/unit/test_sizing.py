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


# ---------------------------------------------------------------- flavors

CONFIG_FLAVORS = {"small": {"memory": 128, "vcpus": 1, "disk_size": "1G"}, "big": {"memory": 1024, "vcpus": 4}}


def test_flavors_from_config_and_inventory_the_inventory_wins():
    known = sizing.flavors_from(CONFIG_FLAVORS, {"small": {"memory": 96}, "tiny": {"vcpus": 1}})
    assert known == {"small": {"memory": 96}, "big": {"memory": 1024, "vcpus": 4}, "tiny": {"vcpus": 1}}
    assert sizing.flavors_from(CONFIG_FLAVORS, None)["small"] == {"memory": 128, "vcpus": 1, "disk_size": G}


@pytest.mark.parametrize("flavors, message", [
    ({"small": {"memory": 128, "ram": 2}}, r"config vm.flavors.small: unknown key 'ram'"),
    ({"small": {"disk_size": "big"}}, r"config vm.flavors.small: disk size 'big'"),
    ({"small": {"memory": "lots"}}, r"config vm.flavors.small: memory must be a whole number"),
    ({"small": 128}, r"config vm.flavors.small: must be a mapping"),
    (["small"], r"config vm.flavors: must be a mapping"),
])
def test_bad_flavors_are_one_line(flavors, message):
    with pytest.raises(CloudopsError, match=message):
        sizing.flavors_from(flavors, None)


def test_unknown_flavor_lists_the_known_ones():
    with pytest.raises(CloudopsError, match=r"^unknown flavor 'huge' \(known: big, small\)$"):
        sizing.flavor("huge", sizing.flavors_from(CONFIG_FLAVORS, None))
    with pytest.raises(CloudopsError, match=r"unknown flavor 'small' \(known: none defined"):
        sizing.flavor("small", {})


def test_explicit_options_override_the_flavor_which_overrides_the_defaults():
    defaults = {"memory": 128, "vcpus": 1}
    small = {"memory": 96, "disk_size": G}
    assert sizing.sized({"memory": None, "vcpus": None, "disk_size": None}, small, defaults) == \
        {"memory": 96, "vcpus": 1, "disk_size": G}
    assert sizing.sized({"memory": "256", "vcpus": None, "disk_size": "2G"}, small, defaults) == \
        {"memory": "256", "vcpus": 1, "disk_size": "2G"}
    assert sizing.sized({}, None, defaults) == {"memory": 128, "vcpus": 1, "disk_size": None}


def test_task_sizes_from_flavor_config_and_options():
    from invoke import Config, Context

    from cloudops.tasks import vm as vm_tasks

    c = Context(Config(overrides={"vm": {"memory": 128, "vcpus": 1, "flavors": CONFIG_FLAVORS}}))
    inv = types.SimpleNamespace(hypervisors=lambda: [types.SimpleNamespace(vars={"flavors": {"big": {"vcpus": 2}}})])
    assert vm_tasks._size(c, inv, "small", memory=None, vcpus="2", disk_size=None) == \
        {"memory": 128, "vcpus": "2", "disk_size": G}
    assert vm_tasks._size(c, inv, "big", memory=None, vcpus=None, disk_size=None) == \
        {"memory": 128, "vcpus": 2, "disk_size": None}
    assert vm_tasks._size(c, inv, None, memory="64", vcpus=None, disk_size="2G") == \
        {"memory": "64", "vcpus": 1, "disk_size": "2G"}


def test_cli_unknown_flavor_is_one_line_before_any_host(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    inventory = tmp_path / "inv.yaml"
    inventory.write_text("vars:\n  flavors:\n    small: {memory: 96}\n    medium: {memory: 512, vcpus: 2}\n"
                         "hosts:\n  hv1: {address: 192.0.2.1}\n")
    proc = subprocess.run([str(Path(sys.executable).parent / "invoke"), "vm.start", "--name=web1", "--flavor=huge",
                           f"--inventory={inventory}"], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ), check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines == ["cloudops: unknown flavor 'huge' (known: medium, small)"], proc.stderr


def test_stack_vm_flavor(tmp_path):
    from cloudops.compute import stack

    path = tmp_path / "stack.yaml"
    path.write_text("vms:\n  - {name: web1, image: tiny, flavor: small, memory: 64}\n")
    spec = stack.load(path, flavors=sizing.flavors_from(CONFIG_FLAVORS, None)).vms[0]
    assert (spec.memory, spec.vcpus, spec.disk_size) == (64, 1, G)
    with pytest.raises(CloudopsError, match=r"vms\[0\]: unknown flavor 'small' \(known: big\)"):
        stack.load(path, flavors={"big": {}})
    assert stack.load(path).vms[0].memory == 64  # cloud.down: flavors not needed


def _elf(segments) -> bytes:
    """A 64-bit little-endian ELF header with program headers (type, paddr, memsz)."""
    import struct

    phoff, phentsize = 64, 56
    head = bytearray(64)
    head[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", head, 0x20, phoff)
    struct.pack_into("<HH", head, 0x36, phentsize, len(segments))
    for p_type, paddr, memsz in segments:
        head += struct.pack("<IIQQQQQQ", p_type, 5, 0, 0, paddr, memsz, memsz, 0x1000)
    return bytes(head)


def test_a_kernel_load_end_is_its_highest_segment_and_notes_do_not_count():
    from cloudops.imaging import kernel

    assert kernel.load_end(_elf([(1, 0x1000000, 0x18eacdc), (4, 0x9000000, 0x100), (1, 0x3079000, 0x1987000)])) \
        == 0x4A00000
    assert kernel.load_end(b"MZ not an elf" + bytes(64)) is None
    assert kernel.load_end(_elf([(1, 0x1000000, 0x100)])[:80]) is None  # headers cut short


def test_memory_below_the_kernels_footprint_is_refused_before_anything_is_made(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from cloudops.compute import sizing

    (tmp_path / "abc.kernel").write_bytes(_elf([(1, 0x1000000, 0x3A00000)]))  # ends at 74 MiB
    (tmp_path / "abc.initrd").write_bytes(bytes(2 << 20))
    image = SimpleNamespace(name="tiny", id="abc", direct_boot=True, local_path=tmp_path / "abc.qcow2")
    assert sizing.image_memory_floor(image) == (74 + 2 + 12) << 20
    sizing.check_memory(96, image)
    with pytest.raises(CloudopsError, match=r"^64 MiB is too little for image tiny: its kernel and initrd need at "
                                            r"least 88 MiB \(the guest would halt before printing anything\)$"):
        sizing.check_memory(64, image)
    sizing.check_memory(16, SimpleNamespace(name="deb", id="x", direct_boot=False, local_path=tmp_path / "x"))
