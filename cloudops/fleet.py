"""Run one function on many hosts in parallel and account for every host.

``run(hosts, func)`` calls ``func(host)`` for each host on a bounded pool of
worker threads, each host with its own timeout. It never stops at the first
failure: every host ends ``ok``, ``changed`` or ``failed`` with its reason, and
the caller gets all results at once (the shape of Fabric's GroupResult).
``func`` returns a value (status ok), ``Changed(value)`` (status changed), or
raises (status failed; the reason is one line).

Workers are daemon threads: a host that hangs past its timeout is reported
failed and abandoned, and can never keep the process from exiting. Work on
such a host must stop too: remote commands run under coreutils ``timeout``
with the time the host has left (``bounded``, ``Bounded``), so the remote
process group ends at the deadline, and ``on_timeout`` closes the host's
connection; the report then says "timed out after Ns; stopped".
"""

import queue
import shlex
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from cloudops import output
from cloudops.errors import CloudopsError
from cloudops.ssh import describe

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
        progress: Callable[[HostResult], None] | None = None, grace: float = 0.0,
        on_timeout: Callable[[str], None] | None = None) -> FleetResult:
    """Call ``func(host)`` on every host, at most ``workers`` at once, each within ``timeout`` seconds.

    A host still busy ``grace`` seconds after its ``timeout`` is abandoned: ``on_timeout(name)``
    stops its work (the report then says "stopped"), and the host is reported failed."""
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
            if name not in results and now - t0 > timeout + grace:
                stopped = ""
                if on_timeout:
                    try:
                        on_timeout(name)
                        stopped = "; stopped"
                    except Exception as exc:
                        stopped = f"; could not stop it: {describe(exc)}"
                results[name] = HostResult(name, FAILED, error=f"timed out after {timeout:g}s{stopped}",
                                           seconds=now - t0)
                if progress:
                    progress(results[name])
                # the abandoned worker is replaced so the pool keeps its size
                threading.Thread(target=worker, daemon=True).start()
    return FleetResult([results[n] for n in names])


# ---------------------------------------------------------------- remote commands

TIMEOUT_EXITS = (124, 137)  # coreutils timeout: the command was stopped (TERM, or KILL after --kill-after)
GRACE = 5.0  # seconds past a host's timeout before its worker is abandoned (its remote work has ended by then)


class TimedOut(CloudopsError):
    """A host ran out of time; its remote work was stopped."""


def bounded(command: str, seconds: float) -> str:
    """``command`` in the login shell under coreutils ``timeout``, which puts it in a process group of
    its own and signals the whole group at ``seconds`` (TERM, KILL 2 s later): nothing it started
    outlives the deadline, whether or not the SSH channel is still open."""
    return (f"timeout --kill-after=2 {max(seconds, 0.1):.1f} \"${{SHELL:-/bin/sh}}\" -c "
            f"{shlex.quote(command)}")


class Bounded:
    """A Fabric connection whose every command and upload ends by ``deadline`` (time.monotonic()).

    After the deadline, or once ``stop()`` was called, it refuses to do anything more
    (TimedOut), so a host reported failed is not changed any further."""

    def __init__(self, conn, deadline: float, timeout: float):
        self._conn, self.deadline, self.timeout, self.stopped = conn, deadline, timeout, False

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if self.stopped or left <= 0:
            raise TimedOut(f"timed out after {self.timeout:g}s; stopped")
        return left

    def run(self, command: str, **kwargs):
        left = self._left()
        own = kwargs.pop("timeout", None)
        seconds = min(left, own) if own else left
        warn = kwargs.pop("warn", False)
        result = self._conn.run(bounded(command, seconds), warn=True, timeout=seconds + GRACE, **kwargs)
        if result.exited in TIMEOUT_EXITS and time.monotonic() >= self.deadline - 0.5:
            raise TimedOut(f"timed out after {self.timeout:g}s; stopped")
        if result.exited != 0 and not warn:
            from invoke.exceptions import UnexpectedExit

            raise UnexpectedExit(result)
        return result

    def put(self, *args, **kwargs):
        self._left()
        return self._conn.put(*args, **kwargs)

    def get(self, *args, **kwargs):
        self._left()
        return self._conn.get(*args, **kwargs)

    def stop(self) -> None:
        """No more commands; the SSH connection (and any channel still open) is closed."""
        self.stopped = True
        self._conn.close()


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
    from cloudops.ssh import connect as ssh_connect

    connect = connect or ssh_connect
    live: dict[str, Bounded] = {}

    def one(host):
        deadline = time.monotonic() + timeout
        with connect(host, timeout=min(timeout, 10)) as raw:
            conn = live[getattr(host, "name", str(host))] = Bounded(raw, deadline, timeout)
            res = conn.run(command, hide=True, warn=True, in_stream=False)
        out = CommandOutput(res.exited, res.stdout, res.stderr)
        if res.exited != 0:
            last = (res.stderr.strip() or res.stdout.strip()).splitlines()
            raise CommandFailed(f"exit {res.exited}: {last[-1] if last else 'no output'}")
        return out

    def stop(name):
        if name in live:
            live[name].stop()

    return run(hosts, one, workers=workers, timeout=timeout, progress=progress, grace=GRACE, on_timeout=stop)
