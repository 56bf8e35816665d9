"""Failover benchmark: from a host's power loss to its shared VM answering SSH on another host.

Split into detect, fence, restart and boot (issue 14). One run.

On a 3-host lab of its own (prefix "fob", or --prefix), hv1 runs a real tiny VM started with
``vm.start --storage shared`` (its overlay on the lab's shared directory, a disk lease held by
hv1's virtlockd) and, beside it, two diskless domains with cloudops records saying ``storage: shared``
(one anti-affinity group; ``--no-diskless`` leaves them out): the same failover for VMs without a
guest to boot. Once the real VM answers SSH and holds a file written before, hv1's power is cut
(``cloudops.lab.power``: every process killed), then watch cycles run in this process every
``--interval`` seconds with ``--grace`` until hv1 is failed over, fenced with the lab's own
fence_command (the power cut again, a subprocess). Then the real VM is polled over SSH through its new
host (``cloudops.compute.guest``, host key verified) until it answers. Figures:

* detect: from the power loss to the cycle that declares hv1 dead (grace plus up to one interval);
* fence: the fence_command's run;
* restart: each VM's define and start on its new host (with its reservation), and the whole failover
  cycle;
* boot: from the real VM's start returning (``failover.restart``, timed by a wrapper here) to its
  first SSH command answering on the new host; the guest's own uptime then is reported beside;
* total: power loss to SSH answering; the overhead beyond grace and boot (the issue's goal: < 5 s)
  is the total less the grace and the boot, i.e. power loss to the real VM's start returning, less
  the grace.

Oracles: virsh domstate on the new hosts, and the file written in the guest before the power loss
read back after it. ``--beside-tests`` times at once even while test runs go on (otherwise the
bench waits for them to end); the report gives the load averages at start and end either way.

    .venv/bin/python bench/failover.py [--grace 5] [--interval 1] [--prefix fob] [--beside-tests] [--json]
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.provision import wait_for_quiet  # noqa: E402 - the same wait for test runs as the other benches
from cloudops import inventory, state, virt  # noqa: E402
from cloudops.compute import guest, records, vms  # noqa: E402
from cloudops.ha import failover, watch  # noqa: E402
from cloudops.imaging import build as imagebuild  # noqa: E402
from cloudops.imaging import store as images  # noqa: E402
from cloudops.lab import hosts as lab  # noqa: E402
from cloudops.lab import power  # noqa: E402
from cloudops.net import ipam, networks  # noqa: E402
from cloudops.ssh import connect  # noqa: E402
from cloudops.templating import render  # noqa: E402

NAMES = ("fob-a", "fob-b")
REAL = "fob-vm"
MARK = "before-the-power-loss"


def start_on_hv1(inv, names) -> None:
    """The diskless VMs on hv1; the network on every host first, as deployed hosts have it."""
    hv1 = inv.hosts["hv1"]
    net = vms.network_spec("cloudops", hv1)
    for host in inv.hypervisors():
        with virt.open_host(host) as conn:
            networks.ensure_network(conn, net)
    with virt.open_host(hv1) as conn:
        for name in names:
            allocation = ipam.allocate(net, name)
            networks.add_reservation(conn, net.name, allocation.mac, allocation.ip, name)
            dom = conn.defineXML(render("lab/diskless-domain.xml.j2", name=name, ns=virt.METADATA_NS,
                                                 ip=allocation.ip, mac=allocation.mac, group="bench"))
            dom.create()
            records.save_domain(dom, "hv1")


def in_vm(inv, name, command, timeout: float = 15) -> str:
    """``command``'s output in VM ``name`` wherever it runs, through its host (as the lab tests' run_in_vm)."""
    host = vms.locate(name, inv.hypervisors())
    vm = next(v for v in vms.list_on_host(host) if v.name == name)
    with connect(host) as hv, guest.connect_vm(hv, vm.ip, timeout=timeout) as conn:
        return conn.run(command, hide=True, in_stream=False).stdout.strip()


def timed_restarts(started: dict):
    """Wrap ``failover.restart`` so each VM's start-returned moment (monotonic) lands in ``started``:
    the boot is timed from there, not from the end of the whole failover cycle."""
    original = failover.restart

    def restart(record, target, start=True):
        original(record, target, start=start)
        started[record["name"]] = time.monotonic()

    failover.restart = restart
    return original


def poll_ssh(hv, ip, deadline: float) -> tuple[float, float, int, float]:
    """Poll the VM's SSH through its host until a command answers: (answered at, guest uptime, tries,
    the last failed try's length, i.e. how late the answer may be seen)."""
    tries, last_failed = 0, 0.0
    while True:
        tries += 1
        t = time.monotonic()
        try:
            with guest.connect_vm(hv, ip, timeout=3) as conn:
                out = conn.run("cat /root/mark; cat /proc/uptime", hide=True, in_stream=False).stdout.split()
            answered = time.monotonic()
            break
        except Exception:  # noqa: BLE001 - booting: no route yet, connection refused, banner timeout
            if time.monotonic() > deadline:
                raise
            last_failed = time.monotonic() - t
            time.sleep(0.2)
    if out[0] != MARK:
        raise SystemExit(f"{REAL} answers on its new host but /root/mark holds {out[0]!r}")
    return answered, float(out[1]), tries, round(last_failed, 3)


def run(prefix: str, grace: float, interval: float, memory: int, diskless: bool) -> dict:
    names = NAMES if diskless else ()
    images.add_image(imagebuild.build_image("tiny"), name="tiny", replace=True)
    the_lab = lab.up(3, prefix=prefix)
    started: dict = {}
    original = timed_restarts(started)
    inv, vm = None, None
    try:
        inv = inventory.load(the_lab.inventory_path)
        start_on_hv1(inv, names)
        vm = vms.start_vm(vms.VMSpec(name=REAL, image="tiny", memory=memory, host="hv1", timeout=300,
                                     storage="shared"), inv)
        guest.wait_until(lambda: _answers(inv), 240, f"a shell on {REAL}")
        in_vm(inv, REAL, f"echo {MARK} > /root/mark; sync")
        watch.cycle(inv, grace)  # every host up: the cycle's fixed cost, and connections warm
        t0 = time.monotonic()
        power.power_off(prefix, "hv1")
        cycles, dead_at, report = 0, None, None
        while time.monotonic() - t0 < grace + 120:
            cycle_started = time.monotonic()
            result = watch.cycle(inv, grace)
            cycles += 1
            hv1 = next(h for h in result.hosts if h.host == "hv1")
            if hv1.status == "dead":
                dead_at, report = cycle_started - t0, hv1.failover
                done_at = time.monotonic() - t0
                break
            time.sleep(max(0.0, interval - (time.monotonic() - cycle_started)))
        if report is None:
            raise SystemExit("hv1 was not declared dead within grace + 120 s")
        steps = {s["vm"]: s for s in report["steps"]}
        if steps.get(REAL, {}).get("action") != "restarted" or REAL not in started:
            raise SystemExit(f"{REAL} was not restarted: {steps.get(REAL)}")
        target = inv.hosts[steps[REAL]["target"]]
        with connect(target) as hv:
            answered, uptime, tries, resolution = poll_ssh(hv, vm.ip, time.monotonic() + 300)
        running = {}
        for step in report["steps"]:
            with connect(inv.hosts[step["target"]]) as hv:
                running[step["vm"]] = hv.run(f"virsh -c qemu:///system domstate {step['vm']}", hide=True,
                                             in_stream=False).stdout.strip()
        moved = next(v for v in vms.list_on_host(target) if v.name == REAL)
        vm_started = started[REAL] - t0
        boot = answered - started[REAL]
        total = answered - t0
        return {"grace_s": grace, "interval_s": interval, "cycles": cycles, "detect_s": round(dead_at, 3),
                "fence_s": report["fence"]["seconds"], "restart_s": {s["vm"]: s["seconds"] for s in report["steps"]},
                "failover_cycle_s": round(done_at - dead_at, 3), "power_loss_to_running_s": round(done_at, 3),
                "overhead_diskless_s": round(done_at - grace, 3) if names else None,
                "power_loss_to_vm_started_s": round(vm_started, 3), "boot_s": round(boot, 3),
                "guest_uptime_at_ssh_s": uptime, "ssh_tries": tries, "ssh_poll_resolution_s": resolution,
                "power_loss_to_ssh_s": round(total, 3), "overhead_beyond_grace_and_boot_s": round(total - grace - boot, 3),
                "goal_met": total - grace - boot < 5.0, "same_address": (moved.ip, moved.mac) == (vm.ip, vm.mac),
                "targets": {s["vm"]: s["target"] for s in report["steps"]}, "running": running,
                "complete": report["complete"]}
    finally:
        failover.restart = original
        for host in ("hv1", "hv2", "hv3"):
            state.current().delete(f"ha/{host}")  # the lab goes: nothing of it stays missing or dead
        if inv is not None:
            net = vms.network_spec("cloudops", inv.hosts["hv1"])
            for name in (*names, REAL):
                records.forget(name)
                ipam.release(net, name)
            if vm is not None:
                guest.forget_host_keys(REAL, vm.ip)
        lab.down(prefix)


def _answers(inv) -> bool:
    try:
        return in_vm(inv, REAL, "echo up", timeout=5) == "up"
    except Exception:  # noqa: BLE001 - booting
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--prefix", default="fob")
    parser.add_argument("--memory", type=int, default=96, help="the real VM's MiB")
    parser.add_argument("--no-diskless", action="store_true", help="only the real VM on hv1")
    parser.add_argument("--beside-tests", action="store_true",
                        help="do not wait for test runs to end (the report says so: its times are of a busy machine)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    waits: list = []
    if not args.beside_tests:
        wait_for_quiet(waits)
    load_start, date = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    result = run(args.prefix, args.grace, args.interval, args.memory, not args.no_diskless)
    result.update({"date": date, "machine": f"{platform.node()} {os.cpu_count()} cpu {platform.machine()}, QEMU TCG",
                   "link": "the lab bridge (veth pairs on one machine)", "beside_test_runs": args.beside_tests,
                   "waited_for_test_runs": waits, "load_average_at_start": [round(x, 2) for x in load_start],
                   "load_average_at_end": [round(x, 2) for x in os.getloadavg()]})
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    print(f"{result['date']}, load {result['load_average_at_start']} -> {result['load_average_at_end']}"
          f"{' (beside test runs)' if args.beside_tests else ''}")
    print(f"grace {result['grace_s']:g}s, a cycle every {result['interval_s']:g}s ({result['cycles']} cycles)")
    print(f"detect   {result['detect_s']:.2f}s (power loss to the cycle that declared hv1 dead)")
    print(f"fence    {result['fence_s']:.2f}s")
    for vm, seconds in result["restart_s"].items():
        print(f"restart  {seconds:.2f}s  {vm} on {result['targets'][vm]} ({result['running'][vm]})")
    print(f"boot     {result['boot_s']:.2f}s  {REAL}: start returned to SSH answering (guest uptime "
          f"{result['guest_uptime_at_ssh_s']:.2f}s, {result['ssh_tries']} tries, last failed try "
          f"{result['ssh_poll_resolution_s']:.2f}s)")
    print(f"failover cycle {result['failover_cycle_s']:.2f}s; power loss to every VM running "
          f"{result['power_loss_to_running_s']:.2f}s; power loss to {REAL} started {result['power_loss_to_vm_started_s']:.2f}s")
    print(f"power loss -> SSH {result['power_loss_to_ssh_s']:.2f}s; overhead beyond grace and boot "
          f"{result['overhead_beyond_grace_and_boot_s']:.2f}s (goal < 5 s: {'met' if result['goal_met'] else 'missed'})")


if __name__ == "__main__":
    main()
