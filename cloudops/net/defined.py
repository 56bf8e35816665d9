"""Network specs read back from libvirt, so a network the hosts have (``net.define``, or made by hand) needs no inventory entry.

One source of truth for a network: the stack's or the inventory's spec when they have one, else the
definition the hypervisors hold. ``spec_from_xml`` turns a network's XML into the ``NetworkSpec``
that renders back to the same mode, bridge, gateway, prefix and DHCP range, so ``ensure_network``
finds nothing to change on a host that has it and defines the same network on one that lacks it.
Its DHCP host entries are not part of the spec: they are the reservations of VMs IPAM already
knows, and each VM's reservation goes with that VM, not to every host.
"""

import xml.etree.ElementTree as ET

import libvirt

from cloudops import fleet, virt
from cloudops.errors import CloudopsError
from cloudops.net import networks

# what two hosts' definitions must agree on to be one network
SAME = ("mode", "cidr", "gateway", "dhcp_start", "dhcp_end", "bridge", "reserved")


def spec_from_xml(xml, autostart: bool = True, where: str = "") -> networks.NetworkSpec:
    """The spec of a libvirt network's XML (a string or an Element); a network cloudops cannot use is one line why.

    nat (``<forward mode="nat"/>``), isolated (no ``<forward>``) and bridge (``<forward mode="bridge"/>``)
    networks are understood; the IPv4 ``<ip address= prefix=|netmask=>`` gives the gateway and cidr, its
    first ``<dhcp><range>`` the DHCP range, and further ranges go to ``reserved`` (dnsmasq leases them
    too). A nat or isolated network without DHCP cannot take a VM's reservation and is refused."""
    root = ET.fromstring(xml) if isinstance(xml, str) else xml
    name = root.findtext("name") or ""
    at = f"network {name}{f' on {where}' if where else ''}"
    facts = networks.owned(root)
    mode = facts["mode"]
    if mode not in networks.MODES:
        raise CloudopsError(f"{at}: forward mode {mode!r} is not one cloudops manages "
                            f"({', '.join(networks.MODES)})")
    try:
        if mode == "bridge":
            return networks.NetworkSpec(name=name, mode="bridge", bridge=facts["bridge"], autostart=autostart)
        subnet = networks.subnet_of(root)
        if subnet is None:
            raise CloudopsError("it has no IPv4 address on its bridge, so no subnet for its VMs")
        ip = next(e for e in root.findall("ip") if e.get("family", "ipv4") == "ipv4")
        ranges = ip.findall("dhcp/range")
        if not ranges:
            raise CloudopsError("it has no DHCP range, and vm.start gives a VM its address by a DHCP reservation")
        return networks.NetworkSpec(
            name=name, mode=mode, cidr=str(subnet), gateway=facts["gateway"], bridge=facts["bridge"],
            dhcp_start=ranges[0].get("start"), dhcp_end=ranges[0].get("end"), autostart=autostart,
            reserved=tuple(f"{r.get('start')}-{r.get('end')}" for r in ranges[1:]))
    except CloudopsError as exc:
        message = str(exc).removeprefix(f"network {name}: ")
        raise CloudopsError(f"{at}: {message}") from None


def defined_spec(conn, name: str, where: str = "") -> networks.NetworkSpec | None:
    """The spec of the network ``name`` as ``conn``'s libvirtd has it defined (its persistent config), or None."""
    net = networks.lookup(conn, name)
    if net is None:
        return None
    try:
        persistent = bool(net.isPersistent())
        xml = net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE if persistent else 0)
        autostart = bool(net.autostart()) if persistent else True
    except libvirt.libvirtError as exc:
        raise CloudopsError(f"reading network {name}{f' on {where}' if where else ''}: "
                            f"{exc.get_error_message()}") from None
    return spec_from_xml(xml, autostart=autostart, where=where)


def from_hosts(name: str, hosts: list, known=()) -> networks.NetworkSpec:
    """The spec of network ``name`` as the ``hosts`` define it, asked in parallel.

    The hosts that have it must agree; hosts that lack it are fine (``ensure_network`` defines it
    there). None has it: one line naming the inventory's networks (``known``) and the hosts asked."""
    networks.check_name(name)  # before any host is asked

    def read(host):
        with virt.open_host(host) as conn:
            try:
                return defined_spec(conn, name, where=host.name), None
            except CloudopsError as exc:
                return None, str(exc)

    result = fleet.run(hosts, read, timeout=60)
    found, unreachable = [], []
    for host, r in zip(hosts, result):
        if r.error:
            unreachable.append(r.error if r.error.startswith(f"{host.name}: ") else f"{host.name}: {r.error}")
            continue
        spec, why = r.value
        if why:
            raise CloudopsError(why)
        if spec is not None:
            found.append((host.name, spec))
    if not found:
        inventory = f"the inventory's networks ({', '.join(known)})" if known else "the inventory's networks"
        asked = ", ".join(h.name for h in hosts)
        extra = f"; unreachable: {'; '.join(unreachable)}" if unreachable else ""
        raise CloudopsError(f"unknown network {name!r}: not in {inventory} nor defined on {asked}{extra}")
    (first_host, spec), *others = found
    for host_name, other in others:
        if differs := [k for k in SAME if getattr(other, k) != getattr(spec, k)]:
            key = differs[0]
            raise CloudopsError(f"network {name} differs between hosts: {key} is {getattr(spec, key)} on {first_host} "
                                f"but {getattr(other, key)} on {host_name}; describe it in the inventory's networks")
    return spec
