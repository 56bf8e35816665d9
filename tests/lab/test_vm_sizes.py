"""VM sizes on a real lab: --disk-size seen in the guest and by qemu-img on the host, refused when smaller than the image.

Oracles outside cloudops: the guest's own block device and df, qemu-img info and virsh on the host.
Guests are tiny (96 MiB); names start with "t" so they never meet a demo VM's.
"""

import json
import shlex

from cloudops.imaging import store as images
from cloudops.ssh import connect
from tests.conftest import invoke
from tests.lab.test_vms import leftovers

G = 1 << 30


def on_host(host, command: str) -> str:
    with connect(host) as hv:
        return hv.run(command, hide=True, in_stream=False).stdout


def overlay_virtual_size(host, name: str) -> int:
    path = f"{images.pool_path(host)}/disks/{name}.qcow2"
    return json.loads(on_host(host, f"qemu-img info -U --output=json {shlex.quote(path)}"))["virtual-size"]


def guest_disk(lab, name: str) -> tuple[int, int]:
    """(bytes of the guest's /dev/vda, KiB of its root filesystem), read in the guest."""
    proc = invoke("vm.run", name, "cat /sys/block/vda/size; df -k / | tail -n 1", "--inventory", str(lab.inventory_path))
    assert proc.returncode == 0, proc.stderr
    sectors, df = proc.stdout.strip().splitlines()[-2:]
    return int(sectors) * 512, int(df.split()[1])


def test_disk_size_grows_the_root_disk_and_filesystem(lab, lab_inventory, tiny_image):
    name = "t-disk"
    assert tiny_image.virtual_size < G
    inv = ("--inventory", str(lab.inventory_path))
    proc = invoke("vm.start", "--name", name, "--host", "hv1", "--memory", "96", "--disk-size", "1G", *inv)
    try:
        assert proc.returncode == 0, proc.stderr
        assert overlay_virtual_size(lab_inventory.hosts["hv1"], name) == G
        disk_bytes, root_kib = guest_disk(lab, name)
        assert disk_bytes == G
        # the tiny image grew its root partition and ext4 to the disk (the image's own is 128M)
        assert root_kib * 1024 > 0.8 * G, root_kib
    finally:
        invoke("vm.delete", name, *inv)
    assert leftovers(lab_inventory, name) == []


def test_disk_smaller_than_the_image_or_unparseable_is_refused_with_nothing_made(lab, lab_inventory, tiny_image):
    name = "t-small"
    for size, message in (("64M", "smaller than image tiny's virtual size"), ("lots", "is not a size like 4G")):
        proc = invoke("vm.start", "--name", name, "--disk-size", size, "--inventory", str(lab.inventory_path))
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], proc.stderr
        assert leftovers(lab_inventory, name) == []
