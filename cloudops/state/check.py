"""``state.check``: the state store against what the hypervisors really run (libvirt is the truth).

``gather`` asks every hypervisor of the inventory for its VMs and image files (in parallel);
``compare`` is pure: it takes the store's entries and those facts, and lists every
disagreement both ways:

- an IPAM allocation whose VM runs nowhere, a cloudops VM without an allocation, and a VM whose
  address or MAC is not the one allocated;
- a catalog entry with no file (not in this machine's image store and on no host), an image
  file on a host that the catalog does not know;
- host keys of a VM that runs nowhere; a migration journal record (a VM to recover);
- a VM record (``vms/``) whose VM is defined nowhere, or on another host than it says; a host
  ``cloud.watch`` declared dead.

A host that does not answer makes the result incomplete: nothing is called an orphan because
it was not seen, and the report says which hosts were missing.
"""

from dataclasses import dataclass, field

from cloudops import fleet
from cloudops.state.store import Store


@dataclass
class Finding:
    kind: str
    key: str
    detail: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "key": self.key, "detail": self.detail}


@dataclass
class CheckReport:
    findings: list[Finding] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)
    vms: int = 0

    @property
    def clean(self) -> bool:
        return not self.findings and not self.unreachable

    def to_dict(self) -> dict:
        return {"clean": self.clean, "vms": self.vms, "unreachable": self.unreachable,
                "findings": [f.to_dict() for f in self.findings]}


@dataclass
class Facts:
    """What the hypervisors run: cloudops VMs as dicts (name, host, network, ip, mac), image ids per host."""

    vms: list[dict]
    image_files: dict[str, list[str]]  # image id -> hosts holding it
    local_images: set[str]  # image ids whose file is in this machine's image store
    unreachable: list[str]


def gather(hosts: list, local_images: set[str]) -> Facts:
    from cloudops.compute import vms as vms_lib
    from cloudops.imaging import store as images

    listed = fleet.run(hosts, vms_lib.list_on_host)
    found = [vm for r in listed if r.value for vm in r.value if vm.network or vm.ip or vm.mac]
    unreachable = [f"{r.host}: {r.error}" if r.error else r.host for r in listed.failed]
    holders = images.holders([h for h in hosts if h.name not in {r.host for r in listed.failed}])
    return Facts(vms=[vm.to_dict() for vm in found], image_files=holders, local_images=local_images,
                 unreachable=unreachable)


def _nics(vm: dict) -> dict:
    """network -> {ip, mac} of each NIC of a VM's facts (``nics``; an older VM's ``network``/``ip``/``mac``)."""
    nics = vm.get("nics") or ([{"network": vm["network"], "ip": vm.get("ip"), "mac": vm.get("mac")}]
                              if vm.get("network") else [])
    return {n["network"]: n for n in nics}


def compare(store: Store, facts: Facts) -> CheckReport:
    report = CheckReport(unreachable=list(facts.unreachable), vms=len(facts.vms))
    add = report.findings.append
    complete = not facts.unreachable
    running = {vm["name"]: vm for vm in facts.vms}

    allocated: dict[tuple[str, str], dict] = {}
    for key, entry in store.items("ipam/").items():
        network = key[len("ipam/"):]
        for vm_name, allocation in entry.value.get("allocations", {}).items():
            allocated[(network, vm_name)] = allocation
            vm = running.get(vm_name)
            if vm is None:
                if complete:
                    add(Finding("allocation-without-vm", key, f"{vm_name} holds {allocation.get('ip')} but runs "
                                "on no host"))
            elif (nic := _nics(vm).get(network)) and (nic.get("ip"), nic.get("mac")) != (allocation.get("ip"),
                                                                                        allocation.get("mac")):
                add(Finding("allocation-mismatch", key, f"{vm_name} on {vm['host']} has {nic.get('ip')} "
                            f"{nic.get('mac')}, the store allocated {allocation.get('ip')} {allocation.get('mac')}"))
    ipam_networks = {key[len("ipam/"):] for key in store.items("ipam/")}
    for vm in facts.vms:
        for network, nic in _nics(vm).items():
            if network in ipam_networks and (network, vm["name"]) not in allocated:
                add(Finding("vm-without-allocation", f"ipam/{network}",
                            f"{vm['name']} on {vm['host']} uses {nic.get('ip')} without an allocation"))

    catalog = store.value("images/catalog", {})
    for image_id, fields in catalog.items():
        if image_id not in facts.local_images and not facts.image_files.get(image_id) and complete:
            add(Finding("catalog-entry-without-files", "images/catalog",
                        f"{fields.get('name')} ({image_id[:12]}) is in no image store and on no host"))
    for image_id, holders in sorted(facts.image_files.items()):
        if image_id not in catalog and len(image_id) == 64:
            add(Finding("image-file-not-in-catalog", "images/catalog",
                        f"{image_id[:12]} is on {', '.join(sorted(holders))} but not in the catalog"))

    for key in store.items("hostkeys/"):
        if key[len("hostkeys/"):] not in running and complete:
            add(Finding("host-keys-without-vm", key, f"{key[len('hostkeys/'):]} runs on no host"))
    for key, entry in store.items("vms/").items():
        name, recorded = key[len("vms/"):], entry.value.get("host")
        vm = running.get(name)
        if vm is None:
            if complete:
                add(Finding("record-without-vm", key, f"{name} is recorded on {recorded} but defined on no host"))
        elif recorded != vm["host"]:
            add(Finding("record-elsewhere", key, f"{name} is defined on {vm['host']}, its record says {recorded} "
                        "(a failover would define it from the record)"))
    for key, entry in store.items("ha/").items():
        if entry.value.get("dead_since") is not None:
            fenced = "fenced" if entry.value.get("fenced_at") is not None else "not fenced"
            add(Finding("dead-host", key, f"{key[len('ha/'):]} was declared dead ({fenced}); cloud.watch reports "
                        "it healthy once it answers"))
    for key, entry in store.items("migrating/").items():
        add(Finding("unfinished-migration", key, f"{entry.value.get('source')} -> {entry.value.get('target')}, "
                    f"phase {entry.value.get('phase')}: run `invoke vm.migrate {key[len('migrating/'):]} --recover`"))
    return report
