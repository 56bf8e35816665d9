"""Where a guest's NICs answer on their networks, seen by ARP from its host: what ``vm.info --arp`` adds, and
how it finds the address of a NIC cloudops does not know one for (a domain it did not make, or a guest on a
LAN whose DHCP server is not libvirt's).

Facts only: nothing is changed, on the host or in IPAM. One scan per network (``probe.addresses_of``).
"""

import xml.etree.ElementTree as ET

from cloudops.compute import vms
from cloudops.net import probe
from cloudops.ssh import connect


def interfaces(dom) -> list[dict]:
    """A domain's NICs from its XML, as ``vms.nics_of`` gives them (no address: libvirt does not know it)."""
    found = []
    for iface in ET.fromstring(dom.XMLDesc(0)).findall("devices/interface"):
        source, mac = iface.find("source"), iface.find("mac")
        network = source.get("network") if source is not None else None
        if network and mac is not None:
            found.append({"network": network, "ip": None, "mac": mac.get("address").lower()})
    return found


def by_arp(host, nics: list[dict], progress=lambda m: None) -> list[dict]:
    """Each NIC with ``seen``: the addresses that answer ARP from its MAC on its network, scanned from ``host``;
    a NIC without an address takes the first of them (``ip_from`` "arp")."""
    networks = {}
    for nic in nics:
        if nic.get("mac") and nic.get("network"):
            networks.setdefault(nic["network"], []).append(nic)
    if not networks:
        return nics
    with connect(host) as hv:
        for name, group in networks.items():
            net = vms.network_spec(name, host)
            progress(f"scanning {net.cidr} on {host.name}'s {net.bridge} for {len(group)} MAC(s) (ARP)")
            found = probe.addresses_of(hv, host.name, net, [n["mac"] for n in group])
            for nic in group:
                nic["seen"] = found[nic["mac"].lower()]
                if not nic.get("ip") and nic["seen"]:
                    nic["ip"], nic["ip_from"] = nic["seen"][0], "arp"
    return nics
