"""Packets on a hypervisor's bridge, with scapy: what ``cloudops.net.probe`` runs on the host, over SSH.

This file is sent to the host as a script (``/usr/bin/python3 -c``) and runs there with Debian's
``python3-scapy``, as root: it imports nothing from cloudops, nothing outside the standard library but
scapy. It answers one JSON document on stdout, or one line on stderr and exit status 1.

The probe speaks from a veth pair of its own, one end a port of the bridge, made for the run and
removed after it (in ``finally``): packets sent from the bridge device itself go to its ports only,
so the host's own DHCP server (libvirt's dnsmasq) would never see a discover sent that way, and the
host's address on the bridge would not answer. From a port, the probe sees the LAN as a guest would.

Actions (bounded: every wait has a timeout, every scan a subnet of at most 1024 addresses):

* ``arp IFACE IP...``: an ARP probe per address (RFC 5227: sender address 0.0.0.0, so nothing
  learns the probe's address); the MACs that answered, per address;
* ``scan IFACE CIDR``: the same probe to every address of the subnet; the addresses that answered;
* ``dhcp IFACE``: one DHCP discover; the offers (server, address offered, server's MAC);
* ``survey IFACE [CIDR]``: ``dhcp`` then ``scan`` from one port (what ``net.probe`` asks).
"""

import argparse
import ipaddress
import json
import os
import secrets
import subprocess
import sys
import time

MAX_SCAN = 1024


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Port:
    """A veth pair whose one end is a port of ``bridge``; the probe sends from the other end."""

    def __init__(self, bridge: str):
        self.bridge = bridge
        tag = secrets.token_hex(3)
        self.inside, self.outside = f"cprb{tag}a", f"cprb{tag}b"  # 11 characters: under IFNAMSIZ

    def __enter__(self):
        if not os.path.isdir(f"/sys/class/net/{self.bridge}/bridge"):
            raise SystemExit(f"no bridge {self.bridge} on this host")
        _ip("link", "add", self.inside, "type", "veth", "peer", "name", self.outside)
        try:
            for end in (self.inside, self.outside):  # no router solicitations or DAD of our own on the LAN
                with open(f"/proc/sys/net/ipv6/conf/{end}/disable_ipv6", "w") as f:
                    f.write("1")
            _ip("link", "set", self.outside, "master", self.bridge, "up")
            _ip("link", "set", self.inside, "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        subprocess.run(["ip", "link", "del", self.inside], capture_output=True)  # takes its peer with it

    @property
    def mac(self) -> str:
        with open(f"/sys/class/net/{self.inside}/address") as f:
            return f.read().strip()


def _wait_forwarding(bridge: str, port: str) -> None:
    """A new bridge port may spend the forward delay listening; wait (bounded) until it forwards."""
    path = f"/sys/class/net/{bridge}/brif/{port}/state"
    deadline = time.monotonic() + 35
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                if f.read().strip() == "3":  # BR_STATE_FORWARDING
                    return
        except OSError:
            return
        time.sleep(0.1)
    raise SystemExit(f"port {port} of {bridge} never started forwarding")


def arp(port: Port, addresses: list[str], timeout: float, tries: int) -> dict[str, list[str]]:
    from scapy.all import ARP, Ether, conf, srp

    conf.verb = 0
    probes = [Ether(dst="ff:ff:ff:ff:ff:ff", src=port.mac) / ARP(op=1, hwsrc=port.mac, psrc="0.0.0.0", pdst=a)
              for a in addresses]
    seen: dict[str, set[str]] = {a: set() for a in addresses}
    for _ in range(tries):
        answered, _unanswered = srp(probes, iface=port.inside, timeout=timeout, multi=True)
        for _sent, reply in answered:
            if reply[ARP].op == 2 and reply[ARP].psrc in seen:
                seen[reply[ARP].psrc].add(reply[ARP].hwsrc.lower())
        if any(seen.values()) and len(addresses) == 1:
            break
    return {a: sorted(macs) for a, macs in seen.items()}


def dhcp(port: Port, timeout: float) -> list[dict]:
    from scapy.all import BOOTP, DHCP, IP, UDP, Ether, conf, srp

    conf.verb = 0
    conf.checkIPaddr = False  # offers come from the server's address, not the broadcast the discover went to
    xid = secrets.randbits(32)
    chaddr = bytes.fromhex(port.mac.replace(":", ""))
    discover = (Ether(dst="ff:ff:ff:ff:ff:ff", src=port.mac) / IP(src="0.0.0.0", dst="255.255.255.255")
                / UDP(sport=68, dport=67) / BOOTP(chaddr=chaddr, xid=xid, flags=0x8000)
                / DHCP(options=[("message-type", "discover"), "end"]))
    answered, _ = srp(discover, iface=port.inside, timeout=timeout, multi=True)
    offers = []
    for _sent, reply in answered:
        if BOOTP not in reply or reply[BOOTP].xid != xid or DHCP not in reply:
            continue
        options = {o[0]: o[1] for o in reply[DHCP].options if isinstance(o, tuple) and len(o) >= 2}
        if options.get("message-type") != 2:  # DHCPOFFER
            continue
        offers.append({"server": str(options.get("server_id", reply[IP].src)), "offered": reply[BOOTP].yiaddr,
                       "mac": reply[Ether].src.lower()})
    return offers


def _address(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise SystemExit(f"not an IPv4 address: {text!r}") from None


def _subnet_hosts(cidr: str) -> list[str]:
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise SystemExit(f"not an IPv4 subnet: {cidr!r}") from None
    if net.num_addresses > MAX_SCAN:
        raise SystemExit(f"subnet {cidr} has more than {MAX_SCAN} addresses: not scanned")
    return [str(a) for a in net.hosts()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="cloudops-packets")
    ap.add_argument("action", choices=("arp", "scan", "dhcp", "survey"))
    ap.add_argument("bridge")
    ap.add_argument("targets", nargs="*")
    ap.add_argument("--timeout", type=float, default=1.0)
    ap.add_argument("--tries", type=int, default=2)
    ap.add_argument("--dhcp-wait", type=float, default=5.0)
    args = ap.parse_args(argv)
    try:
        if args.action in ("scan", "survey"):
            if len(args.targets) > 1 or (args.action == "scan" and not args.targets):
                raise SystemExit(f"{args.action} takes one subnet, got {len(args.targets)}")
            targets = _subnet_hosts(args.targets[0]) if args.targets else []
        else:
            targets = [_address(a) for a in args.targets]
        result = {}
        with Port(args.bridge) as port:
            _wait_forwarding(args.bridge, port.outside)
            if args.action in ("dhcp", "survey"):
                result["offers"] = dhcp(port, args.dhcp_wait)
            if args.action != "dhcp" and targets:
                answers = arp(port, targets, args.timeout, args.tries)
                result["answers"] = {a: macs for a, macs in answers.items() if macs}
            elif args.action != "dhcp":
                result["answers"] = {}
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 1
        raise
    except (ValueError, subprocess.CalledProcessError, OSError, ImportError) as exc:
        detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        print(f"{type(exc).__name__}: {detail}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
