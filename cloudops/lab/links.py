"""Shaped lab links: each host's link to the lab's bridge held to a rate, and delayed where the kernel can.

Without shaping a lab link is a veth pair on one machine: gigabytes per second and a few tens of
microseconds, which says nothing of a datacenter. ``lab.up --link-rate 1gbit [--link-delay 0.25ms]``
puts a qdisc on both ends of every host's link (the machine's side, ``<prefix>-hvN``, shapes what
reaches the host; the host's ``eth0`` what leaves it), so traffic in either direction, control to
host or host to host, crosses at most the rate. The control machine (this machine's own namespace, on the lab's bridge) gets an
uplink of that rate too: the same qdisc on the bridge device itself, whose egress every packet this
machine sends into the lab passes, while traffic between two hosts is bridged from port to port and
never does. So copies from the control machine to eight hosts at once share one link's rate, as they
would from a real control machine, and host-to-host copies do not share it. A delay is netem's, per link and direction: a round
trip between this machine and a host crosses one link twice (2 x delay), one between two hosts two
links twice (4 x delay). Without a delay the qdisc is tbf; with one, netem (delay and rate together).

The shaping is the lab's state (``Lab.link``), written into its inventory (``lab_link``) for the
benchmarks to report, and shown by ``lab.status``. The lab's LAN (``lan0``) is left unshaped.
"""

import re
import subprocess

from cloudops.errors import CloudopsError

_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
RATE_RANGE = (10**6, 100 * 10**9)  # 1 mbit .. 100 gbit: slower would stall the lab's own SSH
DELAY_MAX_MS = 1000.0
TBF_LATENCY = "50ms"  # how long tbf queues a packet before it drops it


def parse_rate(text: str) -> int:
    """``--link-rate`` (tc's units: 100mbit, 1gbit, 2.5gbit) in bits per second; one line when malformed."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)", str(text).strip().lower())
    if not match:
        raise CloudopsError(f"link rate {text!r}: a number and bit, kbit, mbit or gbit (e.g. 1gbit)")
    bps = int(float(match[1]) * _UNITS[match[2]])
    if not RATE_RANGE[0] <= bps <= RATE_RANGE[1]:
        raise CloudopsError(f"link rate {text!r}: from 1mbit to 100gbit")
    return bps


def parse_delay(text: str) -> float:
    """``--link-delay`` (0.25ms, 100us) in milliseconds; one line when malformed."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(us|ms)", str(text).strip().lower())
    if not match:
        raise CloudopsError(f"link delay {text!r}: a number and us or ms (e.g. 0.25ms)")
    ms = float(match[1]) / (1000 if match[2] == "us" else 1)
    if not 0 < ms <= DELAY_MAX_MS:
        raise CloudopsError(f"link delay {text!r}: more than 0 and at most {DELAY_MAX_MS:g}ms")
    return ms


def spec(rate: str | None, delay: str | None) -> dict | None:
    """The lab's link shaping from the options, checked before anything is made; None: unshaped.

    A delay needs netem: a kernel without it (``sch_netem``) refuses it here, in one line."""
    if rate is None and delay is None:
        return None
    if rate is None:
        raise CloudopsError("--link-delay goes with --link-rate (a delay on an unlimited veth says little)")
    link = {"rate": str(rate).strip().lower(), "rate_bps": parse_rate(rate), "delay": None, "delay_ms": None}
    if delay is not None:
        link.update(delay=str(delay).strip().lower(), delay_ms=parse_delay(delay))
        if not netem_available():
            raise CloudopsError("--link-delay needs tc's netem qdisc, and this machine's kernel has none "
                                "(sch_netem); --link-rate alone works (tbf)")
    return link


def describe(link: dict | None) -> str:
    """One line for reports: "1gbit each way, no added delay, control uplink 1gbit", or "unshaped (veth pairs
    on one machine)"."""
    if not link:
        return "unshaped (veth pairs on one machine)"
    delay = f"{link['delay']} added each way per link" if link.get("delay") else "no added delay"
    return f"{link['rate']} each way, {delay}, control uplink {link['rate']}"


def qdisc(link: dict) -> list[str]:
    """tc's arguments after ``qdisc replace dev DEV root``."""
    if link.get("delay_ms"):
        return ["netem", "delay", f"{link['delay_ms']}ms", "rate", str(link["rate_bps"]), "limit", "10000"]
    burst = max(128 * 1024, link["rate_bps"] // 8 // 250)  # a kernel tick's worth of bytes, and a GSO packet
    return ["tbf", "rate", str(link["rate_bps"]), "burst", str(burst), "latency", TBF_LATENCY]


def apply(lab) -> None:
    """Shape both ends of every host's link and the control machine's uplink (the bridge's egress, ``lab.link``);
    nothing to do for an unshaped lab."""
    if not lab.link:
        return
    args = qdisc(lab.link)
    _tc(["tc", "qdisc", "replace", "dev", lab.bridge, "root", *args])
    for host in lab.hosts:
        _tc(["tc", "qdisc", "replace", "dev", host.veth, "root", *args])
        _tc(["ip", "netns", "exec", host.namespace, "tc", "qdisc", "replace", "dev", "eth0", "root", *args])


def shown(lab) -> dict:
    """What ``lab.status`` says of the links: the shaping asked for, the qdisc found on each host's ends and on
    the control machine's uplink (the lab's bridge)."""
    found = {}
    for host in lab.hosts:
        outside = _run(["tc", "qdisc", "show", "dev", host.veth, "root"])
        inside = _run(["ip", "netns", "exec", host.namespace, "tc", "qdisc", "show", "dev", "eth0", "root"])
        found[host.name] = {"to_host": _kind(outside), "from_host": _kind(inside)}
    control = _kind(_run(["tc", "qdisc", "show", "dev", lab.bridge, "root"]))
    return {"shaping": describe(lab.link), "qdiscs": found, "control_uplink": control}


def _kind(text: str) -> str:
    words = text.split()
    return words[1] if len(words) > 1 else "none"


def netem_available() -> bool:
    """Whether the kernel has netem: tried on the loopback of a throwaway network namespace."""
    ns = "cloudops-netem-check"
    _run(["ip", "netns", "add", ns])
    try:
        return subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                               "delay", "1ms"], capture_output=True).returncode == 0
    finally:
        _run(["ip", "netns", "del", ns])


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True).stdout


def _tc(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise CloudopsError(f"shaping the lab's links failed ({' '.join(argv)}): {reason}")
