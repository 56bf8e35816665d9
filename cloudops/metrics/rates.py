"""Turn one host's raw sample into datapoints: gauges as they are, counters as per-second rates.

Rates need the previous sample, kept per host in a small JSON state file
(``var/metrics/state/<host>.json``). Raw counters are never shipped. A rate is left out
(never negative, never invented) when:

- there is no previous sample for that VM on this host (first cycle, VM just arrived),
- the VM is another QEMU process than last time (uuid or libvirt domain id changed:
  restarted, migrated away and back),
- a counter went backwards, or the wall clock did not advance.

A corrupt state file is reported in ``problems`` and replaced, never fatal.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from cloudops import atomicfile
from cloudops.metrics import naming
from cloudops.metrics.carbon import Datapoint
from cloudops.metrics.collect import HostSample, VmSample

STATE_VERSION = 1

_VCPU = re.compile(r"^vcpu\.(\d+)\.(time|wait|delay)$")
_BLOCK = re.compile(r"^block\.(\d+)\.((?:rd|wr)\.(?:bytes|reqs|times))$")
_NET = re.compile(r"^net\.(\d+)\.((?:rx|tx)\.(?:bytes|pkts|errs|drop))$")

# balloon gauges (KiB) -> memory.<field>
_MEMORY_GAUGES = {
    "current": "current_bytes",
    "maximum": "maximum_bytes",
    "rss": "rss_bytes",
    "usable": "usable_bytes",
    "unused": "unused_bytes",
    "available": "available_bytes",
}
_NET_FIELDS = {"bytes": "bytes_per_s", "pkts": "packets_per_s", "errs": "errors_per_s", "drop": "drops_per_s"}


@dataclass
class Figures:
    """Datapoints of one host for one cycle, the state to keep for the next, and what went wrong."""

    datapoints: list[Datapoint] = field(default_factory=list)
    state: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    vms: int = 0


def vm_counters(stats: dict) -> dict[str, int]:
    """The cumulative counters of one VM, keyed by stable device names.

    Disks by target (``disk.vda.rd.bytes``), interfaces by their order in the domain XML
    (``net.net0.rx.bytes``: the host-side tap name changes on every start and migration).
    """
    counters: dict[str, int] = {}
    for key in ("cpu.time", "balloon.swap_in", "balloon.swap_out", "balloon.major_fault"):
        if key in stats:
            counters[key] = int(stats[key])
    for key, value in stats.items():
        if m := _VCPU.match(key):
            counters[f"vcpu.{m[1]}.{m[2]}"] = int(value)
        elif m := _BLOCK.match(key):
            name = stats.get(f"block.{m[1]}.name", f"disk{m[1]}")
            if _is_backing_layer(stats, int(m[1])):
                continue  # a backing image's figures, not the guest's disk
            counters[f"disk.{name}.{m[2]}"] = int(value)
        elif m := _NET.match(key):
            counters[f"net.net{m[1]}.{m[2]}"] = int(value)
    return counters


def _is_backing_layer(stats: dict, index: int) -> bool:
    """True for a backing image's entry (only listed with the BACKING flag, after its disk's top layer).

    With -blockdev, libvirt also gives the *top* layer a ``backingIndex``, so that key alone
    does not mark a backing image: an entry is one when an earlier entry has the same disk name.
    """
    name = stats.get(f"block.{index}.name")
    return name is not None and any(stats.get(f"block.{i}.name") == name for i in range(index))


def figures(
    sample: HostSample, previous: dict | None, prefix: str, timestamp: int, skip: frozenset[str] = frozenset()
) -> Figures:
    """Datapoints for ``sample`` at ``timestamp``, rates against ``previous`` (a state dict or None).

    VMs named in ``skip`` are remembered for the next cycle's rates but not shipped: their
    series come from another host this cycle (a migration in progress).
    """
    out = Figures()
    previous = previous or {}
    dt = sample.taken_at - float(previous.get("taken_at", sample.taken_at))
    if previous and dt <= 0:
        out.problems.append(f"{sample.host}: clock did not advance since the last sample; no rates this cycle")
        previous = {}
    add = _adder(out.datapoints, timestamp)

    new_vms = {}
    prev_vms = previous.get("vms", {})
    for vm in sample.vms:
        if not vm.active:
            continue
        out.vms += 1
        counters = vm_counters(vm.stats)
        new_vms[vm.name] = {"uuid": vm.uuid, "domain_id": vm.domain_id, "counters": counters}
        before = prev_vms.get(vm.name)
        same_process = before and before.get("uuid") == vm.uuid and before.get("domain_id") == vm.domain_id
        if vm.name in skip:
            continue
        deltas = _deltas(before["counters"], counters) if same_process else {}
        _vm_figures(add, prefix, sample.host, vm, counters, deltas, dt)

    host_deltas = _deltas(previous.get("cpu_times_ns", {}), sample.cpu_times_ns) if previous else {}
    _host_figures(add, prefix, sample, host_deltas)

    out.state = {
        "version": STATE_VERSION,
        "host": sample.host,
        "taken_at": sample.taken_at,
        "cpu_times_ns": sample.cpu_times_ns,
        "vms": new_vms,
    }
    return out


def state_path(state_dir: Path, host: str) -> Path:
    return Path(state_dir) / f"{naming.sanitize(host)}.json"


def load_state(path: Path) -> tuple[dict | None, str | None]:
    """(state, None), (None, None) if there is none yet, or (None, problem) if it is corrupt."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        return None, f"state file {path} unreadable ({exc.__class__.__name__}); replaced, no rates this cycle"
    if (
        not isinstance(data, dict)
        or data.get("version") != STATE_VERSION
        or not isinstance(data.get("taken_at"), (int, float))
        or not isinstance(data.get("vms"), dict)
        or not isinstance(data.get("cpu_times_ns", {}), dict)
        or not all(_valid_vm_state(v) for v in data["vms"].values())
    ):
        return None, f"state file {path} has an unexpected shape; replaced, no rates this cycle"
    return data, None


def save_state(path: Path, state: dict) -> None:
    """Write the state atomically (atomicfile): a crash leaves the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomicfile.write(path, json.dumps(state, sort_keys=True) + "\n")


def host_figures_with_state(
    sample: HostSample, state_dir: Path, prefix: str, timestamp: int, skip: frozenset[str] = frozenset()
) -> Figures:
    """``figures`` with the previous state read from, and the new one written to, ``state_dir``."""
    path = state_path(state_dir, sample.host)
    previous, problem = load_state(path)
    out = figures(sample, previous, prefix, timestamp, skip)
    if problem:
        out.problems.insert(0, problem)
    save_state(path, out.state)
    return out


# -- internals ----------------------------------------------------------------------------


def _adder(datapoints: list[Datapoint], timestamp: int):
    def add(path: str, value) -> None:
        if value is None:
            return
        value = float(value)
        if value == value and value not in (float("inf"), float("-inf")):
            datapoints.append((path, (timestamp, value)))
    return add


def _deltas(before: dict, now: dict) -> dict[str, int]:
    """Counter increases; a counter missing on either side or gone backwards has none."""
    deltas = {}
    for key, value in now.items():
        old = before.get(key)
        if isinstance(old, int) and value >= old:
            deltas[key] = value - old
    return deltas


def _valid_vm_state(vm) -> bool:
    return (
        isinstance(vm, dict)
        and isinstance(vm.get("counters"), dict)
        and all(isinstance(v, int) for v in vm["counters"].values())
    )


def _per_second(deltas: dict, key: str, dt: float, scale: float = 1.0):
    return deltas[key] * scale / dt if key in deltas else None


def _vm_figures(add, prefix: str, host: str, vm: VmSample, counters: dict, deltas: dict, dt: float) -> None:
    stats = vm.stats

    def at(group, *rest):
        return naming.vm_path(prefix, vm.name, group, *rest)

    add(naming.placement_path(prefix, vm.name, host), 1)
    add(at("state"), vm.state)

    # CPU: nanoseconds of CPU per second of wall time, as percent (0 .. 100 * vcpus)
    add(at("cpu", "util_percent"), _per_second(deltas, "cpu.time", dt, 100 / 1e9))
    add(at("cpu", "vcpus"), stats.get("vcpu.current"))
    vcpus = sorted({int(m[1]) for k in stats if (m := _VCPU.match(k))})
    for n in vcpus:
        add(at("vcpu", n, "util_percent"), _per_second(deltas, f"vcpu.{n}.time", dt, 100 / 1e9))
        # steal: time the vCPU thread waited on the host run queue ("delay", libvirt >= 8.x),
        # else the scheduler's wait_sum ("wait") which measures the same thing
        steal_key = f"vcpu.{n}.delay" if f"vcpu.{n}.delay" in stats else f"vcpu.{n}.wait"
        add(at("vcpu", n, "steal_percent"), _per_second(deltas, steal_key, dt, 100 / 1e9))

    for source, target in _MEMORY_GAUGES.items():
        if f"balloon.{source}" in stats:
            add(at("memory", target), int(stats[f"balloon.{source}"]) * 1024)
    add(at("memory", "swap_in_bytes_per_s"), _per_second(deltas, "balloon.swap_in", dt, 1024))
    add(at("memory", "swap_out_bytes_per_s"), _per_second(deltas, "balloon.swap_out", dt, 1024))
    add(at("memory", "major_faults_per_s"), _per_second(deltas, "balloon.major_fault", dt))

    for key in sorted(k for k in counters if k.startswith("disk.") and k.endswith(".rd.bytes")):
        dev = key[len("disk."):-len(".rd.bytes")]
        base = f"disk.{dev}"
        for op, word in (("rd", "read"), ("wr", "write")):
            add(at("disk", dev, f"{word}_bytes_per_s"), _per_second(deltas, f"{base}.{op}.bytes", dt))
            add(at("disk", dev, f"{word}_ops_per_s"), _per_second(deltas, f"{base}.{op}.reqs", dt))
            reqs, times = deltas.get(f"{base}.{op}.reqs"), deltas.get(f"{base}.{op}.times")
            if reqs and times is not None:  # no requests this cycle: no latency, not zero
                add(at("disk", dev, f"{word}_latency_ms"), times / reqs / 1e6)

    for key in sorted(k for k in counters if k.startswith("net.") and k.endswith(".rx.bytes")):
        dev = key.split(".")[1]
        for direction in ("rx", "tx"):
            for counter, word in _NET_FIELDS.items():
                add(at("net", dev, f"{direction}_{word}"), _per_second(deltas, f"net.{dev}.{direction}.{counter}", dt))


def _host_figures(add, prefix: str, sample: HostSample, cpu_deltas: dict) -> None:
    def hv(*rest):
        return naming.hv_path(prefix, sample.host, *rest)

    if sample.cpus:
        add(hv("cpu", "count"), sample.cpus)
        add(hv("cpu", "mhz"), sample.cpu_mhz)
    busy_keys = ("kernel", "user")
    if all(k in cpu_deltas for k in (*busy_keys, "idle")):
        total = sum(cpu_deltas.get(k, 0) for k in (*busy_keys, "idle", "iowait"))
        if total > 0:
            add(hv("cpu", "util_percent"), sum(cpu_deltas[k] for k in busy_keys) * 100 / total)
            add(hv("cpu", "iowait_percent"), cpu_deltas.get("iowait", 0) * 100 / total)

    if sample.memory_total_bytes:
        add(hv("memory", "total_bytes"), sample.memory_total_bytes)
    if sample.memory_free_bytes is not None:
        add(hv("memory", "free_bytes"), sample.memory_free_bytes)
    kib = sample.memory_stats_kib
    if {"free", "buffers", "cached"} <= kib.keys():
        add(hv("memory", "buffers_bytes"), kib["buffers"] * 1024)
        add(hv("memory", "cached_bytes"), kib["cached"] * 1024)
        add(hv("memory", "available_bytes"), (kib["free"] + kib["buffers"] + kib["cached"]) * 1024)

    states = [vm.state for vm in sample.vms]
    add(hv("vms", "defined"), len(sample.vms))  # every domain this host knows, running or not
    add(hv("vms", "active"), sum(1 for vm in sample.vms if vm.active))
    add(hv("vms", "running"), states.count(libvirt.VIR_DOMAIN_RUNNING))
    add(hv("vms", "paused"), states.count(libvirt.VIR_DOMAIN_PAUSED))

    for pool, values in sorted(sample.pools.items()):
        for key in ("capacity", "allocation", "available"):
            add(hv("pool", pool, f"{key}_bytes"), values[key])
