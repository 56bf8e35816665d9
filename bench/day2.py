"""Day-2 benchmark: `invoke vm.export` and `vm.snapshot` of a running VM against the naive way and virsh.

On a 1-host lab of its own (prefix "exb"), one tiny VM (96 MiB guest) with 40 MiB of random data
written into its disk beforehand (so the export is not only the image's 18 MiB), rounds alternating
A B A B:

* cloudops: the real CLI, ``invoke vm.export VM FILE --force --json``, the whole process timed
  (interpreter start to exit): push backup on the host while the guest runs, stream to this machine
  with its sha256, host copy removed, ``FILE.json`` written.
* naive: what an operator scripts by hand to get a consistent, flattened copy here: over SSH on the
  hypervisor ``virsh dumpxml`` (the description), ``virsh suspend``, ``qemu-img convert -U -O qcow2``
  of the disk chain, ``virsh resume``; then the file fetched over SFTP, ``sha256sum`` here, the host
  copy removed. The guest is paused during the convert: that time is recorded (``paused_s``);
  vm.export never pauses it.

A third sample per round, ``invoke vm.info VM --json``, is the fixed cost of any cloudops verb on a
VM (interpreter and imports, inventory, finding the VM on the hosts, a libvirt connection): the
export's own work is its wall time minus that.

Both outputs are checked after each round, untimed: ``qemu-img check`` clean, no backing file.

``--part snapshot`` (or ``all``): snapshot create and revert of the same running VM, A B A B, against
``virsh`` run on the hypervisor over one open SSH connection (so virsh pays no interpreter start and no
SSH handshake; cloudops's whole CLI does, which ``vm.info`` measures):

* ``vm.snapshot --create`` (disk only: QEMU's internal snapshot, the guest never pauses, crash-consistent
  without an agent) against ``virsh snapshot-create-as VM NAME`` with its defaults (a full system
  checkpoint of a running domain: the guest pauses while its RAM is saved);
* ``vm.snapshot --create --memory`` against the same virsh default: the same kind of snapshot;
* ``vm.snapshot --revert`` of a memory snapshot against ``virsh snapshot-revert VM NAME``.

Each snapshot is deleted after its round, untimed, and ``qemu-img snapshot -l`` is checked for it first.

    .venv/bin/python bench/day2.py [--part export|snapshot|all] [--rounds 3] [--json] [--keep]
"""

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloudops import inventory
from cloudops.compute import guest, vms
from cloudops.imaging import build as imagebuild
from cloudops.imaging import store as images
from cloudops.lab import hosts as lab
from cloudops.ssh import connect

from bench.provision import invoke, wait_for_quiet  # noqa: E402 - the same CLI runner and quiet-machine wait

PREFIX = "exb"
NAME = "exb-vm"
DISK = f"/var/lib/cloudops/disks/{NAME}.qcow2"
NAIVE = """set -e
virsh -c qemu:///system dumpxml {name} > {out}.xml
t0=$(date +%s.%N)
virsh -c qemu:///system suspend {name} > /dev/null
qemu-img convert -U -O qcow2 {disk} {out}
virsh -c qemu:///system resume {name} > /dev/null
t1=$(date +%s.%N)
echo "paused $t0 $t1"
"""


def run_cloudops(inv_path, out: Path) -> dict:
    wall, done = invoke("vm.export", NAME, str(out), "--force", "--json", "--inventory", str(inv_path))
    result = json.loads(done.stdout)
    return {"wall": wall, "size": result["export"]["disk"]["size"], "paused_s": 0.0}


def run_info(inv_path, _out: Path) -> dict:
    wall, _ = invoke("vm.info", NAME, "--json", "--inventory", str(inv_path))
    return {"wall": wall}


def run_naive(host, out: Path) -> dict:
    remote = f"/var/lib/cloudops/disks/naive-{os.getpid()}.qcow2"
    t0 = time.perf_counter()
    with connect(host) as hv:
        try:
            done = hv.run(f"bash -c {shlex.quote(NAIVE.format(name=NAME, disk=DISK, out=remote))}", hide=True,
                          in_stream=False)
            hv.get(remote, str(out))
            hv.get(f"{remote}.xml", f"{out}.xml")
        finally:
            hv.run(f"rm -f {shlex.quote(remote)} {shlex.quote(remote)}.xml", hide=True, warn=True, in_stream=False)
    subprocess.run(["sha256sum", str(out)], check=True, capture_output=True)
    wall = time.perf_counter() - t0
    _, start, end = done.stdout.split()[-3:]
    return {"wall": wall, "size": out.stat().st_size, "paused_s": round(float(end) - float(start), 3)}


def run_virsh(hv, command: str) -> float:
    t0 = time.perf_counter()
    hv.run(f"virsh -c qemu:///system {command}", hide=True, in_stream=False)
    return time.perf_counter() - t0


def snapshot_tags(hv) -> list[str]:
    lines = hv.run(f"qemu-img snapshot -U -l {DISK}", hide=True, in_stream=False).stdout.splitlines()
    return [line.split()[1] for line in lines if line[:1].isdigit()]


def snapshot_rounds(inv_path, host, rounds: int, waits: list, quiet=wait_for_quiet) -> dict:
    """Samples (seconds) of snapshot create and revert, cloudops's CLI against virsh on the host, interleaved."""
    samples = {k: [] for k in ("cloudops_create_disk", "cloudops_create_memory", "virsh_create",
                               "cloudops_revert_memory", "virsh_revert", "vm_info")}
    with connect(host) as hv:
        for n in range(1, rounds + 1):
            ours, theirs, disk_only = f"cm{n}", f"vm{n}", f"cd{n}"
            steps = (
                ("cloudops_create_disk", lambda: invoke("vm.snapshot", NAME, "--create", disk_only, "--json",
                                                        "--inventory", str(inv_path))[0]),
                ("virsh_create", lambda: run_virsh(hv, f"snapshot-create-as {NAME} {theirs}")),
                ("cloudops_create_memory", lambda: invoke("vm.snapshot", NAME, "--create", ours, "--memory", "--json",
                                                          "--inventory", str(inv_path))[0]),
                ("virsh_revert", lambda: run_virsh(hv, f"snapshot-revert {NAME} {theirs}")),
                ("cloudops_revert_memory", lambda: invoke("vm.snapshot", NAME, "--revert", ours, "--json",
                                                          "--inventory", str(inv_path))[0]),
                ("vm_info", lambda: invoke("vm.info", NAME, "--json", "--inventory", str(inv_path))[0]),
            )
            for kind, run in steps:
                quiet(waits)
                samples[kind].append(round(run(), 3))
                print(f"{kind:<24} #{n}: {samples[kind][-1]:.3f} s", file=sys.stderr)
            tags = snapshot_tags(hv)
            if not {ours, theirs, disk_only} <= set(tags):
                raise RuntimeError(f"round {n}: the disk's snapshots are {tags}")
            for snap in (disk_only, ours, theirs):  # untimed: the disk does not grow round after round
                hv.run(f"virsh -c qemu:///system snapshot-delete {NAME} {snap}", hide=True, in_stream=False)
    report = {kind: stats(values) for kind, values in samples.items()}
    median = {kind: v["median"] for kind, v in report.items()}
    report["ratios"] = {
        "create_disk_only_over_virsh_default": round(median["cloudops_create_disk"] / median["virsh_create"], 3),
        "create_memory_over_virsh_default": round(median["cloudops_create_memory"] / median["virsh_create"], 3),
        "revert_memory_over_virsh": round(median["cloudops_revert_memory"] / median["virsh_revert"], 3),
    }
    report["cloudops_own_work_s"] = {kind: round(median[kind] - median["vm_info"], 2) for kind in
                                     ("cloudops_create_disk", "cloudops_create_memory", "cloudops_revert_memory")}
    report["samples"] = samples
    return report


def check_flat(path: Path) -> None:
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True,
                                     text=True, check=True).stdout)
    if "backing-filename" in info:
        raise RuntimeError(f"{path} has a backing file")
    subprocess.run(["qemu-img", "check", "-q", str(path)], check=True)


def stats(values) -> dict:
    values = list(values)
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each (default 3)")
    ap.add_argument("--part", choices=("export", "snapshot", "all"), default="all", help="what to time (default all)")
    ap.add_argument("--beside-tests", action="store_true",
                    help="do not wait for test runs to end (the report says so: its times are of a busy machine)")
    ap.add_argument("--json", action="store_true", help="print only the JSON summary")
    ap.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    args = ap.parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C and SIGTERM take the lab down
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    load_start = os.getloadavg()
    quiet = _no_wait if args.beside_tests else wait_for_quiet
    images.add_image(imagebuild.build_image("tiny"), name="tiny", replace=True)
    waits, samples = [], {"cloudops": [], "naive": [], "vm_info": []}
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    the_lab = lab.up(1, prefix=PREFIX)
    try:
        inv = inventory.load(the_lab.inventory_path)
        host = inv.hosts["hv1"]
        vm = vms.start_vm(vms.VMSpec(name=NAME, image="tiny", memory=96, host="hv1", timeout=240), inv)
        with connect(host) as hv:
            guest.wait_until(lambda: _answers(hv, vm.ip), 120, f"a shell on {NAME}")
            with guest.connect_vm(hv, vm.ip) as conn:
                conn.run("dd if=/dev/urandom of=/root/data bs=1M count=40 2>/dev/null && sync", hide=True,
                         in_stream=False)
        with tempfile.TemporaryDirectory(prefix="cloudops-bench-") as tmp:
            if args.part != "export":
                snapshot_report = snapshot_rounds(the_lab.inventory_path, host, args.rounds, waits, quiet)
            if args.part != "snapshot":
                run_cloudops(the_lab.inventory_path, Path(tmp) / "warm.qcow2")  # warm-up, not timed
            for n in range(1, args.rounds + 1 if args.part != "snapshot" else 1):  # interleaved A B A B: machine noise hits both alike
                for kind, run in (("cloudops", lambda p: run_cloudops(the_lab.inventory_path, p)),
                                  ("naive", lambda p: run_naive(host, p)),
                                  ("vm_info", lambda p: run_info(the_lab.inventory_path, p))):
                    quiet(waits)
                    out = Path(tmp) / f"{kind}-{n}.qcow2"
                    sample = run(out)
                    if kind != "vm_info":
                        check_flat(out)
                        out.unlink()
                    samples[kind].append(sample)
                    print(f"{kind:<8} #{n}: {json.dumps(sample)}", file=sys.stderr)
        vms.delete_vm(NAME, inv)
    finally:
        if not args.keep:
            lab.down(PREFIX)

    report = {
        "date": started, "machine": f"{platform.node()} {os.cpu_count()} cpu {platform.machine()}, QEMU TCG",
        "link": "the lab's bridge (a veth pair into the host's namespace)",
        "load_average_at_start": [round(x, 2) for x in load_start],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "waited_for_test_runs": waits, "rounds": args.rounds,
        "beside_test_runs": args.beside_tests,
    }
    if args.part != "export":
        report["snapshot"] = snapshot_report
        ratios = snapshot_report["ratios"]
        if not args.json:
            print(f"snapshot (medians of {args.rounds}): create disk-only {snapshot_report['cloudops_create_disk']['median']:.2f} s, "
                  f"with memory {snapshot_report['cloudops_create_memory']['median']:.2f} s, virsh default "
                  f"{snapshot_report['virsh_create']['median']:.2f} s (ratios {ratios['create_disk_only_over_virsh_default']}, "
                  f"{ratios['create_memory_over_virsh_default']}); revert {snapshot_report['cloudops_revert_memory']['median']:.2f} s, "
                  f"virsh {snapshot_report['virsh_revert']['median']:.2f} s (ratio {ratios['revert_memory_over_virsh']}); "
                  f"vm.info {snapshot_report['vm_info']['median']:.2f} s")
    if args.part == "snapshot":
        print(json.dumps(report if args.json else {k: v for k, v in report.items() if k != "snapshot"}
                         | ({} if args.json else {"snapshot": {k: v for k, v in snapshot_report.items()
                                                               if k != "samples"}}), indent=2))
        return 0
    fast, slow = stats(s["wall"] for s in samples["cloudops"]), stats(s["wall"] for s in samples["naive"])
    report.update({
        "export_size_mib": round(samples["cloudops"][0]["size"] / (1 << 20), 1),
        "naive_size_mib": round(samples["naive"][0]["size"] / (1 << 20), 1),
        "vm_export_s": fast, "naive_s": slow,
        "ratio_vm_export_over_naive": round(fast["median"] / slow["median"], 3),
        "naive_paused_s": stats(s["paused_s"] for s in samples["naive"]),
        "vm_info_s": stats(s["wall"] for s in samples["vm_info"]),
        "export_work_s": round(fast["median"] - statistics.median(s["wall"] for s in samples["vm_info"]), 2),
        "samples": samples,
    })
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"vm.export {fast['median']:.2f} s, naive {slow['median']:.2f} s (medians of {args.rounds}), ratio "
          f"{report['ratio_vm_export_over_naive']:.3f}; the naive way paused the guest "
          f"{report['naive_paused_s']['median']:.2f} s, vm.export 0 s; vm.info (any verb's fixed cost) "
          f"{report['vm_info_s']['median']:.2f} s, so the export's own work {report['export_work_s']:.2f} s")
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    return 0


def _no_wait(_log: list) -> None:
    """--beside-tests: time at once, whatever else runs."""


def _answers(hv, ip) -> bool:
    try:
        with guest.connect_vm(hv, ip, timeout=5) as conn:
            return conn.run("echo up", hide=True, in_stream=False, warn=True).stdout.strip() == "up"
    except Exception:  # noqa: BLE001 - booting
        return False


if __name__ == "__main__":
    sys.exit(main())
