"""Facts for placement: read each candidate host's capacity and commitments from libvirt, then ask the scheduler."""

import libvirt

from cloudops import fleet, virt
from cloudops.compute import scheduler
from cloudops.errors import CloudopsError
from cloudops.hosts import maintenance


def host_state(host, in_maintenance: set[str]) -> scheduler.HostState:
    """What the scheduler needs of one host, read with its libvirt connection (and its LXC driver's: containers'
    memory and vCPUs are committed like VMs')."""
    containers = virt.container_connection(host)
    with virt.open_host(host) as conn:
        _model, memory_mb, cpus, *_ = conn.getInfo()
        stats = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
        free_mb = (stats.get("free", 0) + stats.get("buffers", 0) + stats.get("cached", 0)) // 1024
        committed_mb = committed_vcpus = 0
        groups = set()
        domains = conn.listAllDomains() + (containers.listAllDomains() if containers is not None else [])
        for dom in domains:
            _state, max_kib, _cur, vcpus, _t = dom.info()
            committed_mb += max_kib // 1024
            committed_vcpus += vcpus
            group = virt.metadata(dom).get("group")
            if group:
                groups.add(group)
    return scheduler.HostState(
        name=host.name,
        memory_total_mb=host.capacity.memory_mb or memory_mb,
        memory_free_mb=free_mb,
        memory_committed_mb=committed_mb,
        vcpus_total=host.capacity.vcpus or cpus,
        vcpus_committed=committed_vcpus,
        vm_count=len(domains),
        maintenance=host.name in in_maintenance,
        tags=frozenset(host.tags),
        anti_affinity_groups=frozenset(groups),
        cpu_allocation_ratio=float(host.vars.get("cpu_allocation_ratio", 4.0)),
        ram_allocation_ratio=float(host.vars.get("ram_allocation_ratio", 1.0)),
        reserved_host_memory_mb=int(host.vars.get("reserved_host_memory_mb", 256)),
    )


def host_states(hosts: list) -> list[scheduler.HostState]:
    """Host states of every reachable host, read in parallel; unreachable hosts are left out."""
    down = maintenance.hosts_in_maintenance()
    result = fleet.run(hosts, lambda h: host_state(h, down), timeout=60)
    states = [r.value for r in result if r.status != fleet.FAILED]
    if not states:
        reasons = "; ".join(f"{r.host}: {r.error}" for r in result.failed)
        raise CloudopsError(f"no host could be asked for its capacity: {reasons}")
    return states


def request_for(spec) -> scheduler.PlacementRequest:
    # memory as host_state counts the VMs a host runs: at their maximum (room to grow: VMSpec.max_memory)
    return scheduler.PlacementRequest(memory_mb=max(spec.memory, getattr(spec, "max_memory", None) or 0),
                                      vcpus=spec.vcpus, name=spec.name, anti_affinity_group=spec.group)


def choose(spec, candidates: list):
    """The inventory host for a new VM (``spec`` has memory, vcpus, name, group)."""
    states = host_states(candidates)
    chosen = scheduler.place(request_for(spec), states)
    return next(h for h in candidates if h.name == chosen.name)

