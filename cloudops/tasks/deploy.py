"""`deploy`: turn the selected hosts into hypervisors of the cloud and keep them so (root-level task).

Two ways in, one result shape:

- ``invoke deploy --hosts hv1,hv2`` / ``--group hypervisors``: every host in parallel
  through cloudops.fleet, one summary table, exit 1 when any host failed.
- ``fab -H hv1,hv2 deploy``: Fabric clones the task per host and hands each clone a
  Connection; the clone maps it back to its inventory host (by name or address), makes it
  verify host keys, and deploys that host. The first clone validates every host named by
  ``-H`` before any host changes; the last prints the summary table and sets the exit code,
  so one failed host never hides the others.
"""

from pathlib import Path

from fabric import Connection
from invoke import Exit, task

from cloudops import fleet, output, ssh
from cloudops.errors import CloudopsError
from cloudops.hosts import deploy as deploy_lib
from cloudops.tasks._cli import SELECT_HELP, emit_json, load_inventory, progress, user_errors

HELP = {
    **SELECT_HELP,
    "check": "only say what would change; change nothing",
    "rotate_migration_key": "replace the cloud's migration key (every host gets the new one, the old is unauthorized)",
    "verbose": "list every step of every host, not only the changed ones",
    "timeout": "seconds each host may take (default: config deploy.timeout, else 600)",
}


@task(auto_shortflags=False, help=HELP)
@user_errors
def deploy(c, check=False, rotate_migration_key=False, hosts=None, group=None, limit=None, inventory=None,
           workers=None, timeout=None, json=False, verbose=False):
    """Make the selected hosts hypervisors of the cloud: packages, libvirtd, pool, networks, keys, banner."""
    timeout = float(timeout or (c.config.get("deploy") or {}).get("timeout") or 600)
    if isinstance(c, Connection):
        return _deploy_fab(c, check, rotate_migration_key, inventory, timeout, json, verbose)
    inv = load_inventory(c, inventory)
    selected = inv.select(hosts=hosts, groups=group, limit=limit)
    workers = int(workers or (c.config.get("fleet") or {}).get("workers") or 16)
    result, notes = deploy_lib.deploy(selected, inv, check=check, rotate_key=rotate_migration_key,
                                      workers=workers, timeout=timeout, progress=None if json else progress)
    _report(result, notes, check, json, verbose)


def _report(result: fleet.FleetResult, notes: list[str], check: bool, as_json: bool, verbose: bool) -> None:
    if as_json:
        data = result.to_dict()
        data["notes"], data["check"] = notes, check
        for host in data["hosts"]:
            host["changed"], host["unchanged"] = deploy_lib.counts(host["value"])
        emit_json(data)
    else:
        print(summary_table(result, notes, check, verbose))
    if result.exit_code:
        failed = ", ".join(r.host for r in result.failed)
        raise Exit(f"cloudops: deploy failed on {len(result.failed)} host(s): {failed}", code=result.exit_code)


def summary_table(result: fleet.FleetResult, notes: list[str], check: bool, verbose: bool) -> str:
    lines = [f"note: {note}" for note in notes]
    steps = [{"host": r.host, "step": s["name"], "status": ("would change" if check else "changed") if s["changed"]
              else "unchanged", "message": s["message"]}
             for r in result if r.value for s in r.value if verbose or s["changed"]]
    if steps:
        lines += [output.table(steps, ["host", "step", "status", "message"], max_width=90), ""]
    rows = []
    for r in result:
        changed, unchanged = deploy_lib.counts(r.value)
        rows.append({"host": r.host, "status": r.status, "changed": changed, "unchanged": unchanged,
                     "seconds": r.seconds, "result": r.error if r.status == fleet.FAILED else deploy_lib.describe(r.value)})
    lines.append(output.table(rows, ["host", "status", "changed", "unchanged", "seconds", "result"], max_width=100))
    hosts_changed = sum(1 for r in result if r.status == fleet.CHANGED)
    total = sum(deploy_lib.counts(r.value)[0] for r in result)
    lines.append(f"{len(result.results)} hosts: {hosts_changed} changed, "
                 f"{sum(1 for r in result if r.status == fleet.OK)} unchanged, {len(result.failed)} failed; "
                 f"{total} step(s) {'would change' if check else 'changed'}")
    return "\n".join(lines)


# ---------------------------------------------------------------- fab -H: one clone per host

class _FabRun:
    """What the clones of one `fab -H ... deploy` share: the plan, the cloud's keys, the results so far."""

    def __init__(self, hosts, cli_names, cloud, planned):
        self.hosts, self.cli_names, self.cloud, self.planned = hosts, cli_names, cloud, planned
        self.results: list[fleet.HostResult] = []


_fab_run: _FabRun | None = None


def _cli_hosts(c: Connection) -> list[str]:
    """The host list given to `fab -H` (every clone sees only its own Connection)."""
    try:
        from fabric.main import program

        value = program.core[0].args.hosts.value
    except (ImportError, AttributeError, IndexError, TypeError):
        value = None
    return [h.strip() for h in (value or "").split(",") if h.strip()] or [c.original_host]


def _match(inv, given: str):
    """The inventory host a `fab -H` entry names: by name, else by address ([user@]host[:port] accepted)."""
    name = _bare(given)
    if name in inv.hosts:
        return inv.hosts[name]
    for host in inv.hosts.values():
        if host.address == name:
            return host
    raise CloudopsError(f"unknown host {given!r}: not in inventory {inv.path} by name or address")


def _bare(given: str) -> str:
    """``user@host:port`` -> ``host`` (what Fabric keeps as Connection.original_host)."""
    name = given.rsplit("@", 1)[-1]
    return name.split(":")[0] if name.count(":") == 1 else name


def _resolve(c: Connection, host) -> None:
    """A bare inventory name that no ssh_config resolved connects to the inventory's address, user and key."""
    if c.host == host.name != host.address and not c.is_connected:
        c.host = host.address
        if "port" not in c.ssh_config:
            c.port = host.port
        if "user" not in c.ssh_config:
            c.user = host.user
        if host.key and "identityfile" not in c.ssh_config:
            c.connect_kwargs.setdefault("key_filename", host.key)


def _deploy_fab(c: Connection, check, rotate, inventory, timeout, as_json, verbose):
    global _fab_run
    if _fab_run is None:  # the first clone: validate every -H host and prepare the cloud before any change
        inv = load_inventory(c, inventory)
        names = _cli_hosts(c)
        hosts = [_match(inv, name) for name in names]
        peers = inv.hypervisors()
        planned = deploy_lib.plan(hosts, peers, Path(inv.path).parent)
        cloud = deploy_lib.prepare(peers, planned[hosts[0].name].cloud, check, rotate)
        _fab_run = _FabRun(hosts, names, cloud, planned)
    run = _fab_run
    host = next((h for n, h in zip(run.cli_names, run.hosts) if _bare(n) == c.original_host), None) \
        or _match(load_inventory(c, inventory), c.original_host)
    _resolve(c, host)
    ssh.verify_host_keys(c, ssh.known_hosts_files(host))
    live = {}
    result = fleet.run([host], lambda h: deploy_lib.deploy_host(h, run.planned[h.name], run.cloud, check, conn=c,
                                                                progress=None if as_json else progress,
                                                                timeout=timeout, live=live),
                       workers=1, timeout=timeout, grace=fleet.GRACE,
                       on_timeout=lambda name: live[name].stop() if name in live else None)
    run.results.append(result.results[0])
    if len(run.results) < len(run.hosts):
        r = result.results[0]
        if not as_json:
            print(f"{r.host}: {r.status}" + (f": {r.error}" if r.error else ""), flush=True)
        return
    _fab_run = None
    _report(fleet.FleetResult(run.results), run.cloud.notes, check, as_json, verbose)
