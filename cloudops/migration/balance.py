"""Plan live migrations that even out the load of hypervisor hosts, and evacuate a host.

Pure logic, no libvirt: callers build a ``Cluster`` from facts and get back moves.

Model
-----
A host's *load* mixes memory utilisation (memory committed to its VMs / physical
memory) and CPU load (its VMs' measured CPU use in cores / physical threads), with
``Objective.memory_weight`` and ``cpu_weight`` (normalised to sum to 1). Imbalance::

    objective = CV(loads) + alpha * max(loads)

CV is the coefficient of variation (std / mean) over the active hosts, each host
weighted by its size (the same memory/threads mix as the load): the weighted mean is
then the cluster's utilisation, and a VM moved to a smaller host does not look like
an improvement just because it raises an unweighted mean. ``alpha`` penalises the
hottest host.

A move costs ``beta * vm.memory_mb / cluster memory`` (live migration copies the
memory); it is taken when ``net = objective decrease - cost`` is positive and at least
``margin``. Planning stops when no move qualifies, after ``max_moves``, or once the CV
is down to ``target_cv`` (default 0.05: hosts within about 5% of the mean; beyond it
moves buy little and cost many migrations).

Moves must keep the target within ``memory_mb * ram_ratio - reserved_memory_mb`` of
committed memory and ``vcpus * cpu_ratio`` committed vCPUs, never put two VMs of an
anti-affinity group on one host, land on a host with the VM's required tags, and
never touch pinned VMs. Hosts in maintenance are neither sources nor targets nor
counted; emptying one is ``evacuation_plan``'s job.

Algorithm
---------
``greedy_baseline`` is the reference: at each step it scores every (movable VM, host)
pair and takes the best (ties to the lower VM name, then host name) -- O(VMs x hosts)
per move. ``plan`` takes the same moves, in the same order, without that cost (see
``balance_search``): S = sum(w*L) and Q = sum(w*L^2) are kept current so a move is
scored in O(1); host loads are kept sorted, overall and per host class, so the best
target of a VM in a class is the least loaded host there that can take it; and
candidates wait in lazy heaps keyed by a bound on what they can gain, so a step only
scores the few that could beat the best. ``next_move`` plans one move, for apply mode,
which measures the cluster again after every migration.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cloudops.compute import scheduler
from cloudops.errors import CloudopsError
from cloudops.migration.balance_search import LazyGreedy, State, exhaustive_best

DEFAULT_TARGET_CV = 0.05
_EPS = 1e-12  # a move must gain more than float noise, whatever the margin


@dataclass(frozen=True)
class Host:
    """A hypervisor host: capacity, allocation ratios, maintenance flag, tags."""

    name: str
    memory_mb: int
    vcpus: int  # physical threads
    maintenance: bool = False
    tags: frozenset[str] = frozenset()
    cpu_ratio: float = 4.0
    ram_ratio: float = 1.0
    reserved_memory_mb: int = 256
    memory_free_mb: int | None = None  # actually free; only evacuation's scheduler uses it

    def __post_init__(self):
        object.__setattr__(self, "tags", frozenset(self.tags))

    @property
    def memory_limit_mb(self) -> int:
        return int(self.memory_mb * self.ram_ratio) - self.reserved_memory_mb

    @property
    def vcpus_limit(self) -> int:
        return int(self.vcpus * self.cpu_ratio)


@dataclass(frozen=True)
class VM:
    """A VM where it runs now; ``cpu_load`` is its measured CPU use in cores (0..vcpus)."""

    name: str
    host: str
    memory_mb: int
    vcpus: int
    cpu_load: float = 0.0
    anti_affinity_group: str | None = None
    pinned: bool = False
    required_tags: frozenset[str] = frozenset()

    def __post_init__(self):
        object.__setattr__(self, "required_tags", frozenset(self.required_tags))


@dataclass(frozen=True)
class Cluster:
    """Hosts and VMs; checked on creation (unique names, known hosts, sane sizes)."""

    hosts: tuple[Host, ...]
    vms: tuple[VM, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "hosts", tuple(self.hosts))
        object.__setattr__(self, "vms", tuple(self.vms))
        names = Counter(h.name for h in self.hosts)
        _no_duplicates("host", names)
        _no_duplicates("VM", Counter(v.name for v in self.vms))
        for h in self.hosts:
            if h.memory_mb <= 0 or h.vcpus <= 0:
                raise CloudopsError(f"host {h.name}: memory_mb and vcpus must be positive")
        for v in self.vms:
            if v.host not in names:
                raise CloudopsError(f"VM {v.name}: unknown host {v.host!r}")
            if v.memory_mb < 0 or v.vcpus < 0 or v.cpu_load < 0:
                raise CloudopsError(f"VM {v.name}: memory_mb, vcpus and cpu_load must be >= 0")

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise CloudopsError(f"unknown host {name!r}")

    def vms_on(self, host: str) -> list[VM]:
        return [v for v in self.vms if v.host == host]


def _no_duplicates(what: str, counts: Counter) -> None:
    dup = sorted(name for name, k in counts.items() if k > 1)
    if dup:
        raise CloudopsError(f"duplicate {what} names: {', '.join(dup)}")


@dataclass(frozen=True)
class Objective:
    """What "balanced" means: load weights, max-load penalty (alpha), migration cost (beta)."""

    memory_weight: float = 1.0
    cpu_weight: float = 1.0
    max_load_penalty: float = 0.1  # alpha
    migration_cost: float = 1.0  # beta, per fraction of the cluster's memory moved

    def __post_init__(self):
        if min(self.memory_weight, self.cpu_weight) < 0 or self.memory_weight + self.cpu_weight <= 0:
            raise CloudopsError("load weights must be >= 0 and not both 0")
        if self.max_load_penalty < 0 or self.migration_cost < 0:
            raise CloudopsError("max_load_penalty and migration_cost must be >= 0")

    def state(self, cluster: Cluster) -> State:
        return State(cluster, self.memory_weight, self.cpu_weight, self.max_load_penalty, self.migration_cost)


@dataclass(frozen=True)
class Imbalance:
    """How unbalanced the active hosts are; ``objective`` is what the planners minimise."""

    objective: float
    cv: float
    max_load: float
    mean_load: float  # size-weighted: the cluster's utilisation


@dataclass(frozen=True)
class Move:
    """Migrate ``vm`` from ``source`` to ``target``; moves with the same ``wave`` may run together."""

    vm: str
    source: str
    target: str
    memory_mb: int
    improvement: float = 0.0  # decrease of the objective (planned moves)
    cost: float = 0.0  # migration cost charged against it
    wave: int = 0

    @property
    def net(self) -> float:
        return self.improvement - self.cost


@dataclass(frozen=True)
class Plan:
    """The moves in order, the imbalance before and after, and why planning stopped."""

    moves: tuple[Move, ...]
    before: Imbalance
    after: Imbalance
    stopped: str
    evaluations: int = 0  # candidate moves scored exactly (to compare planners)

    @property
    def memory_moved_mb(self) -> int:
        return sum(m.memory_mb for m in self.moves)


def plan(
    cluster: Cluster,
    *,
    max_moves: int | None = None,
    margin: float = 0.0,
    target_cv: float = DEFAULT_TARGET_CV,
    objective: Objective = Objective(),
) -> Plan:
    """The moves ``greedy_baseline`` would make, in its order, found without its cost.

    ``margin`` is absolute, in objective units. One move changes the objective by
    roughly 1/number-of-hosts, so a margin that filters noise on 10 hosts blocks
    everything on 1000: ``target_cv`` is the scale-free way to stop early.
    """
    st = objective.state(cluster)
    before = _imbalance(st)
    moves: list[Move] = []
    if st.n < 2:
        return _finish(st, moves, before, "fewer than two active hosts", 0)
    search = LazyGreedy(st)
    threshold = max(margin, _EPS)
    search.refresh()
    # Unpooled, every key stays a bound on what its candidate can gain, so a step that
    # finds nothing has looked at every candidate; pooled keys are approximate: key
    # them all again and look once more before giving up.
    refreshed = True
    while not (stopped := _stop(st, moves, max_moves, target_cv)):
        net, v, t = search.best_move()
        if net < threshold:
            if refreshed or not search.pooled:
                stopped = "no move clears the margin"
                break
            search.refresh()
            refreshed = True
            continue
        moves.append(_move(st, v, t, search.top(), len(moves)))
        assert moves[-1].net == net, "the search's scoring drifted from State.score"
        s, old_s, old_t = st.apply(v, t)
        search.moved(v, s, old_s, t, old_t)
        refreshed = False
    return _finish(st, moves, before, stopped, search.evaluations)


def next_move(
    cluster: Cluster,
    *,
    margin: float = 0.0,
    target_cv: float = DEFAULT_TARGET_CV,
    objective: Objective = Objective(),
) -> Move | None:
    """The single best move now, or None: for apply mode, which measures again after each move."""
    moves = plan(cluster, max_moves=1, margin=margin, target_cv=target_cv, objective=objective).moves
    return moves[0] if moves else None


def greedy_baseline(
    cluster: Cluster,
    *,
    max_moves: int | None = None,
    margin: float = 0.0,
    target_cv: float = DEFAULT_TARGET_CV,
    objective: Objective = Objective(),
) -> Plan:
    """The reference planner: each step scores every (movable VM, host) pair, takes the best.

    O(VMs x hosts) per move: fine for tens of hosts, not for a thousand.
    """
    st = objective.state(cluster)
    before = _imbalance(st)
    moves: list[Move] = []
    threshold = max(margin, _EPS)
    evaluations = 0
    while not (stopped := _stop(st, moves, max_moves, target_cv)):
        net, v, t, scored = exhaustive_best(st)
        evaluations += scored
        if net < threshold:
            stopped = "no move clears the margin"
            break
        moves.append(_move(st, v, t, st.top3(), len(moves)))
        st.apply(v, t)
    return _finish(st, moves, before, stopped, evaluations)


def _stop(st: State, moves: list[Move], max_moves: int | None, target_cv: float) -> str:
    """Why planning stops before looking for another move, or "" to go on."""
    if st.n < 2:
        return "fewer than two active hosts"
    if max_moves is not None and len(moves) >= max_moves:
        return "max_moves reached"
    cv = st.cv()
    if cv <= target_cv:
        return f"CV {cv:.4f} at or below the target {target_cv:g}"
    return ""


def _move(st: State, v: int, t: int, top: list, wave: int) -> Move:
    net, gain, cost = st.score(v, t, top)
    return Move(st.vm_names[v], st.names[st.vm_host[v]], st.names[t], st.vm_mem[v], gain, cost, wave)


def _imbalance(st: State) -> Imbalance:
    return Imbalance(*st.measure())


def _finish(st: State, moves: list[Move], before: Imbalance, stopped: str, evaluations: int) -> Plan:
    st.resync()  # "after" from the per-host sums, not from the running S and Q
    return Plan(tuple(moves), before, _imbalance(st), stopped, evaluations)


def imbalance(cluster: Cluster, objective: Objective = Objective()) -> Imbalance:
    """The objective, CV, max and mean load of the active hosts."""
    return _imbalance(objective.state(cluster))


def host_loads(cluster: Cluster, objective: Objective = Objective()) -> dict[str, float]:
    """Load of each active host (0 = idle, 1 = memory and CPU full)."""
    st = objective.state(cluster)
    return dict(zip(st.names, st.load))


def apply_moves(cluster: Cluster, moves: Iterable[Move]) -> Cluster:
    """The cluster after ``moves``, in order; a move whose VM is not on its source is an error."""
    where = {v.name: v for v in cluster.vms}
    known = {h.name for h in cluster.hosts}
    for m in moves:
        vm = where.get(m.vm)
        if vm is None:
            raise CloudopsError(f"move of unknown VM {m.vm!r}")
        if vm.host != m.source:
            raise CloudopsError(f"move of {m.vm} from {m.source}, but it runs on {vm.host}")
        if m.target not in known:
            raise CloudopsError(f"move of {m.vm} to unknown host {m.target!r}")
        where[m.vm] = dataclasses.replace(vm, host=m.target)
    return Cluster(cluster.hosts, tuple(where[v.name] for v in cluster.vms))


def host_states(cluster: Cluster) -> dict[str, scheduler.HostState]:
    """What the scheduler sees of each host: capacity plus the sums over its VMs."""
    on: dict[str, list[VM]] = defaultdict(list)
    for v in cluster.vms:
        on[v.host].append(v)
    return {
        h.name: scheduler.HostState(
            name=h.name,
            memory_total_mb=h.memory_mb,
            memory_free_mb=h.memory_free_mb,
            memory_committed_mb=sum(v.memory_mb for v in on[h.name]),
            vcpus_total=h.vcpus,
            vcpus_committed=sum(v.vcpus for v in on[h.name]),
            vm_count=len(on[h.name]),
            maintenance=h.maintenance,
            tags=h.tags,
            anti_affinity_groups=frozenset(v.anti_affinity_group for v in on[h.name] if v.anti_affinity_group),
            cpu_allocation_ratio=h.cpu_ratio,
            ram_allocation_ratio=h.ram_ratio,
            reserved_host_memory_mb=h.reserved_memory_mb,
        )
        for h in cluster.hosts
    }


def evacuation_plan(
    cluster: Cluster,
    host: str,
    *,
    max_parallel_per_source: int = 1,
    include_pinned: bool = False,
    multipliers: Mapping[str, float] | None = None,
) -> list[Move]:
    """Moves that empty ``host``, biggest VMs first, each target chosen by the scheduler.

    Targets pass the scheduler's filters (not in maintenance, room, anti-affinity,
    tags) and are weighed as for a new VM, with the plan's earlier moves counted.
    Move i is in wave i // ``max_parallel_per_source``. Raises CloudopsError naming
    the VMs that fit nowhere, or the pinned VMs unless ``include_pinned``.
    """
    if max_parallel_per_source < 1:
        raise CloudopsError("max_parallel_per_source must be at least 1")
    cluster.host(host)
    vms = sorted(cluster.vms_on(host), key=lambda v: (-v.memory_mb, -v.vcpus, v.name))
    pinned = sorted(v.name for v in vms if v.pinned)
    if pinned and not include_pinned:
        raise CloudopsError(f"cannot evacuate {host}: pinned VM{'s' if len(pinned) > 1 else ''} "
                            f"{', '.join(pinned)} (include_pinned moves them anyway)")
    states = host_states(cluster)
    del states[host]
    moves: list[Move] = []
    failed: list[scheduler.Ranking] = []
    for vm in vms:
        request = scheduler.PlacementRequest(
            memory_mb=vm.memory_mb,
            vcpus=vm.vcpus,
            name=vm.name,
            anti_affinity_group=vm.anti_affinity_group,
            required_tags=tuple(sorted(vm.required_tags)),
            exclude_hosts=(host,),
        )
        ranking = scheduler.rank(request, states.values(), multipliers)
        if not ranking.candidates:
            failed.append(ranking)
            continue
        target = ranking.candidates[0].host
        states[target.name] = scheduler.claim(target, request)
        moves.append(Move(vm.name, host, target.name, vm.memory_mb, wave=len(moves) // max_parallel_per_source))
    if failed:
        more = ""
        if len(failed) > 1:
            more = f" (and {len(failed) - 1} more: {', '.join(r.request.name for r in failed[1:])})"
        raise CloudopsError(f"cannot evacuate {host}: {failed[0].failure()}{more}")
    return moves
