"""Declarative stacks of networks and VMs (and, later, cloud-wide operations)."""

from invoke import task

from cloudops import stack
from tasks._cli import SELECT_HELP, emit_json, load_inventory, progress, user_errors


def _print(report, as_json):
    if as_json:
        emit_json(report.to_dict())
        return
    for line in report.changes:
        print(f"changed: {line}")
    print(f"{len(report.changes)} changed, {len(report.unchanged)} unchanged"
          + ("" if report.changed else ": no changes, everything is as described"))


@task(help={"file": "stack YAML (networks and vms)", "inventory": SELECT_HELP["inventory"], "json": SELECT_HELP["json"]})
@user_errors
def up(c, file, inventory=None, json=False):
    """Bring the stack's networks and VMs to the described state; a second run changes nothing."""
    _print(stack.up(stack.load(file), load_inventory(c, inventory), progress=progress), json)


@task(help={"file": "stack YAML (networks and vms)", "inventory": SELECT_HELP["inventory"], "json": SELECT_HELP["json"]})
@user_errors
def down(c, file, inventory=None, json=False):
    """Delete the stack's VMs, then its networks."""
    _print(stack.down(stack.load(file), load_inventory(c, inventory), progress=progress), json)
