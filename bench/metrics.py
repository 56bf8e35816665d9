"""Collection benchmark: one bulk stats call per host vs collectd-style calls per domain and device.

Usage: .venv/bin/python bench/metrics.py [--hosts 2] [--vms 20] [--repeats 15] [--prefix cmb] [--keep] [--json]
                                         [--link-rate 1gbit] [--relay-delay-ms 0.125]

A lab of H full hosts (``--prefix``, brought up unless it already is) gets V domains per
host from templates/bench/stats-domain.xml.j2: 32 MiB, one vCPU, one raw 1 MiB disk and
one tap NIC each, started *paused* (a real QEMU process with its devices, no guest CPU).
Both ways go over the same cached ``qemu+ssh`` connections, all hosts in parallel
(cloudops.fleet), and read the same host figures:

  bulk      cloudops.metrics.cycle.collect_fleet: per host ONE getAllDomainStats (NOWAIT) + host figures
  collectd  per host listAllDomains, then per domain dom.info, dom.memoryStats, dom.vcpus,
            dom.blockStats per disk, dom.interfaceStats per NIC (device names parsed from the
            XML once beforehand, as collectd's virt plugin caches them between refreshes)
            + the same host figures

The ways run interleaved (bulk, collectd, bulk, ...) so the shared machine's noise hits both.

``--relay-delay-ms D`` reaches every host through a user-space relay that delays each direction by D
(cloudops.lab.delay: this kernel has no netem for ``lab.up --link-delay``), so a round trip gains 2 x D;
the round trip of one libvirt RPC (``getLibVersion``) is measured on the same connections and reported.
The domains are destroyed and undefined at the end; the lab is taken down unless --keep.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import libvirt  # noqa: E402

from cloudops import fleet, inventory, virt
from cloudops.lab import hosts as lab
from cloudops.lab import links
from cloudops.lab.delay import DelayRelay
from cloudops.metrics import cycle as metrics  # noqa: E402
from cloudops.metrics.collect import HostSample, _optional  # noqa: E402
from cloudops.ssh import connect  # noqa: E402
from cloudops.templating import render  # noqa: E402

TARGET = 5.0
MEMORY_MIB = 32
DISK_DIR = "/var/lib/cloudops/bench"


def bench_name(i: int) -> str:
    return f"bench-{i:03d}"


def make_domains(host, count: int) -> None:
    """``count`` paused domains on ``host`` (existing ones of the same name are replaced)."""
    with connect(host) as conn:
        conn.run(f"mkdir -p {DISK_DIR} && for i in $(seq 0 {count - 1}); do "
                 f"truncate -s 1M {DISK_DIR}/$(printf bench-%03d $i).raw; done", hide=True, in_stream=False)
    with virt.open_host(host) as lv:
        for i in range(count):
            name = bench_name(i)
            remove_domain(lv, name)
            xml = render("bench/stats-domain.xml.j2", name=name, memory=MEMORY_MIB, disk=f"{DISK_DIR}/{name}.raw")
            lv.defineXML(xml).createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)


def remove_domain(lv, name: str) -> None:
    try:
        dom = lv.lookupByName(name)
    except libvirt.libvirtError:
        return
    if dom.isActive():
        dom.destroy()
    dom.undefine()


def remove_domains(host, count: int) -> None:
    with virt.open_host(host) as lv:
        for i in range(count):
            remove_domain(lv, bench_name(i))


def devices(dom) -> tuple[list[str], list[str]]:
    root = ET.fromstring(dom.XMLDesc(0))
    disks = [t.get("dev") for t in root.findall("./devices/disk/target")]
    nics = [t.get("dev") for t in root.findall("./devices/interface/target")]
    return disks, nics


def host_figures(conn, host_name: str) -> HostSample:
    """The host part both ways share (what collect_host reads besides the bulk call)."""
    sample = HostSample(host=host_name, taken_at=time.time())
    problems = sample.problems
    _optional(problems, "node info", conn.getInfo)
    _optional(problems, "free memory", conn.getFreeMemory)
    _optional(problems, "memory stats", conn.getMemoryStats, libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
    _optional(problems, "cpu stats", conn.getCPUStats, libvirt.VIR_NODE_CPU_STATS_ALL_CPUS)
    for pool in _optional(problems, "pools", conn.listAllStoragePools, libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE) or ():
        _optional(problems, "pool info", pool.info)
    return sample


def collectd_style(hosts, device_cache: dict) -> int:
    """Per-domain, per-device calls on every host in parallel; returns the number of values read."""

    def one(host):
        values = 0
        with virt.open_host(host) as conn:
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                disks, nics = device_cache[(host.name, dom.UUIDString())]
                values += len(dom.info())
                values += len(dom.memoryStats())
                vcpu_info, _pinning = dom.vcpus()
                values += len(vcpu_info)
                for disk in disks:
                    values += len(dom.blockStats(disk))
                for nic in nics:
                    values += len(dom.interfaceStats(nic))
            host_figures(conn, host.name)
        return values

    result = fleet.run(hosts, one, workers=len(hosts), timeout=120)
    assert not result.failed, result.to_dict()
    return sum(r.value for r in result)


def bulk(hosts) -> int:
    samples = metrics.collect_fleet(hosts, workers=len(hosts), timeout=120)
    bad = {h: s for h, s in samples.items() if not isinstance(s, HostSample)}
    assert not bad, bad
    return sum(len(vm.stats) for s in samples.values() for vm in s.vms)


def through_relays(hosts, delay: float, directory: Path) -> tuple[list, list]:
    """Each host reached through a ``DelayRelay`` on loopback: the same host key, trusted for the relay's
    address ("[127.0.0.1]:port" in a known_hosts of the bench's own), so SSH still verifies it."""
    relays, relayed = [], []
    for host in hosts:
        relay = DelayRelay((host.address, host.port), delay)
        address, port = relay.address
        known = Path(host.vars["known_hosts"]).read_text().splitlines()
        keys = [line.split(None, 1)[1] for line in known
                if line.strip() and {host.name, host.address} & set(line.split(None, 1)[0].split(","))]
        trusted = directory / f"known_hosts-{host.name}"
        trusted.write_text("".join(f"[{address}]:{port} {key}\n" for key in keys))
        relays.append(relay)
        relayed.append(dataclasses.replace(host, address=address, port=port, libvirt_uri="",
                                           vars={**host.vars, "known_hosts": str(trusted)}))
    return relayed, relays


def rpc_round_trip(hosts, calls: int = 50) -> float:
    """Median seconds of one libvirt RPC (getLibVersion) over each host's cached connection."""
    samples = []
    for host in hosts:
        with virt.open_host(host) as conn:
            for _ in range(calls):
                start = time.perf_counter()
                conn.getLibVersion()
                samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--vms", type=int, default=20, help="domains per host")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--prefix", default="cmb", help="lab prefix (brought up unless already up)")
    parser.add_argument("--keep", action="store_true", help="leave the lab up at the end")
    parser.add_argument("--link-rate", help="shape the links of a lab it brings up (lab.up --link-rate)")
    parser.add_argument("--target", type=float, default=TARGET, help="collectd/bulk ratio to reach")
    parser.add_argument("--relay-delay-ms", type=float, default=0.0,
                        help="reach the hosts through a user-space relay delaying each direction this much")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]

    status = lab.status(args.prefix)
    brought_up = not status["up"]
    the_lab = (lab.up(args.hosts, prefix=args.prefix, link_rate=args.link_rate) if brought_up
               else lab.load(args.prefix))
    inv = inventory.load(the_lab.inventory_path)
    hosts = inv.hypervisors()[: args.hosts]
    relays, scratch = [], tempfile.TemporaryDirectory()
    if args.relay_delay_ms:
        hosts, relays = through_relays(hosts, args.relay_delay_ms / 1000, Path(scratch.name))
    try:
        made = time.monotonic()
        making = fleet.run(hosts, lambda h: make_domains(h, args.vms), workers=len(hosts), timeout=900)
        made = time.monotonic() - made
        if making.failed:
            sys.exit("bench/metrics.py: the domains could not be made: "
                     + "; ".join(f"{r.host}: {r.error}" for r in making.failed))
        device_cache = {}
        for host in hosts:
            with virt.open_host(host) as conn:
                for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                    device_cache[(host.name, dom.UUIDString())] = devices(dom)
        active = len(device_cache)
        assert active == args.hosts * args.vms, f"{active} active domains, expected {args.hosts * args.vms}"
        bulk(hosts), collectd_style(hosts, device_cache)  # warm: connections open, caches filled
        round_trip = rpc_round_trip(hosts)
        times = {"bulk": [], "collectd": []}
        values = {}
        for _ in range(args.repeats):
            for way, func in (("bulk", lambda: bulk(hosts)), ("collectd", lambda: collectd_style(hosts, device_cache))):
                start = time.perf_counter()
                values[way] = func()
                times[way].append(time.perf_counter() - start)
    finally:
        list(fleet.run(hosts, lambda h: remove_domains(h, args.vms), workers=len(hosts), timeout=300))
        for host in hosts:
            virt.forget(host)
        for relay in relays:
            relay.close()
        scratch.cleanup()
        if brought_up and not args.keep:
            lab.down(args.prefix)

    medians = {way: statistics.median(t) for way, t in times.items()}
    ratio = medians["collectd"] / medians["bulk"]
    calls_per_host_collectd = 1 + args.vms * 5 + 6
    report = {
        "hosts": args.hosts, "vms_per_host": args.vms, "repeats": args.repeats,
        "vms": f"{MEMORY_MIB} MiB, 1 vCPU, 1 MiB raw disk, 1 tap NIC, started paused (TCG QEMU)",
        "setup_seconds": round(made, 1),
        "median_seconds": {k: round(v, 4) for k, v in medians.items()},
        "min_seconds": {k: round(min(v), 4) for k, v in times.items()},
        "values_read": values,
        "libvirt_calls_per_host": {"bulk": 1 + 6, "collectd": calls_per_host_collectd},
        "ratio": round(ratio, 2), "target": args.target, "meets_target": ratio >= args.target,
        "machine": f"{platform.node()} {platform.machine()}, shared", "link": links.describe(the_lab.link),
        "relay_delay_ms_each_way": args.relay_delay_ms,
        "rpc_round_trip_ms": round(round_trip * 1000, 3),
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.hosts} hosts x {args.vms} VMs ({report['vms']}), {args.repeats} repeats, interleaved; "
              f"link {report['link']}, relay delay {args.relay_delay_ms} ms each way, "
              f"one RPC {report['rpc_round_trip_ms']} ms")
        for way in ("bulk", "collectd"):
            print(f"  {way:<9} median {medians[way] * 1000:8.1f} ms   min {min(times[way]) * 1000:8.1f} ms   "
                  f"values read {values[way]}")
        print(f"  ratio collectd/bulk: {ratio:.1f}x (target >= {args.target:g}x): {'met' if ratio >= args.target else 'NOT met'}")


if __name__ == "__main__":
    main()
