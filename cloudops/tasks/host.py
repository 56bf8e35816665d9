"""Hypervisor hosts: facts and day-2 operations."""

from invoke import task

from cloudops import facts, fleet
from cloudops.tasks._cli import SELECT_HELP, finish, select_hosts, user_errors


@task(name="facts", help=SELECT_HELP)
@user_errors
def facts_(c, hosts=None, group=None, limit=None, inventory=None, workers=None, timeout=None, json=False):
    """Hostname, libvirt and QEMU versions, CPUs, memory, domains, KVM: every selected host."""
    selected = select_hosts(c, hosts, group, limit, inventory)
    timeout = float(timeout or c.fleet.timeout)
    result = fleet.run(selected, lambda h: facts.host_facts(h, timeout=min(timeout, 20)),
                       workers=int(workers or c.fleet.workers), timeout=timeout)
    finish(result, json, facts.summary)



@task(help={"host": "inventory host name", "state": "on (no new VMs go there) or off",
            "inventory": SELECT_HELP["inventory"], "json": SELECT_HELP["json"]})
@user_errors
def maintenance(c, host, state, inventory=None, json=False):
    """Put a host in maintenance (placement gives it no new VMs) or take it out: host.maintenance HV on|off."""
    from cloudops.errors import CloudopsError
    from cloudops.hosts import maintenance as maintenance_lib
    from cloudops.tasks._cli import emit_json, load_inventory

    if state not in ("on", "off"):
        raise CloudopsError(f"maintenance state must be 'on' or 'off', got {state!r}")
    if not host or any(ch in host for ch in ",*?["):
        raise CloudopsError(f"host.maintenance takes one host name, got {host!r}")
    name = load_inventory(c, inventory).select(hosts=host)[0].name  # an unknown host is an error here
    changed = maintenance_lib.set_maintenance(name, state == "on")
    if json:
        emit_json({"host": name, "maintenance": state == "on", "changed": changed,
                   "in_maintenance": sorted(maintenance_lib.hosts_in_maintenance())})
        return
    what = "in maintenance: no new VMs are placed there" if state == "on" else "out of maintenance"
    print(f"{name}: {what}" + ("" if changed else " (already, nothing to do)"))


@task(name="exec", help={"command": "shell command to run on every selected host", **SELECT_HELP})
@user_errors
def exec_(c, command, hosts=None, group=None, limit=None, inventory=None, workers=None, timeout=None, json=False):
    """Run a shell command on the selected hosts in parallel; exit 1 when it failed anywhere."""
    from cloudops.tasks.fleet import run_and_report

    run_and_report(c, command, hosts, group, limit, inventory, workers, timeout, json)


@task(help={"host": "the host to drain", "parallel": "migrations at once from the host (default 1)",
            "dry_run": "print the plan, change nothing (maintenance stays as it is)",
            "timeout": "seconds each migration may take before it is aborted",
            "inventory": SELECT_HELP["inventory"], "json": SELECT_HELP["json"]})
@user_errors
def evacuate(c, host, parallel=1, dry_run=False, timeout=None, inventory=None, json=False):
    """Maintenance on, then live-migrate every VM of the host to hosts the scheduler chooses."""
    from invoke import Exit

    from cloudops.migration import evacuate as evacuation
    from cloudops.migration import migrate
    from cloudops.tasks._cli import emit_json, load_inventory, progress

    policy = migrate.policy_from(c.config.get("migrate") or {}, timeout=timeout)
    report = evacuation.evacuate(host, load_inventory(c, inventory), parallel=int(parallel), dry_run=dry_run,
                                 policy=policy, message=progress)
    if json:
        emit_json(report.to_dict())
    else:
        print("\n".join(report.lines()))
    if report.interrupted:
        raise Exit(f"cloudops: evacuation of {host} interrupted; VMs not moved stay where they were", code=130)
    if report.failed:
        raise Exit(f"cloudops: {len(report.failed)} VM(s) could not leave {host}", code=1)


@task(help={"host": "the dead host", "force": "fail over even though the host answers (it is fenced first)",
            "dry_run": "print which VMs would restart where, fence and change nothing",
            "grace": "not used by host.failover (it acts at once); refused when not positive, as cloud.watch's",
            "fence_timeout": "seconds the fence_command may take (default 60)",
            "inventory": SELECT_HELP["inventory"], "json": SELECT_HELP["json"]})
@user_errors
def failover(c, host, force=False, dry_run=False, grace=None, fence_timeout=None, inventory=None, json=False):
    """Fence a host known to be dead and restart its shared-storage VMs elsewhere, now: host.failover HV."""
    from invoke import Exit

    from cloudops.errors import CloudopsError
    from cloudops.ha import figures
    from cloudops.ha import watch as watching
    from cloudops.inventory import is_hypervisor
    from cloudops.tasks._cli import emit_json, load_inventory, progress

    if grace is not None:
        watching.check_grace(grace)
    if not host or any(ch in host for ch in ",*?["):
        raise CloudopsError(f"host.failover takes one host name, got {host!r}")
    inv = load_inventory(c, inventory)
    target = inv.select(hosts=host)[0]  # an unknown host is one line here
    if not is_hypervisor(target):
        raise CloudopsError(f"host {target.name} is a bare host: it runs no VMs")
    found, report = watching.failover_now(target, inv, force=force, dry_run=dry_run,
                                          fence_timeout=float(fence_timeout) if fence_timeout is not None else 60.0,
                                          ship=lambda r: figures.ship(r, c.metrics.carbon, c.metrics.prefix),
                                          message=progress)
    if json:
        emit_json({**report.to_dict(), "probe": found.to_dict()})
    else:
        print("\n".join(report.lines()))
    if not dry_run and not report.complete:
        raise Exit(f"cloudops: {target.name} not failed over completely" +
                   (f": {report.reason}" if report.reason else ""), code=1)
