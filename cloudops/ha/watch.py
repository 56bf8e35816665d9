"""One cycle of ``cloud.watch``: probe every hypervisor, remember who is missing, fail over the dead.

Made for cron (one cycle per call) or a loop; whatever a cycle learns is in the state store
(``ha/<host>``), so the next cycle, from this control machine or another operator's, goes on
from there: since when a host is missing, when it was declared dead, when it was fenced. A host
missing for ``grace`` seconds or more is dead and failed over (``cloudops.ha.failover``); once
fenced it is not fenced again (unless a VM record was written on it after the fencing: it came
back and died again between two cycles), and each cycle restarts only the shared VMs still
recorded on it (none, once all moved). A host that answers again is healthy: its stale definitions go
(``cloudops.ha.comeback``) and its entry is cleared. One cycle at a time in the whole cloud: the
cycle holds the leased lock ``ha`` (as ``host.failover`` does).
"""

import time
from dataclasses import dataclass, field

from cloudops import state
from cloudops.compute import records
from cloudops.errors import CloudopsError
from cloudops.ha import comeback, failover, fencing, probe

PREFIX = "ha/"
LOCK = "ha"
LOCK_TTL = 60.0


def check_grace(grace) -> float:
    try:
        value = float(grace)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise CloudopsError(f"--grace must be a positive number of seconds, got {grace!r}")
    return value


def entry(host_name: str) -> dict | None:
    return state.current().value(PREFIX + host_name)


def _set(host_name: str, **fields) -> None:
    state.current().update(PREFIX + host_name, lambda value: value.update(fields))


def _clear(host_name: str) -> None:
    state.current().delete(PREFIX + host_name)


def declare_dead(host_name: str, now: float) -> dict:
    """Mark ``host_name`` dead now (``host.failover``): missing since now unless it was already."""
    def change(value):
        value.setdefault("missing_since", now)
        value.setdefault("dead_since", now)
        return dict(value)

    return state.current().update(PREFIX + host_name, change)


@dataclass
class HostStatus:
    host: str
    status: str  # up, degraded, missing, dead, healthy again
    probe: dict = field(default_factory=dict)
    missing_for: float | None = None
    failover: dict | None = None
    actions: list = field(default_factory=list)
    error: str = ""

    def line(self) -> str:
        if self.status == "missing":
            return f"{self.host}: missing for {self.missing_for:.0f}s ({self.probe.get('error')})"
        if self.status == "dead":
            return f"{self.host}: dead (missing for {self.missing_for:.0f}s)"
        if self.status == "healthy again":
            return f"{self.host}: healthy again" + (f" ({'; '.join(self.actions)})" if self.actions else
                                                    ", nothing stale to remove")
        return f"{self.host}: {self.status}" + (f" ({self.probe.get('error')})" if self.probe.get("error") else "")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class WatchReport:
    grace: float
    hosts: list = field(default_factory=list)

    @property
    def attention(self) -> list[str]:
        """Hosts that need a person: dead and not completely failed over, or not cleaned up."""
        return [h.host for h in self.hosts if h.error or (h.status == "dead" and not (h.failover or {}).get("complete"))]

    def to_dict(self) -> dict:
        return {"grace": self.grace, "hosts": [h.to_dict() for h in self.hosts], "attention": self.attention}

    def lines(self) -> list[str]:
        out = []
        for h in self.hosts:
            out.append(h.line())
            if h.failover:
                out += [f"  {line}" for line in _failover_lines(h.failover)]
            if h.error:
                out.append(f"  error: {h.error}")
        changed = [h for h in self.hosts if h.failover or h.status == "healthy again"]
        if not changed:
            out.append("nothing to do: no host dead or back")
        return out


def _failover_lines(data: dict) -> list[str]:
    if data.get("fenced"):
        fence = data.get("fence")
        head = f"fenced in {fence['seconds']:.1f}s" if fence else "fenced before"
    else:
        head = f"not fenced: {data.get('reason')}"
    steps = [failover.Step(**s).line() for s in data.get("steps") or []]
    return [head, *steps] if (data.get("fence") or steps or not data.get("fenced")) else [head]


def cycle(inventory, grace: float = 30.0, *, probe_timeout: float = probe.DEFAULT_TIMEOUT,
          fence_timeout: float = 60.0, now=time.time, probe_all=probe.probe_all, ship=lambda report: None,
          message=lambda m: None) -> WatchReport:
    """One watch cycle over every hypervisor of ``inventory``."""
    grace = check_grace(grace)
    hosts = inventory.hypervisors()
    for host in hosts:
        fencing.template_of(host)  # a malformed fence_command is an error now, not when the host dies
    report = WatchReport(grace)
    with state.current().lock(LOCK, ttl=LOCK_TTL, busy_message="another cloud.watch or host.failover is running"):
        probes = probe_all(hosts, probe_timeout)
        for host in hosts:
            report.hosts.append(_host_cycle(host, probes[host.name], inventory, grace, now(), fence_timeout,
                                            ship, message))
    return report


def _host_cycle(host, found, inventory, grace, t, fence_timeout, ship, message) -> HostStatus:
    known = entry(host.name)
    status = HostStatus(host.name, found.status, probe=found.to_dict())
    if found.untrusted:  # something answers with another key: never dead on that, a person checks it
        status.error = ("answers with an SSH host key that is not the trusted one: not declared dead, nothing "
                        "fenced or restarted (verify the host out of band; host.failover --force if it is dead)")
        return status
    if not found.missing:
        if known is None:
            return status
        if known.get("dead_since") is None:  # missed a cycle or two, never declared dead
            _clear(host.name)
            return status
        try:
            status.actions = comeback.clean(host)
        except CloudopsError as exc:
            status.error = f"back, but its stale definitions could not be checked: {exc}"
            return status
        _clear(host.name)
        status.status = "healthy again"
        return status
    if known is None:
        _set(host.name, missing_since=t)
        known = {"missing_since": t}
    status.missing_for = round(t - known["missing_since"], 3)
    if status.missing_for < grace:
        status.status = "missing"
        return status
    status.status = "dead"
    if known.get("dead_since") is None:
        _set(host.name, dead_since=t)
        known["dead_since"] = t
        message(f"{host.name} missing for {status.missing_for:.0f}s: declared dead")
    on_host = records.on_host(host.name)
    fenced = known.get("fenced_at") is not None and not any(
        (r.get("updated") or 0) > known["fenced_at"] for r in on_host)  # a VM written there since: it came back
    if fenced and not any(records.is_shared(r) for r in on_host):
        status.failover = {"fenced": True, "fence": None, "steps": [], "complete": True,
                           "reason": "", "host": host.name}
        return status  # done in an earlier cycle: nothing left to move
    try:
        result = failover.failover(host, inventory, fence=not fenced, fence_timeout=fence_timeout, message=message,
                                   detect_seconds=None if fenced else round(t - known["missing_since"], 3))
    except CloudopsError as exc:
        status.error = str(exc)
        return status
    if result.fenced and not fenced:
        _set(host.name, fenced_at=round(time.time(), 3))
    status.failover = result.to_dict()
    if result.fence or result.restarted:
        ship(result)
    return status


def failover_now(host, inventory, *, force: bool = False, dry_run: bool = False, probe_timeout: float =
                 probe.DEFAULT_TIMEOUT, fence_timeout: float = 60.0, ship=lambda report: None,
                 message=lambda m: None) -> tuple[probe.Probe, failover.Report]:
    """``host.failover``: the host is declared dead at once and failed over (fenced again, whatever before).

    A host that still answers is refused unless ``force`` (and then it is still fenced first); ``dry_run``
    only plans, for any host."""
    fencing.template_of(host)
    with state.current().lock(LOCK, ttl=LOCK_TTL, busy_message="another cloud.watch or host.failover is running"):
        found = probe.probe_all([host], probe_timeout)[host.name]
        if dry_run:  # changes nothing, so a live host may be planned for too
            return found, failover.failover(host, inventory, dry_run=True, message=message)
        if not found.missing and not force:
            raise CloudopsError(f"{host.name} answers ({found.status}: SSH {'yes' if found.ssh else 'no'}, libvirt "
                                f"{'yes' if found.libvirt else 'no'}): not failing over a live host; --force fences "
                                "it and fails over anyway")
        known = declare_dead(host.name, time.time())
        result = failover.failover(host, inventory, fence=True, fence_timeout=fence_timeout, message=message,
                                   detect_seconds=0.0 if found.missing else None)
        if result.fenced:
            _set(host.name, fenced_at=round(time.time(), 3))
        elif known.get("fenced_at") is None and not found.missing:
            _clear(host.name)  # a live host that could not be fenced is not dead
        if result.fence or result.restarted:
            ship(result)
    return found, result
