"""Drain a host: maintenance on, then every VM on it migrated to a host the scheduler chooses.

The plan is ``balance.evacuation_plan`` over the live cluster model (biggest VMs
first, each target passing the scheduler's filters with the earlier moves counted).
Moves run wave by wave, at most ``parallel`` at a time; a failed move does not stop
the others, and the report has a result for every VM.
"""

import contextlib
import signal
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from cloudops.errors import CloudopsError
from cloudops.hosts import maintenance
from cloudops.migration import balance, cluster, migrate


@dataclass
class MoveResult:
    vm: str
    source: str
    target: str
    status: str  # "moved", "failed", "cancelled" (Ctrl-C: the VM stays on its source), "planned"
    error: str | None = None
    result: dict | None = None


@dataclass
class Report:
    host: str
    dry_run: bool
    maintenance_changed: bool
    moves: list[MoveResult] = field(default_factory=list)
    interrupted: bool = False

    @property
    def failed(self) -> list[MoveResult]:
        return [m for m in self.moves if m.status == "failed"]

    def to_dict(self) -> dict:
        return {"host": self.host, "dry_run": self.dry_run, "maintenance_changed": self.maintenance_changed,
                "moves": [m.__dict__ for m in self.moves], "failed": len(self.failed),
                "interrupted": self.interrupted}

    def lines(self) -> list[str]:
        out = []
        for m in self.moves:
            detail = m.error if m.error else (migrate.Result(**m.result).summary() if m.result else "")
            out.append(f"{m.vm:<20} {m.source} -> {m.target:<8} {m.status:<8} {detail}".rstrip())
        moved = sum(m.status == "moved" for m in self.moves)
        if self.dry_run:
            out.append(f"plan: {len(self.moves)} migration(s) to empty {self.host} (dry run: nothing moved)")
        else:
            cancelled = sum(m.status == "cancelled" for m in self.moves)
            out.append(f"{self.host}: {moved} moved, {len(self.failed)} failed"
                       + (f", {cancelled} cancelled (interrupted)" if self.interrupted else "")
                       + ("" if self.moves else ": no VMs to move") + "; the host stays in maintenance")
        return out


def evacuate(host: str, inventory, *, parallel: int = 1, dry_run: bool = False, policy=None,
             progress=None, message=lambda m: None) -> Report:
    """Put ``host`` in maintenance and live-migrate its VMs away (``dry_run``: only plan)."""
    if host not in inventory.hosts:
        raise CloudopsError(f"unknown host {host!r} (inventory {inventory.path}; known: {', '.join(inventory.hosts)})")
    if parallel < 1:
        raise CloudopsError("parallel must be at least 1")
    changed = False if dry_run else maintenance.set_maintenance(host, True)
    if changed:
        message(f"{host} is now in maintenance: no new VMs go there")
    message("reading every host to plan the evacuation")
    model = cluster.model(inventory.hypervisors(), cpu_interval=0)
    moves = balance.evacuation_plan(model, host, max_parallel_per_source=parallel)
    report = Report(host=host, dry_run=dry_run, maintenance_changed=changed)
    if dry_run:
        report.moves = [MoveResult(m.vm, m.source, m.target, "planned") for m in moves]
        return report
    waves: dict[int, list] = {}
    for m in moves:
        waves.setdefault(m.wave, []).append(m)
    own_bars = parallel > 1  # each migration draws its own bar (one line per VM) instead of the caller's one

    cancel = threading.Event()  # Ctrl-C reaches only the main thread: it tells every migration through this

    def run(m):
        if cancel.is_set():
            return MoveResult(m.vm, m.source, m.target, "cancelled", error="not started: interrupted")
        message(f"migrating {m.vm} to {m.target}")
        try:
            result = migrate.migrate_vm(m.vm, m.target, inventory, policy=policy, cancel=cancel,
                                        progress=None if own_bars else progress, message=message)
        except CloudopsError as exc:
            return MoveResult(m.vm, m.source, m.target, "cancelled" if exc.exit_code == 130 else "failed",
                              error=str(exc))
        return MoveResult(m.vm, m.source, m.target, "moved", result=result.to_dict())

    with _sigint_cancels(cancel, message), ThreadPoolExecutor(max_workers=parallel) as pool:
        for wave in sorted(waves):
            futures = [pool.submit(run, m) for m in waves[wave]]
            while wait(futures, timeout=0.5).not_done:
                pass
            report.moves += [f.result() for f in futures]
    report.interrupted = cancel.is_set()
    return report


@contextlib.contextmanager
def _sigint_cancels(cancel: threading.Event, message):
    """In the main thread, Ctrl-C (and SIGTERM, which the CLI turns into one) sets ``cancel`` instead of
    raising KeyboardInterrupt: an exception raised at a random point of the main thread can land inside the
    executor's own locking (``wait`` takes every future's lock) and leave a lock held, and the evacuation
    would then never end. Each migration sees ``cancel`` at its next poll and aborts its job."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def press(_signum, _frame):
        if not cancel.is_set():
            message("interrupted: aborting every running migration; each VM stays on its source")
        cancel.set()

    previous = signal.signal(signal.SIGINT, press)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)

