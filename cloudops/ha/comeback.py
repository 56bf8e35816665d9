"""A host that answers again after a failover: it must not start a second copy of a VM that moved.

Its libvirtd still has the definitions of the VMs restarted elsewhere (their records name another
host now). Those stale definitions are undefined, destroyed first if one runs (fencing and the
disk leases should make that impossible; if it happens anyway it is said), and their DHCP
reservations there removed. Their disks are never touched: on shared storage they are the disks
the VMs run from now. A VM whose record still names this host (local storage) is left as it is,
shut off, for the operator to power on.
"""

import contextlib

import libvirt

from cloudops import virt
from cloudops.compute import records, vms
from cloudops.errors import CloudopsError
from cloudops.net import networks


def stale(domain_names: list[str], host_name: str, known: dict[str, dict]) -> list[str]:
    """The names among ``domain_names`` (cloudops domains on ``host_name``) whose record says they live elsewhere."""
    return sorted(n for n in domain_names if n in known and known[n].get("host") not in (None, host_name))


def clean(host) -> list[str]:
    """Undefine the stale definitions on ``host``; one line per thing done."""
    done = []
    known = {r["name"]: r for r in records.every()}
    with virt.open_host(host) as conn:
        ours = {d.name(): d for d in conn.listAllDomains() if vms.made_by_cloudops(d)}
        for name in stale(list(ours), host.name, known):
            dom = ours[name]
            elsewhere = known[name]["host"]
            if dom.isActive():
                vms._destroy(dom)
                done.append(f"{name}: destroyed a running stale copy on {host.name} (it lives on {elsewhere}): "
                            "fencing did not stop it")
            for nic in vms.nics_of(virt.metadata(dom)):
                if nic["mac"] and nic["network"]:
                    with contextlib.suppress(CloudopsError, libvirt.libvirtError):
                        networks.remove_reservation(conn, nic["network"], nic["mac"], nic["ip"], name)
            vms._undefine(dom)
            done.append(f"{name}: stale definition undefined on {host.name} (it lives on {elsewhere})")
    return done
