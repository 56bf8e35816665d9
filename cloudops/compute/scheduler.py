"""Choose the hypervisor host for a new VM: Nova-style filters, then weighers.

Pure logic, no libvirt: callers read the facts (``HostState``) and ask ``place``
or ``rank``. The shape follows Nova's FilterScheduler:

* **Filters** drop hosts that cannot take the VM. Each is a small function
  ``(request, host) -> None | reason``; the first reason a host hits is the one
  reported, so the cheap, clear ones (maintenance, excluded) come first.
* **Weighers** score the hosts that are left. Each gives a raw value where
  bigger is better; values are normalised to 0..1 across the candidates (all
  equal -> 0, as in Nova), multiplied by a configurable multiplier and summed.
  A negative multiplier turns spreading into stacking.
* Ties are broken by host name, so the same facts always give the same host.

When no host passes, ``place`` raises ``CloudopsError`` with one line that says,
per host, why it was refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cloudops.errors import CloudopsError


@dataclass(frozen=True)
class HostState:
    """What the scheduler knows about one hypervisor host."""

    name: str
    memory_total_mb: int
    memory_free_mb: int | None = None  # actually free (libvirt); None: unknown, not checked
    memory_committed_mb: int = 0  # sum of the memory of the VMs defined on the host
    vcpus_total: int = 1  # physical threads
    vcpus_committed: int = 0
    vm_count: int = 0
    maintenance: bool = False
    tags: frozenset[str] = frozenset()
    anti_affinity_groups: frozenset[str] = frozenset()  # groups of the VMs on the host
    cpu_allocation_ratio: float = 4.0
    ram_allocation_ratio: float = 1.0
    reserved_host_memory_mb: int = 256

    def __post_init__(self):
        object.__setattr__(self, "tags", frozenset(self.tags))
        object.__setattr__(self, "anti_affinity_groups", frozenset(self.anti_affinity_groups))

    @property
    def memory_limit_mb(self) -> int:
        """Memory the VMs may commit in total: total x ratio, less the host's reserve."""
        return int(self.memory_total_mb * self.ram_allocation_ratio) - self.reserved_host_memory_mb

    @property
    def memory_uncommitted_mb(self) -> int:
        return self.memory_limit_mb - self.memory_committed_mb

    @property
    def memory_usable_mb(self) -> int | None:
        """Actually free memory above the reserve, or None when the free figure is unknown."""
        if self.memory_free_mb is None:
            return None
        return self.memory_free_mb - self.reserved_host_memory_mb

    @property
    def vcpus_limit(self) -> int:
        return int(self.vcpus_total * self.cpu_allocation_ratio)


@dataclass(frozen=True)
class PlacementRequest:
    """A VM to place: its size and the constraints on where it may go."""

    memory_mb: int
    vcpus: int
    name: str | None = None
    anti_affinity_group: str | None = None
    required_tags: tuple[str, ...] = ()
    exclude_hosts: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "required_tags", tuple(self.required_tags))
        object.__setattr__(self, "exclude_hosts", tuple(self.exclude_hosts))

    def describe(self) -> str:
        """``'web1' (512 MiB, 1 vCPU)`` -- how error messages name the request."""
        label = repr(self.name) if self.name else "the VM"
        return f"{label} ({self.memory_mb} MiB, {_vcpus(self.vcpus)})"


def _vcpus(n: int) -> str:
    return f"{n} vCPU" if n == 1 else f"{n} vCPUs"


# -- filters: (request, host) -> None when the host is fine, else the reason ------------


def maintenance_filter(request: PlacementRequest, host: HostState) -> str | None:
    return "in maintenance" if host.maintenance else None


def excluded_filter(request: PlacementRequest, host: HostState) -> str | None:
    return "excluded" if host.name in request.exclude_hosts else None


def tags_filter(request: PlacementRequest, host: HostState) -> str | None:
    missing = sorted(set(request.required_tags) - host.tags)
    return f"lacks tag{'s' if len(missing) > 1 else ''} {', '.join(missing)}" if missing else None


def anti_affinity_filter(request: PlacementRequest, host: HostState) -> str | None:
    group = request.anti_affinity_group
    if group is not None and group in host.anti_affinity_groups:
        return f"already runs a VM of anti-affinity group {group!r}"
    return None


def vcpu_filter(request: PlacementRequest, host: HostState) -> str | None:
    left = host.vcpus_limit - host.vcpus_committed
    if request.vcpus > left:
        return (
            f"needs {_vcpus(request.vcpus)}, {max(left, 0)} of {host.vcpus_limit} left"
            f" ({host.vcpus_total} x {host.cpu_allocation_ratio:g})"
        )
    return None


def committed_memory_filter(request: PlacementRequest, host: HostState) -> str | None:
    left = host.memory_uncommitted_mb
    if request.memory_mb > left:
        return (
            f"needs {request.memory_mb} MiB, {max(left, 0)} MiB uncommitted"
            f" of {host.memory_limit_mb} MiB"
        )
    return None


def free_memory_filter(request: PlacementRequest, host: HostState) -> str | None:
    usable = host.memory_usable_mb
    if usable is not None and request.memory_mb > usable:
        reserve = host.reserved_host_memory_mb
        note = f" above the {reserve} MiB reserve" if reserve else ""
        return f"needs {request.memory_mb} MiB, {max(usable, 0)} MiB free{note}"
    return None


Filter = Callable[[PlacementRequest, HostState], "str | None"]

FILTERS: tuple[Filter, ...] = (
    maintenance_filter,
    excluded_filter,
    tags_filter,
    anti_affinity_filter,
    free_memory_filter,
    committed_memory_filter,
    vcpu_filter,
)


def check(request: PlacementRequest, host: HostState, filters: Iterable[Filter] = FILTERS) -> str | None:
    """The first reason ``host`` cannot take ``request``, or None when every filter passes."""
    for keep in filters:
        reason = keep(request, host)
        if reason is not None:
            return reason
    return None


# -- weighers: (request, host) -> raw value, bigger is better ---------------------------


def ram_weigher(request: PlacementRequest, host: HostState) -> float:
    """Free memory (the tighter of uncommitted and actually free): spread by default."""
    room = host.memory_uncommitted_mb
    usable = host.memory_usable_mb
    return float(room if usable is None else min(room, usable))


def vm_count_weigher(request: PlacementRequest, host: HostState) -> float:
    """Fewer VMs preferred."""
    return -float(host.vm_count)


def cpu_weigher(request: PlacementRequest, host: HostState) -> float:
    """Lower vCPU commitment (committed / limit) preferred."""
    return -host.vcpus_committed / host.vcpus_limit if host.vcpus_limit > 0 else 0.0


Weigher = Callable[[PlacementRequest, HostState], float]

WEIGHERS: dict[str, Weigher] = {"ram": ram_weigher, "vms": vm_count_weigher, "cpu": cpu_weigher}
DEFAULT_MULTIPLIERS: dict[str, float] = {"ram": 1.0, "vms": 0.5, "cpu": 1.0}


@dataclass(frozen=True)
class Candidate:
    """A host that passed every filter, its total score and each weigher's share of it."""

    host: HostState
    score: float
    weights: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Ranking:
    """Result of ``rank``: candidates best first, and the refused hosts with their reason."""

    request: PlacementRequest
    candidates: tuple[Candidate, ...]
    rejected: tuple[tuple[str, str], ...]  # (host name, reason), by host name

    def failure(self) -> str:
        """The one-line explanation used when no host is left."""
        head = f"no host can take {self.request.describe()}"
        if not self.rejected:
            return f"{head}: no hosts known"
        return head + ": " + "; ".join(f"{name}: {reason}" for name, reason in self.rejected)


def _normalise(values: Sequence[float]) -> list[float]:
    lo, hi = min(values), max(values)
    if hi - lo <= 0:
        return [0.0] * len(values)
    return [(v - lo) / (hi - lo) for v in values]


def _multipliers(overrides: Mapping[str, float] | None) -> dict[str, float]:
    merged = dict(DEFAULT_MULTIPLIERS)
    for name, value in (overrides or {}).items():
        if name not in WEIGHERS:
            raise CloudopsError(f"unknown weigher {name!r}; known: {', '.join(WEIGHERS)}")
        merged[name] = float(value)
    return merged


def rank(
    request: PlacementRequest,
    hosts: Iterable[HostState],
    multipliers: Mapping[str, float] | None = None,
    filters: Sequence[Filter] = FILTERS,
) -> Ranking:
    """Filter then weigh ``hosts`` for ``request``; never raises for a lack of hosts."""
    mult = _multipliers(multipliers)
    passed: list[HostState] = []
    rejected: list[tuple[str, str]] = []
    for host in sorted(hosts, key=lambda h: h.name):
        reason = check(request, host, filters)
        if reason is None:
            passed.append(host)
        else:
            rejected.append((host.name, reason))
    shares: list[dict[str, float]] = [{} for _ in passed]
    if passed:
        for name, weigher in WEIGHERS.items():
            if mult[name] == 0:
                continue
            for share, norm in zip(shares, _normalise([weigher(request, h) for h in passed])):
                share[name] = mult[name] * norm
    candidates = [Candidate(h, sum(s.values()), s) for h, s in zip(passed, shares)]
    candidates.sort(key=lambda c: (-c.score, c.host.name))
    return Ranking(request, tuple(candidates), tuple(rejected))


def place(
    request: PlacementRequest,
    hosts: Iterable[HostState],
    multipliers: Mapping[str, float] | None = None,
) -> HostState:
    """The best host for ``request``; CloudopsError with per-host reasons when none fits."""
    ranking = rank(request, hosts, multipliers)
    if not ranking.candidates:
        raise CloudopsError(ranking.failure())
    return ranking.candidates[0].host


def claim(host: HostState, request: PlacementRequest) -> HostState:
    """``host`` as it will be once ``request`` runs there (to place several VMs in a row)."""
    groups = host.anti_affinity_groups
    if request.anti_affinity_group is not None:
        groups = groups | {request.anti_affinity_group}
    free = None if host.memory_free_mb is None else host.memory_free_mb - request.memory_mb
    return dataclasses.replace(
        host,
        memory_free_mb=free,
        memory_committed_mb=host.memory_committed_mb + request.memory_mb,
        vcpus_committed=host.vcpus_committed + request.vcpus,
        vm_count=host.vm_count + 1,
        anti_affinity_groups=groups,
    )
