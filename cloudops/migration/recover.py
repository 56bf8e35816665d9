"""Recover a VM whose migration broke: resume a broken post-copy, then clean the side that does not run.

``recover_vm`` asks every hypervisor where the VM is (``migrate_outcome.where``)
and acts only on an outcome it can be sure of:

* post-copy still running in QEMU: wait for it (bounded by ``timeout``);
* post-copy failed (both sides say so): libvirt's post-copy recovery
  (``migrateToURI3`` with ``VIR_MIGRATE_POSTCOPY_RESUME``) from the source;
* exactly one copy runs (or, with none running, exactly one is paused, which is
  resumed, or exactly one is defined): that copy is the VM. It is made persistent
  and given its DHCP reservation; every other host's copy is destroyed and
  undefined, and the disks a failed move left there are deleted, but never a
  disk on storage the surviving host also sees, nor one a domain there uses;
* anything else (two running copies, a host that does not answer): refused in
  one line, nothing changed.

The migration journal (``migrate_journal``) names the two hosts and what was
prepared; without a record every hypervisor is examined.
"""

import contextlib
import json
import os
import shlex
import time
from dataclasses import dataclass, field

import libvirt

from cloudops import storage, virt
from cloudops.compute import records, vms
from cloudops.errors import CloudopsError
from cloudops.migration import journal, migrate, outcome
from cloudops.net import networks
from cloudops.ssh import connect


@dataclass
class Recovery:
    name: str
    host: str | None  # where the VM runs (or is defined) afterwards
    state: str | None
    actions: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.actions)

    def to_dict(self) -> dict:
        return {"name": self.name, "host": self.host, "state": self.state, "changed": self.changed,
                "actions": self.actions}

    def summary(self) -> str:
        if not self.actions:
            return f"nothing to recover: {self.name} is {self.state} on {self.host}, and no host holds a leftover"
        return f"{self.name} is {self.state} on {self.host}: " + "; ".join(self.actions)


def recover_vm(name: str, inventory, *, timeout: float = 300, restart: bool = False,
               message=lambda m: None) -> Recovery:
    """Bring VM ``name`` back to exactly one copy after a broken migration (see the module docstring).

    ``restart``: a copy left paused by a post-copy whose target copy is gone (its newest memory went
    with the target) is destroyed and started again from its disk; without it that is refused."""
    try:
        report = _recover(name, inventory, timeout, restart, message)
        from cloudops.migration import snapcarry

        snapcarry.restore(name, inventory.hypervisors(), message)  # snapshots a broken migration carried
        return report
    except libvirt.libvirtError as exc:
        text = (exc.get_error_message() or str(exc)).strip().splitlines()
        raise CloudopsError(f"recovering {name} stopped: {text[-1] if text else exc}; "
                            "nothing else was changed, run --recover again once the cause is fixed") from None


def _recover(name, inventory, timeout, restart, message) -> Recovery:
    vms.validate_name(name)
    hypervisors = inventory.hypervisors()
    record = journal.read(name) or {}
    involved = [h for h in hypervisors if h.name in (record.get("source"), record.get("target"))] or hypervisors
    actions: list[str] = []
    with vms._name_lock(name):
        deadline = time.monotonic() + timeout
        settle_until = time.monotonic() + min(30, timeout)
        forced = None
        watch = _PostcopyWatch(name, record, inventory, message)
        while True:
            where = outcome.where(name, hypervisors)
            missing = [h.name for h in involved if h.name in where.unreachable]
            if missing or (not where.copies and where.unreachable):
                raise CloudopsError(f"cannot recover {name} yet: {where.describe()}; run again once "
                                    f"{', '.join(missing or where.unreachable)} answer(s)")
            if not where.copies:
                journal.end(name)
                raise CloudopsError(f"unknown VM {name!r}: no host has it")
            busy = [c for c in where.copies.values() if c.postcopy]
            failed = where.postcopy_failed()
            incoming = [c for c in where.copies.values() if c.migrating] if where.running() else []
            if incoming and time.monotonic() < settle_until:
                message(f"waiting for the copy a migration left paused to go: {where.describe()}")
                time.sleep(2)
                continue  # an aborted migration's incoming copy is torn down by libvirt in a moment
            if not busy and not failed:
                break
            if failed and not busy:
                verdict = _resume_postcopy(name, record, where, inventory, message)
                if verdict == "resumed":
                    actions.append("resumed the broken post-copy")
                    continue
                if verdict == "completed":  # QEMU finished the move; only libvirt's bookkeeping broke
                    forced = record["target"]
                    break
                if verdict == "orphaned":
                    (host_name,) = failed
                    actions.append(_restart_orphan(name, inventory.hosts[host_name], restart, message))
                    continue
            if busy and not failed:
                verdict = watch.look(where)
                if verdict == "completed":  # QEMU finished the move; libvirt lost track when its daemon died
                    message(f"QEMU on {record['source']} finished the post-copy; libvirt had lost track of it")
                    forced = record["target"]
                    break
                if verdict == "stalled":
                    actions.append(f"paused the post-copy that made no progress for {STALL_AFTER:g}s, to resume it")
                    continue
            if time.monotonic() > deadline:
                raise CloudopsError(f"cannot recover {name} within {timeout:g}s: {where.describe()}"
                                    f"{watch.describe()}")
            message(f"waiting for the migration still running in QEMU: {where.describe()}{watch.describe()}")
            time.sleep(3)
        survivor = forced or _survivor(name, where, record)
        host = inventory.hosts[survivor]
        actions += _settle_survivor(name, host, where.copies[survivor], message, restart)
        for other in hypervisors:
            if other.name == survivor:
                continue
            if other.name in where.copies or other.name in (record.get("source"), record.get("target")):
                actions += _clean_other(name, other, host, record, where.copies.get(other.name), message)
        journal.end(name)
        _record(host, name)
        final = outcome.where(name, [host]).copies.get(survivor)
    return Recovery(name=name, host=survivor, state=final.state if final else None, actions=actions)


def _survivor(name, where, record) -> str:
    running = where.running()
    if len(running) == 1:
        return running[0]
    if len(running) > 1:
        raise CloudopsError(f"{name} runs on {' and '.join(running)}: cloudops cannot tell which copy is "
                            "the VM; stop the one that must not run (`virsh destroy`), then run --recover again")
    paused = [h for h, c in where.copies.items() if c.state == outcome.PAUSED]
    if len(paused) == 1 and all(c.state == outcome.SHUTOFF for h, c in where.copies.items() if h != paused[0]):
        return paused[0]
    if record.get("phase") == "cleaning the source" and record.get("target") in where.copies:
        return record["target"]  # an offline move that defined the target and failed before undefining the source
    if len(where.copies) == 1:
        return next(iter(where.copies))
    raise CloudopsError(f"{where.describe()}: cloudops cannot tell which copy is the VM; start the right one "
                        "(`virsh start`) and run --recover again")


def _resume_postcopy(name, record, where, inventory, message) -> str:
    """libvirt's post-copy recovery, from the source the journal names: "resumed"; "running" when the
    migration still runs in QEMU (try again later); "completed" when QEMU on the source reports the
    migration completed (the target has all of the VM; libvirt only lost track); "orphaned" when the
    only copy left is the post-copy's source (the target copy is gone)."""
    source, target = record.get("source"), record.get("target")
    if len(where.copies) == 1 and len(where.postcopy_failed()) == 1:
        return "orphaned"  # the other side of the post-copy is gone
    if source not in where.copies or target not in where.copies:
        raise CloudopsError(f"{where.describe()}: post-copy failed but the migration journal does not name its "
                            "two hosts; resume it by hand (`virsh migrate --postcopy --postcopy-resume`)")
    src, dst = inventory.hosts[source], inventory.hosts[target]
    message(f"resuming the post-copy migration of {name} from {source} to {target}")
    with virt.open_host(src) as conn:
        dom = conn.lookupByName(name)
        disks = migrate._disks(conn, dom)
        shared = bool(record.get("shared"))
        policy = migrate.Policy()
        flags = migrate._flags(shared, policy, bool(record.get("shared_path"))) | libvirt.VIR_MIGRATE_POSTCOPY_RESUME
        status = _qemu_migration_status(dom)
        if status == "completed":
            return "completed"
        if status in ("active", "postcopy-active", "device", "pre-switchover", "postcopy-recover"):
            return "running"
        try:
            dom.migrateToURI3(migrate.migration_uri(dst), migrate._params(dst, shared, disks, policy), flags)
        except libvirt.libvirtError as exc:
            text = exc.get_error_message() or str(exc)
            if "still running" in text:
                return "running"
            if _qemu_migration_status(dom) == "completed":
                return "completed"
            raise CloudopsError(f"resuming the post-copy migration of {name} failed: {text.strip()}") from None
    return "resumed"


def _qemu_migration(dom) -> dict:
    """QEMU's own view of the outgoing migration (``query-migrate``): its status (completed,
    postcopy-active, postcopy-paused, ...) and RAM counters; {} when QEMU cannot be asked."""
    try:
        import libvirt_qemu

        reply = libvirt_qemu.qemuMonitorCommand(dom, '{"execute": "query-migrate"}', 0)
    except (ImportError, libvirt.libvirtError):
        return {}
    return json.loads(reply).get("return") or {}


def _qemu_migration_status(dom) -> str | None:
    return _qemu_migration(dom).get("status")


STALL_AFTER = 60  # seconds a post-copy may go without moving a byte before it is paused and resumed


class _PostcopyWatch:
    """A post-copy that libvirt still shows running, looked at through QEMU on the source.

    ``look`` says "completed" when QEMU finished the move but libvirt, its daemon killed meanwhile,
    lost track; "stalled" when no byte moved for ``STALL_AFTER`` seconds (the stream is then paused
    with ``abortJobFlags(POSTCOPY)``, which libvirt's post-copy recovery resumes on the next round);
    else "running". ``describe`` is QEMU's word for the error lines."""

    def __init__(self, name, record, inventory, message):
        self.name, self.message, self.inventory = name, message, inventory
        self.source = inventory.hosts.get(record.get("source") or "")
        self.target = record.get("target")
        self.status, self.remaining = None, None
        self._transferred, self._moved_at = None, time.monotonic()

    def look(self, where) -> str:
        if self.source is None or self.source.name not in where.copies or self.target not in where.copies:
            return "running"
        with virt.open_host(self.source) as conn:
            dom = conn.lookupByName(self.name)
            info = _qemu_migration(dom)
            self.status = info.get("status")
            ram = info.get("ram") or {}
            self.remaining = ram.get("remaining")
            if self.status == "completed":  # sent; the target's QEMU must say it has it all too
                return "completed" if self._target_status(where) == "completed" else "running"
            if self.status != "postcopy-active":
                return "running"
            if ram.get("transferred") != self._transferred:
                self._transferred, self._moved_at = ram.get("transferred"), time.monotonic()
                return "running"
            if time.monotonic() - self._moved_at < STALL_AFTER:
                return "running"
            self.message(f"the post-copy of {self.name} moved nothing for {STALL_AFTER:g}s; pausing it to resume it")
            dom.abortJobFlags(libvirt.VIR_DOMAIN_ABORT_JOB_POSTCOPY)
            self._moved_at = time.monotonic()
            return "stalled"

    def _target_status(self, where) -> str | None:
        with virt.open_host(self.inventory.hosts[self.target]) as conn:
            return _qemu_migration_status(conn.lookupByName(self.name))

    def describe(self) -> str:
        if self.status is None:
            return ""
        left = f", {self.remaining // (1 << 20)} MiB of RAM left" if isinstance(self.remaining, int) else ""
        return f" (QEMU on {self.source.name}: {self.status}{left})"


def _settle_survivor(name, host, copy, message, restart: bool = False) -> list[str]:
    """The surviving copy runs, is persistent and keeps its address on its host."""
    done = []
    with virt.open_host(host) as conn:
        dom = conn.lookupByName(name)
        if copy.state == outcome.PAUSED:
            try:
                _resume_paused(name, host, dom, message)
                done.append(f"resumed it on {host.name}")
            except _LeaseGone:
                if not restart:
                    raise
                done.append(_restart_orphan(name, host, restart, message))
        if not dom.isPersistent():
            conn.defineXML(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_MIGRATABLE))
            done.append(f"made its definition on {host.name} persistent")
        for nic in vms.nics_of(virt.metadata(dom)):
            if not (nic["mac"] and nic["ip"]):
                continue
            with contextlib.suppress(CloudopsError):
                added, _ = networks.add_reservation(conn, nic["network"], nic["mac"], nic["ip"], name)
                if added:
                    done.append(f"restored its address reservation on {nic['network']} on {host.name}")
    return done


def _orphan_text(name, host) -> str:
    return (f"{name} is paused on {host.name} after a post-copy whose target copy is gone: what the guest did "
            f"on the target since the switchover is lost; `invoke vm.migrate {name} --recover --restart` starts it "
            f"again from its disk on {host.name}")


def _restart_orphan(name, host, restart, message) -> str:
    """The post-copy's source, left alone: started again from its disk (``restart``), else refused."""
    if not restart:
        raise CloudopsError(_orphan_text(name, host))
    message(f"restarting {name} from its disk on {host.name}")
    with virt.open_host(host) as conn:
        dom = conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        if not dom.isPersistent():
            raise CloudopsError(f"{name} on {host.name} has no persistent definition to start again from")
        dom.create()
    return f"restarted it from its disk on {host.name} (its memory since the switchover was lost)"


_QEMU_MIGRATING = ("setup", "active", "device", "pre-switchover", "cancelling", "wait-unplug")


def _resume_paused(name, host, dom, message) -> None:
    """Resume the one paused copy; an outgoing migration QEMU still has open (its target gone) is cancelled
    first. A copy that QEMU holds in post-copy is not resumed: its newest memory was on the target."""
    status = _qemu_migration_status(dom)
    if status and status.startswith("postcopy"):
        raise CloudopsError(_orphan_text(name, host))
    if status in _QEMU_MIGRATING:
        message(f"cancelling the outgoing migration QEMU still has open for {name} on {host.name} ({status})")
        with contextlib.suppress(libvirt.libvirtError):
            dom.abortJob()
        deadline = time.monotonic() + 60
        while _qemu_migration_status(dom) in _QEMU_MIGRATING and time.monotonic() < deadline:
            time.sleep(1)
    if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
        message(f"resuming {name} on {host.name}")
        try:
            dom.resume()
        except libvirt.libvirtError as exc:
            text = (exc.get_error_message() or "").strip()
            if _lease_refused(text):
                # The disk lease (lockd) is no longer this copy's: libvirt released it when the source paused for
                # the switchover and the post-copy's target took it. Resuming would run stale memory on the
                # disk; only a restart from the disk (whose QEMU takes the lease anew) is safe.
                raise _LeaseGone(f"its disk lease is not with the paused copy (the switchover had happened): "
                                 f"{_orphan_text(name, host)}") from None
            raise CloudopsError(f"cannot resume {name} on {host.name}: {text} "
                                f"(QEMU's migration state: {_qemu_migration_status(dom)})") from None


class _LeaseGone(CloudopsError):
    """The paused copy cannot resume: its disk lease went to the post-copy's target (see _resume_paused)."""


def _lease_refused(text: str) -> bool:
    """virtlockd's refusal of a lease another holder has (libvirt's lockd plugin)."""
    return "Lockspace resource" in text and "is locked" in text


def _remove_copy(conn, name, paths: set) -> bool:
    """Destroy and undefine ``name`` on ``conn`` (its disk paths added to ``paths``); False if it went
    away by itself meanwhile (an incoming copy that libvirt tore down)."""
    try:
        dom = conn.lookupByName(name)
        paths |= set(vms._disk_paths(dom))
        if dom.isActive():
            dom.destroy()
        if dom.isPersistent():
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise
    return True


def _clean_other(name, other, survivor, record, copy, message) -> list[str]:
    """Remove from ``other`` its copy of the VM, the reservation, and leftover disks not shared with the survivor."""
    done = []
    with virt.open_host(survivor) as conn:
        live = conn.lookupByName(name)
        meta = virt.metadata(live)
        paths = set(vms._disk_paths(live))
    paths |= set(record.get("disks") or []) | set(record.get("prepared_files") or [])
    with virt.open_host(other) as conn:
        if copy is not None and _remove_copy(conn, name, paths):
            message(f"removed the copy of {name} that does not run from {other.name}")
            done.append(f"removed the stale copy from {other.name}")
        for nic in vms.nics_of(meta):
            if not nic["mac"]:
                continue
            with contextlib.suppress(CloudopsError):
                removed, _ = networks.remove_reservation(conn, nic["network"], nic["mac"], nic["ip"], name)
                if removed:
                    done.append(f"removed its reservation on {nic['network']} from {other.name}")
        in_use = {p for d in conn.listAllDomains() for p in vms._disk_paths(d)}
    shared = migrate._shared_dirs(survivor, other, {os.path.dirname(p) for p in paths})
    doomed = sorted(p for p in paths if not shared[os.path.dirname(p)] and p not in in_use)
    if doomed:  # one round trip: delete what exists, print what was deleted
        script = ("for f in " + " ".join(shlex.quote(p) for p in doomed)
                  + '; do [ -e "$f" ] && rm -f -- "$f" && echo "$f"; done; true')
        with connect(other) as hv:
            deleted = hv.run(script, hide=True, in_stream=False).stdout.splitlines()
        if deleted:
            with virt.open_host(other) as conn:  # the pools' volume lists forget the deleted files
                for pool in conn.listAllStoragePools():
                    with contextlib.suppress(libvirt.libvirtError):
                        storage.refresh_pool(pool)
            done.append(f"deleted {len(deleted)} leftover disk file(s) from {other.name}")
    return done


def _record(host, name) -> None:
    """The VM's record says where it lives now (its definition read again there); kept as it was when
    libvirt cannot say."""
    try:
        with virt.open_host(host) as conn:
            records.save_domain(conn.lookupByName(name), host.name)
    except (libvirt.libvirtError, CloudopsError):
        records.moved(name, host.name)
