"""customize_image refuses bad input in one line, before any appliance starts or any disk is touched."""

import hashlib
import os
import shutil
import subprocess
import time

import pytest

from cloudops.errors import CloudopsError
from cloudops.imaging.customize import customize_image

pytestmark = pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-img missing")
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN4pNdNv8QP28E7WAe+OW2ENjWJFUtNXuZ8PpdQpHb3w alice@example"


@pytest.fixture
def mbr_disk(tmp_path):
    """A raw file that passes the host-side checks (an MBR signature); the appliance is never reached."""
    path = tmp_path / "disk.raw"
    data = bytearray(2 * 1024 * 1024)
    data[510:512] = b"\x55\xaa"
    path.write_bytes(bytes(data))
    return path


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(match, *args, **kwargs):
    started = time.monotonic()
    with pytest.raises(CloudopsError, match=match) as info:
        customize_image(*args, **kwargs)
    assert time.monotonic() - started < 5, "refused before launching an appliance"
    assert "\n" not in str(info.value)


def test_missing_disk(tmp_path):
    refused("does not exist", tmp_path / "nope.qcow2", hostname="a")


def test_random_bytes_are_not_a_disk_image(tmp_path):
    path = tmp_path / "random.img"
    data = bytearray(os.urandom(1024 * 1024))
    data[510:512] = b"\0\0"  # no MBR signature by chance
    data[1080:1082] = b"\0\0"  # nor an ext superblock magic
    path.write_bytes(bytes(data))
    before = digest(path)
    refused("is not a disk image", path, hostname="a")
    assert digest(path) == before


def test_empty_file_is_not_a_disk_image(tmp_path):
    path = tmp_path / "empty.img"
    path.touch()
    refused("is not a disk image", path, hostname="a")


def test_unsupported_format(tmp_path):
    path = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(path), "16M"], check=True)
    refused("format vmdk is not supported", path, hostname="a")


@pytest.mark.parametrize("hostname", ["bad_name", "-x", "a..b", "x" * 64, ""])
def test_bad_hostname(mbr_disk, hostname):
    before = digest(mbr_disk)
    refused("hostname", mbr_disk, hostname=hostname)
    assert digest(mbr_disk) == before


@pytest.mark.parametrize("key", ["not a key", "ssh-ed25519", "ssh-ed25519 AAAA====", f'{KEY} "quoted"'])
def test_bad_key_line(mbr_disk, key):
    refused("bad SSH public key", mbr_disk, ssh_keys=[key])


def test_bad_files(mbr_disk, tmp_path):
    refused("must be absolute", mbr_disk, files={"etc/motd": "x"})
    refused("must not contain '..'", mbr_disk, files={"/etc/../shadow": "x"})
    refused("does not exist", mbr_disk, files={"/etc/motd": tmp_path / "missing"})
    refused("is a directory", mbr_disk, files={"/etc/motd": tmp_path})


def test_bad_password_and_nothing_to_do(mbr_disk):
    refused("password is empty", mbr_disk, root_password="")
    refused("newline", mbr_disk, root_password="a\nb")
    refused("nothing to customize", mbr_disk)


def test_disk_given_twice(mbr_disk):
    refused("given twice", [mbr_disk, mbr_disk], hostname="a")


def test_one_bad_disk_refuses_the_batch(mbr_disk, tmp_path):
    refused("does not exist", [mbr_disk, tmp_path / "missing.qcow2"], hostname="a")
