"""Hypervisor hosts: facts and day-2 operations."""

from invoke import task

from cloudops import facts, fleet
from tasks._cli import SELECT_HELP, finish, select_hosts, user_errors


@task(name="facts", help=SELECT_HELP)
@user_errors
def facts_(c, hosts=None, group=None, limit=None, inventory=None, workers=None, timeout=None, json=False):
    """Hostname, libvirt and QEMU versions, CPUs, memory, domains, KVM: every selected host."""
    selected = select_hosts(c, hosts, group, limit, inventory)
    timeout = float(timeout or c.fleet.timeout)
    result = fleet.run(selected, lambda h: facts.host_facts(h, timeout=min(timeout, 20)),
                       workers=int(workers or c.fleet.workers), timeout=timeout)
    finish(result, json, facts.summary)

