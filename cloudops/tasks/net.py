"""libvirt networks on the selected hypervisor hosts: define, start, list, delete."""

from invoke import Exit, task

from cloudops import fleet, output, virt
from cloudops.net import networks
from cloudops.tasks._cli import SELECT_HELP, emit_json, finish, select_hosts, user_errors

CHECK_HELP = "only say what would change; change nothing"


def _fleet_args(c, workers, timeout) -> dict:
    return {"workers": int(workers or c.fleet.workers), "timeout": float(timeout or c.fleet.timeout)}


def _on_hosts(c, selected, operation, workers, timeout, as_json):
    """Run ``operation(conn, host) -> (changed, message)`` on every host; report changed/unchanged per host."""

    def one(host):
        with virt.open_host(host) as conn:
            changed, message = operation(conn, host)
        return fleet.Changed(message) if changed else message

    finish(fleet.run(selected, one, **_fleet_args(c, workers, timeout)), as_json)


def _specs_per_host(selected, cli_spec) -> dict:
    """Every host's specs, all built (and checked) before any host is touched."""
    if cli_spec is not None:
        return {host.name: [cli_spec] for host in selected}
    return {host.name: networks.specs_from(host.vars) for host in selected}


@task(auto_shortflags=False, help={**SELECT_HELP, "name": "network name (without it: the inventory's `networks:`, else the default network)",
            "mode": "nat (default), isolated or bridge", "cidr": "IPv4 subnet, e.g. 192.168.150.0/24",
            "gateway": "gateway address (default: the first host address)",
            "dhcp_start": "first DHCP address (default: upper half of the subnet)", "dhcp_end": "last DHCP address",
            "bridge": "bridge device: for bridge mode the host's existing bridge; else default co-<name>",
            "no_autostart": "do not start the network with libvirtd",
            "from_inventory": "take the networks from the inventory variable `networks` (default without --name)",
            "check": CHECK_HELP})
@user_errors
def define(c, name=None, mode=None, cidr=None, gateway=None, dhcp_start=None, dhcp_end=None, bridge=None,
           no_autostart=False, from_inventory=False, check=False,
           hosts=None, group=None, limit=None, inventory=None, workers=None, timeout=None, json=False):
    """Define and start networks (idempotent), from options or the inventory's `networks:`."""
    if name and from_inventory:
        raise Exit("cloudops: give either --name or --from-inventory, not both")
    if not name and any((mode, cidr, gateway, dhcp_start, dhcp_end, bridge)):
        raise Exit("cloudops: --mode/--cidr/--dhcp-*/--bridge need --name")
    cli_spec = None
    if name:
        cli_spec = networks.NetworkSpec(name=name, mode=mode or "nat", cidr=cidr, gateway=gateway,
                                        dhcp_start=dhcp_start, dhcp_end=dhcp_end, bridge=bridge,
                                        autostart=not no_autostart)
    selected = select_hosts(c, hosts, group, limit, inventory)
    specs = _specs_per_host(selected, cli_spec)

    def operation(conn, host):
        results = [networks.ensure_network(conn, spec, check=check) for spec in specs[host.name]]
        if not results:
            return False, "no networks configured"
        return any(changed for changed, _ in results), "; ".join(message for _, message in results)

    _on_hosts(c, selected, operation, workers, timeout, json)


@task(help={**SELECT_HELP, "name": "network name (default: the inventory's networks)", "check": CHECK_HELP})
@user_errors
def start(c, name=None, check=False, hosts=None, group=None, limit=None, inventory=None, workers=None, timeout=None,
          json=False):
    """Start defined networks that are not running."""
    selected = select_hosts(c, hosts, group, limit, inventory)
    names = {host.name: [name] if name else [spec.name for spec in networks.specs_from(host.vars)] for host in selected}

    def operation(conn, host):
        results = [networks.start_network(conn, net, check=check) for net in names[host.name]]
        return any(changed for changed, _ in results), "; ".join(message for _, message in results)

    _on_hosts(c, selected, operation, workers, timeout, json)


@task(name="list", help=SELECT_HELP)
@user_errors
def list_(c, hosts=None, group=None, limit=None, inventory=None, workers=None, timeout=None, json=False):
    """Every libvirt network of the selected hosts: state, mode, bridge, subnet, reservations."""
    selected = select_hosts(c, hosts, group, limit, inventory)

    def one(host):
        with virt.open_host(host) as conn:
            return networks.list_networks(conn)

    result = fleet.run(selected, one, **_fleet_args(c, workers, timeout))
    if json:
        emit_json(result.to_dict())
    else:
        rows = []
        for r in result:
            if r.status == fleet.FAILED:
                rows.append({"host": r.host, "name": f"FAILED: {r.error}"})
            rows += [{"host": r.host, **net} for net in r.value or []]
        columns = ["host", "name", "active", "autostart", "mode", "bridge", "cidr", "dhcp_range", "reservations"]
        print(output.table(rows, columns, {"reservations": "res"}, max_width=80))
        counts = result.counts()
        print(f"{len(result.results)} hosts: {counts['ok']} listed, {counts['failed']} failed")
    if result.exit_code:
        failed = ", ".join(r.host for r in result.failed)
        raise Exit(f"cloudops: failed on {len(result.failed)} host(s): {failed}", code=result.exit_code)


@task(help={**SELECT_HELP, "name": "network to delete", "check": CHECK_HELP,
            "force": "delete even while running VMs use it"})
@user_errors
def delete(c, name, check=False, force=False, hosts=None, group=None, limit=None, inventory=None, workers=None,
           timeout=None, json=False):
    """Stop and undefine a network (idempotent; refuses while running VMs use it unless --force)."""
    networks.check_name(name)  # before any host is touched
    selected = select_hosts(c, hosts, group, limit, inventory)
    _on_hosts(c, selected, lambda conn, host: networks.delete_network(conn, name, check=check, force=force),
              workers, timeout, json)


def _describe_probe(report: dict) -> str:
    servers = ", ".join(f"{s['server']} ({s['mac']}, offered {s['offered']})" for s in report["dhcp_servers"])
    unknown = ", ".join(f"{a['ip']} ({'/'.join(a['macs'])})" for a in report["unknown"])
    parts = [f"{report['network']} on {report['bridge']}: DHCP {servers or 'none'}"]
    if report["cidr"]:
        parts.append(f"{len(report['answering'])} answer ARP, unknown: {unknown or 'none'}")
    return "; ".join(parts)


@task(help={**SELECT_HELP, "name": "network to probe (the inventory's, or one libvirt has defined)"})
@user_errors
def probe(c, name, hosts=None, group=None, limit=None, inventory=None, workers=None, timeout=None, json=False):
    """From each selected host, on NAME's bridge: DHCP servers (a discover), the addresses that answer ARP,
    and which of those cloudops does not know. Sends packets only: changes nothing (needs python3-scapy)."""
    from cloudops.compute import vms
    from cloudops.net import probe as probes
    from cloudops.ssh import connect

    networks.check_name(name)
    selected = select_hosts(c, hosts, group, limit, inventory)
    spec = vms.network_spec(name, selected[0], hosts=selected)  # an unknown network: one line, no host probed

    def one(host):
        with connect(host) as hv:
            return probes.probe_network(hv, host.name, spec).to_dict()

    finish(fleet.run(selected, one, **_fleet_args(c, workers, timeout)), json, _describe_probe)
