"""Live-migration benchmark: `virsh migrate --live` defaults against `vm.migrate` defaults, side by side.

On a 2-host lab of its own (``--prefix``, default "cmgb"; ``--link-rate`` shapes its links), one VM
whose memory a writer inside the guest keeps dirtying is migrated back and forth, the two ways
interleaved (virsh, cloudops, virsh, ...):

* virsh: ``virsh migrate --live --p2p --persistent --undefinesource --copy-storage-inc``
  run on the source host, nothing else (virsh's defaults: 300 ms max downtime, no
  auto-converge, no post-copy); the destination is prepared for it as vm.migrate
  prepares it (image, network, overlay, seed), outside the measured time;
* cloudops: ``migrate_vm`` with its default Policy.

Guests and writers: ``--image tiny`` (128 MiB, busybox) with ``--writer dd``, a dd loop over a
tmpfs file (the issue-6 setup); ``--image debian --memory 512 --writer pages --writer-mib 256``,
python3 rewriting a 256 MiB working set of its own (``cloudops.lab.guestload.start_pages``), which
on a 1gbit link dirties memory faster than the link carries it.

For each run: the job's time and the downtime, both from the completed job's statistics on
the destination, the bytes moved, the memory iterations and whether post-copy started; the
job is also sampled on the source twice a second (iteration, dirty rate, transfer rate), the
same way for both. A virsh run that has not converged after ``--give-up`` seconds is aborted
and counted as such. With a shaped link every figure is also given as a multiple of the
floor: the guest's RAM over the link rate (time), the RAM (bytes).

    .venv/bin/python bench/migrate.py [--rounds 3] [--writer-mib 16] [--json]
    .venv/bin/python bench/migrate.py --prefix cmd --link-rate 1gbit --image debian --memory 512 \\
        --writer pages --writer-mib 256 --give-up 120
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import libvirt  # noqa: E402
import paramiko  # noqa: E402

from cloudops import inventory, virt  # noqa: E402
from cloudops.compute import guest, vms  # noqa: E402
from cloudops.imaging import build as imagebuild  # noqa: E402
from cloudops.imaging import store as images  # noqa: E402
from cloudops.lab import guestload  # noqa: E402
from cloudops.lab import hosts as lab  # noqa: E402
from cloudops.lab import links  # noqa: E402
from cloudops.migration import migrate  # noqa: E402
from cloudops.ssh import connect  # noqa: E402

NAME = "b-mig"
MiB = 1 << 20


def in_vm(inv, host_name, ip, command, within: float = 60):
    """``command`` in the guest, tried again for ``within`` seconds while SSH fails (a busy TCG guest may
    miss the banner timeout): read-only commands, or ones that are safe to run twice."""
    deadline = time.monotonic() + within
    while True:
        try:
            with connect(inv.hosts[host_name]) as hv, guest.connect_vm(hv, ip, timeout=30) as conn:
                return conn.run(command, hide=True, in_stream=False).stdout.strip()
        except (paramiko.SSHException, EOFError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def completed(dest_host, name) -> dict:
    with virt.open_host(dest_host) as conn:
        return conn.lookupByName(name).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)


class Sampler:
    """The job's statistics on the source, twice a second, over a libvirt connection of its own."""

    def __init__(self, source):
        self.source, self.samples, self._stop = source, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def _run(self):
        conn = libvirt.open(self.source.libvirt_uri)
        try:
            dom = conn.lookupByName(NAME)
            t0 = time.monotonic()
            while not self._stop.wait(0.5):
                try:
                    stats = dom.jobStats()
                except libvirt.libvirtError:
                    continue
                if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
                    continue
                page = stats.get("memory_page_size", 4096)
                self.samples.append({"t": round(time.monotonic() - t0, 1),
                                     "iteration": int(stats.get("memory_iteration", 0)),
                                     "dirty_mib_s": round(stats.get("memory_dirty_rate", 0) * page / MiB, 1),
                                     "mib_s": round(stats.get("memory_bps", 0) / MiB, 1),
                                     "remaining_mib": round(stats.get("data_remaining", 0) / MiB, 1)})
        finally:
            conn.close()

    def summary(self) -> dict:
        s = self.samples
        rates = [x["dirty_mib_s"] for x in s if x["dirty_mib_s"]]
        speeds = [x["mib_s"] for x in s if x["mib_s"]]
        return {"sampled_iterations": max((x["iteration"] for x in s), default=None),
                "dirty_mib_s_first": rates[0] if rates else None,
                "dirty_mib_s_max": max(rates, default=None),
                "transfer_mib_s_median": statistics.median(speeds) if speeds else None}


def run_virsh(inv, source, dest, give_up: float) -> dict:
    """Prepare the destination as migrate_vm would, then time plain `virsh migrate --live` on the source."""
    with virt.open_host(source) as src_conn, virt.open_host(dest) as dst_conn:
        dom = src_conn.lookupByName(NAME)
        meta, disks = virt.metadata(dom), migrate._disks(src_conn, dom)
        prepared = migrate._Prepared()
        migrate._prepare(dom, meta, disks, False, migrate._image(meta), source, dest, dst_conn, prepared,
                         lambda m: None)
    cmd = (f"virsh -c qemu:///system migrate --live --p2p --persistent --undefinesource --copy-storage-inc "
           f"{NAME} {shlex.quote(migrate.migration_uri(dest))} tcp://{dest.address}")  # the hosts' own key and trust
    t0 = time.perf_counter()
    with Sampler(source) as sampler, connect(source) as hv:
        done = hv.run(f"timeout {int(give_up)} {cmd}", warn=True, hide=True, in_stream=False)
        if not done.ok:
            hv.run(f"virsh -c qemu:///system domjobabort {NAME}", warn=True, hide=True, in_stream=False)
    wall = time.perf_counter() - t0
    if not done.ok:
        time.sleep(5)  # the aborted incoming copy torn down on the destination
        with virt.open_host(dest) as dst_conn:
            migrate._undo(dst_conn, dest, prepared)  # as migrate_vm undoes a failed run, so the next one can go
        return {"converged": False, "wall": wall, "error": (done.stderr.strip() or "timed out")[-200:],
                "postcopy": False, **sampler.summary()}
    with virt.open_host(source) as src_conn:
        migrate._cleanup_source(src_conn, source, meta, disks, False, NAME, lambda m: None)
    stats = completed(dest, NAME)
    return {"converged": True, "wall": wall, "job_time": stats.get("time_elapsed", 0) / 1000,
            "downtime_ms": stats.get("downtime"), "bytes": stats.get("data_processed"),
            "memory_bytes": stats.get("memory_processed"), "disk_bytes": stats.get("disk_processed"),
            "iterations": stats.get("memory_iteration"), "postcopy": False, **sampler.summary()}


def run_cloudops(inv, source, dest) -> dict:
    t0 = time.perf_counter()
    with Sampler(source) as sampler:
        result = migrate.migrate_vm(NAME, dest.name, inv, progress=lambda p: None)
    wall = time.perf_counter() - t0
    return {"converged": True, "wall": wall, "job_time": result.migration_time, "downtime_ms": result.downtime_ms,
            "bytes": result.bytes_moved, "memory_bytes": result.memory_bytes, "disk_bytes": result.disk_bytes,
            "iterations": result.iterations, "postcopy": result.postcopy, **sampler.summary()}


def median(runs, key):
    values = [r[key] for r in runs if r.get("converged") and r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(runs: list, give_up: float) -> dict:
    done = [x for x in runs if x["converged"]]
    return {"runs": len(runs), "converged": len(done), "gave_up_after_s": give_up if len(done) < len(runs) else None,
            "job_time_median_s": median(runs, "job_time"), "wall_median_s": median(runs, "wall"),
            "downtime_median_ms": median(runs, "downtime_ms"),
            "downtime_max_ms": max((x["downtime_ms"] for x in done if x.get("downtime_ms") is not None), default=None),
            "bytes_median": median(runs, "bytes"), "memory_bytes_median": median(runs, "memory_bytes"),
            "disk_bytes_median": median(runs, "disk_bytes"), "iterations_median": median(runs, "iterations"),
            "postcopy_runs": sum(bool(x.get("postcopy")) for x in done),
            "iterations_reached_when_given_up": [x.get("sampled_iterations") for x in runs if not x["converged"]],
            "dirty_mib_s_first_median": statistics.median(v) if (v := [x["dirty_mib_s_first"] for x in runs
                                                                      if x.get("dirty_mib_s_first")]) else None,
            "transfer_mib_s_median": statistics.median(v) if (v := [x["transfer_mib_s_median"] for x in runs
                                                                  if x.get("transfer_mib_s_median")]) else None}


def floors(memory_mib: int, link: dict | None) -> dict | None:
    """The floor of a migration over the link: all of the RAM once at the link's rate."""
    if not link:
        return None
    return {"time_s": memory_mib * MiB * 8 / link["rate_bps"], "bytes": memory_mib * MiB,
            "link_mib_s": link["rate_bps"] / 8 / MiB}


def with_floor(s: dict, floor: dict | None) -> dict:
    """Job time (a virsh that gave up: the give-up bound), downtime and bytes as multiples of the floor."""
    if not floor:
        return {}
    time_s = s["job_time_median_s"] if s["converged"] == s["runs"] else s["gave_up_after_s"]
    x = {"job_time_x_floor": time_s / floor["time_s"] if time_s else None,
         "job_time_is_give_up_bound": s["converged"] < s["runs"],
         "downtime_x_floor": (s["downtime_median_ms"] / 1000 / floor["time_s"]) if s["downtime_median_ms"] else None,
         "bytes_x_ram": (s["bytes_median"] / floor["bytes"]) if s["bytes_median"] else None}
    return x


def eject_seed(host) -> str | None:
    """Empty the guest's CD-ROM (the NoCloud seed, read at first boot): the target it was on, or None."""
    with virt.open_host(host) as conn:
        dom = conn.lookupByName(NAME)
        for disk in ET.fromstring(dom.XMLDesc(0)).findall("./devices/disk[@device='cdrom']"):
            source = disk.find("./source")
            if source is None:
                continue
            disk.remove(source)
            dom.updateDeviceFlags(ET.tostring(disk, encoding="unicode"),
                                  libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            return disk.find("./target").get("dev")
    return None


def writer_command(kind: str, mib: int, stride: int) -> str:
    return guestload.start_pages(mib, stride) if kind == "pages" else guestload.start(mib)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="migrations of each kind")
    ap.add_argument("--prefix", default="cmgb", help="the lab's prefix (its own lab, taken down at the end)")
    ap.add_argument("--image", default="tiny", choices=("tiny", "debian"), help="the recipe of the guest's image")
    ap.add_argument("--memory", type=int, default=128, help="the guest's RAM, MiB")
    ap.add_argument("--writer", default="dd", choices=("dd", "pages"),
                    help="dd: a dd loop over a tmpfs file (busybox); pages: python3 rewriting a working set")
    ap.add_argument("--writer-mib", type=int, default=16, help="the writer's working set, MiB")
    ap.add_argument("--writer-stride", type=int, default=4096,
                    help="pages: one byte written in this many (4096: one per page; 1: every byte)")
    ap.add_argument("--give-up", type=float, default=180, help="seconds before a virsh run counts as not converging")
    ap.add_argument("--eject-seed", action="store_true",
                    help="empty the guest's CD-ROM (its seed) before the first migration")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    ap.add_argument("--link-rate", help="shape the lab's links (lab.up --link-rate, e.g. 1gbit)")
    args = ap.parse_args()

    load_start, date = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    image, _ = images.add_image(imagebuild.build_image(args.image), name=args.image, replace=True)
    the_lab = lab.up(2, prefix=args.prefix, link_rate=args.link_rate)
    inv = inventory.load(the_lab.inventory_path)
    hosts = [inv.hosts["hv1"], inv.hosts["hv2"]]
    runs = {"virsh": [], "cloudops": []}
    writer_rates, ejected = [], None
    try:
        vm = vms.start_vm(vms.VMSpec(name=NAME, image=image.name, memory=args.memory, host="hv1",
                                     timeout=900), inv)
        guest.wait_until(lambda: _answers(inv, "hv1", vm.ip), 300, "a shell in the VM", interval=2)
        ejected = eject_seed(hosts[0]) if args.eject_seed else None
        in_vm(inv, "hv1", vm.ip, writer_command(args.writer, args.writer_mib, args.writer_stride))
        where = 0
        for _ in range(args.rounds):
            for kind in ("virsh", "cloudops"):
                source, dest = hosts[where], hosts[1 - where]
                if args.writer == "pages":  # the writer's own rate, unthrottled, just before the job
                    time.sleep(3)
                    try:
                        rate = in_vm(inv, source.name, vm.ip, guestload.rate_pages())
                    except Exception as exc:  # a guest that stopped answering: said in the run, not fatal
                        rate = f"no answer: {type(exc).__name__}"
                    writer_rates.append(int(rate) if rate.isdigit() else rate)
                run = run_virsh(inv, source, dest, args.give_up) if kind == "virsh" else run_cloudops(inv, source, dest)
                run["writer_mib_s_before"] = writer_rates[-1] if args.writer == "pages" else None
                runs[kind].append(run)
                print(f"{kind:<8} {source.name}->{dest.name} {json.dumps(run)}", file=sys.stderr)
                if run["converged"]:
                    where = 1 - where
        vms.delete_vm(NAME, inv)
    finally:
        if not args.keep:
            lab.down(args.prefix)

    floor = floors(args.memory, the_lab.link)
    summary = {kind: summarize(r, args.give_up) for kind, r in runs.items()}
    for s in summary.values():
        s.update(with_floor(s, floor))
    v, c = summary["virsh"], summary["cloudops"]
    virsh_time = v["job_time_median_s"] if v["converged"] == v["runs"] else args.give_up
    ratio = (c["job_time_median_s"] / virsh_time) if virsh_time and c["job_time_median_s"] else None
    rates = [r for r in writer_rates if isinstance(r, int) and r]
    out = {"date": date, "machine": platform.node(), "cores": os.cpu_count(), "link": links.describe(the_lab.link),
           "image": args.image, "memory_mib": args.memory, "writer": args.writer, "writer_mib": args.writer_mib,
           "writer_stride": args.writer_stride, "seed_ejected": ejected,
           "writer_mib_s_median": statistics.median(rates) if rates else None, "floor": floor,
           "load_average_at_start": [round(x, 2) for x in load_start],
           "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
           "summary": summary, "job_time_ratio_cloudops_to_virsh": ratio,
           "ratio_against_give_up_bound": v["converged"] < v["runs"], "runs": runs}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{date}, {out['cores']} cores, link {out['link']}, {args.image} {args.memory} MiB, writer {args.writer} "
              f"{args.writer_mib} MiB ({_f(out['writer_mib_s_median'])} MiB/s), load {out['load_average_at_start']} -> "
              f"{out['load_average_at_end']}")
        if floor:
            print(f"floor: {args.memory} MiB / {floor['link_mib_s']:.1f} MiB/s = {floor['time_s']:.2f} s")
        for kind, s in summary.items():
            print(f"{kind:<9} converged {s['converged']}/{s['runs']}  job time median {_f(s['job_time_median_s'])} s "
                  f"({_f(s.get('job_time_x_floor'))}x floor{', give-up bound' if s.get('job_time_is_give_up_bound') else ''})  "
                  f"wall {_f(s['wall_median_s'])} s  downtime median {_f(s['downtime_median_ms'])} ms "
                  f"(max {_f(s['downtime_max_ms'])})  moved {_f((s['bytes_median'] or 0) / MiB)} MiB  "
                  f"iterations {_f(s['iterations_median'])}  post-copy {s['postcopy_runs']}/{s['converged']}  "
                  f"dirty {_f(s['dirty_mib_s_first_median'])} MiB/s  sent {_f(s['transfer_mib_s_median'])} MiB/s")
        print(f"job time ratio cloudops/virsh: {_f(ratio)}"
              + (f" (virsh: the give-up bound of {args.give_up:g} s)" if out["ratio_against_give_up_bound"] else ""))
    return 0


def _answers(inv, host, ip):
    try:
        return in_vm(inv, host, ip, "echo up", within=0) == "up"
    except Exception:
        return False


def _f(x):
    return "n/a" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    sys.exit(main())
