"""Dry runs of ``vm.start``: where a VM would go and why, its address, its disk and what would be made; makes nothing.

``plan_start`` checks what ``start_vm`` checks (spec, image, disk size, host, network, the name
free on every host), ranks the hosts with the scheduler on the facts ``start_vm`` would read,
peeks at the address IPAM would hand out (a read of the state store, no allocation), and asks the
chosen host, read-only, what it lacks (the image's files, the network, the pool). No lock is
taken, nothing is written to the state store or to any host.
"""

from dataclasses import dataclass, field

import libvirt

from cloudops import kvm, sharedstorage, storage, virt
from cloudops.compute import placement, scheduler, sizing, vms
from cloudops.errors import CloudopsError
from cloudops.imaging import store as images
from cloudops.net import ipam, networks
from cloudops.ssh import connect


@dataclass
class StartPlan:
    name: str
    host: str
    memory: int
    vcpus: int
    image: str
    image_id: str
    disk_size: int
    image_virtual_size: int
    network: str
    ip: str
    mac: str
    customize: str
    user_data: str | None = None  # what the seed passes of the user's (no content)
    ip_requested: bool = False  # the address was asked for (--ip), not picked by IPAM
    extra_nics: list[dict] = field(default_factory=list)  # NICs after the first: {network, ip, mac}
    hosts: list[dict] = field(default_factory=list)  # every candidate: chosen, score, weights, or refused: reason
    actions: list[str] = field(default_factory=list)  # what the real start would make, in order

    def to_dict(self) -> dict:
        return {"dry_run": True, "name": self.name, "host": self.host, "memory": self.memory, "vcpus": self.vcpus,
                "image": {"name": self.image, "id": self.image_id, "virtual_size": self.image_virtual_size},
                "disk": {"size": self.disk_size, "size_human": sizing.format_size(self.disk_size),
                         "format": "qcow2", "backing": self.image},
                "network": self.network, "ip": self.ip, "ip_requested": self.ip_requested, "mac": self.mac,
                "customize": self.customize, "nics": [{"network": self.network, "ip": self.ip, "mac": self.mac},
                                                      *self.extra_nics],
                "user_data": self.user_data, "hosts": self.hosts, "would_make": self.actions}

    def lines(self) -> list[str]:
        out = [(f"dry run: {self.name} would start on {self.host} at {self.ip} ({self.memory} MiB, "
                f"{self.vcpus} vCPU{'s' if self.vcpus != 1 else ''}); nothing was made"),
               "hosts (the scheduler's ranking):"]
        for h in self.hosts:
            if "refused" in h:
                out.append(f"  {h['host']}: refused: {h['refused']}")
            else:
                weights = ", ".join(f"{k} {v:.2f}" for k, v in h["weights"].items())
                mark = "  <- chosen" if h["host"] == self.host else ""
                out.append(f"  {h['host']}: score {h['score']:.2f} ({weights}){mark}")
        if self.ip_requested:
            out.append(f"address: {self.ip} ({self.mac}) on network {self.network}: as asked (--ip), free now, "
                       "not allocated")
        else:
            out.append(f"address: {self.ip} ({self.mac}) on network {self.network}: what IPAM would give now, "
                       "not allocated")
        for nic in self.extra_nics:
            out.append(f"address: {nic['ip']} ({nic['mac']}) on network {nic['network']}: another NIC, what IPAM "
                       "would give now, not allocated")
        out.append(f"disk: {sizing.format_size(self.disk_size)} qcow2 overlay on image {self.image} "
                   f"({self.image_id[:12]}, virtual size {sizing.format_size(self.image_virtual_size)})")
        out.append("would make:")
        out += [f"  - {a}" for a in self.actions]
        return out


def ranked_hosts(ranking: scheduler.Ranking) -> list[dict]:
    """The scheduler's ranking as data: candidates best first (score, each weigher's share), then the refused."""
    rows = [{"host": c.host.name, "score": round(c.score, 4), "weights": {k: round(v, 4) for k, v in c.weights.items()}}
            for c in ranking.candidates]
    return rows + [{"host": name, "refused": reason} for name, reason in ranking.rejected]


def plan_start(spec: "vms.VMSpec", inventory, extra_networks=(), states=None, also_taken=()) -> StartPlan:
    """What ``start_vm(spec, inventory)`` would do now; raises what it would refuse. Makes nothing.

    ``states`` (host name -> HostState) and ``also_taken`` (addresses) let a caller plan several
    VMs in a row, each as if the ones before were made."""
    vms.validate(spec)
    image = images.resolve(spec.image)
    capacity = sizing.check_disk_size(spec.disk_size, image.virtual_size, image.name)
    sizing.check_memory(spec.memory, image)
    vms.check_firmware(spec.firmware, image)
    if spec.host and spec.host not in inventory.hosts:
        raise CloudopsError(f"unknown host {spec.host!r} (inventory {inventory.path}; known: {', '.join(inventory.hosts)})")
    candidates = [inventory.hosts[spec.host]] if spec.host else inventory.hypervisors()
    if spec.storage == "shared":
        candidates = vms.shared_candidates(candidates, bool(spec.host))
    nets = vms.start_networks(spec, candidates, inventory, extra_networks)
    net = nets[0]
    if spec.ip is not None:  # refused before any host is ranked, as start_vm refuses it
        ipam.peek(net, spec.name, also_taken=also_taken, ip=spec.ip)
    vms._ensure_name_free(spec.name, inventory.hypervisors())
    host_states = [states[h.name] for h in candidates if h.name in states] if states else \
        placement.host_states(candidates)
    ranking = scheduler.rank(placement.request_for(spec), host_states)
    if not ranking.candidates:
        raise CloudopsError(ranking.failure())
    host = next(h for h in candidates if h.name == ranking.candidates[0].host.name)
    allocation = ipam.peek(net, spec.name, also_taken=also_taken, ip=spec.ip)
    extra = [(n, ipam.peek(n, spec.name, also_taken=also_taken)) for n in nets[1:]]
    actions, virt_type = _host_actions(image, host, nets)
    pool_dir = storage_dir(host)
    if spec.storage == "shared":
        pool_dir = sharedstorage.disks_dir(host)
        actions.append(f"image {image.name} on the shared path ({sharedstorage.images_dir(host)}), when not there yet")
    for n, a in [(net, allocation), *extra]:
        actions.append(f"IPAM allocation {a.ip} ({a.mac}) on network {n.name}, and its DHCP reservation on {host.name}")
    actions.append(f"disk {pool_dir}/{spec.name}.qcow2: qcow2 overlay of {sizing.format_size(capacity)} on image "
                   f"{image.name}" + (", customized with libguestfs" if spec.customize == "guestfs" else ""))
    if spec.customize != "guestfs":
        actions.append(f"seed {pool_dir}/{spec.name}-seed.iso (NoCloud: hostname {spec.hostname or spec.name}, "
                       "SSH keys" + (", root password hash" if spec.root_password else "")
                       + (f"; {spec.user_data.describe()}" if spec.user_data else "") + ")")
    actions.append(f"domain {spec.name} on {host.name} (type {virt_type}, firmware {spec.firmware}): defined and "
                   "started, then waited for until SSH answers")
    return StartPlan(name=spec.name, host=host.name, memory=spec.memory, vcpus=spec.vcpus, image=image.name,
                     image_id=image.id, disk_size=capacity, image_virtual_size=image.virtual_size, network=net.name,
                     ip=allocation.ip, ip_requested=spec.ip is not None, mac=allocation.mac, customize=spec.customize,
                     user_data=spec.user_data.describe() if spec.user_data else None, hosts=ranked_hosts(ranking),
                     extra_nics=[{"network": n.name, "ip": a.ip, "mac": a.mac} for n, a in extra],
                     actions=actions)


def storage_dir(host) -> str:
    return storage.disks_dir(images.pool_path(host))


def _host_actions(image, host, nets) -> tuple[list[str], str]:
    """What the chosen host lacks for the VM, asked read-only (one SSH ``ls``, libvirt lookups); its domain type."""
    actions = []
    with connect(host) as hv, virt.open_host(host) as conn:
        if images.missing_on_host(image, host, hv):
            actions.append(f"copy image {image.name} to {host.name} ({images.pool_path(host)}/images)")
        for net in nets:
            changed, message = networks.ensure_network(conn, net, check=True)
            if changed:
                actions.append(f"{message} on {host.name}")
        try:
            conn.storagePoolLookupByName(storage.POOL_NAME)
        except libvirt.libvirtError:
            actions.append(f"storage pool {storage.POOL_NAME} on {host.name} ({storage_dir(host)})")
        return actions, kvm.domain_type(conn)
