"""Facts about a hypervisor host: read the host, parse what it says into data. Changes nothing.

One SSH command gathers the system facts; one libvirt connection gathers the
libvirt facts. A host without a libvirtd (a bare lab host) still has system facts.
"""

import libvirt

from cloudops import inventory, kvm, virt
from cloudops.ssh import connect

# One round trip: every fact in a line "key<TAB>value".
_SYSTEM_SCRIPT = r"""
printf 'hostname\t%s\n' "$(hostname)"
printf 'cpus\t%s\n' "$(nproc)"
awk '/^MemTotal:/ {print "mem_total_kb\t" $2} /^MemAvailable:/ {print "mem_available_kb\t" $2}' /proc/meminfo
""" + kvm.PROBE_SH + r"""
printf 'kernel\t%s\n' "$(uname -r)"
"""


def parse_system(text: str) -> dict:
    raw = dict(line.split("\t", 1) for line in text.splitlines() if "\t" in line)
    return {
        "hostname": raw.get("hostname"),
        "cpus": int(raw["cpus"]) if raw.get("cpus", "").isdigit() else None,
        "memory_total_mb": int(raw["mem_total_kb"]) // 1024 if raw.get("mem_total_kb") else None,
        "memory_free_mb": int(raw["mem_available_kb"]) // 1024 if raw.get("mem_available_kb") else None,
        "kvm": raw.get("kvm") == "yes",
        "kernel": raw.get("kernel"),
    }


def system_facts(host, timeout: float = 10) -> dict:
    with connect(host, timeout=timeout) as conn:
        result = conn.run(_SYSTEM_SCRIPT, hide=True, warn=False, timeout=timeout, in_stream=False)
    return parse_system(result.stdout)


def libvirt_facts(conn: libvirt.virConnect) -> dict:
    model, memory_mb, cpus, *_ = conn.getInfo()
    running = [d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]
    defined = [d.name() for d in conn.listAllDomains()]
    return {
        "libvirt_version": virt.version_string(conn.getLibVersion()),
        "qemu_version": virt.version_string(conn.getVersion()),
        "libvirt_hostname": conn.getHostname(),
        "libvirt_cpus": cpus,
        "libvirt_free_mb": conn.getFreeMemory() // (1024 * 1024),
        "domains_running": sorted(running),
        "domains_defined": sorted(defined),
    }


def host_facts(host, timeout: float = 10) -> dict:
    """System facts over SSH plus libvirt facts, or ``libvirt_error`` when libvirtd does not answer."""
    facts = {"host": host.name, "address": host.address, **system_facts(host, timeout)}
    if not inventory.is_hypervisor(host):
        facts["libvirt_error"] = "bare host (no libvirtd)"
        return facts
    try:
        with virt.open_host(host) as conn:
            facts.update(libvirt_facts(conn))
    except virt.LibvirtUnavailable as exc:
        facts["libvirt_error"] = str(exc)
    return facts


def summary(facts: dict) -> str:
    """One line for a terminal table."""
    if not facts:
        return ""
    parts = [f"{facts.get('hostname')}", f"{facts.get('cpus')} cpu",
             f"{facts.get('memory_free_mb')}/{facts.get('memory_total_mb')} MiB free",
             f"kvm {'yes' if facts.get('kvm') else 'no (TCG)'}"]
    if facts.get("libvirt_version"):
        parts += [f"libvirt {facts['libvirt_version']}", f"qemu {facts['qemu_version']}",
                  f"{len(facts['domains_running'])}/{len(facts['domains_defined'])} domains running"]
    else:
        parts.append(f"libvirt: {facts.get('libvirt_error')}")
    return ", ".join(parts)
