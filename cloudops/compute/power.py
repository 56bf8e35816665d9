"""Power verbs for a VM cloudops made: power a stopped one on again, reboot a running one, force one off.

Each verb acts only when it has to and says so: powering on a running VM, or forcing off a
stopped one, changes nothing and returns ``changed=False``. They hold the VM's name lock
(``vms._name_lock``), so they never race a start, a delete or a migration of the same name;
a VM with an unfinished migration is refused (``vm.migrate NAME --recover`` first), and so is
any domain cloudops did not make (``vms.made_by_cloudops``).

How a reboot is seen to be done, from outside the guest: its kernel's boot id
(``/proc/sys/kernel/random/boot_id``, new at every boot) read over SSH through the
hypervisor, at the VM's own address, before and after. An ACPI reboot (libvirt presses the
power button and restarts QEMU's guest when it powers off) that has not taken the guest down
within the grace time falls back to a hard reset.
"""

import contextlib
import time
from dataclasses import dataclass

import libvirt

from cloudops import state, virt
from cloudops.compute import guest, records, vms
from cloudops.errors import CloudopsError
from cloudops.net import ipam, networks
from cloudops.ssh import connect

MIGRATING = "migrating/"  # the migration journal's records (cloudops.migration.journal), read here, never written


@dataclass
class PowerResult:
    vm: vms.VM
    changed: bool
    action: str    # what was done: "powered on", "rebooted", "reset", "destroyed", or "none"
    message: str   # one line for the operator
    uptime: float | None = None  # a rebooted guest's uptime once it was back (seconds)

    def to_dict(self) -> dict:
        extra = {"uptime": self.uptime} if self.uptime is not None else {}
        return {**self.vm.to_dict(), "changed": self.changed, "action": self.action, "message": self.message, **extra}


def _foreign(name: str, host_name: str, doing: str) -> CloudopsError:
    return CloudopsError(f"VM {name!r} on {host_name} was not made by cloudops (no cloudops metadata): "
                         f"refusing to {doing}")


def _refuse_unsettled_migration(name: str) -> None:
    if state.current().value(MIGRATING + name) is not None:
        raise CloudopsError(f"VM {name} has an unfinished migration: run `invoke vm.migrate {name} --recover` first")


@contextlib.contextmanager
def _own_vm(name: str, hosts: list, doing: str):
    """(host, libvirt connection, domain) of the cloudops VM ``name``, under its name lock."""
    vms.validate_name(name)
    with vms._name_lock(name):
        host = vms.locate(name, hosts)
        _refuse_unsettled_migration(name)
        with virt.open_host(host) as conn:
            dom = conn.lookupByName(name)
            if not vms.made_by_cloudops(dom):
                raise _foreign(name, host.name, doing)
            yield host, conn, dom


def _allocations(vm: vms.VM, host, extra_networks=()) -> list:
    """[(network spec, IPAM allocation)] of each of a VM's NICs, the primary first, checked against what
    its domain says."""
    if not (vm.network and vm.ip and vm.mac):
        raise CloudopsError(f"VM {vm.name} has no network address in its cloudops metadata: cannot give it its address")
    found = []
    for nic in vm.nics:
        net = vms.network_spec(nic["network"], host, extra_networks)
        allocation = ipam.lookup(net, vm.name)
        if allocation is None:
            raise CloudopsError(f"VM {vm.name}'s address {nic['ip']} is no longer allocated to it on network "
                                f"{net.name} (see state.check): not starting it, another VM may have that address now")
        if (allocation.ip, allocation.mac.lower()) != (nic["ip"], (nic["mac"] or "").lower()):
            raise CloudopsError(f"VM {vm.name}: IPAM allocates it {allocation.ip} ({allocation.mac}) on {net.name}, "
                                f"but its domain has {nic['ip']} ({nic['mac']}): not starting it (see state.check)")
        found.append((net, allocation))
    return found


def ensure_nics(conn, name: str, nics, progress=lambda m: None) -> None:
    """Each NIC's network active and its DHCP reservation there (re-added from IPAM's allocation when missing)."""
    for net, allocation in nics:
        changed, message = networks.ensure_network(conn, net)
        if changed:
            progress(message)
        added, message = networks.add_reservation(conn, net.name, allocation.mac, allocation.ip, name)
        if added:
            progress(f"{message} (it was missing)")


# ---------------------------------------------------------------- power on

def poweron_vm(name: str, inventory, hosts: list | None = None, wait: bool = True, timeout: float = 180,
               progress=lambda m: None, extra_networks=()) -> PowerResult:
    """Start a defined, stopped cloudops VM on the host that has it, with its own address.

    Its network is made sure to be active and its DHCP reservation there (re-added from the
    IPAM allocation when missing); then, unless ``wait`` is false, it waits like ``vm.start``
    for the address, the host key on the console and SSH. A running VM changes nothing
    (``changed=False``): powering on is idempotent. A paused or otherwise not stopped VM
    is refused."""
    hosts = hosts or inventory.hypervisors()
    with _own_vm(name, hosts, "power it on") as (host, conn, dom):
        vm = vms.describe(dom, host.name)
        if dom.isActive():
            if vm.state != "running":
                raise CloudopsError(f"VM {name} on {host.name} is {vm.state}, not stopped: not powering it on")
            return PowerResult(vm, False, "none", f"{name} on {host.name}: already running, nothing to do")
        nics = _allocations(vm, host, extra_networks)
        ensure_nics(conn, name, nics, progress)
        net, allocation = nics[0]
        progress(f"starting {name} on {host.name}")
        dom.create()
        records.set_running(name, True)  # a failover starts it again
        if not wait:
            return PowerResult(vms.describe(dom, host.name), True, "powered on",
                               f"{name} on {host.name}: powered on at {allocation.ip} (not waiting for SSH)")
        progress(f"waiting for {name} at {allocation.ip}")
        with connect(host) as hv:
            try:
                vms.wait_ready(dom, conn, hv, net.name, allocation, name, timeout, progress,
                               static=net.mode == "bridge")
            except CloudopsError as exc:
                raise CloudopsError(f"{name} was powered on on {host.name} but is not ready: {exc}") from None
        return PowerResult(vms.describe(dom, host.name), True, "powered on",
                           f"{name} on {host.name}: powered on, SSH answers at {allocation.ip}")


# ---------------------------------------------------------------- reboot

BOOT_PROBE = "cat /proc/sys/kernel/random/boot_id /proc/uptime"


def parse_probe(text: str) -> tuple[str, float] | None:
    """(boot id, uptime seconds) from the output of ``BOOT_PROBE``; None when it is not that."""
    lines = text.split()
    if len(lines) < 2:
        return None
    try:
        return lines[0], float(lines[1])
    except ValueError:
        return None


def reboot_progress(before: str | None, now: str | None) -> str:
    """Where a reboot stands, from the boot id before it and the one read now (None: no answer).

    "back" (a new boot answers), "down" (the old boot no longer answers), or "waiting"."""
    if now is not None and now != before:
        return "back"
    if now is None and before is not None:
        return "down"
    return "waiting"


UNSURE = ("?", None)  # SSH port open, but the boot id could not be read: neither old, new nor down


def _probe(hv, ip: str):
    """The guest's (boot id, uptime) over SSH; None when nothing answers at its SSH port, else ``UNSURE``."""
    if not guest.ssh_banner(hv, ip, timeout=2):
        return None
    try:
        with guest.connect_vm(hv, ip, timeout=5) as conn:
            result = conn.run(BOOT_PROBE, hide=True, warn=True, in_stream=False, timeout=10)
    except Exception:  # noqa: BLE001 - a probe: a guest going down or coming up fails in many ways
        return UNSURE
    return (parse_probe(result.stdout) if result.ok else None) or UNSURE


def _wait_for(dom, hv, ip, before, want: tuple[str, ...], timeout: float):
    """Poll the guest until ``reboot_progress`` is one of ``want``; (stage, probe), or (None, None) at timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if not dom.isActive():
            raise CloudopsError(f"{dom.name()} powered off instead of rebooting")
        probe = _probe(hv, ip)
        stage = "waiting" if probe is UNSURE else reboot_progress(before, probe[0] if probe else None)
        if stage in want:
            return stage, probe
        if time.monotonic() >= deadline:
            return None, None
        time.sleep(0.5)


def _acpi_shutdown(dom, timeout: float) -> bool:
    """The ACPI power button, then wait up to ``timeout`` for the domain to stop; whether it did.

    Not libvirt's ACPI reboot (``VIR_DOMAIN_REBOOT_ACPI_POWER_BTN``): that is a "fake reboot" (the guest
    shuts down, QEMU is reset and resumed), and with disk leases (lockd) libvirt 9.0 fails to take the
    leases again at the resume and destroys the VM ("Lockspace resource ... is locked"). A shutdown and
    a start take them afresh, and also apply what waits for the next power-on (vm.resize beyond the
    maximum)."""
    with contextlib.suppress(libvirt.libvirtError):  # it may be going down already
        dom.shutdown()
    deadline = time.monotonic() + timeout
    while dom.isActive() and time.monotonic() < deadline:
        time.sleep(0.3)
    return not dom.isActive()


def reboot_vm(name: str, hosts: list, force: bool = False, timeout: float = 60, wait_timeout: float = 180,
              progress=lambda m: None) -> PowerResult:
    """Reboot a running cloudops VM and wait until it is back at its address (a new boot id over SSH).

    ACPI reboot first (the power button, then a start: ``_acpi_shutdown`` says why); a hard reset when
    the guest has not gone down within ``timeout``, or was not back within ``wait_timeout``. ``force``: the hard
    reset at once. A VM that is not running is an error: there is nothing to reboot."""
    with _own_vm(name, hosts, "reboot it") as (host, _conn, dom):
        vm = vms.describe(dom, host.name)
        if vm.state != "running":
            raise CloudopsError(f"VM {name} on {host.name} is {vm.state}: nothing to reboot (vm.poweron starts it)")
        if not vm.ip:
            raise CloudopsError(f"VM {name} has no known address: cannot tell when it is back")
        with connect(host) as hv:
            before = _probe(hv, vm.ip)
            before_id = before[0] if before and before is not UNSURE else None
            if before_id is None:
                progress(f"{name} does not answer SSH at {vm.ip} now; rebooting it anyway")
            stage, probe, action = None, None, "reset"
            if not force:
                progress(f"ACPI reboot of {name} on {host.name}: shut down, then started again (reset if not down "
                         f"within {timeout:g}s)")
                if _acpi_shutdown(dom, timeout):
                    dom.create()
                    stage, probe = _wait_for(dom, hv, vm.ip, before_id, ("back",), wait_timeout)
                    if stage is None:
                        progress(f"{name} was started again but was not back within {wait_timeout:g}s; resetting it")
                else:
                    progress(f"{name} did not go down within {timeout:g}s of the ACPI power button; resetting it")
                if stage == "back":
                    action = "rebooted"
            if stage != "back":
                if force:
                    progress(f"resetting {name} on {host.name}")
                dom.reset(0)
                stage, probe = _wait_for(dom, hv, vm.ip, before_id, ("back",), wait_timeout)
                if stage is None:
                    raise CloudopsError(f"{name} was reset on {host.name} but did not answer SSH at {vm.ip} "
                                        f"with a new boot within {wait_timeout:g}s")
        how = "rebooted (ACPI)" if action == "rebooted" else "reset"
        return PowerResult(vms.describe(dom, host.name), True, action,
                           f"{name} on {host.name}: {how}, back at {vm.ip} (uptime {probe[1]:.1f}s)", uptime=probe[1])


# ---------------------------------------------------------------- force off

def force_stop_vm(name: str, hosts: list, progress=lambda m: None) -> PowerResult:
    """Destroy (pull the plug on) a running cloudops VM at once, no ACPI wait; a stopped one changes nothing."""
    with _own_vm(name, hosts, "force it off") as (host, _conn, dom):
        if not dom.isActive():
            return PowerResult(vms.describe(dom, host.name), False, "none",
                               f"{name} on {host.name}: already stopped, nothing to do")
        progress(f"destroying {name} on {host.name} (--force: no ACPI shutdown)")
        dom.destroy()
        records.set_running(name, False)
        return PowerResult(vms.describe(dom, host.name), True, "destroyed",
                           f"{name} on {host.name}: stopped at once (--force)")
