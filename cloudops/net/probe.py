"""Network probes run on a hypervisor, on the bridge a guest uses: is an address free, who answers, is there DHCP.

The packets are scapy's, sent by ``cloudops/net/packets.py`` on the host (over SSH, as
``python3 -c``, with Debian's python3-scapy: a default package of ``deploy``). This side says what to
ask, reads the JSON answer and turns it into cloudops's terms: the addresses IPAM knows, the
network's gateway, one line when something is wrong.

* ``ensure_free`` — before ``vm.start`` gives a static address on a bridged LAN: an ARP probe
  (RFC 5227); an answer means another machine holds the address, and the start is refused naming its MAC.
* ``probe_network`` — ``net.probe``: DHCP servers (a discover, the offers), the addresses that answer
  ARP, and which of them cloudops does not know.
* ``addresses_of`` — ``vm.info``: the addresses a guest's MAC answers ARP for on its network (a guest
  whose address cloudops does not know, as on a LAN with an outside DHCP server).
"""

from __future__ import annotations

import ipaddress
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from cloudops.errors import CloudopsError
from cloudops.net import ipam
from cloudops.net.networks import NetworkSpec

SCRIPT = Path(__file__).with_name("packets.py")
TIMEOUT = 1.0  # seconds each round of probes waits for answers
TRIES = 2
DHCP_WAIT = 5.0  # seconds a DHCP discover waits: dnsmasq ARP-pings an address (about 3 s) before offering it


def run_packets(hv, host_name: str, action: str, bridge: str, *targets: str, timeout: float = TIMEOUT,
                tries: int = TRIES, dhcp_wait: float = DHCP_WAIT) -> dict:
    """``packets.py ACTION BRIDGE TARGETS`` on the host (root, scapy); its JSON, or one line why not."""
    args = " ".join(shlex.quote(a) for a in (action, bridge, *targets))
    command = (f"/usr/bin/python3 -c {shlex.quote(SCRIPT.read_text())} {args} "
               f"--timeout {float(timeout)} --tries {int(tries)} --dhcp-wait {float(dhcp_wait)}")
    # bounded: the host side waits at most tries x timeout for ARP and dhcp_wait for offers, plus a
    # bridge port's forward delay (35 s at most)
    result = hv.run(command, hide=True, warn=True, in_stream=False, timeout=60 + tries * timeout * 4 + dhcp_wait)
    if not result.ok:
        reason = (result.stderr.strip().splitlines() or [f"exit status {result.exited}"])[-1]
        if "No module named 'scapy'" in result.stderr:
            reason = "python3-scapy is not installed there (deploy installs it)"
        raise CloudopsError(f"network probe on {host_name} ({action} on {bridge}) failed: {reason}")
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        raise CloudopsError(f"network probe on {host_name}: unreadable answer {result.stdout[:200]!r}") from None


def answering(hv, host_name: str, net: NetworkSpec, ip: str) -> list[str]:
    """The MACs that answered an ARP probe for ``ip`` on ``net``'s bridge, from ``host_name``."""
    answers = run_packets(hv, host_name, "arp", net.bridge, ip)["answers"]
    return answers.get(ip, [])


def ensure_free(hv, host_name: str, net: NetworkSpec, ip: str, requested: bool) -> None:
    """Refuse ``ip`` on a bridged LAN when anything answers ARP for it (RFC 5227 probe from the host)."""
    macs = answering(hv, host_name, net, ip)
    if macs:
        how = ("choose another --ip" if requested else
               f"add it to network {net.name}'s reserved addresses so IPAM skips it, or give --ip")
        raise CloudopsError(f"address {ip} on network {net.name} is taken: {', '.join(macs)} answered ARP "
                            f"on {host_name}'s {net.bridge} ({how})")


def addresses_of(hv, host_name: str, net: NetworkSpec, macs: list[str]) -> dict[str, list[str]]:
    """{MAC: the addresses of ``net``'s subnet that answer ARP from that MAC}, one scan of the subnet from the
    host (bounded: ``TRIES`` rounds of ``TIMEOUT`` seconds)."""
    if not net.cidr:
        raise CloudopsError(f"network {net.name} has no cidr (subnet) in the inventory: there is nothing to scan "
                            "for a guest's address")
    answers = run_packets(hv, host_name, "scan", net.bridge, str(ipaddress.ip_network(net.cidr)))["answers"]
    return {mac.lower(): sorted((ip for ip, seen in answers.items() if mac.lower() in seen), key=ipaddress.IPv4Address)
            for mac in macs}


@dataclass
class Report:
    """What ``net.probe`` found on one network from one host."""

    network: str
    host: str
    bridge: str
    cidr: str | None
    dhcp_servers: list[dict] = field(default_factory=list)
    answering: list[dict] = field(default_factory=list)  # {ip, macs, known: VM name | "gateway" | None}

    @property
    def unknown(self) -> list[dict]:
        return [a for a in self.answering if a["known"] is None]

    def to_dict(self) -> dict:
        return {"network": self.network, "host": self.host, "bridge": self.bridge, "cidr": self.cidr,
                "dhcp_servers": self.dhcp_servers, "answering": self.answering, "unknown": self.unknown}


def probe_network(hv, host_name: str, net: NetworkSpec, store=None) -> Report:
    """DHCP offers on ``net``'s bridge, and (when its subnet is known) every address that answers ARP,
    each named by what cloudops knows it as: a VM of IPAM, the gateway, or nothing (unknown)."""
    report = Report(network=net.name, host=host_name, bridge=net.bridge, cidr=net.cidr)
    subnet = [str(ipaddress.ip_network(net.cidr))] if net.cidr else []
    found = run_packets(hv, host_name, "survey", net.bridge, *subnet)  # one run: one port, one scapy import
    report.dhcp_servers = found["offers"]
    if not net.cidr:
        return report
    known = {a.ip: vm for vm, a in ipam.allocations(net, store).items()}
    if net.gateway:
        known.setdefault(str(net.gateway), "gateway")
    answers = found["answers"]
    for ip in sorted(answers, key=ipaddress.IPv4Address):
        report.answering.append({"ip": ip, "macs": answers[ip], "known": known.get(ip)})
    return report
