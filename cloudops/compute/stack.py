"""Declarative stacks: bring a YAML description of networks and VMs to the described state.

    networks:
      - {name: web, mode: nat, cidr: 192.168.160.0/24}
    vms:
      - {name: web1, image: tiny, memory: 128, network: web}
      - {name: web2, image: tiny, network: web, host: hv2, group: web, user_data: web.yaml}
      - {name: db1, image: tiny, network: web, ip: 192.168.160.10}

A VM's ``user_data`` is a file of user-data (see ``cloudops.compute.userdata``), relative to the
stack file's directory. A VM's ``ip`` is the address it asks IPAM for (as ``vm.start --ip``); no
two VMs of a stack may ask for one address, and the VMs that ask are made (and planned) first,
so a VM without ``ip`` is never handed an address a later one of the stack asks for.

``up`` makes what is missing (networks on every hypervisor, VMs where the
scheduler or ``host`` puts them) and starts what is stopped; a second ``up``
changes nothing and says so. ``down`` deletes the stack's VMs, then its networks.
"""

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cloudops import fleet, virt
from cloudops.compute import sizing, vms
from cloudops.errors import CloudopsError, NotFound
from cloudops.net import networks

VM_KEYS = {"name", "image", "memory", "vcpus", "host", "network", "ssh_keys", "hostname", "customize", "group",
           "disk_size", "flavor", "user_data", "ip", "firmware"}


@dataclass
class Stack:
    path: Path
    networks: list
    vms: list[vms.VMSpec]


@dataclass
class Report:
    changes: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def to_dict(self) -> dict:
        return {"changed": self.changed, "changes": self.changes, "unchanged": self.unchanged}


def load(path, flavors: dict | None = None) -> Stack:
    """The stack in ``path``; a VM's ``flavor`` is resolved in ``flavors`` (None: not checked, as for ``down``)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CloudopsError(f"stack file {path} does not exist") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise CloudopsError(f"stack {path}:{where}: not valid YAML") from None
    if not isinstance(data, dict) or not set(data) <= {"networks", "vms"}:
        raise CloudopsError(f"stack {path}: top level must be a mapping with 'networks' and/or 'vms'")
    specs = networks.specs_from(data.get("networks") or [])
    vm_specs, seen, asked = [], set(), {}
    for i, item in enumerate(data.get("vms") or []):
        where = f"stack {path}: vms[{i}]"
        if not isinstance(item, dict) or "name" not in item:
            raise CloudopsError(f"{where}: must be a mapping with at least 'name'")
        unknown = set(item) - VM_KEYS
        if unknown:
            raise CloudopsError(f"{where}: unknown key {sorted(unknown)[0]!r} (expected: {', '.join(sorted(VM_KEYS))})")
        if item["name"] in seen:
            raise CloudopsError(f"{where}: duplicate VM name {item['name']!r}")
        seen.add(item["name"])
        item = dict(item)
        flavor_name = item.pop("flavor", None)
        if flavor_name is not None and flavors is not None:
            try:
                chosen = sizing.flavor(str(flavor_name), flavors)
            except CloudopsError as exc:
                raise CloudopsError(f"{where}: {exc}") from None
            size = sizing.sized({k: item.get(k) for k in sizing.FLAVOR_KEYS}, chosen, {})
            item.update({k: v for k, v in size.items() if v is not None})
        if item.get("user_data") is not None:
            if not isinstance(item["user_data"], str):
                raise CloudopsError(f"{where}: user_data must be a file name")
            item["user_data"] = path.parent / item["user_data"]  # an absolute one stays as it is
        spec = vms.VMSpec(**{k: v for k, v in item.items() if k != "ssh_keys"},
                          ssh_keys=tuple(item.get("ssh_keys") or ()))
        try:
            vms.validate(spec)
        except CloudopsError as exc:
            raise CloudopsError(f"{where}: {exc}") from None
        if spec.ip is not None:
            key = (spec.networks[0], spec.ip)
            if key in asked:
                raise CloudopsError(f"{where}: {spec.name} asks for ip {spec.ip}, as {asked[key]} does")
            asked[key] = spec.name
        vm_specs.append(spec)
    vm_specs.sort(key=lambda s: s.ip is None)  # stable: those asking for an address first, else in file order
    return Stack(path, specs, vm_specs)


def up(stack: Stack, inventory, progress=lambda m: None) -> Report:
    report = Report()
    hypervisors = inventory.hypervisors()
    for spec in stack.networks:
        result = fleet.run(hypervisors, lambda h, s=spec: _ensure_network(h, s))
        _collect(result, report, f"network {spec.name}")
    for spec in stack.vms:
        try:
            host = vms.locate(spec.name, hypervisors)
        except NotFound:
            progress(f"starting {spec.name}")
            vm = vms.start_vm(spec, inventory, progress=progress, extra_networks=stack.networks)
            report.changes.append(f"vm {spec.name}: started on {vm.host} at {vm.ip}")
            continue
        with virt.open_host(host) as conn:
            dom = conn.lookupByName(spec.name)
            if dom.isActive():
                report.unchanged.append(f"vm {spec.name}: running on {host.name}")
            else:
                dom.create()
                report.changes.append(f"vm {spec.name}: was stopped on {host.name}, started")
    return report


def plan(stack: Stack, inventory) -> tuple[Report, list]:
    """What ``up`` would do, as a report of would-be changes and the start plan of every missing VM; makes nothing.

    The VMs are planned in a row, each as if the ones before it were made (their host's capacity
    claimed, their address taken), as ``up`` would make them."""
    from cloudops.compute import placement, scheduler
    from cloudops.compute import plan as planning

    report, plans = Report(), []
    hypervisors = inventory.hypervisors()
    for spec in stack.networks:
        result = fleet.run(hypervisors, lambda h, s=spec: _check_network(h, s))
        _collect(result, report, f"network {spec.name}")
    states, taken = None, []
    for spec in stack.vms:
        try:
            host = vms.locate(spec.name, hypervisors)
        except NotFound:
            if states is None:
                states = {s.name: s for s in placement.host_states(hypervisors)}
            planned = planning.plan_start(spec, inventory, extra_networks=stack.networks, states=states,
                                          also_taken=taken)
            states[planned.host] = scheduler.claim(states[planned.host], placement.request_for(spec))
            taken.append(planned.ip)
            plans.append(planned)
            report.changes.append(f"vm {spec.name}: would start on {planned.host} at {planned.ip} "
                                  f"({spec.memory} MiB, {spec.vcpus} vCPU, disk {sizing.format_size(planned.disk_size)})")
            continue
        with virt.open_host(host) as conn:
            if conn.lookupByName(spec.name).isActive():
                report.unchanged.append(f"vm {spec.name}: running on {host.name}")
            else:
                report.changes.append(f"vm {spec.name}: stopped on {host.name}, would start")
    return report, plans


def _check_network(host, spec):
    with virt.open_host(host) as conn:
        changed, message = networks.ensure_network(conn, spec, check=True)
    return fleet.Changed(message) if changed else message


def down(stack: Stack, inventory, progress=lambda m: None, force: bool = False) -> Report:
    """Delete the stack's VMs, then its networks. Every VM is checked first: when one of the
    stack's names is a domain cloudops did not make, nothing is deleted (``force``: see vms.delete_vm)."""
    report = Report()
    hypervisors = inventory.hypervisors()
    for spec in stack.vms:
        vms.check_deletable(spec.name, hypervisors, force=force)
    for spec in stack.vms:
        try:
            vm = vms.delete_vm(spec.name, inventory, hypervisors, progress=progress, extra_networks=stack.networks,
                               force=force)
            report.changes.append(f"vm {spec.name}: deleted from {vm.host}")
        except NotFound:
            report.unchanged.append(f"vm {spec.name}: not present")
    for spec in stack.networks:
        result = fleet.run(hypervisors, lambda h, s=spec: _delete_network(h, s))
        _collect(result, report, f"network {spec.name}")
    return report


def _ensure_network(host, spec):
    with virt.open_host(host) as conn:
        changed, message = networks.ensure_network(conn, spec)
    return fleet.Changed(message) if changed else message


def _delete_network(host, spec):
    with virt.open_host(host) as conn:
        changed, message = networks.delete_network(conn, spec.name)
    return fleet.Changed(message) if changed else message


def _collect(result: fleet.FleetResult, report: Report, what: str) -> None:
    if result.failed:
        reasons = "; ".join(f"{r.host}: {r.error}" for r in result.failed)
        raise CloudopsError(f"{what}: {reasons}")
    for r in result:
        (report.changes if r.status == fleet.CHANGED else report.unchanged).append(f"{what} on {r.host}: {r.value}")
