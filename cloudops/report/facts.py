"""What the cloud report shows, read once: every host (capacity, commitments, health, maintenance,
its VMs), the planner's imbalance now, and the recent migrations and failovers from the state store.

A host that does not answer is a row with its health and the reason; the others are still read.
"""

from dataclasses import asdict, dataclass, field

from cloudops import fleet
from cloudops.compute import vms
from cloudops.ha import failover, probe, watch
from cloudops.hosts import maintenance
from cloudops.migration import balance, cluster, migrate


@dataclass
class HostRow:
    name: str
    health: str  # probe's status: up, degraded, missing, untrusted
    maintenance: bool = False
    error: str = ""  # why its capacity and VMs could not be read
    dead_since: float | None = None  # declared dead by cloud.watch or host.failover
    memory_total_mb: int = 0
    memory_limit_mb: int = 0  # what VMs may commit: total x ratio less the reserve
    memory_committed_mb: int = 0
    vcpus_total: int = 0
    vcpus_limit: int = 0
    vcpus_committed: int = 0
    vms: list = field(default_factory=list)  # vm.list's rows of this host

    @property
    def memory_percent(self) -> float:
        return _percent(self.memory_committed_mb, self.memory_limit_mb)

    @property
    def vcpus_percent(self) -> float:
        return _percent(self.vcpus_committed, self.vcpus_limit)


@dataclass
class CloudFacts:
    taken_at: float
    hosts: list
    imbalance: dict | None  # balance.Imbalance of the hosts that answered; None when none did
    complete: bool  # every host answered
    migrations: list  # newest first
    failovers: list  # newest first

    def to_dict(self) -> dict:
        return {**asdict(self), "hosts": [{**asdict(h), "memory_percent": h.memory_percent,
                                           "vcpus_percent": h.vcpus_percent} for h in self.hosts]}


def _percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 1) if whole > 0 else 0.0


def _read(host, in_maintenance: set, cpu_interval: float):
    model_host, model_vms = cluster.host_facts(host, in_maintenance, cpu_interval)
    return model_host, model_vms, vms.list_on_host(host)


def gather(hosts: list, *, taken_at: float, cpu_interval: float = 1.0, recent: int = 20,
           timeout: float = 120) -> CloudFacts:
    """Read every hypervisor in parallel and the state store's history."""
    down = maintenance.hosts_in_maintenance()
    probes = probe.probe_all(hosts)
    result = fleet.run(hosts, lambda h: _read(h, down, cpu_interval), timeout=timeout)
    rows, model_hosts, model_vms = [], [], []
    for r in result:
        dead = (watch.entry(r.host) or {}).get("dead_since")
        row = HostRow(name=r.host, health=probes[r.host].status, maintenance=r.host in down, dead_since=dead)
        if r.status == fleet.FAILED:
            row.error = r.error or "did not answer"
        else:
            model_host, host_vms, listed = r.value
            model_hosts.append(model_host)
            model_vms.extend(host_vms)
            row.vms = sorted((vm.to_dict() for vm in listed), key=lambda v: v["name"])
        rows.append(row)
    figures = None
    if model_hosts:
        model = balance.Cluster(tuple(model_hosts), tuple(model_vms))
        states = balance.host_states(model)
        for row in rows:
            state = states.get(row.name)
            if state is not None:
                row.memory_total_mb, row.memory_limit_mb = state.memory_total_mb, state.memory_limit_mb
                row.memory_committed_mb = state.memory_committed_mb
                row.vcpus_total, row.vcpus_limit = state.vcpus_total, state.vcpus_limit
                row.vcpus_committed = state.vcpus_committed
        figures = asdict(balance.imbalance(model))
    return CloudFacts(
        taken_at=taken_at, hosts=sorted(rows, key=lambda h: h.name), imbalance=figures,
        complete=len(model_hosts) == len(rows),
        migrations=list(reversed(migrate.history()))[:recent],
        failovers=list(reversed(failover.history()))[:recent],
    )
