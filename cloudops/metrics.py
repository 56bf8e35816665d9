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

import json
import shlex
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import libvirt

from . import metrics_naming as naming
from . import paths
from .carbon import CarbonClient, CarbonUnreachable, Datapoint, parse_address
from .errors import CloudopsError
from .metrics_collect import HostSample, collect_host
from .metrics_rates import host_figures_with_state
from .spool import Spool
from .templating import render


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
) -> dict:
    """Collect every host, replay the spool, ship this cycle; return the summary dict.

    ``hosts_connections`` maps host name -> an open libvirt connection, a HostSample
    already collected with ``collect_host`` (a parallel fan-out), or the exception raised
    while opening the connection (that host is then reported failed). ``now`` (wall clock
    seconds) is the timestamp of every datapoint of the cycle and, when given, also the
    sample time for rates (deterministic tests); by default the current time.
    """
    started = time.monotonic()
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
    root: Path | None = None,
    var: Path | None = None,
) -> str:
    """An /etc/cron.d file running ``invoke metrics.ship`` every ``interval_minutes`` minutes.

    ``flock -n`` skips a cycle while the previous one still holds the lock, so cycles
    never overlap; ``timeout`` ends a stuck cycle after ``max_runtime`` seconds.
    """
    parse_address(carbon_address)
    naming.validate_prefix(prefix)
    if not isinstance(interval_minutes, int) or isinstance(interval_minutes, bool) or not 1 <= interval_minutes <= 60:
        raise CloudopsError(f"metrics interval must be a whole number of minutes in 1..60, got {interval_minutes!r}")
    if not isinstance(max_runtime, int) or max_runtime <= 0:
        raise CloudopsError(f"metrics max_runtime must be > 0 seconds, got {max_runtime!r}")
    if not user or not user.replace("-", "").replace("_", "").isalnum():
        raise CloudopsError(f"cron user {user!r} is not a plain user name")
    root = Path(root or paths.ROOT)
    var = Path(var or paths.var_dir())
    metrics = var / "metrics"
    invoke = root / ".venv" / "bin" / "invoke"
    command = " ".join([
        "cd", shlex.quote(str(root)), "&&",
        "mkdir", "-p", shlex.quote(str(metrics)), "&&",
        "flock", "-n", shlex.quote(str(metrics / "ship.lock")),
        "timeout", "--kill-after=10", str(max_runtime),
        shlex.quote(str(invoke)), "metrics.ship",
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
