"""Cloud-wide IP address management: one allocator per network, so a VM keeps its address on any host.

The allocations of a network are one document of the cloud's state store (``ipam/<network>``,
see cloudops/state): every allocation and release is a compare-and-swap on it, so two
cloudops processes (on one control machine, or on two sharing etcd) never hand out one
address or one MAC twice. Addresses come from ``NetworkSpec.static_pool()`` (the
subnet minus gateway, DHCP range, static reservations and the spec's ``reserved``),
lowest free first, or a VM asks for one (``ip=``, ``vm.start --ip``): that one or an
error saying why not (``check_address``; taken by whom, inside the same
compare-and-swap, so of two starts asking for one address exactly one gets it); a
released address rests for ``QUARANTINE`` seconds (dnsmasq may still hold a lease
for the old MAC, and would give the new VM some other address) unless nothing
else is free or it goes back to the same MAC. A MAC
is derived from sha256("<network>/<vm>") under QEMU's 52:54:00 prefix and stored;
on a collision the next derivation ("<network>/<vm>/1", ...) is taken.
"""

import copy
import hashlib
import ipaddress
import re
import time
from dataclasses import dataclass

from cloudops import state
from cloudops.errors import CloudopsError
from cloudops.net.networks import NetworkSpec

VM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAC_PREFIX = "52:54:00"
FORMAT = 1
QUARANTINE = 3600  # libvirt's default DHCP lease time


@dataclass(frozen=True)
class Allocation:
    """The address and MAC a VM has on one network, wherever it runs."""

    ip: str
    mac: str

    def to_dict(self) -> dict:
        return {"ip": self.ip, "mac": self.mac}


def state_key(spec: NetworkSpec) -> str:
    return f"ipam/{spec.name}"


def derived_mac(network: str, vm_name: str, attempt: int = 0) -> str:
    """52:54:00 plus three bytes of sha256("<network>/<vm>[/<attempt>]")."""
    seed = f"{network}/{vm_name}" + (f"/{attempt}" if attempt else "")
    digest = hashlib.sha256(seed.encode()).digest()
    return MAC_PREFIX + "".join(f":{b:02x}" for b in digest[:3])


def _check_vm(vm_name: str) -> None:
    if not isinstance(vm_name, str) or not VM_NAME_RE.match(vm_name):
        raise CloudopsError(f"invalid VM name {vm_name!r} (letters, digits, '_', '.', '-'; 1 to 63)")


def _check_spec(spec: NetworkSpec) -> None:
    if not spec.cidr:
        raise CloudopsError(f"network {spec.name} has no cidr: IPAM needs one")


def _empty(spec: NetworkSpec) -> dict:
    return {"format": FORMAT, "network": spec.name, "cidr": spec.cidr, "allocations": {}}


def _checked(spec: NetworkSpec, doc: dict) -> dict:
    key = state_key(spec)
    if not isinstance(doc.get("allocations"), dict):
        raise state.StoreCorrupt(f"state store: {key} is not an allocation document")
    if doc.get("cidr") != spec.cidr:
        raise CloudopsError(f"IPAM state {key} is for {doc.get('cidr')}, but network {spec.name} is now "
                            f"{spec.cidr}: release its {len(doc['allocations'])} allocations first")
    return doc


def _change(spec: NetworkSpec, change, store=None):
    """Apply ``change(doc)`` to the network's allocation document with compare-and-swap."""
    _check_spec(spec)
    store = store or state.current()
    return store.update(state_key(spec), lambda doc: change(_checked(spec, doc)), default=lambda: _empty(spec))


def _read(spec: NetworkSpec, store=None) -> dict:
    _check_spec(spec)
    store = store or state.current()
    return _checked(spec, store.value(state_key(spec)) or _empty(spec))


def check_address(spec: NetworkSpec, ip, vm_name: str = "the VM") -> str:
    """``ip`` (normalized) when a VM may ask for it on ``spec``; else one line saying why not.

    Only what the spec says: an IPv4 host address of the subnet, not the gateway, not in the
    DHCP range (dnsmasq leases those to anyone; every network cloudops renders has one, the
    upper half by default), not reserved (``reserved``, the static ``reservations``). Whether
    another VM holds it is the allocation document's to say (``allocate``, ``peek``)."""
    _check_spec(spec)
    try:
        address = ipaddress.IPv4Address(str(ip).strip())
    except ValueError:
        raise CloudopsError(f"address {ip!r} for {vm_name} is not an IPv4 address (e.g. 192.168.150.10)") from None
    net = spec.network
    on = f"network {spec.name} ({spec.cidr})"
    why = None
    if address not in net:
        why = f"outside {on}"
    elif address == net.network_address:
        why = f"the network address of {on}"
    elif address == net.broadcast_address:
        why = f"the broadcast address of {on}"
    elif spec.gateway and address == ipaddress.IPv4Address(spec.gateway):
        why = f"the gateway of {on} (the network's own address on its bridge)"
    elif (rng := spec.dhcp_range()) and rng[0] <= address <= rng[1]:
        why = f"in the DHCP range {rng[0]}-{rng[1]} of {on}, which dnsmasq leases to any guest"
    elif any(first <= address <= last for first, last in spec.reserved_ranges()):
        why = f"reserved on {on} (its reserved: list)"
    elif res := next((r for r in spec.reservations if r.ip == str(address)), None):
        why = f"reserved on {on} for {res.mac} ({res.name}) by its reservations"
    if why:
        raise CloudopsError(f"address {address} for {vm_name} is {why}")
    return str(address)


def allocate(spec: NetworkSpec, vm_name: str, store=None, ip: str | None = None) -> Allocation:
    """The VM's allocation on ``spec``: the existing one, else the lowest free address and a fresh MAC.

    With ``ip`` exactly that address, or CloudopsError: not one a VM may have (``check_address``),
    allocated to another VM (named), the VM holding another one, or released by another MAC
    within ``QUARANTINE``. The check and the allocation are one compare-and-swap."""
    _check_vm(vm_name)
    if ip is not None:
        ip = check_address(spec, ip, vm_name)
    return _change(spec, lambda doc: _allocate(spec, vm_name, doc, ip), store)


def _allocate(spec: NetworkSpec, vm_name: str, doc: dict, ip: str | None = None) -> Allocation:
    taken = doc["allocations"]
    if vm_name in taken:
        if ip is not None and taken[vm_name]["ip"] != ip:
            raise CloudopsError(f"address {ip} for {vm_name}: IPAM already allocates {vm_name} "
                                f"{taken[vm_name]['ip']} on network {spec.name} (see state.check)")
        return Allocation(**taken[vm_name])
    used_ips = {entry["ip"] for entry in taken.values()}
    used_macs = {entry["mac"] for entry in taken.values()} | {r.mac for r in spec.reservations}
    attempt = 0
    while (mac := derived_mac(spec.name, vm_name, attempt)) in used_macs:
        attempt += 1
    if ip is not None:
        _check_requested(spec, vm_name, ip, mac, doc)
        doc.setdefault("released", {}).pop(ip, None)
        taken[vm_name] = {"ip": ip, "mac": mac}
        return Allocation(ip, mac)
    free = [str(a) for a in spec.static_pool() if str(a) not in used_ips]
    if not free:
        raise CloudopsError(f"network {spec.name}: no free address left for {vm_name} "
                            f"({len(taken)} allocated; pool of {len(spec.static_pool())} in {spec.cidr})")
    ip = _pick(free, doc.setdefault("released", {}), mac)
    doc["released"].pop(ip, None)
    taken[vm_name] = {"ip": ip, "mac": mac}
    return Allocation(ip, mac)




def _check_requested(spec: NetworkSpec, vm_name: str, ip: str, mac: str, doc: dict,
                     now: float | None = None) -> None:
    """Refuse ``ip`` when another VM holds it, or its last lease (another MAC's) may still be alive."""
    holder = next((vm for vm, entry in doc["allocations"].items() if entry["ip"] == ip), None)
    if holder is not None:
        who = "a VM planned before it" if holder.startswith("\0planned") else f"VM {holder}"
        raise CloudopsError(f"address {ip} for {vm_name} is already allocated to {who} on network {spec.name}")
    last = doc.get("released", {}).get(ip)
    now = time.time() if now is None else now
    if last is not None and last["mac"] != mac and now - last["at"] < QUARANTINE:
        left = (QUARANTINE - (now - last["at"])) / 60
        raise CloudopsError(f"address {ip} for {vm_name} was released {(now - last['at']) / 60:.0f} min ago on network "
                            f"{spec.name}: its DHCP lease to {last['mac']} may live {left:.0f} min more, so dnsmasq "
                            "would not give it to a new MAC; ask for another address or wait")


def _pick(free: list[str], released: dict, mac: str, now: float | None = None) -> str:
    """Lowest free address whose last lease cannot be alive; else the one released longest ago."""
    now = time.time() if now is None else now
    for ip in free:
        last = released.get(ip)
        if last is None or last["mac"] == mac or now - last["at"] >= QUARANTINE:
            return ip
    return min(free, key=lambda ip: released[ip]["at"])


def peek(spec: NetworkSpec, vm_name: str, store=None, also_taken=(), ip: str | None = None) -> Allocation:
    """What ``allocate`` would give the VM now (``ip``: or why it would refuse), without allocating: a read.

    ``also_taken``: addresses to treat as allocated (a plan of several VMs in a row)."""
    _check_vm(vm_name)
    if ip is not None:
        ip = check_address(spec, ip, vm_name)
    doc = copy.deepcopy(_read(spec, store))
    for i, taken_ip in enumerate(also_taken):
        doc["allocations"].setdefault(f"\0planned-{i}", {"ip": taken_ip, "mac": ""})
    return _allocate(spec, vm_name, doc, ip)


def release(spec: NetworkSpec, vm_name: str, store=None) -> bool:
    """Forget the VM's allocation; False when it had none."""
    _check_vm(vm_name)

    def forget(doc):
        entry = doc["allocations"].pop(vm_name, None)
        if entry is None:
            return False
        doc.setdefault("released", {})[entry["ip"]] = {"mac": entry["mac"], "at": round(time.time(), 3)}
        return True

    return _change(spec, forget, store)


def lookup(spec: NetworkSpec, vm_name: str, store=None) -> Allocation | None:
    _check_vm(vm_name)
    entry = _read(spec, store)["allocations"].get(vm_name)
    return None if entry is None else Allocation(**entry)


def allocations(spec: NetworkSpec, store=None) -> dict[str, Allocation]:
    """Every VM's allocation on ``spec``, in address order."""
    items = sorted(_read(spec, store)["allocations"].items(), key=lambda kv: ipaddress.IPv4Address(kv[1]["ip"]))
    return {vm: Allocation(**entry) for vm, entry in items}
