"""Facts for failure detection: does each hypervisor answer over SSH and over libvirt, within a timeout.

All hosts are asked at once (``fleet.run``), each with its own deadline, so one host that hangs
costs one timeout, not one per host. A host is *missing* only when neither answers: a host whose
sshd answers but whose libvirtd does not may still run its VMs (QEMU outlives libvirtd), so it is
reported degraded, never declared dead. Nor is a host that answers with an SSH host key that is
not the trusted one (``untrusted``): something answers at its address, maybe the host reinstalled,
maybe an impostor; fencing or restarting on that evidence is a person's decision, not a watcher's.
"""

from dataclasses import asdict, dataclass

import libvirt

from cloudops import fleet, ssh, virt
from cloudops.errors import CloudopsError

DEFAULT_TIMEOUT = 5.0


@dataclass
class Probe:
    host: str
    ssh: bool
    libvirt: bool
    error: str = ""
    untrusted: bool = False  # it answered with a host key that is not the trusted one

    @property
    def missing(self) -> bool:
        return not (self.ssh or self.libvirt or self.untrusted)

    @property
    def status(self) -> str:
        if self.untrusted:
            return "untrusted"
        return "missing" if self.missing else "up" if self.ssh and self.libvirt else "degraded"

    def to_dict(self) -> dict:
        return {**asdict(self), "status": self.status}


KEY_MARKS = ("SSH host key", "host key not verified")  # what ssh.describe and virt.open_error say of a wrong key


def _ssh_answers(host, timeout: float) -> str:
    """'' when ``true`` runs on the host over SSH, else why not."""
    try:
        with ssh.connect(host, timeout=timeout) as conn:
            conn.run(fleet.bounded("true", timeout), hide=True, warn=False, in_stream=False, timeout=timeout + 2)
        return ""
    except Exception as exc:  # noqa: BLE001 - any failure to answer is the fact we are after
        return f"ssh: {ssh.describe(exc)}"


def untrusted_key(error: str) -> bool:
    """Whether a probe's error says the host answered with a host key cloudops does not trust."""
    return any(mark in error for mark in KEY_MARKS)


def _libvirt_answers(host) -> str:
    """'' when the host's libvirtd answers a call now (a cached connection is asked, and dropped if dead)."""
    try:
        with virt.open_host(host) as conn:
            conn.getLibVersion()
        return ""
    except (libvirt.libvirtError, CloudopsError) as exc:
        virt.forget(host)
        text = exc.get_error_message() if isinstance(exc, libvirt.libvirtError) else str(exc)
        return f"libvirt: {(text or type(exc).__name__).strip().splitlines()[-1]}"


def probe_one(host, timeout: float = DEFAULT_TIMEOUT) -> Probe:
    ssh_error = _ssh_answers(host, timeout)
    libvirt_error = _libvirt_answers(host)
    error = "; ".join(e for e in (ssh_error, libvirt_error) if e)
    return Probe(host.name, not ssh_error, not libvirt_error, error, untrusted=untrusted_key(error))


def probe_all(hosts: list, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Probe]:
    """A Probe per host, asked in parallel; a host whose probe itself timed out is missing."""
    result = fleet.run(hosts, lambda h: probe_one(h, timeout), workers=max(1, min(32, len(hosts))),
                       timeout=3 * timeout + 5)
    probes = {}
    for r in result:
        probes[r.host] = r.value if r.status != fleet.FAILED and r.value is not None else \
            Probe(r.host, False, False, r.error or "probe failed")
    return probes
