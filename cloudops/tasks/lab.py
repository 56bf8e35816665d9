"""The local lab: namespaced hypervisor hosts on this machine."""

from invoke import task

from cloudops import output
from cloudops.lab import hosts as lab
from cloudops.tasks._cli import emit_json, progress, user_errors


@task(help={"hosts": "how many hosts (1-32)", "bare": "sshd only, no libvirtd (cheap, for fan-out)",
            "prefix": "lab name prefix (namespaces <prefix>-hvN)", "json": "print JSON"})
@user_errors
def up(c, hosts=2, bare=False, prefix=None, json=False):
    """Bring up a lab of N hypervisor hosts in network namespaces."""
    the_lab = lab.up(int(hosts), bare=bare, prefix=prefix or c.lab.prefix, progress=progress)
    if json:
        emit_json(lab.status(the_lab.prefix))
        return
    for host in the_lab.hosts:
        print(f"{host.name}  {host.address}  {'bare (sshd)' if host.bare else 'sshd + libvirtd'}")
    print(f"inventory: {the_lab.inventory_path}\nssh_config: {the_lab.ssh_config_path} (also at the top of ~/.ssh/config)")


@task(help={"prefix": "lab name prefix", "json": "print JSON"})
@user_errors
def down(c, prefix=None, json=False):
    """Take the lab down: processes, namespaces, bridge, veths, files."""
    summary = lab.down(prefix or c.lab.prefix, progress=progress)
    if json:
        emit_json(summary)


@task(help={"prefix": "lab name prefix", "json": "print JSON"})
@user_errors
def status(c, prefix=None, json=False):
    """Show each lab host and whether its namespace and daemons are alive."""
    state = lab.status(prefix or c.lab.prefix)
    if json:
        emit_json(state)
        return
    if not state["hosts"]:
        print(f"lab {state['prefix']}: down" + (f" (stale namespaces: {', '.join(state['stale_namespaces'])})"
                                                 if state["stale_namespaces"] else ""))
        return
    columns = ["name", "address", "ok", "namespace", "sshd"] + ([] if state["hosts"][0]["bare"] else ["libvirtd"])
    print(output.table(state["hosts"], columns))
