"""VM sizes on a real lab: --flavor and --disk-size seen in the guest and on the host, refused when smaller than the image.

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


def test_flavor_with_explicit_overrides_and_disk_size_seen_in_the_guest(lab, lab_inventory, tiny_image, tmp_path):
    """One boot: the flavor's vCPUs; --memory and --disk-size override its memory and disk."""
    name = "t-disk"
    assert tiny_image.virtual_size < G
    config = tmp_path / "flavors.yaml"
    config.write_text("vm:\n  flavors:\n    t-size: {memory: 128, vcpus: 2, disk_size: 2G}\n")
    inv = ("--inventory", str(lab.inventory_path))
    proc = invoke("-f", str(config), "vm.start", "--name", name, "--host", "hv1", "--flavor", "t-size",
                  "--memory", "96", "--disk-size", "1G", *inv)
    try:
        assert proc.returncode == 0, proc.stderr
        hv1 = lab_inventory.hosts["hv1"]
        dominfo = dict(line.split(":", 1) for line in
                       on_host(hv1, f"virsh -c qemu:///system dominfo {name}").splitlines() if ":" in line)
        assert dominfo["Max memory"].split() == ["98304", "KiB"]
        assert dominfo["CPU(s)"].strip() == "2"
        assert overlay_virtual_size(hv1, name) == G
        shown = invoke("vm.info", name, "--json", *inv)
        assert shown.returncode == 0, shown.stderr
        info = json.loads(shown.stdout)
        assert info["firmware"] == "bios"
        assert [(d["target"], d["size"]) for d in info["disks"] if d["device"] == "disk"] == [("vda", "1G")]
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


def ipam_state() -> dict:
    proc = invoke("state.show", "--prefix", "ipam/", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["keys"]


def test_dry_runs_make_nothing(lab, lab_inventory, tiny_image, tmp_path):
    import sqlite3

    from cloudops import paths

    inv = ("--inventory", str(lab.inventory_path))
    before = ipam_state()
    proc = invoke("vm.start", "--name", "t-dry", "--disk-size", "1G", "--memory", "96", "--dry-run", "--json", *inv)
    assert proc.returncode == 0, proc.stderr
    planned = json.loads(proc.stdout)
    assert planned["dry_run"] and planned["host"] in lab_inventory.hosts and planned["ip"].startswith("192.168.150.")
    assert planned["disk"]["size"] == G and planned["image"]["name"] == "tiny"
    assert {h["host"] for h in planned["hosts"]} == {h.name for h in lab_inventory.hypervisors()}
    assert planned["hosts"][0]["host"] == planned["host"] and "score" in planned["hosts"][0]
    text = invoke("vm.start", "--name", "t-dry", "--dry-run", *inv)
    assert text.returncode == 0 and "nothing was made" in text.stdout and "would make:" in text.stdout, text.stderr
    stack = tmp_path / "stack.yaml"
    stack.write_text("vms:\n  - {name: t-dry, image: tiny, memory: 96}\n  - {name: t-dry2, image: tiny, memory: 96}\n")
    up = invoke("cloud.up", str(stack), "--dry-run", "--json", *inv)
    assert up.returncode == 0, up.stderr
    assert [v["name"] for v in json.loads(up.stdout)["vms"]] == ["t-dry", "t-dry2"]
    # nothing on any host: no domain, no DHCP host entry, no disk (virsh and ls on the hosts)
    for host in lab_inventory.hypervisors():
        domains = on_host(host, "virsh -c qemu:///system list --all --name").split()
        dhcp = on_host(host, "virsh -c qemu:///system net-dumpxml cloudops 2>/dev/null || true")
        disks = on_host(host, f"ls {shlex.quote(images.pool_path(host))}/disks 2>/dev/null || true").split()
        assert not {"t-dry", "t-dry2"} & set(domains), host.name
        assert "t-dry" not in dhcp, host.name
        assert not [d for d in disks if d.startswith("t-dry")], host.name
    # nothing in the state store: the same IPAM documents, and no lock of the names
    after = ipam_state()
    assert after == before and "t-dry" not in json.dumps(after)
    store_file = paths.var_dir() / "cloud.sqlite"  # the default backend's file, read with sqlite3
    if store_file.exists():
        with sqlite3.connect(store_file) as db:
            assert db.execute("SELECT name FROM locks WHERE name LIKE '%t-dry%'").fetchall() == []
    assert leftovers(lab_inventory, "t-dry") == [] and leftovers(lab_inventory, "t-dry2") == []
