"""Where a VM is after a migration fault: every host involved asked again, one verdict in one line.

A fault (a daemon killed, a link cut, Ctrl-C) leaves a migration's outcome
unknown until both hosts have been asked. ``where`` asks them in parallel, each on
a connection proven alive (a dead cached one is replaced) and within a timeout,
and returns what every host has: its copy of the domain with the state and the
reason libvirt gives (post-copy failed, paused by the migration, ...), or why the
host could not be asked. Nothing here changes anything.
"""

from dataclasses import dataclass, field

import libvirt

from cloudops import fleet, virt

RUNNING, PAUSED, SHUTOFF = "running", "paused", "shut off"
_STATES = {libvirt.VIR_DOMAIN_RUNNING: RUNNING, libvirt.VIR_DOMAIN_PAUSED: PAUSED,
           libvirt.VIR_DOMAIN_SHUTOFF: SHUTOFF, libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
           libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended"}
_POSTCOPY_FAILED = {(libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED),
                    (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY_FAILED)}
_POSTCOPY = {(libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY),
             (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY)}


@dataclass
class Copy:
    """A host's domain of that name."""

    host: str
    state: str
    reason: int
    persistent: bool
    postcopy: bool = False  # in post-copy now
    postcopy_failed: bool = False  # post-copy broke: libvirt can resume it (--postcopy-resume)
    migrating: bool = False  # paused by a migration (the incoming side, or the source at switchover)

    def label(self) -> str:
        if self.postcopy_failed:
            return f"{self.state} (post-copy failed)"
        if self.postcopy:
            return f"{self.state} (in post-copy)"
        if self.migrating:
            return f"{self.state} (by the migration)"
        return self.state


@dataclass
class Where:
    name: str
    copies: dict[str, Copy] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)

    @property
    def known(self) -> bool:
        return not self.unreachable

    def running(self) -> list[str]:
        """Hosts where the VM runs for sure (post-copy targets count: their vCPUs run)."""
        return [h for h, c in self.copies.items() if c.state == RUNNING and not c.postcopy_failed]

    def postcopy_failed(self) -> list[str]:
        return [h for h, c in self.copies.items() if c.postcopy_failed]

    def describe(self) -> str:
        """``t1 runs on hv2, paused (post-copy failed) on hv1; hv3 does not answer``."""
        parts = []
        for host, copy in self.copies.items():
            parts.append(f"runs on {host}" if copy.state == RUNNING and not (copy.postcopy_failed or copy.postcopy)
                         else f"is {copy.label()} on {host}")
        if not self.copies:
            parts.append("is on no host that answered")
        text = f"{self.name} " + ", ".join(parts)
        if self.unreachable:
            text += "; " + ", ".join(f"{h} does not answer ({why})" for h, why in self.unreachable.items())
        return text


def copy_of(dom, host_name: str) -> Copy:
    state, reason = dom.state()
    return Copy(host=host_name, state=_STATES.get(state, str(state)), reason=reason,
                persistent=bool(dom.isPersistent()), postcopy=(state, reason) in _POSTCOPY,
                postcopy_failed=(state, reason) in _POSTCOPY_FAILED,
                migrating=(state, reason) == (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION))


def where(name: str, hosts: list, timeout: float = 20) -> Where:
    """Ask every host in ``hosts`` (in parallel, each within ``timeout`` seconds) what it has of ``name``."""

    def ask(host):
        conn = virt.connection(host)
        try:
            return copy_of(conn.lookupByName(name), host.name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None  # none, or an incoming copy that went away between lookup and state
            virt.forget(host)
            raise

    result = fleet.run(hosts, ask, timeout=timeout)
    found = Where(name)
    for host, r in zip(hosts, result):
        if r.status == fleet.FAILED:
            found.unreachable[host.name] = (r.error or "no answer").removeprefix(f"{host.name}: ")
        elif r.value is not None:
            found.copies[host.name] = r.value
    return found
