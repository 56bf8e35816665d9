"""Cloud-wide tasks: declarative stacks (up, down), rebalance, the HA watch, and the HTML report."""

from invoke import task

from cloudops.compute import stack
from cloudops.errors import CloudopsError
from cloudops.tasks._cli import (
    SELECT_HELP,
    emit_json,
    load_inventory,
    progress,
    user_errors,
)


def _print(report, as_json):
    if as_json:
        emit_json(report.to_dict())
        return
    for line in report.changes:
        print(f"changed: {line}")
    print(f"{len(report.changes)} changed, {len(report.unchanged)} unchanged"
          + ("" if report.changed else ": no changes, everything is as described"))


@task(help={"file": "stack YAML (networks and vms)", "inventory": SELECT_HELP["inventory"], "json": SELECT_HELP["json"],
            "dry_run": "print what would be made (each new VM's host with the scheduler's reasons, address, disk); "
                       "make nothing"})
@user_errors
def up(c, file, inventory=None, json=False, dry_run=False):
    """Bring the stack's networks and VMs to the described state; a second run changes nothing."""
    from cloudops.compute import sizing

    inv = load_inventory(c, inventory)
    flavors = sizing.flavors_from(c.vm.get("flavors"), sizing.inventory_flavors(inv))
    if dry_run:
        _print_plan(*stack.plan(stack.load(file, flavors=flavors), inv), json)
        return
    _print(stack.up(stack.load(file, flavors=flavors), inv, progress=progress), json)


def _print_plan(report, plans, as_json):
    if as_json:
        emit_json({**report.to_dict(), "dry_run": True, "vms": [p.to_dict() for p in plans]})
        return
    for line in report.changes:
        print(f"would change: {line}")
    for planned in plans:
        print(f"{planned.name}:")
        print("\n".join(f"  {line}" for line in planned.lines()[1:]))
    print(f"dry run: {len(report.changes)} would change, {len(report.unchanged)} unchanged; nothing was made")


@task(help={"file": "stack YAML (networks and vms)", "inventory": SELECT_HELP["inventory"], "json": SELECT_HELP["json"],
            "force": "also undefine domains of the stack's names that cloudops did not make (their disks stay)"})
@user_errors
def down(c, file, inventory=None, json=False, force=False):
    """Delete the stack's VMs (only those cloudops made, unless --force), then its networks."""
    _print(stack.down(stack.load(file), load_inventory(c, inventory), progress=progress, force=force), json)


@task(help={"dry_run": "print the plan with the imbalance before and after (the default)",
            "apply": "carry the plan out, one migration at a time, measuring again between moves",
            "max_moves": "at most this many migrations", "margin": "a move must improve the objective by this much",
            "cpu_interval": "seconds over which VM CPU load is measured (0: memory only)",
            "timeout": "seconds each migration may take before it is aborted",
            "inventory": SELECT_HELP["inventory"], "json": SELECT_HELP["json"]})
@user_errors
def rebalance(c, dry_run=False, apply=False, max_moves=None, margin=0.0, cpu_interval=1.0, timeout=None,
              inventory=None, json=False):
    """Migrations that even out memory and CPU load across hosts: --dry-run plans, --apply moves."""
    from invoke import Exit

    from cloudops.migration import migrate
    from cloudops.migration import rebalance as balancing
    from cloudops.report import imbalance

    if dry_run and apply:
        raise CloudopsError("choose --dry-run or --apply, not both")
    policy = migrate.policy_from(c.config.get("migrate") or {}, timeout=timeout)
    report = balancing.rebalance(load_inventory(c, inventory), apply=apply,
                                 max_moves=int(max_moves) if max_moves is not None else None, margin=float(margin),
                                 cpu_interval=float(cpu_interval), policy=policy, message=progress)
    imbalance.record(report.after if report.applied else report.before, source="rebalance")  # as measured
    if json:
        emit_json(report.to_dict())
    else:
        print("\n".join(report.lines()))
    if report.failed:
        raise Exit(code=1)


@task(help={"grace": "seconds a host may be missing before it is declared dead and failed over (default 30)",
            "interval": "run a cycle every this many seconds until interrupted (default: one cycle, for cron)",
            "timeout": "seconds each probe (SSH, libvirt) of a host may take (default 5)",
            "fence_timeout": "seconds a fence_command may take before fencing counts as failed (default 60)",
            "inventory": SELECT_HELP["inventory"], "json": SELECT_HELP["json"]})
@user_errors
def watch(c, grace=30, interval=None, timeout=None, fence_timeout=None, inventory=None, json=False):
    """Probe every hypervisor; fence a host missing for --grace seconds and restart its shared-storage VMs elsewhere.

    Exit 1 when a dead host could not be failed over completely (no or failed fencing, a VM without a host)."""
    from invoke import Exit

    from cloudops.ha import figures, probe
    from cloudops.ha import watch as watching
    from cloudops.metrics.cycle import run_every

    grace = watching.check_grace(grace)
    probe_timeout = float(timeout) if timeout is not None else probe.DEFAULT_TIMEOUT
    if not probe_timeout > 0:
        raise CloudopsError(f"--timeout must be a positive number of seconds, got {timeout!r}")
    inv = load_inventory(c, inventory)
    attention = []

    def one():
        report = watching.cycle(inv, grace, probe_timeout=probe_timeout,
                                fence_timeout=float(fence_timeout) if fence_timeout is not None else 60.0,
                                ship=lambda r: figures.ship(r, c.metrics.carbon, c.metrics.prefix),
                                message=progress)
        if json:
            emit_json(report.to_dict())
        else:
            print("\n".join(report.lines()), flush=True)
        attention[:] = report.attention

    if interval is None:
        one()
    else:
        try:
            run_every(float(interval), one)
        except KeyboardInterrupt:
            raise Exit("cloudops: cloud.watch interrupted", code=130) from None
    if attention:
        raise Exit(f"cloudops: not failed over completely: {', '.join(attention)}", code=1)


@task(help={"output": "the HTML file to write (default: <state dir>/report/cloud.html)",
            "graphs": "embed graphs from graphite-web's render API (default; --no-graphs: none)",
            "graphite_port": "graphite-web's port on 127.0.0.1 (default: config graphite.web_port)",
            "prefix": "the metrics prefix of the series graphed (default: config metrics.prefix)",
            "since": "how far back the graphs go, in the render API's terms (default -6h)",
            "cpu_interval": "seconds over which VM CPU load is measured for the imbalance (0: memory only)",
            **{k: SELECT_HELP[k] for k in ("hosts", "group", "limit", "inventory", "json")}})
@user_errors
def report(c, output=None, graphs=True, graphite_port=None, prefix=None, since="-6h", cpu_interval=1.0,
           hosts=None, group=None, limit=None, inventory=None, json=False):
    """Write one self-contained HTML page of the cloud: hosts, VMs, imbalance over time, migrations, graphs."""
    import sys
    import time
    from pathlib import Path

    from cloudops import paths
    from cloudops.inventory import hypervisors
    from cloudops.metrics import graphite_web
    from cloudops.report import facts as cloud_facts
    from cloudops.report import graphs as cloud_graphs
    from cloudops.report import imbalance, page
    from cloudops.tasks._cli import select_hosts

    if output is None:
        output = paths.var_dir() / "report" / "cloud.html"
        output.parent.mkdir(parents=True, exist_ok=True)
    output = Path(output)
    if not output.parent.is_dir():  # before any host is asked
        raise CloudopsError(f"cannot write the report to {output}: directory {output.parent} does not exist")
    selected = hypervisors(select_hosts(c, hosts, group, limit, inventory))
    if not selected:
        raise CloudopsError("no hypervisor host selected")
    port = int(graphite_port or c.graphite.get("web_port") or graphite_web.DEFAULT_PORT)
    prefix = prefix or c.metrics.prefix
    progress(f"reading {len(selected)} hosts")
    found = cloud_facts.gather(selected, taken_at=time.time(), cpu_interval=float(cpu_interval))
    if found.imbalance is not None and found.complete:
        imbalance.record(found.imbalance, found.taken_at, source="report")
    warning = ""
    if graphs:
        progress(f"asking graphite-web at {graphite_web.url(port)} for graphs")
        drawn, warning = cloud_graphs.fetch(port, prefix, since)
    else:
        drawn = cloud_graphs.unavailable(prefix, "not asked for (--no-graphs)")
    html = page.render_page(found, drawn, imbalance.series(), graphite_web.url(port) if graphs else "")
    page.write(output, html)
    if warning:
        print(f"cloudops: warning: {warning}; the report was written without them", file=sys.stderr)
    summary = {"output": str(output), "hosts": len(found.hosts), "vms": sum(len(h.vms) for h in found.hosts),
               "complete": found.complete, "graphs": sum(1 for g in drawn if g.data_uri),
               "graphs_unavailable": sum(1 for g in drawn if not g.data_uri), "warning": warning,
               "imbalance": found.imbalance, "migrations": len(found.migrations), "failovers": len(found.failovers)}
    if json:
        emit_json({**summary, "facts": found.to_dict()})
    else:
        print(f"wrote {output}: {summary['hosts']} hosts, {summary['vms']} VMs, {summary['graphs']} graphs"
              + ("" if found.complete else "; some hosts did not answer"))
