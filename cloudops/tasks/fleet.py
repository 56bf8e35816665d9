"""Fan-out across the inventory: one command on many hosts at once."""

from invoke import task

from cloudops import fleet
from cloudops.tasks._cli import SELECT_HELP, finish, select_hosts, user_errors


@task(help={"command": "shell command to run on every selected host", **SELECT_HELP})
@user_errors
def run(c, command, hosts=None, group=None, limit=None, inventory=None, workers=None, timeout=None, json=False):
    """Run a shell command on every selected host in parallel (a table, or --json)."""
    run_and_report(c, command, hosts, group, limit, inventory, workers, timeout, json)


def run_and_report(c, command, hosts, group, limit, inventory, workers, timeout, json):
    """The body of `fleet.run` and `host.exec`: fan out, print a table or JSON, exit 1 on any failure."""
    selected = select_hosts(c, hosts, group, limit, inventory)
    result = fleet.run_command(selected, command, workers=int(workers or c.fleet.workers),
                               timeout=float(timeout or c.fleet.timeout))
    if json:
        for r in result:
            if r.value is not None:
                r.value = vars(r.value)
    finish(result, json)
