"""Fan-out across the inventory: one command on many hosts at once."""

from invoke import task

from cloudops import fleet
from tasks._cli import SELECT_HELP, finish, select_hosts, user_errors


@task(help={"command": "shell command to run on every selected host", **SELECT_HELP})
@user_errors
def run(c, command, hosts=None, group=None, limit=None, inventory=None, workers=None, timeout=None, json=False):
    """Run a shell command on every selected host in parallel (a table, or --json)."""
    selected = select_hosts(c, hosts, group, limit, inventory)
    result = fleet.run_command(selected, command, workers=int(workers or c.fleet.workers),
                               timeout=float(timeout or c.fleet.timeout))
    if json:
        for r in result:
            if r.value is not None:
                r.value = vars(r.value)
    finish(result, json)
