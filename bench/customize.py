"""Customization benchmark: N disks in ONE libguestfs appliance against one launch per disk.

Both ways apply the same edits (hostname, a root SSH key, the root password, one
file) to fresh qcow2 overlays on the tiny image, so each does the same real writes.
An appliance launch costs ~20-30 s under TCG, so the single launch should win by
about N times minus the per-disk work. Prints the medians, the time of one disk on
its own, and the ratio (target >= 3x for 4 disks); ``--json`` for machines.

    .venv/bin/python bench/customize.py [--disks 4] [--repeat 1] [--json]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")

from cloudops.imaging import build as imagebuild  # noqa: E402
from cloudops.imaging.customize import customize_image  # noqa: E402

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN4pNdNv8QP28E7WAe+OW2ENjWJFUtNXuZ8PpdQpHb3w bench@cloudops"
EDITS = {"hostname": "bench-vm", "ssh_keys": [KEY], "root_password": "bench-password",
         "files": {"/etc/motd": "customized by bench/customize.py\n"}}  # fmt: skip


def overlays(base: Path, directory: Path, count: int) -> list[Path]:
    for old in directory.glob("*.qcow2"):
        old.unlink()
    disks = []
    for i in range(count):
        path = directory / f"disk{i}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(path)],
                       check=True)  # fmt: skip
        disks.append(path)
    return disks


def one_appliance(disks):
    report = customize_image(disks, **EDITS)
    assert all(r["changed"] for r in report.values()), report
    return []


def launch_per_disk(disks):
    each = []
    for disk in disks:
        t0 = time.perf_counter()
        report = customize_image(disk, **EDITS)
        each.append(time.perf_counter() - t0)
        assert report[str(disk)]["changed"], report
    return each


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disks", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    base = imagebuild.build_image("tiny")
    ways = {"one appliance": one_appliance, "launch per disk": launch_per_disk}
    samples = {name: [] for name in ways}
    single = []
    with tempfile.TemporaryDirectory(prefix="cloudops-bench-") as tmp:
        for _ in range(args.repeat):  # interleaved, so machine noise hits both ways alike
            for name, way in ways.items():
                disks = overlays(base, Path(tmp), args.disks)
                t0 = time.perf_counter()
                single += way(disks)
                samples[name].append(time.perf_counter() - t0)

    medians = {name: statistics.median(s) for name, s in samples.items()}
    ratio = medians["launch per disk"] / medians["one appliance"]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {os.cpu_count()} cpu {platform.machine()}",
        "disks": args.disks,
        "repeat": args.repeat,
        "median_seconds": {k: round(v, 1) for k, v in medians.items()},
        "median_one_disk_alone_seconds": round(statistics.median(single), 1),
        "per_disk_over_one_appliance": round(ratio, 2),
        "target_met": ratio >= 3,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"customizing {args.disks} disks (hostname, key, password, file), median of {args.repeat}:")
    for name, m in medians.items():
        print(f"  {name:<16} {m:7.1f} s")
    print(f"  one disk alone   {report['median_one_disk_alone_seconds']:7.1f} s")
    print(f"one appliance for all is {ratio:.2f}x faster than a launch per disk (target >= 3x)")


if __name__ == "__main__":
    main()
