"""The balance planner's model of the live cloud: hosts and VMs read from libvirt, CPU load measured.

``model(hosts)`` reads every host in parallel (capacity and commitments as the
scheduler sees them, every domain with its size, anti-affinity group and measured
CPU use) and returns a ``balance.Cluster``. A VM's CPU load is its ``cpu.time``
delta over ``cpu_interval`` seconds, in cores; 0 skips the measurement and the
planner then balances committed memory alone.
"""

import time

import libvirt

from cloudops import fleet, virt
from cloudops.compute import placement, vms
from cloudops.errors import CloudopsError
from cloudops.hosts import maintenance
from cloudops.migration import balance


def _cpu_times(conn) -> dict[str, int]:
    stats = conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_CPU_TOTAL, 0)
    return {dom.name(): values.get("cpu.time", 0) for dom, values in stats}


def host_facts(host, in_maintenance: set[str], cpu_interval: float) -> tuple[balance.Host, list[balance.VM]]:
    """One host and its VMs, as the planner models them."""
    state = placement.host_state(host, in_maintenance)
    with virt.open_host(host) as conn:
        first, t0 = (_cpu_times(conn), time.monotonic()) if cpu_interval else ({}, 0.0)
        if cpu_interval:
            time.sleep(cpu_interval)
            second, elapsed = _cpu_times(conn), time.monotonic() - t0
        listed = [vms.describe(d, host.name) for d in conn.listAllDomains()]
    load = {}
    if cpu_interval:
        for name, ns in second.items():
            if name in first:
                load[name] = max(0.0, (ns - first[name]) / 1e9 / elapsed)
    model_host = balance.Host(
        name=host.name, memory_mb=state.memory_total_mb, vcpus=state.vcpus_total, maintenance=state.maintenance,
        tags=state.tags, cpu_ratio=state.cpu_allocation_ratio, ram_ratio=state.ram_allocation_ratio,
        reserved_memory_mb=state.reserved_host_memory_mb, memory_free_mb=state.memory_free_mb)
    model_vms = [balance.VM(name=vm.name, host=host.name, memory_mb=vm.memory, vcpus=vm.vcpus,
                            cpu_load=min(float(vm.vcpus), load.get(vm.name, 0.0)), anti_affinity_group=vm.group)
                 for vm in listed]
    return model_host, model_vms


def model(hosts: list, cpu_interval: float = 1.0) -> balance.Cluster:
    """The cluster as it is now; every host must answer (a plan over part of the cloud could overcommit)."""
    down = maintenance.hosts_in_maintenance()
    result = fleet.run(hosts, lambda h: host_facts(h, down, cpu_interval), timeout=120)
    if result.failed:
        reasons = "; ".join(f"{r.host}: {r.error}" for r in result.failed)
        raise CloudopsError(f"cannot model the cloud, some hosts did not answer: {reasons}")
    model_hosts = [r.value[0] for r in result]
    model_vms = [vm for r in result for vm in r.value[1]]
    return balance.Cluster(tuple(model_hosts), tuple(model_vms))
