"""Shared-storage migration against the copying migration, for VMs of the same size.

On a 2-host lab of its own (prefix "hsa"), two tiny VMs of the same memory and disk size
start on hv1: one with ``--storage shared`` (overlay on the lab's shared directory), one on
the host's own pool, each with ``--fill-mib`` of fresh data written into its disk (what a
copying migration must move). Then ``--pairs`` times: the shared VM migrates (memory only,
VIR_MIGRATE_UNSAFE after cloudops's proof), then the local one (memory and its overlay over
NBD, NON_SHARED_INC), both to the other host, alternating direction. Reported: the median
wall time of ``migrate_vm`` (preflight, preparing the destination, the job, the clean-up),
the median libvirt job time, the bytes moved (libvirt's data_processed: memory; the NBD copy of
the overlay is not in the job's figures, so the overlay's allocation is reported beside), and the
ratio shared / copying.

    .venv/bin/python bench/shared_migration.py [--pairs 3] [--fill-mib 32] [--json] [--keep]
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloudops import inventory  # noqa: E402
from cloudops.compute import guest, vms  # noqa: E402
from cloudops.imaging import build as imagebuild  # noqa: E402
from cloudops.imaging import store as images  # noqa: E402
from cloudops.lab import hosts as lab  # noqa: E402
from cloudops.migration import migrate  # noqa: E402
from cloudops.ssh import connect  # noqa: E402

PREFIX = "hsa"
KINDS = {"shared": "b-shared", "local": "b-local"}


def in_vm(inv, name, command) -> str:
    host = vms.locate(name, inv.hypervisors())
    vm = next(v for v in vms.list_on_host(host) if v.name == name)
    with connect(host) as hv, guest.connect_vm(hv, vm.ip) as conn:
        return conn.run(command, hide=True, in_stream=False).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--fill-mib", type=int, default=32, help="fresh data written into each VM's disk first")
    parser.add_argument("--memory", type=int, default=96)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="leave the lab up")
    args = parser.parse_args()

    the_lab = lab.up(2, prefix=PREFIX, progress=lambda m: print(f"lab: {m}", file=sys.stderr))
    runs = {kind: [] for kind in KINDS}
    overlay = {}  # the overlay's allocated bytes once filled: what a copying migration moves over NBD
    try:
        inv = inventory.load(the_lab.inventory_path)
        images.add_image(imagebuild.build_image("tiny"), name="tiny", replace=True)
        for kind, name in KINDS.items():
            vms.start_vm(vms.VMSpec(name=name, image="tiny", memory=args.memory, host="hv1", timeout=300,
                                    storage=kind), inv)
            guest.wait_until(lambda n=name: _answers(inv, n), 180, f"a shell on {name}")
            if args.fill_mib:
                in_vm(inv, name, f"dd if=/dev/urandom of=/root/fill bs=1M count={args.fill_mib} 2>/dev/null; sync")
            overlay[kind] = _allocation(inv, name)
        where = "hv1"
        for pair in range(args.pairs):
            to = "hv2" if where == "hv1" else "hv1"
            for kind, name in KINDS.items():
                started = time.monotonic()
                result = migrate.migrate_vm(name, to, inv, progress=lambda p: None)
                wall = time.monotonic() - started
                runs[kind].append({"pair": pair + 1, "to": to, "wall_s": round(wall, 3),
                                   "job_s": result.migration_time, "bytes_moved": result.bytes_moved,
                                   "disk_bytes": result.disk_bytes, "shared": result.shared_storage})
                print(f"pair {pair + 1} {kind}: {wall:.2f} s wall, job {result.migration_time} s, "
                      f"{(result.bytes_moved or 0) / 2**20:.1f} MiB moved", file=sys.stderr)
            where = to
        for name in KINDS.values():
            vms.delete_vm(name, inv)
    finally:
        if not args.keep:
            lab.down(PREFIX)

    def med(kind, key):
        return statistics.median(r[key] for r in runs[kind] if r[key] is not None)

    summary = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {platform.machine()}, "
        f"{__import__('os').cpu_count()} cores", "link": "the lab bridge (veth pairs on one machine)",
        "pairs": args.pairs, "fill_mib": args.fill_mib, "memory_mib": args.memory, "runs": runs,
        "overlay_bytes": overlay,
        "median": {kind: {"wall_s": med(kind, "wall_s"), "job_s": med(kind, "job_s"),
                          "bytes_moved": med(kind, "bytes_moved")} for kind in KINDS},
    }
    summary["ratio_wall"] = round(summary["median"]["shared"]["wall_s"] / summary["median"]["local"]["wall_s"], 3)
    summary["ratio_job"] = round(summary["median"]["shared"]["job_s"] / summary["median"]["local"]["job_s"], 3)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for kind in KINDS:
            m = summary["median"][kind]
            print(f"{kind:7} median wall {m['wall_s']:.2f} s, job {m['job_s']:.2f} s, "
                  f"{m['bytes_moved'] / 2**20:.1f} MiB moved")
        print(f"shared / copying: wall {summary['ratio_wall']}, job {summary['ratio_job']}")
    return 0


def _allocation(inv, name) -> int:
    """Bytes the VM's root overlay holds on disk (libvirt's allocation, as ``qemu-img info`` disk-size)."""
    from cloudops import virt

    host = vms.locate(name, inv.hypervisors())
    with virt.open_host(host) as conn:
        dom = conn.lookupByName(name)
        path = vms._disk_paths(dom)[0]
        return conn.storageVolLookupByPath(path).info()[2]


def _answers(inv, name) -> bool:
    try:
        return in_vm(inv, name, "echo up") == "up"
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(main())
