"""One metrics cycle over the fleet: collect per host, ship to carbon, spool what carbon did not take.

    summary = ship_cycle({"hv1": conn1, "hv2": conn2}, CarbonClient("graphite:2004"),
                         Spool(default_spool_dir()), prefix="cloudops")
    print(summary_line(summary))

Every host is collected before anything is reported: a host that fails is an entry in
``summary["hosts"]`` with its error, the others still ship. Spooled datapoints are
replayed before the new ones, so carbon receives them oldest first. The cycle also ships
its own figures under ``<prefix>.cloudops.metrics``.

Naming lives in ``metrics_naming``, libvirt reading in ``metrics_collect``, rates in
``metrics_rates``; scheduling is a cron file from ``templates/cron/cloudops-metrics.j2``.
"""

from __future__ import annotations

import fcntl
import json
import math
import shlex
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path

import libvirt

from cloudops import paths
from cloudops.errors import CloudopsError
from cloudops.metrics import naming
from cloudops.metrics.carbon import CarbonClient, CarbonUnreachable, Datapoint, parse_address
from cloudops.metrics.collect import HostSample, collect_containers, collect_host
from cloudops.metrics.rates import host_figures_with_state
from cloudops.metrics.spool import Spool
from cloudops.templating import render


def metrics_dir() -> Path:
    return paths.var_dir() / "metrics"


def default_state_dir() -> Path:
    return metrics_dir() / "state"


def default_spool_dir() -> Path:
    return metrics_dir() / "spool"


def ship_cycle(
    hosts_connections: Mapping[str, object] | Iterable[tuple[str, object]],
    carbon: CarbonClient,
    spool: Spool,
    prefix: str,
    now: float | None = None,
    state_dir: Path | None = None,
    started: float | None = None,
) -> dict:
    """Collect every host, replay the spool, ship this cycle; return the summary dict.

    ``hosts_connections`` maps host name -> an open libvirt connection, a HostSample
    already collected with ``collect_host`` (a parallel fan-out), or the exception raised
    while opening the connection (that host is then reported failed). ``now`` (wall clock
    seconds) is the timestamp of every datapoint of the cycle and, when given, also the
    sample time for rates (deterministic tests); by default the current time. ``started``
    (``time.monotonic()``) is when the cycle began, if collection happened before this call.
    """
    started = time.monotonic() if started is None else started
    naming.validate_prefix(prefix)
    timestamp = int(time.time() if now is None else now)
    state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
    items = hosts_connections.items() if isinstance(hosts_connections, Mapping) else hosts_connections

    hosts, samples = _collect(items, now)
    datapoints = _figures(samples, hosts, state_dir, prefix, timestamp)
    summary = {
        "timestamp": timestamp,
        "prefix": prefix,
        "hosts": hosts,
        "hosts_failed": sum(1 for h in hosts.values() if not h["ok"]),
        "collected": len(datapoints),
        **_deliver(datapoints, carbon, spool),
    }
    summary["cycle_time"] = round(time.monotonic() - started, 3)
    _deliver_own(summary, carbon, spool)
    summary["spool_pending"] = spool.pending()
    summary["spool_dropped_total"] = spool.dropped
    summary["problems"] = list(spool.problems)
    summary["ok"] = summary["carbon"] == "ok" and summary["hosts_failed"] == 0
    return summary


def _collect(items, now) -> tuple[dict[str, dict], dict[str, HostSample]]:
    """Read every host; a host that fails gets its error in the report, the others go on."""
    hosts: dict[str, dict] = {}
    samples: dict[str, HostSample] = {}
    for host, conn in items:
        if isinstance(conn, CloudopsError):  # already one line naming the host
            hosts[host] = {"ok": False, "error": str(conn)}
            continue
        if isinstance(conn, BaseException):
            hosts[host] = {"ok": False, "error": f"{host}: no connection: {conn}"}
            continue
        if isinstance(conn, HostSample):  # collected already, e.g. in parallel by cloudops.fleet
            samples[host] = conn
            hosts[host] = {"ok": True}
            continue
        try:
            samples[host] = collect_host(conn, host, taken_at=now)
            hosts[host] = {"ok": True}
        except CloudopsError as exc:
            hosts[host] = {"ok": False, "error": str(exc)}
    return hosts, samples


def _figures(samples: dict[str, HostSample], hosts: dict[str, dict], state_dir: Path, prefix: str, timestamp: int):
    """Datapoints of all hosts (rates against each host's state file); fills in ``hosts``."""
    owners, notes = vm_owners(samples.values())
    datapoints: list[Datapoint] = []
    for host, sample in samples.items():
        skip = frozenset(vm.name for vm in sample.vms if vm.active and owners[vm.name] != host)
        try:
            figures = host_figures_with_state(sample, state_dir, prefix, timestamp, skip)
        except OSError as exc:  # the state directory is not writable
            hosts[host] = {"ok": False, "error": f"{host}: rate state: {exc.strerror or exc}"}
            continue
        datapoints.extend(figures.datapoints)
        hosts[host] = {
            "ok": True,
            "vms": figures.vms,
            "datapoints": len(figures.datapoints),
            "problems": sample.problems + figures.problems + notes.get(host, []),
        }
    return datapoints


def vm_owners(samples: Iterable[HostSample]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Which host ships each active VM's series, and a note per host for VMs active on several.

    During a live migration a VM is active on two hosts at once (running on the source,
    paused on the destination until the switch). Its series do not name the host, so
    only one may write them: the host where it runs, else the first host seen.
    """
    seen: dict[str, list[tuple[str, int]]] = {}
    for sample in samples:
        for vm in sample.vms:
            if vm.active:
                seen.setdefault(vm.name, []).append((sample.host, vm.state))
    owners, notes = {}, {}
    for name, places in seen.items():
        running = [host for host, state in places if state == libvirt.VIR_DOMAIN_RUNNING]
        owners[name] = running[0] if running else places[0][0]
        if len(places) > 1:
            where = ", ".join(host for host, _state in places)
            for host, _state in places:
                notes.setdefault(host, []).append(
                    f"{name}: active on {where} (migrating?); its series come from {owners[name]} this cycle"
                )
    return owners, notes


def _deliver(datapoints: list[Datapoint], carbon: CarbonClient, spool: Spool) -> dict:
    """Replay the spool, then send; whatever carbon did not take goes to the spool.

    Once carbon failed in this cycle it is not tried again: one timeout per cycle at most.
    """
    replayed = sent = spooled = dropped = 0
    error = None
    if not spool.is_empty():
        try:
            replayed = spool.replay(carbon.send)
        except CarbonUnreachable as exc:
            replayed, error = exc.sent, str(exc)
    rest = datapoints
    if error is None:
        try:
            sent, rest = carbon.send(datapoints), []
        except CarbonUnreachable as exc:
            sent, rest, error = exc.sent, datapoints[exc.sent:], str(exc)
    if rest:
        dropped = spool.append(rest)
        spooled = len(rest)
    return {
        "sent": sent + replayed,
        "replayed": replayed,
        "spooled": spooled,
        "dropped": dropped,
        "carbon": error or "ok",
    }


def _deliver_own(summary: dict, carbon: CarbonClient, spool: Spool) -> None:
    """Ship the cycle's own figures last (or spool them, if carbon already failed); update ``summary``."""
    own = self_datapoints(summary["prefix"], summary["timestamp"], summary)
    if summary["carbon"] == "ok":
        try:
            summary["sent"] += carbon.send(own)
            return
        except CarbonUnreachable as exc:
            summary["sent"] += exc.sent
            summary["carbon"] = str(exc)
            own = own[exc.sent:]
    summary["dropped"] += spool.append(own)
    summary["spooled"] += len(own)


def self_datapoints(prefix: str, timestamp: int, summary: dict) -> list[Datapoint]:
    """The shipper's own figures for one cycle (counts are per cycle, cycle_time in seconds)."""
    fields = ("collected", "sent", "replayed", "spooled", "dropped", "hosts_failed", "cycle_time")
    return [(naming.self_path(prefix, f), (timestamp, float(summary[f]))) for f in fields]


def summary_line(summary: dict) -> str:
    """The summary as one JSON line (for cron logs)."""
    return json.dumps(summary, sort_keys=True, separators=(",", ":"), default=str)


def migration_datapoints(
    vm: str,
    duration: float,
    downtime_ms: float,
    bytes: int,
    prefix: str = "cloudops",
    timestamp: float | None = None,
) -> list[Datapoint]:
    """Figures of one live migration: ``<prefix>.vm.<vm>.migration.{duration_s,downtime_ms,bytes,...}``."""
    naming.validate_prefix(prefix)
    for name, value in (("duration", duration), ("downtime_ms", downtime_ms), ("bytes", bytes)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise CloudopsError(f"migration {name} must be a number >= 0, got {value!r}")
    ts = int(time.time() if timestamp is None else timestamp)
    points = [
        (naming.vm_path(prefix, vm, "migration", "duration_s"), (ts, float(duration))),
        (naming.vm_path(prefix, vm, "migration", "downtime_ms"), (ts, float(downtime_ms))),
        (naming.vm_path(prefix, vm, "migration", "bytes"), (ts, float(bytes))),
    ]
    if duration > 0:
        points.append((naming.vm_path(prefix, vm, "migration", "bytes_per_s"), (ts, bytes / duration)))
    return points


def cron_entry(
    carbon_address: str,
    prefix: str,
    interval_minutes: int = 1,
    user: str = "root",
    max_runtime: int = 300,
    program: str | Path | None = None,
    var: Path | None = None,
    local: bool = False,
) -> str:
    """An /etc/cron.d file running ``cloudops metrics.ship --once --json`` every ``interval_minutes`` minutes.

    ``flock -n`` skips a cycle while the previous one still holds the lock, so cycles
    never overlap; ``timeout`` ends a stuck cycle after ``max_runtime`` seconds. With
    ``local`` the cycle collects only the machine it runs on (``--local``: a hypervisor's
    own cron), else the inventory's hosts. ``var`` becomes the job's ``CLOUDOPS_VAR``:
    state, spool, lock and log live there. ``program`` is the ``cloudops`` command the job runs (a
    hypervisor's own, see cloudops.hosts.toolkit; default: the one beside this Python), never a checkout.
    """
    parse_address(carbon_address)
    naming.validate_prefix(prefix)
    if not isinstance(interval_minutes, int) or isinstance(interval_minutes, bool) or not 1 <= interval_minutes <= 60:
        raise CloudopsError(f"metrics interval must be a whole number of minutes in 1..60, got {interval_minutes!r}")
    if not isinstance(max_runtime, int) or max_runtime <= 0:
        raise CloudopsError(f"metrics max_runtime must be > 0 seconds, got {max_runtime!r}")
    if not user or not user.replace("-", "").replace("_", "").isalnum():
        raise CloudopsError(f"cron user {user!r} is not a plain user name")
    program = str(program or Path(sys.executable).parent / "cloudops")
    var = Path(var or paths.var_dir())
    metrics = var / "metrics"
    command = " ".join([
        "cd", "/", "&&",
        "mkdir", "-p", shlex.quote(str(metrics)), "&&",
        "flock", "-n", shlex.quote(str(metrics / "ship.lock")),
        "timeout", "--kill-after=10", str(max_runtime),
        shlex.quote(program), "metrics.ship", "--once", "--json", *(["--local"] if local else []),
        f"--carbon={shlex.quote(carbon_address)}", f"--prefix={shlex.quote(prefix)}",
        ">>", shlex.quote(str(metrics / "ship.log")), "2>&1",
    ])
    if "\n" in command:
        raise CloudopsError("cron command must be one line")
    schedule = "* * * * *" if interval_minutes == 1 else f"*/{interval_minutes} * * * *"
    return render(
        "cron/cloudops-metrics.j2",
        schedule=schedule,
        user=user,
        command=command.replace("%", r"\%"),  # cron turns a bare % into a newline
        interval_minutes=interval_minutes,
        var=var,
    )


# -- the fleet: every host collected in parallel, then one cycle ---------------------------


class CycleBusy(CloudopsError):
    """Another metrics cycle holds this state directory's lock: this cycle is skipped."""


def local_host(name: str | None = None, uri: str = "qemu:///system"):
    """This machine as a host to collect (a hypervisor's own cron job): named by its short hostname."""
    from cloudops.inventory import Host

    return Host(name=name or socket.gethostname().split(".")[0], address="localhost", libvirt_uri=uri)


def collect_fleet(hosts, workers: int = 16, timeout: float = 60.0, open_host=None) -> dict[str, object]:
    """Each host's HostSample (one bulk call per host, all hosts at once), or its CloudopsError.

    ``hosts`` are inventory hosts; ``open_host`` (default ``virt.open_host``, cached
    connections) is a context manager giving a libvirt connection. A host that is down,
    fails its stats call or passes ``timeout`` maps to an error naming it.
    """
    from cloudops import fleet, virt

    opener = open_host or virt.open_host

    def one(host):
        with opener(host) as conn:
            sample = collect_host(conn, host.name)
        containers = virt.container_connection(host) if open_host is None else None
        if containers is not None:
            collect_containers(containers, sample)
        return sample

    out: dict[str, object] = {}
    for result in fleet.run(list(hosts), one, workers=workers, timeout=timeout):
        if result.status == fleet.FAILED:
            error = result.error or "failed"
            out[result.host] = CloudopsError(error if error.startswith(f"{result.host}:") else f"{result.host}: {error}")
        else:
            out[result.host] = result.value
    return out


def ship_fleet(
    hosts,
    carbon: CarbonClient,
    spool: Spool,
    prefix: str,
    *,
    workers: int = 16,
    timeout: float = 60.0,
    state_dir: Path | None = None,
    now: float | None = None,
    open_host=None,
) -> dict:
    """One whole cycle: collect ``hosts`` in parallel, then ``ship_cycle``; returns its summary.

    A non-blocking lock on the state directory keeps two cycles (a cron job and a manual
    ``--interval`` loop, say) from running at once: the second raises CycleBusy.
    """
    naming.validate_prefix(prefix)
    state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
    started = time.monotonic()
    with cycle_lock(state_dir):
        samples = collect_fleet(hosts, workers=workers, timeout=timeout, open_host=open_host)
        return ship_cycle(samples, carbon, spool, prefix, now=now, state_dir=state_dir, started=started)


@contextmanager
def cycle_lock(state_dir: Path):
    """Hold ``<state_dir>/.cycle.lock`` (flock, non-blocking) for one cycle; CycleBusy if taken."""
    state_dir = Path(state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        lock = open(state_dir / ".cycle.lock", "a")
    except OSError as exc:
        raise CloudopsError(f"metrics state directory {state_dir}: {exc.strerror or exc}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CycleBusy(f"another metrics cycle is running (lock {state_dir / '.cycle.lock'}); this one is skipped") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_every(interval: float, cycle, *, cycles: int | None = None, clock=time.monotonic, sleep=time.sleep) -> int:
    """Call ``cycle()`` every ``interval`` seconds, never two at once; return how many ran.

    Ticks are on a fixed grid from the first call. A cycle that runs past the next tick
    makes that tick be skipped (not run late and then twice): cycles never overlap and
    never bunch up. ``cycles`` bounds the count (None: until interrupted).
    """
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval > 0:
        raise CloudopsError(f"metrics interval must be > 0 seconds, got {interval!r}")
    next_at = clock()
    done = 0
    while cycles is None or done < cycles:
        cycle()
        done += 1
        if cycles is not None and done >= cycles:
            break
        next_at += interval
        now = clock()
        if now > next_at:
            next_at += math.ceil((now - next_at) / interval) * interval
        sleep(max(0.0, next_at - now))
    return done


def check_carbon_address(address: str) -> tuple[str, int]:
    """Parse ``host:port`` and make sure the host name resolves; CloudopsError otherwise.

    A carbon that is down is not an error here (its datapoints are spooled); a name that
    does not resolve is a configuration mistake and is refused before anything is collected.
    """
    host, port = parse_address(address)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CloudopsError(f"carbon address {address!r}: host {host!r} does not resolve ({exc.strerror})") from None
    return host, port


# -- migrations ------------------------------------------------------------------------------


def record_migration(
    vm: str,
    duration: float,
    downtime_ms: float,
    bytes: int,
    *,
    carbon: CarbonClient | str | None = None,
    spool: Spool | None = None,
    prefix: str = "cloudops",
    timestamp: float | None = None,
) -> dict:
    """Ship one live migration's figures now; what carbon does not take waits in the spool.

    ``carbon`` is a CarbonClient, an address ``host:port``, or None: then the figures go
    straight to the spool (default ``default_spool_dir()``) and the next ``metrics.ship``
    cycle using that spool sends them. Carbon being down never raises (a finished
    migration must not fail on monitoring); figures that are not numbers >= 0 do.
    Returns {"datapoints", "sent", "spooled", "dropped", "carbon"}.
    """
    points = migration_datapoints(vm, duration, downtime_ms, bytes, prefix=prefix, timestamp=timestamp)
    spool = spool if spool is not None else Spool(default_spool_dir())
    sent, error = 0, "not configured; spooled for the next cycle"
    if carbon is not None:
        client = CarbonClient(carbon, attempts=2) if isinstance(carbon, str) else carbon
        try:
            sent, error = client.send(points), "ok"
        except CarbonUnreachable as exc:
            sent, error = exc.sent, str(exc)
        finally:
            if isinstance(carbon, str):
                client.close()
    rest = points[sent:]
    dropped = spool.append(rest)
    return {"datapoints": len(points), "sent": sent, "spooled": len(rest), "dropped": dropped, "carbon": error}


def migration_job_figures(job_stats: Mapping[str, object]) -> tuple[float, float, int]:
    """(duration s, downtime ms, bytes) from libvirt's completed-job statistics of a migration.

    ``job_stats`` is ``dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)`` on the source
    (``virsh domjobinfo --completed``): time_elapsed and downtime in ms, data_processed
    (memory and disk) in bytes. A missing figure counts as 0.
    """
    elapsed_ms = float(job_stats.get("time_elapsed", 0) or 0)
    downtime_ms = float(job_stats.get("downtime", 0) or 0)
    data = job_stats.get("data_processed")
    if data is None:
        data = int(job_stats.get("memory_processed", 0) or 0) + int(job_stats.get("disk_processed", 0) or 0)
    return elapsed_ms / 1000.0, downtime_ms, int(data)
