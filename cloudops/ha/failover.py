"""Failover of one dead host: fence it, restart its shared-storage VMs elsewhere, report the others down.

The order is the whole safety argument: nothing is restarted unless fencing succeeded (a host
without a ``fence_command``, or whose fencing failed, keeps its VMs: it might still run them, and
two QEMUs writing one disk destroy it). The VMs come from their records in the state store
(``cloudops.compute.records``), since the dead host cannot be asked. ``plan`` is pure: which VM
restarts where (the scheduler, with anti-affinity and capacity, the dead host excluded, each
placement claimed before the next), which stay down (local storage) and which find no host.
``restart`` defines the recorded domain on its new host with the same MAC and address (the IPAM
allocation never moved) and starts it. Every failover is kept in the state store
(``failovers/<time>-<host>``).
"""

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import libvirt

from cloudops import fleet, state, virt
from cloudops.compute import placement, power, records, scheduler, vms
from cloudops.errors import CloudopsError
from cloudops.ha import fencing
from cloudops.migration import journal as migration_journal
from cloudops.net import networks

HISTORY = "failovers/"
RESTART, DOWN, NO_HOST, ALREADY = "restart", "down", "no host", "already elsewhere"
DEFINED = "defined"  # a shared VM that was stopped: defined on its new host, not started
RESTART_WORKERS = 8  # VMs restarted at once


@dataclass
class Step:
    """What happens (or happened) to one VM of the dead host."""

    vm: str
    action: str  # restart, down, no host; after execution: restarted, failed
    target: str | None = None
    reason: str = ""
    seconds: float | None = None

    def line(self) -> str:
        if self.action in (RESTART, "restarted"):
            verb = "would restart" if self.action == RESTART else "restarted"
            took = f" in {self.seconds:.1f}s" if self.seconds is not None else ""
            return f"{self.vm}: {verb} on {self.target}{took}"
        return f"{self.vm}: {self.action}: {self.reason}"


@dataclass
class Report:
    host: str
    fenced: bool = False
    fence: dict | None = None
    steps: list = field(default_factory=list)
    reason: str = ""  # why nothing was restarted, when nothing was
    dry_run: bool = False
    detect_seconds: float | None = None
    time: float = field(default_factory=lambda: round(time.time(), 3))

    @property
    def restarted(self) -> list:
        return [s.vm for s in self.steps if s.action == "restarted"]

    @property
    def complete(self) -> bool:
        """Fenced, and every shared-storage VM restarted (local ones are down by design)."""
        return self.fenced and all(s.action in ("restarted", DEFINED, DOWN, ALREADY) for s in self.steps)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(restarted=self.restarted, complete=self.complete)
        return data

    def lines(self) -> list[str]:
        head = f"{self.host}: "
        if self.dry_run:
            head += "dry run, nothing fenced or restarted" + (f" ({self.reason})" if self.reason else "")
        elif self.fenced:
            head += f"fenced ({self.fence['seconds']:.1f}s)" if self.fence else "fenced"
        else:
            head += f"not fenced: {self.reason}"
        return [head, *(f"  {s.line()}" for s in self.steps)]


def plan(vm_records: list[dict], states: list, dead: str) -> list[Step]:
    """Where each VM of the dead host goes: shared storage -> the scheduler's host, local -> down. Pure."""
    states = [s for s in states if s.name != dead]
    steps = []
    for record in sorted(vm_records, key=lambda r: r["name"]):
        name = record["name"]
        if not records.is_shared(record):
            steps.append(Step(name, DOWN, reason=f"local storage: down until {dead} returns, left untouched"))
            continue
        request = scheduler.PlacementRequest(memory_mb=int(record.get("memory_mb") or 0),
                                             vcpus=int(record.get("vcpus") or 1), name=name,
                                             anti_affinity_group=record.get("group"), exclude_hosts=(dead,))
        ranking = scheduler.rank(request, states)
        if not ranking.candidates:
            steps.append(Step(name, NO_HOST, reason=ranking.failure()))
            continue
        chosen = ranking.candidates[0].host
        states = [scheduler.claim(s, request) if s.name == chosen.name else s for s in states]
        steps.append(Step(name, RESTART, target=chosen.name))
    return steps


def not_fenced_reason(fence: fencing.FenceResult) -> str:
    return f"{fence.reason}: nothing restarted (never a restart without fencing)"


def failover(host, inventory, *, fence: bool = True, dry_run: bool = False, fence_timeout: float = 60,
             message=lambda m: None, detect_seconds: float | None = None) -> Report:
    """Fence ``host`` (unless ``fence`` is False: it was fenced already), then restart its shared VMs.

    A bad fence_command is a CloudopsError before anything runs; a missing or failing one is a
    report that says so, with nothing restarted."""
    template = fencing.template_of(host)  # refused now when malformed
    report = Report(host.name, dry_run=dry_run, detect_seconds=detect_seconds)
    vm_records = records.on_host(host.name)
    if dry_run:
        report.steps = plan(vm_records, _states(host, inventory, vm_records), host.name)
        report.fenced = not fence
        if template is None and fence:
            report.reason = f"no fence_command for {host.name} in the inventory: nothing would be restarted"
        return report
    if fence:
        if template is not None:
            message(f"fencing {host.name}")
        result = fencing.fence(host, timeout=fence_timeout)
        report.fence = result.to_dict()
        if not result.ok:
            report.reason = not_fenced_reason(result)
            report.steps = [Step(r["name"], DOWN, reason=f"{host.name} not fenced") for r in vm_records]
            _keep(report)
            return report
    report.fenced = True
    try:
        steps = plan(vm_records, _states(host, inventory, vm_records), host.name)
    except CloudopsError as exc:  # no other host answers: the shared VMs wait for the next try
        steps = [Step(r["name"], NO_HOST, reason=str(exc)) if records.is_shared(r) else s
                 for r, s in zip(sorted(vm_records, key=lambda r: r["name"]), plan(vm_records, [], host.name))]
    elsewhere = _defined_elsewhere(host, inventory, [s.vm for s in steps if s.action == RESTART])
    for step in steps:
        if step.action == RESTART and step.vm in elsewhere:  # an earlier try started it, or someone did by hand
            step.action, step.target = ALREADY, elsewhere[step.vm]
            step.reason = f"already defined on {step.target}: its record now says so, no second copy made"
            records.moved(step.vm, step.target)
        elif step.action == RESTART and migration_journal.read(step.vm):
            step.action = "failed"
            step.reason = (f"unfinished migration: its other copy may be on the target; run `invoke vm.migrate "
                           f"{step.vm} --recover` once both hosts answer")
    todo = [s for s in steps if s.action == RESTART]
    if todo:  # at once: each VM's define and start are independent (its own name lock, its own target)
        with ThreadPoolExecutor(max_workers=min(RESTART_WORKERS, len(todo))) as pool:
            list(pool.map(lambda step: _restart_step(step, vm_records, inventory, message), todo))
    report.steps = steps
    _keep(report)
    return report


def _restart_step(step: Step, vm_records: list, inventory, message) -> None:
    record = next(r for r in vm_records if r["name"] == step.vm)
    run = records.meant_to_run(record)
    message(f"{'restarting' if run else 'defining (it was stopped)'} {step.vm} on {step.target}")
    t0 = time.monotonic()
    try:
        restart(record, inventory.hosts[step.target], start=run)
        step.action, step.seconds = ("restarted" if run else DEFINED), round(time.monotonic() - t0, 3)
        if not run:
            step.reason = f"stopped on the dead host (vm.stop): defined on {step.target}, left stopped"
    except CloudopsError as exc:
        step.action, step.reason = "failed", str(exc)
    except libvirt.libvirtError as exc:
        step.action, step.reason = "failed", f"{step.target}: {exc.get_error_message()}"


def _defined_elsewhere(host, inventory, names: list[str]) -> dict[str, str]:
    """{vm: host} of the ``names`` that another hypervisor already has defined; a host that cannot be asked
    is a CloudopsError (a restart could make a second copy there)."""
    if not names:
        return {}
    others = [h for h in inventory.hypervisors() if h.name != host.name]
    result = fleet.run(others, lambda h: [n for n in names if _has(h, n)], timeout=60)
    if result.failed and len(result.failed) == len(others):
        raise CloudopsError("no other hypervisor answers: " + "; ".join(f"{r.host}: {r.error}" for r in result.failed))
    found = {}
    for r in result:
        for name in r.value or []:
            found[name] = r.host
    return found


def _has(host, name) -> bool:
    with virt.open_host(host) as conn:
        return vms.defined_on(conn, name)


def _states(host, inventory, vm_records) -> list:
    """The scheduler's facts of every other hypervisor (none needed when no VM is shared)."""
    if not any(records.is_shared(r) for r in vm_records):
        return []
    others = [h for h in inventory.hypervisors() if h.name != host.name]
    if not others:
        raise CloudopsError(f"{host.name} has shared-storage VMs but the inventory has no other hypervisor")
    return placement.host_states(others)


def restart(record: dict, target, start: bool = True) -> None:
    """Define the recorded domain on ``target`` with its reservations, start it (unless ``start`` is false:
    it was stopped), and move its record there.

    Under the VM's name lock, so no start, delete or migration of the name runs meanwhile; a start
    that fails leaves neither the definition nor the reservations it added."""
    name = record["name"]
    nics = record.get("nics") or []
    as_vm = vms.VM(name=name, host=target.name, ip=nics[0]["ip"] if nics else None,
                   network=nics[0]["network"] if nics else None, mac=nics[0]["mac"] if nics else None, nics=nics)
    with vms._name_lock(name), virt.open_host(target) as conn:
        if vms.defined_on(conn, name):
            raise CloudopsError(f"{target.name} already has a domain {name}: not defining a second one")
        allocations = power._allocations(as_vm, target)  # the address is still the VM's in IPAM
        added = []
        try:
            for net, allocation in allocations:
                networks.ensure_network(conn, net)
                if networks.add_reservation(conn, net.name, allocation.mac, allocation.ip, name)[0]:
                    added.append((net.name, allocation))
            dom = conn.defineXML(record["xml"])
            try:
                if start:
                    dom.create()
            except libvirt.libvirtError:
                vms._undefine(dom)
                raise
        except BaseException:
            for net_name, allocation in added:
                with contextlib.suppress(CloudopsError, libvirt.libvirtError):
                    networks.remove_reservation(conn, net_name, allocation.mac, allocation.ip, name)
            raise
        records.save_domain(dom, target.name)


def _keep(report: Report) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(report.time))
    state.current().put(f"{HISTORY}{stamp}-{report.host}", report.to_dict())


def history(host: str | None = None) -> list[dict]:
    entries = state.current().items(HISTORY)
    return [entries[k].value for k in sorted(entries) if host is None or entries[k].value.get("host") == host]
