"""The local lab: namespaced hypervisor hosts on this machine, and an etcd cluster for the shared state."""

from invoke import task

from cloudops import output
from cloudops.errors import CloudopsError
from cloudops.lab import etcd as lab_etcd
from cloudops.lab import hosts as lab
from cloudops.tasks._cli import emit_json, progress, user_errors


@task(help={"hosts": "how many hosts (1-32; 0 with --etcd: the etcd cluster alone)",
            "bare": "sshd only, no libvirtd (cheap, for fan-out)",
            "prefix": "lab name prefix (namespaces <prefix>-hvN)",
            "etcd": "also start an etcd cluster of N members (3 tolerates one failure) on loopback, with TLS, "
                    "and write its state: configuration; hosts already up are kept",
            "link_rate": "shape every host's link to this rate, both ways (tc units: 100mbit, 1gbit; default: "
                         "unshaped veth pairs)",
            "link_delay": "with --link-rate: also delay each way of each link (0.25ms; needs the kernel's netem)",
            "json": "print JSON"})
@user_errors
def up(c, hosts=2, bare=False, prefix=None, etcd=0, json=False, link_rate=None, link_delay=None):
    """Bring up a lab of N hypervisor hosts in network namespaces (and, with --etcd N, an etcd cluster)."""
    prefix = prefix or c.lab.prefix
    if int(etcd):
        if link_rate or link_delay:
            raise CloudopsError("--link-rate and --link-delay shape a lab's hosts: bring them up without --etcd")
        _up_with_etcd(prefix, int(hosts), bare, int(etcd), json)
        return
    the_lab = lab.up(int(hosts), bare=bare, prefix=prefix, progress=progress, link_rate=link_rate,
                     link_delay=link_delay)
    if json:
        emit_json(lab.status(the_lab.prefix))
        return
    _print_hosts(the_lab)


def _up_with_etcd(prefix: str, hosts: int, bare: bool, members: int, json: bool) -> None:
    """Hosts (unless 0, or already up: then they are kept), then the etcd cluster (kept too when it runs)."""
    the_lab = None
    if hosts:
        current = lab.status(prefix)
        if current["up"]:
            the_lab = lab.load(prefix)
            if not json:
                print(f"lab {prefix}: {len(current['hosts'])} hosts already up")
        elif lab_etcd.status(prefix)["members"]:
            raise CloudopsError(f"lab {prefix!r} runs etcd without hosts; `invoke lab.down` first "
                                f"(or `lab.up --hosts 0 --etcd {members}` to keep only etcd)")
        else:
            the_lab = lab.up(hosts, bare=bare, prefix=prefix, progress=progress)
            if not json:
                _print_hosts(the_lab)
    result = lab_etcd.up(prefix, members, progress=progress)
    if json:
        emit_json({**lab.status(prefix), "etcd": result})
        return
    if result["already_up"]:
        print(f"lab {prefix}: etcd already up with {len(result['members'])} members")
    for member in result["members"]:
        print(f"{member['name']}  {member['endpoint']}")
    print(f"state: {result['config']}\n  use it: `invoke -f {result['config']} TASK` "
          "(or copy its state: block into invoke.yaml or cloudops.yaml)")


def _print_hosts(the_lab) -> None:
    from cloudops.lab import links

    for host in the_lab.hosts:
        print(f"{host.name}  {host.address}  {'bare (sshd)' if host.bare else 'sshd + libvirtd'}")
    print(f"links: {links.describe(the_lab.link)}")
    print(f"inventory: {the_lab.inventory_path}\nssh_config: {the_lab.ssh_config_path} (also at the top of ~/.ssh/config)")


@task(help={"prefix": "lab name prefix", "json": "print JSON"})
@user_errors
def down(c, prefix=None, json=False):
    """Take the lab down: processes, namespaces, bridge, veths, etcd members, files."""
    summary = lab.down(prefix or c.lab.prefix, progress=progress)
    if json:
        emit_json(summary)


@task(help={"prefix": "lab name prefix", "json": "print JSON"})
@user_errors
def status(c, prefix=None, json=False):
    """Show each lab host (and etcd member) and whether its namespace and daemons are alive."""
    prefix = prefix or c.lab.prefix
    state = lab.status(prefix)
    etcd = lab_etcd.status(prefix)
    if json:
        emit_json({**state, "etcd": etcd} if etcd["members"] else state)
        return
    if not state["hosts"]:
        print(f"lab {state['prefix']}: {'no hosts' if etcd['members'] else 'down'}" + (f" (stale namespaces: {', '.join(state['stale_namespaces'])})"
                                                 if state["stale_namespaces"] else ""))
    else:
        columns = ["name", "address", "ok", "namespace", "sshd"] + ([] if state["hosts"][0]["bare"] else ["libvirtd"])
        print(output.table(state["hosts"], columns))
        link = state["link"]
        qdiscs = link.get("qdiscs") or {}
        ends = "; ".join(f"{h}: {q['to_host']} in, {q['from_host']} out" for h, q in qdiscs.items())
        uplink = f"; control uplink: {link['control_uplink']}" if link.get("control_uplink") else ""
        print(f"links: {link['shaping']}" + (f" ({ends}{uplink})" if ends else ""))
    if etcd["members"]:
        print(output.table(etcd["members"], ["name", "endpoint", "alive", "pid"]))
        print(f"state: {etcd['config']}")


@task(name="power-off", help={"host": "lab host name (hv1, ...)", "prefix": "lab name prefix"})
@user_errors
def power_off(c, host, prefix=None):
    """Cut a lab host's power: every process of it killed at once (its files stay); the lab's fence_command."""
    from cloudops.lab import power

    killed = power.power_off(prefix or c.lab.prefix, host)
    print(f"{host}: powered off ({len(killed)} processes killed)" if killed else f"{host}: already off, nothing to do")


@task(name="power-on", help={"host": "lab host name (hv1, ...)", "prefix": "lab name prefix"})
@user_errors
def power_on(c, host, prefix=None):
    """Bring a powered-off lab host back: virtlogd, libvirtd and sshd started again on its own files."""
    from cloudops.lab import power

    prefix = prefix or c.lab.prefix
    was_off = power.is_off(prefix, host)
    power.power_on(prefix, host)
    print(f"{host}: powered on" if was_off else f"{host}: already on, nothing to do")
