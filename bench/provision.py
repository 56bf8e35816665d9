"""Provisioning benchmark: `vm.start` against the guest's own uptime, and against a naive pipeline.

Side by side in one run, on a 1-host lab of its own (prefix "cop"):

* cloudops ``start_vm`` (NoCloud seed, qcow2 overlay, static DHCP reservation,
  lease/console/SSH polling through one hypervisor connection): wall time to
  SSH-ready, and the guest's own uptime at that moment (printed on its console
  when dropbear listens) -- the floor a toolkit cannot beat;
* the naive pipeline: a full copy of the image, ``virt-customize`` (root password,
  SSH key, hostname), copy to the host, ``virsh define`` + ``virsh start``, then
  polling ``virsh domifaddr`` and the SSH port once a second.

    .venv/bin/python bench/provision.py [--repeat 2] [--json]
"""

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloudops import inventory, virt
from cloudops.compute import (
    guest,
    vms,  # noqa: E402
)
from cloudops.imaging import build as imagebuild
from cloudops.imaging import store as images
from cloudops.lab import hosts as lab
from cloudops.ssh import connect  # noqa: E402
from cloudops.templating import render  # noqa: E402

PREFIX = "cop"
PASSWORD = "bench-password-123"
READY = re.compile(r"cloudops-tiny: ready .*uptime=([0-9.]+)")


def guest_uptime_at_ready(hv, name: str) -> float:
    text = guest.wait_until(lambda: READY.search(guest.read_console(hv, name)), 30, "ready line")
    return float(text.group(1))


def run_cloudops(inv, host, key_pub: str, n: int) -> dict:
    name = f"b-fast{n}"
    t0 = time.perf_counter()
    vm = vms.start_vm(vms.VMSpec(name=name, image="tiny", memory=128, host=host.name, root_password=PASSWORD,
                                 ssh_keys=(key_pub,)), inv)
    wall = time.perf_counter() - t0
    with connect(host) as hv:
        uptime = guest_uptime_at_ready(hv, name)
    vms.delete_vm(name, inv)
    return {"wall": wall, "guest_uptime": uptime, "overhead": wall - uptime, "timings": vm.timings}


def run_naive(inv, host, image, key_pub_path: Path, n: int) -> dict:
    name = f"b-naive{n}"
    remote_disk = f"{images.pool_path(host)}/disks/{name}.qcow2"
    xml = render("libvirt/domain.xml.j2", metadata_ns=virt.METADATA_NS, vm=dict(
        name=name, uuid=str(uuid.uuid4()), virt_type="qemu", memory=128, vcpus=1, image_id=image.id,
        network="cloudops", ip="", mac="52:54:00:be:ec:%02x" % n, customize="naive", group=None, created=0,
        disk_path=remote_disk, seed_path=None, console_log=guest.console_log_path(name), boot=None))
    env = {**os.environ, "LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, connect(host) as hv:
        disk = Path(tmp) / "disk.qcow2"
        subprocess.run(["cp", str(image.local_path), str(disk)], check=True)          # full copy
        pw = Path(tmp) / "pw"
        pw.write_text(PASSWORD + "\n")
        subprocess.run(["virt-customize", "-q", "-a", str(disk), "--root-password", f"file:{pw}",
                        "--ssh-inject", f"root:file:{key_pub_path}", "--write", f"/etc/hostname:{name}"],
                       check=True, env=env, capture_output=True)
        hv.put(str(disk), remote_disk)                                                  # copy to the host
        hv.put(_text_file(tmp, xml), f"/tmp/{name}.xml")
        hv.run(f"virsh -q define /tmp/{name}.xml && virsh -q start {name}", hide=True, in_stream=False)
        ip = None
        while not ip:                                                                   # poll domifaddr
            time.sleep(1)
            out = hv.run(f"virsh -q domifaddr {name} --source lease", hide=True, warn=True, in_stream=False).stdout
            ip = next((f.split("/")[0] for f in out.split() if re.match(r"\d+\.\d+\.\d+\.\d+/", f)), None)
        while not hv.run(f"timeout 1 bash -c {shlex.quote(f'exec 3<>/dev/tcp/{ip}/22')}",  # poll the SSH port
                         hide=True, warn=True, in_stream=False).ok:
            time.sleep(1)
        wall = time.perf_counter() - t0
        hv.run(f"virsh -q destroy {name}; virsh -q undefine {name}; rm -f {remote_disk} /tmp/{name}.xml",
               hide=True, warn=True, in_stream=False)
    return {"wall": wall}


def _text_file(tmp, text) -> str:
    path = Path(tmp) / "domain.xml"
    path.write_text(text)
    return str(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    image, _ = images.add_image(imagebuild.build_image("tiny"), name="tiny", replace=True)
    lab.down(PREFIX)
    the_lab = lab.up(1, prefix=PREFIX)
    fast, naive = [], []
    try:
        inv = inventory.load(the_lab.inventory_path)
        host = inv.hosts["hv1"]
        with tempfile.TemporaryDirectory() as tmp:
            key = Path(tmp) / "id"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
            key_pub = Path(f"{key}.pub")
            run_cloudops(inv, host, key_pub.read_text().strip(), 0)  # warm-up: image copy, network, pool
            for n in range(1, args.repeat + 1):  # interleaved, so machine noise hits both alike
                fast.append(run_cloudops(inv, host, key_pub.read_text().strip(), n))
                naive.append(run_naive(inv, host, image, key_pub, n))
    finally:
        lab.down(PREFIX)

    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cpu",
        "repeat": args.repeat,
        "vm_start_wall_s": round(med(fast, "wall"), 2), "guest_uptime_at_ssh_s": round(med(fast, "guest_uptime"), 2),
        "overhead_s": round(med(fast, "overhead"), 2), "naive_wall_s": round(med(naive, "wall"), 2),
        "naive_over_vm_start": round(med(naive, "wall") / med(fast, "wall"), 2),
        "samples": {"cloudops": fast, "naive": naive},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"vm.start to SSH-ready   median {report['vm_start_wall_s']:6.2f} s")
    print(f"guest uptime at SSH     median {report['guest_uptime_at_ssh_s']:6.2f} s  (the floor)")
    print(f"toolkit overhead        median {report['overhead_s']:6.2f} s")
    print(f"naive pipeline          median {report['naive_wall_s']:6.2f} s  "
          f"({report['naive_over_vm_start']}x vm.start)")
    print("vm.start step timings:", json.dumps([r["timings"] for r in fast]))


if __name__ == "__main__":
    main()
