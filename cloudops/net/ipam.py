"""Cloud-wide IP address management: one allocator per network, so a VM keeps its address on any host.

State lives in ``var/cloud/ipam/<network>.json`` (``state_dir`` overrides the
directory). Every read-modify-write holds an exclusive ``fcntl.flock`` on
``<network>.lock`` and replaces the state file atomically (temp file, fsync,
rename), so concurrent processes never hand out one address twice and a crash
never leaves half a file. Addresses come from ``NetworkSpec.static_pool()`` (the
subnet minus gateway, DHCP range and static reservations), lowest free first; a
released address rests for ``QUARANTINE`` seconds (dnsmasq may still hold a lease
for the old MAC, and would give the new VM some other address) unless nothing
else is free or it goes back to the same MAC. A MAC
is derived from sha256("<network>/<vm>") under QEMU's 52:54:00 prefix and stored;
on a collision the next derivation ("<network>/<vm>/1", ...) is taken.
"""

import fcntl
import hashlib
import ipaddress
import json
import os
import re
import tempfile
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from cloudops import paths
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


def state_root(state_dir=None) -> Path:
    return Path(state_dir) if state_dir is not None else paths.var_dir() / "cloud" / "ipam"


def state_path(spec: NetworkSpec, state_dir=None) -> Path:
    return state_root(state_dir) / f"{spec.name}.json"


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


@contextmanager
def _locked(spec: NetworkSpec, state_dir=None, write: bool = True):
    """Hold the network's lock; yield its state dict; on a clean exit with ``write``, save it atomically."""
    _check_spec(spec)
    root = state_root(state_dir)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{spec.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            state = _read(spec, state_path(spec, state_dir))
            before = json.dumps(state, sort_keys=True)
            yield state
            if write and json.dumps(state, sort_keys=True) != before:
                _write_atomically(state_path(spec, state_dir), state)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(spec: NetworkSpec, path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {"format": FORMAT, "network": spec.name, "cidr": spec.cidr, "allocations": {}}
    except (OSError, ValueError) as exc:
        raise CloudopsError(f"IPAM state {path} is unreadable: {exc}") from None
    if not isinstance(state, dict) or not isinstance(state.get("allocations"), dict):
        raise CloudopsError(f"IPAM state {path} is not an allocation file")
    if state.get("cidr") != spec.cidr:
        raise CloudopsError(f"IPAM state {path} is for {state.get('cidr')}, but network {spec.name} is now "
                            f"{spec.cidr}: release its {len(state['allocations'])} allocations first")
    return state


def _write_atomically(path: Path, state: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(state, out, indent=2, sort_keys=True)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def allocate(spec: NetworkSpec, vm_name: str, state_dir=None) -> Allocation:
    """The VM's allocation on ``spec``: the existing one, else the lowest free address and a fresh MAC."""
    _check_vm(vm_name)
    with _locked(spec, state_dir) as state:
        taken = state["allocations"]
        if vm_name in taken:
            return Allocation(**taken[vm_name])
        used_ips = {entry["ip"] for entry in taken.values()}
        used_macs = {entry["mac"] for entry in taken.values()} | {r.mac for r in spec.reservations}
        attempt = 0
        while (mac := derived_mac(spec.name, vm_name, attempt)) in used_macs:
            attempt += 1
        free = [str(a) for a in spec.static_pool() if str(a) not in used_ips]
        if not free:
            raise CloudopsError(f"network {spec.name}: no free address left for {vm_name} "
                                f"({len(taken)} allocated; pool of {len(spec.static_pool())} in {spec.cidr})")
        ip = _pick(free, state.setdefault("released", {}), mac)
        state["released"].pop(ip, None)
        taken[vm_name] = {"ip": ip, "mac": mac}
        return Allocation(ip, mac)


def _pick(free: list[str], released: dict, mac: str, now: float | None = None) -> str:
    """Lowest free address whose last lease cannot be alive; else the one released longest ago."""
    now = time.time() if now is None else now
    for ip in free:
        last = released.get(ip)
        if last is None or last["mac"] == mac or now - last["at"] >= QUARANTINE:
            return ip
    return min(free, key=lambda ip: released[ip]["at"])


def release(spec: NetworkSpec, vm_name: str, state_dir=None) -> bool:
    """Forget the VM's allocation; False when it had none."""
    _check_vm(vm_name)
    with _locked(spec, state_dir) as state:
        entry = state["allocations"].pop(vm_name, None)
        if entry is None:
            return False
        state.setdefault("released", {})[entry["ip"]] = {"mac": entry["mac"], "at": round(time.time(), 3)}
        return True


def lookup(spec: NetworkSpec, vm_name: str, state_dir=None) -> Allocation | None:
    _check_vm(vm_name)
    with _locked(spec, state_dir, write=False) as state:
        entry = state["allocations"].get(vm_name)
        return None if entry is None else Allocation(**entry)


def allocations(spec: NetworkSpec, state_dir=None) -> dict[str, Allocation]:
    """Every VM's allocation on ``spec``, in address order."""
    with _locked(spec, state_dir, write=False) as state:
        items = sorted(state["allocations"].items(), key=lambda kv: ipaddress.IPv4Address(kv[1]["ip"]))
        return {vm: Allocation(**entry) for vm, entry in items}
