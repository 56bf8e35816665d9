"""Failover benchmark: from a host's power loss to its shared VMs running on other hosts, split into
detect, fence and restart (issue 14). One run.

On a 3-host lab of its own (prefix "fob", or --prefix), two diskless domains with cloudops records
saying ``storage: shared`` (one anti-affinity group) run on hv1: what a failover does for a shared
VM minus its guest's boot, which needs ``vm.start --storage shared`` (another branch; the boot is
not measured here). hv1's power is cut (``cloudops.lab.power``: every process killed), then watch
cycles run in this process every ``--interval`` seconds with ``--grace`` until hv1 is failed over,
fenced with the lab's own fence_command (the power cut again, a subprocess). Figures:

* detect: from the power loss to the cycle that declares hv1 dead (grace plus up to one interval);
* fence: the fence_command's run;
* restart: each VM's define and start on its new host (with its reservation), and the whole failover
  cycle; the overhead is everything from the power loss to the last VM running, less the grace.

The oracle that the VMs run is virsh on their new hosts, after the timing.

    .venv/bin/python bench/failover.py [--grace 5] [--interval 1] [--prefix fob] [--json]
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloudops import inventory, state, virt  # noqa: E402
from cloudops.compute import records, vms  # noqa: E402
from cloudops.ha import watch  # noqa: E402
from cloudops.lab import hosts as lab  # noqa: E402
from cloudops.lab import power  # noqa: E402
from cloudops.net import ipam, networks  # noqa: E402
from cloudops.ssh import connect  # noqa: E402

NAMES = ("fob-a", "fob-b")
DISKLESS = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>
<os><type arch='x86_64'>hvm</type><boot dev='hd'/></os>
<metadata><cloudops:vm xmlns:cloudops='{ns}'><cloudops:image>none</cloudops:image>
<cloudops:network>cloudops</cloudops:network><cloudops:ip>{ip}</cloudops:ip><cloudops:mac>{mac}</cloudops:mac>
<cloudops:customize>seed</cloudops:customize><cloudops:group>bench</cloudops:group>
<cloudops:storage>shared</cloudops:storage></cloudops:vm></metadata>
<devices><interface type='network'><mac address='{mac}'/><source network='cloudops'/><model type='virtio'/></interface>
</devices></domain>"""


def start_on_hv1(inv) -> None:
    """The VMs on hv1; the network on every host first, as deployed hosts have it."""
    hv1 = inv.hosts["hv1"]
    net = vms.network_spec("cloudops", hv1)
    for host in inv.hypervisors():
        with virt.open_host(host) as conn:
            networks.ensure_network(conn, net)
    with virt.open_host(hv1) as conn:
        for name in NAMES:
            allocation = ipam.allocate(net, name)
            networks.add_reservation(conn, net.name, allocation.mac, allocation.ip, name)
            dom = conn.defineXML(DISKLESS.format(name=name, ns=virt.METADATA_NS, ip=allocation.ip, mac=allocation.mac))
            dom.create()
            records.save_domain(dom, "hv1")


def run(prefix: str, grace: float, interval: float) -> dict:
    the_lab = lab.up(3, prefix=prefix)
    try:
        inv = inventory.load(the_lab.inventory_path)
        start_on_hv1(inv)
        watch.cycle(inv, grace)  # every host up: the cycle's fixed cost, and connections warm
        t0 = time.monotonic()
        power.power_off(prefix, "hv1")
        cycles, dead_at, report = 0, None, None
        while time.monotonic() - t0 < grace + 120:
            started = time.monotonic()
            result = watch.cycle(inv, grace)
            cycles += 1
            hv1 = next(h for h in result.hosts if h.host == "hv1")
            if hv1.status == "dead":
                dead_at, report = started - t0, hv1.failover
                done_at = time.monotonic() - t0
                break
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
        if report is None:
            raise SystemExit("hv1 was not declared dead within grace + 120 s")
        running = {}
        for step in report["steps"]:
            with connect(inv.hosts[step["target"]]) as hv:
                running[step["vm"]] = hv.run(f"virsh -c qemu:///system domstate {step['vm']}", hide=True,
                                             in_stream=False).stdout.strip()
        restarts = {s["vm"]: s["seconds"] for s in report["steps"]}
        return {"grace_s": grace, "interval_s": interval, "cycles": cycles, "detect_s": round(dead_at, 3),
                "fence_s": report["fence"]["seconds"], "restart_s": restarts,
                "failover_cycle_s": round(done_at - dead_at, 3), "power_loss_to_running_s": round(done_at, 3),
                "overhead_s": round(done_at - grace, 3), "targets": {s["vm"]: s["target"] for s in report["steps"]},
                "running": running, "complete": report["complete"]}
    finally:
        for host in ("hv1", "hv2", "hv3"):
            state.current().delete(f"ha/{host}")  # the lab goes: nothing of it stays missing or dead
        for name in NAMES:
            records.forget(name)
            for net in [vms.network_spec("cloudops", inv.hosts["hv1"])]:
                ipam.release(net, name)
        lab.down(prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--prefix", default="fob")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.prefix, args.grace, args.interval)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    print(f"grace {result['grace_s']:g}s, a cycle every {result['interval_s']:g}s ({result['cycles']} cycles)")
    print(f"detect   {result['detect_s']:.2f}s (power loss to the cycle that declared hv1 dead)")
    print(f"fence    {result['fence_s']:.2f}s")
    for vm, seconds in result["restart_s"].items():
        print(f"restart  {seconds:.2f}s  {vm} on {result['targets'][vm]} ({result['running'][vm]})")
    print(f"failover cycle {result['failover_cycle_s']:.2f}s; power loss to every VM running "
          f"{result['power_loss_to_running_s']:.2f}s; overhead beyond grace {result['overhead_s']:.2f}s")


if __name__ == "__main__":
    main()
