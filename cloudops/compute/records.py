"""The VM records: what the cloud knows of each cloudops VM, kept in the state store, not on its host.

A dead hypervisor cannot be asked for its domains' definitions, yet a failover must define them
again elsewhere (same MAC, same address, same disk). So every cloudops VM has a record
``vms/<name>``: its host, its domain XML (inactive), its NICs, storage kind, size and anti-affinity
group. Written by ``vm.start`` once the VM is up, moved by ``vm.migrate`` and a failover, removed
by ``vm.delete``: these are the only writers, and each write is one small document.

``is_shared`` is the one place that says whether a VM's disk is on the cloud's shared path (the
``storage`` field, from the VM's cloudops metadata): only such a VM can be restarted elsewhere.
``running`` is the power state the operator last asked for (``vm.start``, ``vm.poweron``: true;
``vm.stop``: false): a failover starts only the VMs that were meant to run, and defines the others
stopped. A guest that powers itself off is still "running" here.
"""

import time
import xml.etree.ElementTree as ET

import libvirt

from cloudops import state, virt
from cloudops.state.store import check_key

PREFIX = "vms/"
SHARED = "shared"
LOCAL = "local"
UNITS_KIB = {"KiB": 1, "k": 1, "KB": 1, "MiB": 1024, "M": 1024, "GiB": 1 << 20, "G": 1 << 20}


def key(name: str) -> str:
    return check_key(PREFIX + name)


def from_domain(dom, host_name: str) -> dict:
    """The record of a cloudops domain as it is defined now on ``host_name``."""
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    return from_xml(xml, host_name, virt.metadata(dom), running=bool(dom.isActive()))


def from_xml(xml: str, host_name: str, meta: dict, running: bool = True) -> dict:
    """A record from a domain's XML and its cloudops metadata (pure: tests build records with it)."""
    from cloudops.compute.vms import nics_of

    root = ET.fromstring(xml)
    memory = root.find("memory")
    amount = int(memory.text) if memory is not None and memory.text else 0
    unit = (memory.get("unit") or "KiB") if memory is not None else "KiB"
    memory_mb = amount * UNITS_KIB.get(unit, 1) // 1024
    vcpu = root.find("vcpu")
    return {
        "name": root.findtext("name"),
        "host": host_name,
        "xml": xml,
        "nics": nics_of(meta),
        "storage": meta.get("storage") or LOCAL,
        "memory_mb": memory_mb,
        "vcpus": int(vcpu.text) if vcpu is not None and vcpu.text else 1,
        "group": meta.get("group") or None,
        "running": running,
        "updated": round(time.time(), 3),
    }


def is_shared(record: dict) -> bool:
    """Whether the VM's disk is on shared storage, so another host can open it (the VM's ``storage``)."""
    return (record or {}).get("storage") == SHARED


def save(record: dict) -> None:
    """Write a VM's record (its one writer at a time holds the VM's name lock)."""
    state.current().put(key(record["name"]), record)


def save_domain(dom, host_name: str) -> dict:
    record = from_domain(dom, host_name)
    save(record)
    return record


def refresh(name: str, dom, host_name: str) -> None:
    """Rewrite a VM's record after its definition changed (vm.resize, vm.disk); a VM without one gets none
    (made before records existed: its next vm.start or vm.migrate writes it)."""
    if get(name) is not None:
        save_domain(dom, host_name)


def set_running(name: str, running: bool) -> None:
    """The operator started or stopped the VM: what a failover brings back (a VM without a record: nothing)."""
    def change(record):
        if record:
            record["running"] = running
            record["updated"] = round(time.time(), 3)

    state.current().update(key(name), change)


def meant_to_run(record: dict) -> bool:
    return (record or {}).get("running", True) is not False


def get(name: str) -> dict | None:
    return state.current().value(key(name))


def forget(name: str) -> None:
    state.current().delete(key(name))


def moved(name: str, host_name: str, xml: str | None = None) -> None:
    """The VM now lives on ``host_name`` (migrated, or restarted there by a failover)."""
    def change(record):
        if record:
            record["host"] = host_name
            if xml:
                record["xml"] = xml
            record["updated"] = round(time.time(), 3)

    state.current().update(key(name), change)


def every() -> list[dict]:
    """Every VM record, by name."""
    entries = state.current().items(PREFIX)
    return [entries[k].value for k in sorted(entries)]


def on_host(host_name: str) -> list[dict]:
    """The records of the VMs that live on ``host_name``."""
    return [r for r in every() if r.get("host") == host_name]
