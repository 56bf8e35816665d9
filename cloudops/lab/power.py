"""A lab host's power: cut it (every process of the host killed at once, as a power loss would) and
bring it back (its daemons started again on the same disks).

Off keeps the host's namespaces and files (its anchor process holds them, as a powered-off
machine keeps its disks): libvirtd, virtlogd, virtlockd, sshd, every QEMU and dnsmasq get SIGKILL, by pid,
with no chance to clean up. On starts virtlogd, virtlockd, libvirtd and sshd again inside the same
namespaces; libvirtd finds its domain definitions, their QEMUs gone. Both are idempotent, so
``off`` serves as the lab's ``fence_command``::

    fence_command: [/path/to/python, -m, cloudops.lab.power, off, --prefix, co, "{host}"]
"""

import argparse
import signal
import sys
import time
from pathlib import Path

from cloudops.errors import CloudopsError
from cloudops.lab import hosts as lab_hosts


VIRTLOCKD_SOCKET_WAIT = ("i=0; while ! virt-admin -c virtlockd:///system srv-list >/dev/null 2>&1 && [ $i -lt 100 ]; "
                         "do sleep 0.1; i=$((i+1)); done")


def _host(prefix: str, name: str):
    lab = lab_hosts.load(prefix)
    if lab is None:
        raise CloudopsError(f"lab {prefix!r} is not up")
    return lab, lab.host(name)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _kept(host) -> set[int]:
    """The anchor and its ancestors inside the namespace: what holds the host's namespaces open."""
    anchor = host.pids.get("anchor")
    return {anchor, _parent(anchor)} if anchor and not host.bare else set()


def power_off(prefix: str, name: str) -> list[int]:
    """Kill every process of the lab host but its anchor, at once; the pids killed (none: it was off)."""
    _lab, host = _host(prefix, name)
    victims = [p for p in lab_hosts.namespace_pids(host.namespace) if p not in _kept(host)]
    for pid in victims:
        lab_hosts._signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(lab_hosts._alive(p) for p in victims):
        time.sleep(0.05)
    return victims


def is_off(prefix: str, name: str) -> bool:
    _lab, host = _host(prefix, name)
    return not [p for p in lab_hosts.namespace_pids(host.namespace) if p not in _kept(host)]


def power_on(prefix: str, name: str) -> dict:
    """Start the host's daemons again (a host that runs is left alone); their pids."""
    lab, host = _host(prefix, name)
    if not is_off(prefix, name):
        return dict(host.pids)
    hdir = Path(host.dir)
    steps = [("sshd", ["/usr/sbin/sshd", "-f", lab_hosts.inside(host, "sshd_config")])]
    if not host.bare:
        steps = [("virtlogd", ["virtlogd", "-d", "-p", lab_hosts.inside(host, "virtlogd.pid")]),
                 # before libvirtd: its lock manager (lockd) connects to virtlockd at its start
                 ("virtlockd", ["virtlockd", "-d", "-p", lab_hosts.inside(host, "virtlockd.pid")]),
                 ("libvirtd", ["libvirtd", "-d", "-p", lab_hosts.inside(host, "libvirtd.pid")]), *steps]
    for daemon, argv in steps:
        (hdir / f"{daemon}.pid").unlink(missing_ok=True)
        lab_hosts._sh(*lab_hosts.enter(host), *argv)
        lab_hosts._wait_for(lambda: lab_hosts._read_pid(hdir / f"{daemon}.pid"), 15, f"{daemon} pid on {host.name}")
        host.pids[daemon] = lab_hosts._read_pid(hdir / f"{daemon}.pid")
        if daemon == "virtlockd":  # its socket, left by the killed one, is bound again a moment after the pid
            lab_hosts._sh(*lab_hosts.enter(host), "sh", "-c", VIRTLOCKD_SOCKET_WAIT)
    lab_hosts._wait_for(lambda: lab_hosts._port_open(host.address), 20, f"sshd on {host.name}")
    if not host.bare:
        lab_hosts._wait_for(lambda: lab_hosts._libvirt_answers(host), 30, f"libvirtd on {host.name}", 0.3)
    lab_hosts._save(lab)
    return dict(host.pids)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloudops.lab.power", description=__doc__.splitlines()[0])
    parser.add_argument("state", choices=("off", "on"))
    parser.add_argument("host")
    parser.add_argument("--prefix", default=lab_hosts.DEFAULT_PREFIX)
    args = parser.parse_args(argv)
    try:
        if args.state == "off":
            killed = power_off(args.prefix, args.host)
            print(f"{args.host}: powered off ({len(killed)} processes killed)" if killed
                  else f"{args.host}: already off, nothing to do")
        else:
            power_on(args.prefix, args.host)
            print(f"{args.host}: powered on")
    except CloudopsError as exc:
        print(f"cloudops: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
