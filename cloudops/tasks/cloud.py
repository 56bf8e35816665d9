"""Declarative stacks of networks and VMs (and, later, cloud-wide operations)."""

from invoke import task

from cloudops.compute import stack
from cloudops.tasks._cli import SELECT_HELP, emit_json, load_inventory, progress, user_errors


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

    from cloudops.errors import CloudopsError
    from cloudops.migration import migrate
    from cloudops.migration import rebalance as balancing

    if dry_run and apply:
        raise CloudopsError("choose --dry-run or --apply, not both")
    policy = migrate.policy_from(c.config.get("migrate") or {}, timeout=timeout)
    report = balancing.rebalance(load_inventory(c, inventory), apply=apply,
                                 max_moves=int(max_moves) if max_moves is not None else None, margin=float(margin),
                                 cpu_interval=float(cpu_interval), policy=policy, message=progress)
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

    from cloudops.errors import CloudopsError
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
