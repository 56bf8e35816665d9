"""Metrics to Graphite: metrics.ship (one cycle, or a loop) and metrics.install-cron on the hypervisors.

Defaults come from the ``metrics`` configuration (set below with ``ns.configure``;
override them in invoke.yaml or the root namespace).

Exit codes of ``metrics.ship --once``: 0 everything collected and sent; 1 a host
failed (the others were shipped); 3 carbon could not be reached, so the cycle's
datapoints wait in the spool for the next cycle (nothing lost unless the summary
counts ``dropped``). Bad input exits non-zero before anything is collected.
"""

import sys

from invoke import Collection, Exit, task

from cloudops import fleet
from cloudops.errors import CloudopsError
from cloudops.metrics import cron as metrics_cron
from cloudops.metrics import cycle as metrics
from cloudops.metrics.carbon import CarbonClient
from cloudops.metrics.spool import Spool
from cloudops.tasks._cli import SELECT_HELP, finish, select_hosts, user_errors

EXIT_CARBON_DOWN = 3

_SHIP_HELP = {
    **SELECT_HELP,
    "once": "one cycle, then exit (the default without --interval)",
    "interval": "loop: one cycle every S seconds until Ctrl-C (--interval alone: config metrics.interval)",
    "carbon": "carbon's pickle/plaintext receiver, HOST:PORT (default: config metrics.carbon)",
    "prefix": "first component(s) of every series name (default: config metrics.prefix)",
    "protocol": "pickle or plaintext (default: config metrics.protocol)",
    "local": "collect only this machine's libvirtd (qemu:///system), as a hypervisor's cron job does",
    "json": "one JSON summary line per cycle (for logs) instead of a short text line",
}


def _settings(c) -> dict:
    return dict(c.config.get("metrics") or {})


def _setting(c, name, value):
    if value is not None:
        return value
    value = _settings(c).get(name)
    if value is None:
        raise CloudopsError(f"no metrics {name}: give --{name.replace('_', '-')} or set metrics.{name} in the configuration")
    return value


def _interval(c, interval, once):
    """None for one cycle, else the loop's interval in seconds (checked > 0)."""
    if interval is None or interval is False:
        return None
    if once:
        raise CloudopsError("give either --once or --interval, not both")
    raw = _setting(c, "interval", None) if interval is True else interval
    try:
        seconds = float(raw)
    except (TypeError, ValueError):
        raise CloudopsError(f"metrics interval must be a number of seconds, got {raw!r}") from None
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise CloudopsError(f"metrics interval must be > 0 seconds, got {raw!r}")
    return seconds


def _text_line(summary: dict) -> str:
    failed = [f"{h}: {r['error']}" for h, r in summary["hosts"].items() if not r["ok"]]
    parts = [
        f"{len(summary['hosts'])} hosts" + (f" ({len(failed)} failed)" if failed else ""),
        f"{summary['collected']} collected", f"{summary['sent']} sent",
    ]
    if summary["replayed"]:
        parts.append(f"{summary['replayed']} of them replayed from the spool")
    if summary["spooled"] or summary["spool_pending"]:
        parts.append(f"{summary['spooled']} spooled ({summary['spool_pending']} waiting)")
    if summary["dropped"]:
        parts.append(f"{summary['dropped']} dropped (spool full)")
    parts.append(f"carbon {summary['carbon']}" if summary["carbon"] == "ok" else "carbon unreachable")
    parts.append(f"{summary['cycle_time']:.2f}s")
    return ", ".join(parts)


def _report(summary: dict, as_json: bool) -> int:
    """Print one cycle; return its exit code (problems go to stderr, one line each)."""
    print(metrics.summary_line(summary) if as_json else _text_line(summary), flush=True)
    code = 0
    if summary["carbon"] != "ok":
        print(f"cloudops: {summary['carbon']}; {summary['spool_pending']} datapoints wait in the spool "
              f"for the next cycle", file=sys.stderr, flush=True)
        code = EXIT_CARBON_DOWN
    for host, result in summary["hosts"].items():
        if not result["ok"]:
            print(f"cloudops: {result['error']}", file=sys.stderr, flush=True)
            code = 1
        for problem in result.get("problems", []):
            print(f"cloudops: {host}: note: {problem}", file=sys.stderr, flush=True)
    for problem in summary.get("problems", []):
        print(f"cloudops: note: {problem}", file=sys.stderr, flush=True)
    return code


@task(optional=["interval"], help=_SHIP_HELP)
@user_errors
def ship(c, once=False, interval=None, carbon=None, prefix=None, protocol=None, local=False,
         hosts=None, group=None, limit=None, inventory=None, workers=None, timeout=None, json=False):
    """Collect every selected hypervisor (one bulk call each, in parallel) and ship to Graphite."""
    seconds = _interval(c, interval, once)
    address = _setting(c, "carbon", carbon)
    prefix = metrics.naming.validate_prefix(_setting(c, "prefix", prefix))
    metrics.check_carbon_address(address)
    client = CarbonClient(address, protocol=_setting(c, "protocol", protocol))
    spool = Spool(metrics.default_spool_dir(), max_bytes=int(_settings(c).get("spool_max_bytes") or 64 << 20))
    if local:
        if hosts or group or limit or inventory:
            raise CloudopsError("--local collects this machine only: drop --hosts/--group/--limit/--inventory")
        selected = [metrics.local_host()]
    else:
        selected = select_hosts(c, hosts, group, limit, inventory)
    fleet_args = {"workers": int(workers or c.fleet.workers), "timeout": float(timeout or c.fleet.timeout)}
    codes = []

    def cycle():
        try:
            summary = metrics.ship_fleet(selected, client, spool, prefix, **fleet_args)
        except metrics.CycleBusy as exc:
            print(f"cloudops: {exc}", file=sys.stderr, flush=True)
            codes.append(1)
            return
        codes.append(_report(summary, json))

    with client:
        if seconds is None:
            cycle()
        else:
            try:
                metrics.run_every(seconds, cycle)
            except KeyboardInterrupt:
                print(f"cloudops: stopped after {len(codes)} cycle(s)", file=sys.stderr, flush=True)
                return
    if codes and codes[-1]:
        raise Exit(code=codes[-1])


@task(name="install-cron", help={
    **SELECT_HELP,
    "carbon": "carbon address the hosts ship to, HOST:PORT (default: the host's inventory `metrics`, then config metrics.carbon)",
    "prefix": "series prefix (default: the host's inventory `metrics`, then config metrics.prefix)",
    "every": "minutes between cycles, 1-60 (default: the host's `metrics.interval_minutes`, then config metrics.cron_minutes)",
    "check": "only say what would change; change nothing",
})
@user_errors
def install_cron(c, carbon=None, prefix=None, every=None, check=False,
                 hosts=None, group=None, limit=None, inventory=None, workers=None, timeout=None, json=False):
    """Install /etc/cron.d/cloudops-metrics on every selected host (one locked cycle a minute); idempotent.

    The entry runs the host's own cloudops (/opt/cloudops/venv, as `deploy` installs it), so that is
    installed or updated first when the host's differs from this one. The Debian packages it needs
    come with `deploy` (with the inventory variable metrics set)."""
    selected = select_hosts(c, hosts, group, limit, inventory)
    entries = {}
    for h in selected:  # all checked first; values not given come from the host's `metrics` (as deploy's do)
        address, host_prefix, minutes = metrics_cron.host_settings(h, carbon, prefix, every, defaults=_settings(c))
        metrics.check_carbon_address(address)
        metrics.naming.validate_prefix(host_prefix)
        entries[h.name] = metrics_cron.host_entry(h, address, host_prefix, minutes)

    def one(host):
        from cloudops.ssh import connect

        from cloudops.hosts import toolkit

        with connect(host) as conn:  # the entry runs the host's own cloudops: installed first when missing or old
            venv_changed, venv_message = toolkit.ensure_toolkit(conn, check=check)
            changed, message = metrics_cron.ensure_cron(conn, entries[host.name], check=check)
        message = f"{venv_message}; {message}" if venv_changed else message
        return fleet.Changed(message) if changed or venv_changed else message

    finish(fleet.run(selected, one, workers=int(workers or c.fleet.workers), timeout=float(timeout or c.fleet.timeout)),
           json)


ns = Collection("metrics", ship, install_cron)
ns.configure({
    "metrics": {
        "carbon": "127.0.0.1:2004",
        "prefix": "cloudops",
        "protocol": "pickle",
        "interval": 60,
        "cron_minutes": 1,
        "spool_max_bytes": 64 * 1024 * 1024,
    },
})
