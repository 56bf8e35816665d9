"""Read one hypervisor's raw figures through one libvirt connection: one bulk stats call per cycle.

``collect_host`` returns raw counters and gauges exactly as libvirt gives them (a
``HostSample``); turning counters into rates is ``metrics_rates``' job. The per-VM part
is a single ``getAllDomainStats`` call with ``NOWAIT``: a VM busy with a job (a
migration, a snapshot) answers with what it has instead of stalling the whole cycle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import libvirt

from cloudops.errors import CloudopsError

STATS = (
    libvirt.VIR_DOMAIN_STATS_STATE
    | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
    | libvirt.VIR_DOMAIN_STATS_BALLOON
    | libvirt.VIR_DOMAIN_STATS_VCPU
    | libvirt.VIR_DOMAIN_STATS_INTERFACE
    | libvirt.VIR_DOMAIN_STATS_BLOCK
)
# libvirt >= 4.5; without it a VM in a long job blocks the call until the job ends.
FLAGS = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT


@dataclass
class VmSample:
    """One domain's raw typed parameters from getAllDomainStats.

    ``domain_id`` is libvirt's runtime id (-1 when inactive); it changes at every start,
    so together with ``uuid`` it tells whether counters belong to the same QEMU process.
    """

    name: str
    uuid: str
    domain_id: int
    stats: dict[str, Any]

    @property
    def state(self) -> int:
        return int(self.stats.get("state.state", libvirt.VIR_DOMAIN_NOSTATE))

    @property
    def active(self) -> bool:
        return self.domain_id != -1 and self.state != libvirt.VIR_DOMAIN_SHUTOFF


@dataclass
class HostSample:
    """Everything read from one host in one cycle; ``problems`` lists what could not be read."""

    host: str
    taken_at: float
    cpus: int = 0
    cpu_mhz: int = 0
    memory_total_bytes: int = 0
    memory_free_bytes: int | None = None
    memory_stats_kib: dict[str, int] = field(default_factory=dict)
    cpu_times_ns: dict[str, int] = field(default_factory=dict)
    pools: dict[str, dict[str, int]] = field(default_factory=dict)
    vms: list[VmSample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def collect_host(conn, host_name: str, taken_at: float | None = None) -> HostSample:
    """Read ``host_name``'s figures through ``conn`` (an open libvirt connection).

    The bulk domain stats call is required: if it fails the host fails (CloudopsError).
    Host-level extras that a driver does not support are noted in ``problems`` and left out.
    ``taken_at`` (wall clock seconds) defaults to the moment the bulk call returned.
    """
    try:
        records = conn.getAllDomainStats(STATS, FLAGS)
    except libvirt.libvirtError as exc:
        raise CloudopsError(f"{host_name}: domain stats failed: {_message(exc)}") from None
    sample = HostSample(host=host_name, taken_at=time.time() if taken_at is None else taken_at)
    sample.vms = [VmSample(dom.name(), dom.UUIDString(), _domain_id(dom), dict(stats)) for dom, stats in records]

    problems = sample.problems
    info = _optional(problems, "node info", conn.getInfo)
    if info:
        # [model, memory MiB, cpus, MHz, numa nodes, sockets, cores, threads]
        sample.memory_total_bytes = int(info[1]) * 1024 * 1024
        sample.cpus = int(info[2])
        sample.cpu_mhz = int(info[3])
    free = _optional(problems, "free memory", conn.getFreeMemory)
    if free is not None:
        sample.memory_free_bytes = int(free)
    memory = _optional(problems, "memory stats", conn.getMemoryStats, libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
    if memory:
        sample.memory_stats_kib = {k: int(v) for k, v in memory.items()}
    cpu = _optional(problems, "cpu stats", conn.getCPUStats, libvirt.VIR_NODE_CPU_STATS_ALL_CPUS)
    if cpu:
        sample.cpu_times_ns = {k: int(v) for k, v in cpu.items()}
    pools = _optional(problems, "storage pools", conn.listAllStoragePools, libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
    for pool in pools or ():
        figures = _optional(problems, "storage pool info", pool.info)
        if figures:
            _state, capacity, allocation, available = figures[:4]
            sample.pools[pool.name()] = {
                "capacity": int(capacity), "allocation": int(allocation), "available": int(available),
            }
    return sample


def collect_containers(conn, sample: HostSample) -> None:
    """The host's containers (its LXC driver's ``conn``) added to ``sample.vms`` in the bulk call's naming.

    libvirt's LXC driver has no bulk stats call: each running container's CPU time and memory (its cgroup's,
    from ``virDomainGetInfo``) are read one by one, as ``cpu.time``, ``vcpu.current``, ``balloon.current``
    and ``balloon.maximum``, so they ship under the same metric names as a VM's. A container that stops
    meanwhile is left out; any other error is noted in ``problems``."""
    try:
        domains = conn.listAllDomains()
    except libvirt.libvirtError as exc:
        sample.problems.append(f"containers: {_message(exc)}")
        return
    for dom in domains:
        try:
            state, max_kib, cur_kib, vcpus, cpu_ns = dom.info()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                sample.problems.append(f"container {dom.name()}: {_message(exc)}")
            continue
        stats = {"state.state": state, "cpu.time": cpu_ns, "vcpu.current": vcpus,
                 "balloon.current": cur_kib, "balloon.maximum": max_kib}
        sample.vms.append(VmSample(dom.name(), dom.UUIDString(), _domain_id(dom), stats))


def _optional(problems: list[str], what: str, call, *args):
    try:
        return call(*args)
    except libvirt.libvirtError as exc:
        problems.append(f"{what}: {_message(exc)}")
        return None


def _domain_id(dom) -> int:
    domain_id = dom.ID()  # local to the domain object: no round trip
    return -1 if domain_id in (-1, 0xFFFFFFFF) else int(domain_id)


def _message(exc: libvirt.libvirtError) -> str:
    return (exc.get_error_message() or str(exc)).splitlines()[0]
