"""Live-migration benchmark: `virsh migrate --live` defaults against `vm.migrate` defaults, side by side.

On a 2-host lab of its own (prefix "cmgb"), one VM (128 MiB) whose memory a writer
inside the guest keeps dirtying (a dd loop over a tmpfs file) is migrated back and
forth, alternating the two ways:

* virsh: ``virsh migrate --live --p2p --persistent --undefinesource --copy-storage-inc``
  run on the source host, nothing else (virsh's defaults: 300 ms max downtime, no
  auto-converge, no post-copy); the destination is prepared for it as vm.migrate
  prepares it (image, network, overlay, seed), outside the measured time;
* cloudops: ``migrate_vm`` with its default Policy (downtime ramp, auto-converge,
  post-copy from the 4th memory iteration).

For each: the migration job's time and the downtime, both from the completed job's
statistics on the destination, and the bytes moved. A virsh run that has not converged
after ``--give-up`` seconds is aborted and counted as such.

    .venv/bin/python bench/migrate.py [--rounds 3] [--writer-mib 16] [--json]
"""

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloudops import inventory, virt
from cloudops.compute import (
    guest,
    vms,  # noqa: E402
)
from cloudops.imaging import build as imagebuild
from cloudops.imaging import store as images
from cloudops.lab import guestload
from cloudops.lab import hosts as lab
from cloudops.lab import links
from cloudops.migration import migrate
from cloudops.ssh import connect  # noqa: E402

PREFIX = "cmgb"
NAME = "b-mig"


def in_vm(inv, host_name, ip, command):
    with connect(inv.hosts[host_name]) as hv, guest.connect_vm(hv, ip) as conn:
        return conn.run(command, hide=True, in_stream=False).stdout.strip()


def completed(dest_host, name) -> dict:
    with virt.open_host(dest_host) as conn:
        return conn.lookupByName(name).jobStats(__import__("libvirt").VIR_DOMAIN_JOB_STATS_COMPLETED)


def run_virsh(inv, source, dest, give_up: float) -> dict:
    """Prepare the destination as migrate_vm would, then time plain `virsh migrate --live` on the source."""
    with virt.open_host(source) as src_conn, virt.open_host(dest) as dst_conn:
        dom = src_conn.lookupByName(NAME)
        meta, disks = virt.metadata(dom), migrate._disks(src_conn, dom)
        migrate._prepare(dom, meta, disks, False, migrate._image(meta), source, dest, dst_conn,
                         migrate._Prepared(), lambda m: None)
    cmd = (f"virsh -c qemu:///system migrate --live --p2p --persistent --undefinesource --copy-storage-inc "
           f"{NAME} {shlex.quote(migrate.migration_uri(dest))} tcp://{dest.address}")  # the hosts' own key and trust
    t0 = time.perf_counter()
    with connect(source) as hv:
        done = hv.run(f"timeout {int(give_up)} {cmd}", warn=True, hide=True, in_stream=False)
        if not done.ok:
            hv.run(f"virsh -c qemu:///system domjobabort {NAME}", warn=True, hide=True, in_stream=False)
    wall = time.perf_counter() - t0
    if not done.ok:
        return {"converged": False, "wall": wall, "error": (done.stderr.strip() or "timed out")[-200:]}
    with virt.open_host(source) as src_conn:
        migrate._cleanup_source(src_conn, source, meta, disks, False, NAME, lambda m: None)
    stats = completed(dest, NAME)
    return {"converged": True, "wall": wall, "job_time": stats.get("time_elapsed", 0) / 1000,
            "downtime_ms": stats.get("downtime"), "bytes": stats.get("data_processed"),
            "iterations": stats.get("memory_iteration")}


def run_cloudops(inv, dest) -> dict:
    t0 = time.perf_counter()
    result = migrate.migrate_vm(NAME, dest.name, inv, progress=lambda p: None)
    wall = time.perf_counter() - t0
    return {"converged": True, "wall": wall, "job_time": result.migration_time, "downtime_ms": result.downtime_ms,
            "bytes": result.bytes_moved, "iterations": result.iterations, "postcopy": result.postcopy}


def median(runs, key):
    values = [r[key] for r in runs if r.get("converged") and r.get(key) is not None]
    return statistics.median(values) if values else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="migrations of each kind")
    ap.add_argument("--writer-mib", type=int, default=16, help="size of the tmpfs file the guest keeps rewriting")
    ap.add_argument("--give-up", type=float, default=180, help="seconds before a virsh run counts as not converging")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    ap.add_argument("--link-rate", help="shape the lab's links (lab.up --link-rate, e.g. 1gbit)")
    args = ap.parse_args()

    image, _ = images.add_image(imagebuild.build_image("tiny"), name="tiny", replace=True)
    the_lab = lab.up(2, prefix=PREFIX, link_rate=args.link_rate)
    inv = inventory.load(the_lab.inventory_path)
    hosts = [inv.hosts["hv1"], inv.hosts["hv2"]]
    runs = {"virsh": [], "cloudops": []}
    try:
        vm = vms.start_vm(vms.VMSpec(name=NAME, image=image.name, memory=128, host="hv1", timeout=300), inv)
        guest.wait_until(lambda: _answers(inv, "hv1", vm.ip), 60, "a shell in the VM")
        in_vm(inv, "hv1", vm.ip, guestload.start(args.writer_mib))
        where = 0
        for _ in range(args.rounds):
            for kind in ("virsh", "cloudops"):
                source, dest = hosts[where], hosts[1 - where]
                run = run_virsh(inv, source, dest, args.give_up) if kind == "virsh" else run_cloudops(inv, dest)
                runs[kind].append(run)
                print(f"{kind:<8} {source.name}->{dest.name} {json.dumps(run)}", file=sys.stderr)
                if run["converged"]:
                    where = 1 - where
        vms.delete_vm(NAME, inv)
    finally:
        if not args.keep:
            lab.down(PREFIX)

    summary = {kind: {"runs": len(r), "converged": sum(x["converged"] for x in r),
                      "job_time_median_s": median(r, "job_time"), "wall_median_s": median(r, "wall"),
                      "downtime_median_ms": median(r, "downtime_ms"), "downtime_max_ms": max(
                          (x["downtime_ms"] for x in r if x.get("downtime_ms") is not None), default=None),
                      "bytes_median": median(r, "bytes")} for kind, r in runs.items()}
    v, c = summary["virsh"], summary["cloudops"]
    ratio = (c["job_time_median_s"] / v["job_time_median_s"]) if v["job_time_median_s"] and c["job_time_median_s"] else None
    out = {"machine": platform.node(), "link": links.describe(the_lab.link), "writer_mib": args.writer_mib,
           "summary": summary,
           "job_time_ratio_cloudops_to_virsh": ratio, "runs": runs}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for kind, s in summary.items():
            print(f"{kind:<9} converged {s['converged']}/{s['runs']}  job time median {_f(s['job_time_median_s'])} s  "
                  f"wall {_f(s['wall_median_s'])} s  downtime median {_f(s['downtime_median_ms'])} ms "
                  f"(max {_f(s['downtime_max_ms'])})  moved {_f((s['bytes_median'] or 0) / 2**20)} MiB")
        print(f"job time ratio cloudops/virsh: {_f(ratio)}")
    return 0


def _answers(inv, host, ip):
    try:
        return in_vm(inv, host, ip, "echo up") == "up"
    except Exception:
        return False


def _f(x):
    return "n/a" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    sys.exit(main())
