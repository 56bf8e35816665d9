"""Run one function on many hosts in parallel and account for every host.

``run(hosts, func)`` calls ``func(host)`` for each host on a bounded pool of
worker threads, each host with its own timeout. It never stops at the first
failure: every host ends ``ok``, ``changed`` or ``failed`` with its reason, and
the caller gets all results at once (the shape of Fabric's GroupResult).
``func`` returns a value (status ok), ``Changed(value)`` (status changed), or
raises (status failed; the reason is one line).

Workers are daemon threads: a host that hangs past its timeout is reported
failed and abandoned, and can never keep the process from exiting.
"""

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import output
from .errors import CloudopsError
from .ssh import describe

OK, CHANGED, FAILED = "ok", "changed", "failed"


@dataclass
class Changed:
    """Return this from a fleet function when it changed something on the host."""
    value: Any = None


@dataclass
class HostResult:
    host: str
    status: str
    value: Any = None
    error: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"host": self.host, "status": self.status, "value": self.value,
                "error": self.error, "seconds": round(self.seconds, 3)}


@dataclass
class FleetResult:
    results: list[HostResult] = field(default_factory=list)

    def __iter__(self):
        return iter(self.results)

    def __getitem__(self, host: str) -> HostResult:
        return next(r for r in self.results if r.host == host)

    @property
    def failed(self) -> list[HostResult]:
        return [r for r in self.results if r.status == FAILED]

    def counts(self) -> dict:
        return {s: sum(r.status == s for r in self.results) for s in (OK, CHANGED, FAILED)}

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def to_dict(self) -> dict:
        return {"hosts": [r.to_dict() for r in self.results], "summary": self.counts()}

    def table(self, describe_value: Callable[[Any], str] = lambda v: "" if v is None else str(v)) -> str:
        rows = [{"host": r.host, "status": r.status, "seconds": r.seconds,
                 "result": r.error if r.status == FAILED else describe_value(r.value)} for r in self.results]
        counts = self.counts()
        summary = f"{len(self.results)} hosts: {counts[OK]} ok, {counts[CHANGED]} changed, {counts[FAILED]} failed"
        return output.table(rows, ["host", "status", "seconds", "result"], max_width=100) + "\n" + summary


def run(hosts: list, func: Callable, *, workers: int = 16, timeout: float = 60,
        progress: Callable[[HostResult], None] | None = None) -> FleetResult:
    """Call ``func(host)`` on every host, at most ``workers`` at once, each within ``timeout`` seconds."""
    if workers < 1:
        raise ValueError("workers must be at least 1")
    names = [getattr(h, "name", str(h)) for h in hosts]
    results: dict[str, HostResult] = {}
    started: dict[str, float] = {}
    done = queue.Queue()
    todo = queue.Queue()
    for name, host in zip(names, hosts):
        todo.put((name, host))

    def worker():
        while True:
            try:
                name, host = todo.get_nowait()
            except queue.Empty:
                return
            started[name] = time.monotonic()
            try:
                value = func(host)
                status = CHANGED if isinstance(value, Changed) else OK
                value = value.value if isinstance(value, Changed) else value
                done.put(HostResult(name, status, value, seconds=time.monotonic() - started[name]))
            except BaseException as exc:  # every failure is a result, never a crash of the run
                done.put(HostResult(name, FAILED, error=describe(exc), seconds=time.monotonic() - started[name]))

    for _ in range(min(workers, len(hosts))):
        threading.Thread(target=worker, daemon=True).start()

    while len(results) < len(hosts):
        try:
            result = done.get(timeout=0.1)
        except queue.Empty:
            result = None
        if result is not None and result.host not in results:
            results[result.host] = result
            if progress:
                progress(result)
        now = time.monotonic()
        for name, t0 in list(started.items()):
            if name not in results and now - t0 > timeout:
                results[name] = HostResult(name, FAILED, error=f"timed out after {timeout:g}s", seconds=now - t0)
                if progress:
                    progress(results[name])
                # the abandoned worker is replaced so the pool keeps its size
                threading.Thread(target=worker, daemon=True).start()
    return FleetResult([results[n] for n in names])


# ---------------------------------------------------------------- remote commands

@dataclass
class CommandOutput:
    exited: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        lines = self.stdout.strip().splitlines()
        return lines[0] + (f" (+{len(lines) - 1} lines)" if len(lines) > 1 else "") if lines else ""


class CommandFailed(CloudopsError):
    """A remote command exited non-zero."""


def run_command(hosts: list, command: str, *, workers: int = 16, timeout: float = 60,
                connect=None, progress=None) -> FleetResult:
    """Run a shell command on every host through Fabric; a non-zero exit marks that host failed."""
    from .ssh import connect as ssh_connect

    connect = connect or ssh_connect

    def one(host):
        with connect(host, timeout=min(timeout, 10)) as conn:
            res = conn.run(command, hide=True, warn=True, timeout=timeout, in_stream=False)
        out = CommandOutput(res.exited, res.stdout, res.stderr)
        if res.exited != 0:
            last = (res.stderr.strip() or res.stdout.strip()).splitlines()
            raise CommandFailed(f"exit {res.exited}: {last[-1] if last else 'no output'}")
        return out

    return run(hosts, one, workers=workers, timeout=timeout, progress=progress)
