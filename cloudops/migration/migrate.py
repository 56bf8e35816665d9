"""Live migration of a VM to another host: preflight checks, storage, progress, convergence, abort.

``migrate_vm`` checks everything before anything moves (VM and host known, not the
same host, destination not in maintenance, room, anti-affinity, network, CPU,
storage reachable or copying allowed), then prepares the destination (image and
boot files, network, IP reservation, pre-created overlay and seed), and migrates
peer to peer with ``migrateToURI3``: live, persistent on the destination,
undefined on the source. Disks on storage both hosts see (a marker file written
on one is read on the other) stay where they are; otherwise the overlay's top
layer, and all of an extra disk (``vm.disk --add``: no backing file, so its top
layer is all of it), is copied with the migration into volumes made empty on the
destination (NBD, ``NON_SHARED_INC``), and the read-only seed is copied ahead.

While the job runs, this thread polls ``jobStats()``: it draws the progress and
applies the ``Policy``: a max-downtime ramp per memory iteration, auto-converge,
a switch to post-copy after N iterations, and the timeout, which aborts the job
(as does Ctrl-C) so the VM keeps running on the source. Whatever was prepared
on the destination is removed again when the migration does not complete.
A stopped VM migrates offline: its disks are copied, it is defined on the
destination and undefined on the source.
"""

import contextlib
import os
import shlex
import signal
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

import libvirt

from cloudops import cloudkeys, kvm, sharedstorage, state, storage, virt
from cloudops.compute import placement, records, scheduler, vms
from cloudops.errors import CloudopsError, NotFound
from cloudops.hosts import maintenance
from cloudops.imaging import store as images
from cloudops.inventory import is_hypervisor
from cloudops.migration import journal, outcome, snapcarry
from cloudops.net import networks
from cloudops.progress import FIGURES, bar_for
from cloudops.ssh import connect

MiB = 1 << 20


@dataclass
class Policy:
    """How a live migration is made to converge; the defaults suit small, busy VMs."""

    downtime_ms: int = 50  # max downtime allowed at the first iteration...
    downtime_step_ms: int = 50  # ...raised by this much per memory iteration...
    downtime_max_ms: int = 300  # ...up to this
    auto_converge: bool = True  # let QEMU throttle the vCPUs when memory is dirtied faster than it is sent
    postcopy_after: int | None = 4  # switch to post-copy once this memory iteration starts (None: never)...
    postcopy_stall: float | None = 0.1  # ...or earlier, once an iteration starts with less than this share
    # less memory to send than the one before (pre-copy is not getting anywhere; nova's rule); None: off
    bandwidth_mib: int | None = None  # MiB/s cap (None: unlimited)
    postcopy_bandwidth_mib: int | None = None  # MiB/s cap once in post-copy (None: unlimited)
    timeout: float | None = None  # seconds before the job is aborted (pre-copy only)
    poll: float = 0.5

    def downtime_for(self, iteration: int) -> int:
        return min(self.downtime_max_ms, self.downtime_ms + self.downtime_step_ms * max(iteration - 1, 0))

    def wants_postcopy(self, iteration: int, starts: dict[int, float]) -> bool:
        """Post-copy now? At iteration ``postcopy_after``, or from the 2nd on when the memory left at the
        start of this iteration (``starts``: iteration -> bytes) is not ``postcopy_stall`` below the
        last one's: the guest dirties its memory about as fast as the link sends it, and more
        iterations would only throttle it longer before the same switch."""
        if self.postcopy_after is None:
            return False
        if iteration >= self.postcopy_after:
            return True
        if self.postcopy_stall is None or iteration < 2 or iteration not in starts:
            return False
        before = max((i for i in starts if i < iteration), default=None)
        if before is None or starts[before] <= 0:
            return False
        return (starts[before] - starts[iteration]) / starts[before] < self.postcopy_stall


@dataclass
class IterationStarts:
    """The memory left to send at the start of each memory iteration, estimated from polled samples: the
    first sample of an iteration comes after part of it was sent already, and that part is added back
    (what was sent since the last sample beyond what the iteration before still had left)."""

    starts: dict = field(default_factory=dict)
    _last: tuple | None = None  # (iteration, processed, remaining) of the last sample

    def feed(self, iteration: int, processed: int, remaining: int, total: int) -> None:
        if iteration <= 0:
            return
        last = self._last
        if iteration == 1 and 1 not in self.starts:
            self.starts[1] = total  # the first pass sends all of it
        elif last is not None and iteration > last[0] and iteration not in self.starts:
            self.starts[iteration] = remaining + max(0, processed - last[1] - last[2])
        elif last is None and iteration not in self.starts:
            self.starts[iteration] = remaining  # the watch began mid-iteration: as good as it gets
        self._last = (iteration, processed, remaining)


@dataclass
class Progress:
    """One sample of the job statistics, as drawn by the progress bar."""

    elapsed: float
    percent: float
    remaining_mib: float
    total_mib: float
    dirty_mib_s: float
    speed_mib_s: float
    iteration: int
    eta: float | None
    phase: str  # "storage", "memory" or "post-copy"


@dataclass
class Result:
    name: str
    source: str
    target: str
    mode: str  # "live" or "offline"
    shared_storage: bool
    duration: float  # seconds, from the first call to the end
    migration_time: float | None = None  # seconds, the libvirt job itself
    downtime_ms: int | None = None
    bytes_moved: int | None = None
    memory_bytes: int | None = None
    disk_bytes: int | None = None
    iterations: int | None = None
    postcopy: bool = False
    ip: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"{self.name}: {self.source} -> {self.target} ({self.mode}) in {self.duration:.1f}s"]
        if self.downtime_ms is not None:
            parts.append(f"downtime {self.downtime_ms} ms")
        if self.bytes_moved is not None:
            parts.append(f"{self.bytes_moved / MiB:.1f} MiB moved")
        if self.iterations:
            parts.append(f"{self.iterations} iterations" + (", post-copy" if self.postcopy else ""))
        return ", ".join(parts)


@dataclass
class _Disk:
    target: str  # vda, hdc
    path: str
    readonly: bool
    backing: str | None = None
    backing_format: str | None = None
    capacity: int = 0
    format: str = "qcow2"


@dataclass
class _Prepared:
    """What was made on the destination, so it can be removed when the migration fails."""

    files: list = field(default_factory=list)
    reservations: list = field(default_factory=list)  # (network, mac, ip, name) added on the destination


# ---------------------------------------------------------------- public entry

def migrate_vm(name: str, to_host: str, inventory, *, copy_storage: bool = True, policy: Policy | None = None,
               progress=None, message=lambda m: None, cancel: threading.Event | None = None) -> Result:
    """Move VM ``name`` to host ``to_host``: live when it runs, offline when it is stopped.

    ``progress(Progress)`` is called about twice a second during a live migration
    (default: a ``MigrationBar`` through ``message``); ``message(str)`` gets the stage-by-stage notes;
    setting ``cancel`` aborts a live migration still in pre-copy (as Ctrl-C does).
    """
    policy = policy or Policy()
    progress = progress if progress is not None else MigrationBar(message, name)
    vms.validate_name(name)
    hypervisors = inventory.hypervisors()
    if to_host not in inventory.hosts:
        raise CloudopsError(f"unknown host {to_host!r} (inventory {inventory.path}; known: {', '.join(inventory.hosts)})")
    dest = inventory.hosts[to_host]
    if not is_hypervisor(dest):
        raise CloudopsError(f"host {to_host} is a bare host: it runs no VMs")
    t0 = time.monotonic()
    with vms._name_lock(name):
        unfinished = journal.read(name)
        if unfinished:
            raise CloudopsError(f"{name} has an unfinished migration ({unfinished.get('source')} -> "
                                f"{unfinished.get('target')}): run `invoke vm.migrate {name} --recover` first")
        source = _locate(name, hypervisors, dest)
        with virt.open_host(source) as src_conn, virt.open_host(dest) as dst_conn:
            dom = src_conn.lookupByName(name)
            running = dom.isActive()
            disks = _disks(src_conn, dom)
            meta = virt.metadata(dom)
            message(f"checking {dest.name} can take {name}")
            shared = preflight(dom, meta, disks, source, dest, src_conn, dst_conn, copy_storage)
            on_shared_path = shared and sharedstorage.kind_of(meta) == "shared"  # preflight proved every disk there
            image = None if on_shared_path else _image(meta)  # a shared VM's image is on the shared path
            prepared = _Prepared()
            journal.begin(name, source.name, dest.name, live=bool(running), shared=shared,
                          disks=[d.path for d in disks], shared_path=on_shared_path)
            job = _Job()
            carry = None
            try:
                carry = snapcarry.before(dom, disks, shared, source, dest, prepared, message)
                _prepare(dom, meta, disks, shared, image, source, dest, dst_conn, prepared, message)
                journal.update(name, phase="migrating")
                if running:
                    result = _live(dom, disks, shared, source, dest, dst_conn, policy, progress, message, job, cancel,
                                   on_shared_path)
                else:
                    result = _offline(dom, disks, shared, source, dest, src_conn, dst_conn, message)
                journal.update(name, phase="cleaning the source")
                message(f"{name} runs on {dest.name}; removing it from {source.name}" if running
                        else f"{name} is defined on {dest.name}; removing it from {source.name}")
                _cleanup_source(src_conn, source, meta, disks, shared, name, message)
            except BaseException as exc:
                with _sigint_deferred():  # finding out where the VM is must not be cut short either
                    snapcarry.failed(carry, source, message)
                    _after_fault(exc, name, source, dest, prepared, job, bool(running), policy, message)
                raise  # not reached: _after_fault always raises
            journal.end(name)
            snapcarry.after(carry, dest, message, source=source)
            records.save_domain(dst_conn.lookupByName(name), dest.name)  # where the VM lives, for a failover
    result.duration = round(time.monotonic() - t0, 3)
    result.ip = meta.get("ip") or None
    _record(result)
    return result


@dataclass
class _Job:
    """What the live migration got to: set by the watcher, read after a fault."""

    postcopy: bool = False  # post-copy was requested: from here on the target may hold the only running copy


def _fault_text(exc: BaseException, policy: Policy) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "was interrupted"
    if isinstance(exc, _Aborted):
        return "was interrupted" if exc.why == "interrupted" else f"did not complete within {policy.timeout:g}s"
    if isinstance(exc, libvirt.libvirtError):
        text = (exc.get_error_message() or str(exc)).strip().splitlines()
        return f"failed: {text[-1] if text else exc}"
    if isinstance(exc, CloudopsError):
        return f"failed: {exc}"
    text = str(exc).strip().splitlines()
    return f"failed: {type(exc).__name__}: {text[-1] if text else ''}".rstrip(": ")


def _after_fault(exc, name, source, dest, prepared, job, live, policy, message):
    """Find out where the VM is after ``exc``; undo the destination only when that is known for certain.

    Certain means: post-copy never started, both hosts answered, the destination has
    no domain of that name, and the source has it in the state it started in
    (running for a live migration, shut off for an offline one). Anything else
    removes nothing, leaves the journal, and says how to recover.
    """
    what = _fault_text(exc, policy)
    interrupted = isinstance(exc, KeyboardInterrupt) or (isinstance(exc, _Aborted) and exc.why == "interrupted")
    code = 130 if interrupted else 1
    record = journal.read(name) or {}
    if (isinstance(exc, CloudopsError) and not job.postcopy and record.get("phase") == "preparing"
            and not prepared.files and not prepared.reservations):
        journal.end(name)  # refused while preparing, before anything was made on the destination
        raise exc
    where = _settled(name, source, dest, live)
    expected = outcome.RUNNING if live else outcome.SHUTOFF
    src_copy = where.copies.get(source.name)
    if (not job.postcopy and where.known and dest.name not in where.copies and src_copy is not None
            and src_copy.state == expected):
        message(f"migration failed; removing what was prepared on {dest.name}")
        try:
            with virt.open_host(dest) as dst_conn:
                _undo(dst_conn, dest, prepared)
        except CloudopsError:
            pass
        journal.end(name)
        state = "keeps running on" if live else "stays on"
        raise CloudopsError(f"migration of {name} to {dest.name} {what}: aborted, {name} {state} {source.name}",
                            exit_code=code) from None
    dst_copy = where.copies.get(dest.name)
    if (where.known and src_copy is None and dst_copy is not None and dst_copy.state == expected
            and not dst_copy.postcopy):
        journal.update(name, phase="cleaning the source")
        raise CloudopsError(f"{name} runs on {dest.name}, but the migration {what}; run "
                            f"`invoke vm.migrate {name} --recover` to finish the clean-up", exit_code=code) from None
    journal.update(name, phase="unknown", fault=what)
    raise CloudopsError(f"migration of {name} to {dest.name} {what}; {where.describe()}; nothing was removed: "
                        f"run `invoke vm.migrate {name} --recover`", exit_code=code) from None


SETTLE_SECONDS = 20  # how long a fault's outcome may take to settle (an incoming copy being torn down)


def _settled(name, source, dest, live, wait: float | None = None):
    """Where the VM is, asked again for up to ``wait`` seconds while the destination still tears down an
    incoming copy (a failed pre-copy leaves it paused a moment) or a host is mid-migration."""
    deadline = time.monotonic() + (SETTLE_SECONDS if wait is None else wait)
    while True:
        where = outcome.where(name, [source, dest])
        transitional = any(c.migrating or c.postcopy for c in where.copies.values())
        if not transitional or time.monotonic() > deadline:
            return where
        time.sleep(1)


class _Aborted(Exception):
    """The watcher aborted the job (timeout, Ctrl-C, cancel) and libvirt confirmed it."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


# ---------------------------------------------------------------- preflight

def _locate(name, hypervisors, dest):
    """The host that has the VM; errors for an unknown VM, or one the destination already has."""
    found, unreachable = vms.find(name, hypervisors)
    if dest in found:
        others = [h.name for h in found if h is not dest]
        if others:
            raise CloudopsError(f"{dest.name} already has a VM named {name!r} (and so has {', '.join(others)})")
        raise CloudopsError(f"VM {name!r} is already on {dest.name}: the destination is its host")
    if not found:
        extra = f" (unreachable: {', '.join(unreachable)})" if unreachable else ""
        raise NotFound(f"unknown VM {name!r}: no host has it{extra}", unreachable=unreachable)
    if len(found) > 1:
        raise CloudopsError(f"VM {name!r} is defined on several hosts: {', '.join(h.name for h in found)}")
    return found[0]


def preflight(dom, meta, disks, source, dest, src_conn, dst_conn, copy_storage) -> bool:
    """Every reason the move cannot happen, as one CloudopsError, before anything moves. Returns shared?"""
    name = dom.name()
    if dest.name in maintenance.hosts_in_maintenance():
        raise CloudopsError(f"cannot migrate {name} to {dest.name}: it is in maintenance")
    _state, max_kib, _cur, vcpus, _t = dom.info()
    request = scheduler.PlacementRequest(memory_mb=max_kib // 1024, vcpus=vcpus, name=name,
                                         anti_affinity_group=meta.get("group") or None)
    state = placement.host_state(dest, set())
    if not dom.isActive():  # a stopped VM needs no free memory now, only its commitment
        state = scheduler.HostState(**{**state.__dict__, "memory_free_mb": None})
    reason = scheduler.check(request, state)
    if reason:
        raise CloudopsError(f"cannot migrate {name} to {dest.name}: {reason}")
    _check_cpu(dom, src_conn, dst_conn, dest)
    for nic in vms.nics_of(meta):
        try:  # a network outside the inventory: as the hosts define it (the source has it)
            vms.network_spec(nic["network"], dest, hosts=[dest, source])
        except CloudopsError as exc:
            raise CloudopsError(f"cannot migrate {name} to {dest.name}: its network {nic['network']!r}: {exc}") from None
    if sharedstorage.kind_of(meta) == "shared":
        return _check_shared_path(name, disks, source, dest)
    if meta.get("image"):
        try:
            images.resolve(meta["image"])
        except CloudopsError:
            if not _files_on(dest, [images.pool_path(dest) + f"/images/{meta['image']}.qcow2"]):
                raise CloudopsError(f"cannot migrate {name} to {dest.name}: its image {meta['image'][:12]} is "
                                    "neither on the destination nor in the image store") from None
    shared = _shared_dirs(source, dest, {os.path.dirname(d.path) for d in disks})
    unreachable = [d.path for d in disks if not shared[os.path.dirname(d.path)]]
    if unreachable and not copy_storage:
        raise CloudopsError(f"cannot migrate {name} to {dest.name}: disk {unreachable[0]} is on storage "
                            f"{dest.name} cannot reach, and copying storage was refused")
    return not unreachable


def _check_shared_path(name, disks, source, dest) -> bool:
    """A VM on shared storage moves no disk: both hosts must name the same shared_path, every disk of the VM
    must lie under it, and a marker written there by the source must be read by the destination. Returns True
    (shared), or refuses: such a VM is never copied, its disks already are where every host finds them."""
    where = f"cannot migrate {name} to {dest.name}"
    try:
        root, theirs = sharedstorage.path_of(source), sharedstorage.path_of(dest)
    except CloudopsError as exc:
        raise CloudopsError(f"{where}: it is on shared storage and {exc}") from None
    if root != theirs:
        raise CloudopsError(f"{where}: it is on shared storage at {root} ({source.name}'s shared_path), and "
                            f"{dest.name}'s shared_path is {theirs}")
    outside = [d.path for d in disks if not sharedstorage.under(d.path, root)]
    if outside:
        raise CloudopsError(f"{where}: it is on shared storage, but its disk {outside[0]} is not under {root}")
    seen = _shared_dirs(source, dest, {os.path.dirname(d.path) for d in disks})
    unseen = sorted(directory for directory, ok in seen.items() if not ok)
    if unseen:
        raise CloudopsError(f"{where}: {dest.name} does not see {source.name}'s {unseen[0]} (a marker written there "
                            f"was not read back): its shared path {root} is not the same storage")
    return True


def _check_cpu(dom, src_conn, dst_conn, dest) -> None:
    root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))
    if root.get("type") == "kvm" and kvm.domain_type(dst_conn) != "kvm":
        raise CloudopsError(f"cannot migrate {dom.name()} to {dest.name}: it runs with KVM, "
                            f"and {dest.name} has no usable KVM")
    cpu = root.find("./cpu")
    if cpu is None or cpu.find("./model") is None:
        return  # an emulated default CPU: any QEMU of the same architecture runs it
    try:
        os_type = root.find("./os/type")
        verdict = dst_conn.compareHypervisorCPU(
            None, os_type.get("arch") if os_type is not None else None, None, root.get("type"),
            ET.tostring(cpu, encoding="unicode"), 0)
    except libvirt.libvirtError as exc:
        raise CloudopsError(f"cannot compare {dom.name()}'s CPU with {dest.name}'s: {exc.get_error_message()}") from None
    if verdict == libvirt.VIR_CPU_COMPARE_INCOMPATIBLE:
        raise CloudopsError(f"cannot migrate {dom.name()} to {dest.name}: its CPU model is not compatible")


def _disks(conn, dom) -> list[_Disk]:
    found = []
    for disk in ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).findall("./devices/disk"):
        src = disk.find("./source")
        if disk.get("type") != "file" or src is None or not src.get("file"):
            continue
        d = _Disk(target=disk.find("./target").get("dev"), path=src.get("file"),
                  readonly=disk.find("./readonly") is not None)
        drv = disk.find("./driver")
        d.format = drv.get("type", "raw") if drv is not None else "raw"
        if not d.readonly:
            with contextlib.suppress(libvirt.libvirtError):
                vol = conn.storageVolLookupByPath(d.path)
                d.capacity = vol.info()[1]
                backing = ET.fromstring(vol.XMLDesc(0)).find("./backingStore")
                if backing is not None and backing.findtext("path"):
                    d.backing = backing.findtext("path")
                    d.backing_format = backing.find("format").get("type") if backing.find("format") is not None else "qcow2"
        found.append(d)
    return found


def _shared_dirs(source, dest, directories) -> dict[str, bool]:
    """For each directory: is it the same storage on both hosts? A marker written on one, read on the other."""
    result = {}
    with connect(source) as src, connect(dest) as dst:
        for directory in directories:
            marker = f"{directory}/.cloudops-shared-{uuid.uuid4().hex}"
            token = uuid.uuid4().hex
            q = shlex.quote(marker)
            made = src.run(f"echo {token} > {q}", warn=True, hide=True, in_stream=False).ok
            try:
                seen = dst.run(f"cat {q} 2>/dev/null || true", hide=True, in_stream=False).stdout.strip()
            finally:
                src.run(f"rm -f {q}", warn=True, hide=True, in_stream=False)
            result[directory] = made and seen == token
    return result


def _files_on(host, paths) -> bool:
    with connect(host) as c:
        return c.run("ls " + " ".join(shlex.quote(p) for p in paths), warn=True, hide=True, in_stream=False).ok


def _image(meta):
    with contextlib.suppress(CloudopsError):
        return images.resolve(meta["image"]) if meta.get("image") else None
    return None


# ---------------------------------------------------------------- prepare the destination

def _prepare(dom, meta, disks, shared, image, source, dest, dst_conn, prepared, message):
    name = dom.name()
    if image is not None:
        with connect(dest) as hv:
            images.ensure_on_host(image, dest, hv, message)  # its bar's last line says what was copied
    for nic in vms.nics_of(meta):
        net = vms.network_spec(nic["network"], dest, hosts=[dest, source])
        changed, what = networks.ensure_network(dst_conn, net)
        if changed:
            message(f"{dest.name}: {what}")
        if nic["mac"] and nic["ip"]:
            added, _ = networks.add_reservation(dst_conn, net.name, nic["mac"], nic["ip"], name)
            if added:
                prepared.reservations.append((net.name, nic["mac"], nic["ip"], name))
                journal.update(name, reservations=[list(r) for r in prepared.reservations])
    if shared:
        if sharedstorage.kind_of(meta) == "shared":  # libvirt on the destination then knows the VM's volumes
            pool, _ = sharedstorage.ensure_pool(dst_conn, dest)
            storage.refresh_pool(pool)
        return
    for disk in disks:
        directory = os.path.dirname(disk.path)
        pool, _ = storage.ensure_pool(dst_conn, directory, name=_pool_name(source, disk.path, directory))
        volume = os.path.basename(disk.path)
        with contextlib.suppress(libvirt.libvirtError):
            storage.refresh_pool(pool)
        try:
            pool.storageVolLookupByName(volume)
            raise CloudopsError(f"{dest.name} already has a disk {disk.path}; remove it or choose another host")
        except libvirt.libvirtError:
            pass
        prepared.files.append(disk.path)
        journal.update(name, prepared_files=list(prepared.files))
        if disk.readonly or not dom.isActive() or not (disk.backing or disk.capacity):
            message(f"copying {volume} to {dest.name}")
            _copy_file(source, dest, disk.path)
        elif disk.backing:
            storage.create_overlay(pool, volume, disk.backing, disk.backing_format, disk.capacity)
        else:  # a writable disk of its own (vm.disk --add): an empty volume that the NBD copy fills, never a
            storage.create_volume(pool, volume, disk.capacity, disk.format)  # copy of a file QEMU is writing
        storage.refresh_pool(pool)


def _pool_name(source, path, directory) -> str:
    with virt.open_host(source) as conn, contextlib.suppress(libvirt.libvirtError):
        return conn.storageVolLookupByPath(path).storagePoolLookupByVolume().name()
    return "cloudops-" + uuid.uuid5(uuid.NAMESPACE_URL, directory).hex[:8]


def _copy_file(source, dest, path):
    """Copy one file between hosts through this machine (seeds are small; offline disks are rare)."""
    from cloudops import hostfiles

    with tempfile.TemporaryDirectory(prefix="cloudops-") as tmp, connect(source) as src, connect(dest) as dst:
        local = str(Path(tmp) / "f")
        src.get(path, local)
        dst.run(f"mkdir -p {shlex.quote(os.path.dirname(path))}", hide=True, in_stream=False)
        hostfiles.put_private(dst, local, path)  # a seed holds root's hash: 0600 from creation, then renamed


def _undo(dst_conn, dest, prepared):
    for path in prepared.files:
        with contextlib.suppress(Exception):
            vms._delete_path(dst_conn, path)
        with contextlib.suppress(Exception), connect(dest) as hv:
            hv.run(f"rm -f {shlex.quote(path)}", hide=True, in_stream=False)
    for reservation in prepared.reservations:
        with contextlib.suppress(Exception):
            networks.remove_reservation(dst_conn, *reservation)


def _cleanup_source(src_conn, source, meta, disks, shared, name, message):
    """After the VM is confirmed on the destination: undefine it on the source, drop its reservation and
    (unless the storage is shared) its disks there."""
    with contextlib.suppress(libvirt.libvirtError):
        dom = src_conn.lookupByName(name)
        if dom.isActive():
            raise CloudopsError(f"{name} still runs on {source.name} after the migration")
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
    for nic in vms.nics_of(meta):
        if nic["mac"] and nic["ip"]:
            networks.remove_reservation(src_conn, nic["network"], nic["mac"], nic["ip"], name)
    if shared:
        return
    message(f"removing {name}'s disks from {source.name}")
    for disk in disks:
        vms._delete_path(src_conn, disk.path)


# ---------------------------------------------------------------- live

def _flags(shared, policy, shared_path: bool = False) -> int:
    # No UNDEFINE_SOURCE: the source's definition goes only after cloudops has seen the VM run on the
    # destination (_cleanup_source), so no fault can leave the VM defined nowhere.
    flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
    if not shared:
        flags |= libvirt.VIR_MIGRATE_NON_SHARED_INC
    if shared and shared_path:
        # libvirt 9.0's qemuMigrationSrcIsSafe refuses a disk it does not copy unless statfs() names a network
        # or cluster file system ("Migration without shared storage is unsafe"), whatever its cache mode: a
        # shared path that is a bind mount, or a file system it does not know, is refused. cloudops has proved
        # the storage shared itself (_check_shared_path: same shared_path on both hosts, every disk under it,
        # a marker written by the source read by the destination; the seed is read-only, the root disk
        # cache=none), so it takes the responsibility, and only then.
        flags |= libvirt.VIR_MIGRATE_UNSAFE
    if policy.auto_converge:
        flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
    if policy.postcopy_after is not None:
        flags |= libvirt.VIR_MIGRATE_POSTCOPY
    return flags


def migration_uri(dest) -> str:
    """The libvirt URI the source's libvirtd uses to reach the destination's (inventory var migration_uri):
    the hosts' own migration key and known_hosts, never the operator's key or trust (cloudkeys.migration_uri)."""
    return dest.vars.get("migration_uri") or cloudkeys.migration_uri(dest)


def _params(dest, shared, disks, policy) -> dict:
    address = dest.vars.get("migration_address") or dest.address
    params = {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{address}"}
    if not shared:
        params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = [d.target for d in disks if not d.readonly]
    if policy.bandwidth_mib:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(policy.bandwidth_mib)
    if policy.postcopy_bandwidth_mib:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY] = int(policy.postcopy_bandwidth_mib)
    return params


def _live(dom, disks, shared, source, dest, dst_conn, policy, progress, message, job, cancel,
          shared_path: bool = False) -> Result:
    name = dom.name()
    flags, params = _flags(shared, policy, shared_path), _params(dest, shared, disks, policy)
    outcome = {}

    def run():
        try:
            dom.migrateToURI3(migration_uri(dest), params, flags)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = exc

    message(f"migrating {name} live to {dest.name}" + ("" if shared else " with its disk"))
    worker = threading.Thread(target=run, name=f"migrate-{name}", daemon=True)
    # The job is watched and steered over a connection of its own: calls on the connection that is
    # running migrateToURI3 wait for it to end (seen with libvirt 9.0 over qemu+ssh).
    try:
        control = libvirt.open(source.libvirt_uri)
    except libvirt.libvirtError as exc:
        raise CloudopsError(f"{source.name}: cannot open a second libvirt connection: {exc.get_error_message()}") from None
    start = time.monotonic()
    presses = _Presses()
    try:
        with _sigint_counted(presses):  # from here on Ctrl-C is a request to abort, never an exception mid-call
            watch = _Watch(control.lookupByName(name), policy, progress, start, job)
            worker.start()
            _follow(worker, watch, outcome, name, policy, progress, message, cancel, presses)
        new = dst_conn.lookupByName(name)
        if not new.isActive():
            raise CloudopsError(f"libvirt reported the migration done, but {name} does not run on {dest.name}")
        return _result(new, name, source, dest, shared, watch, source_dom=watch.dom)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            control.close()


def _follow(worker, watch, outcome, name, policy, progress, message, cancel, presses) -> None:
    """Wait for the job, steering it; raise _Aborted or the job's error. Ctrl-C (``presses``) or ``cancel``
    aborts the job. Once post-copy has started an abort is impossible (the VM runs on the destination):
    a first Ctrl-C only says so, a second one stops waiting (KeyboardInterrupt), and the outcome is then
    found out by asking both hosts."""
    aborted = None
    told = False
    try:
        while worker.is_alive():
            worker.join(policy.poll)
            if not worker.is_alive():
                break
            aborted = watch.tick() or aborted
            if presses.count or (cancel is not None and cancel.is_set()):
                aborted = "interrupted"
            if aborted and watch.job.postcopy:
                if told and presses.count > presses.seen:
                    raise KeyboardInterrupt
                if not told:
                    message(f"post-copy has started: {name} already runs on the destination and the migration "
                            "cannot be aborted; waiting for it to finish (Ctrl-C again to stop waiting)")
                    told, presses.seen = True, presses.count
                continue
            if aborted:  # again and again: a job libvirt had queued may start after the first abort
                deadline = time.monotonic() + 120
                while worker.is_alive() and time.monotonic() < deadline:
                    watch.abort(aborted)
                    worker.join(1)
                break
    finally:
        progress_done = getattr(progress, "done", None)
        if progress_done:
            progress_done()
    if worker.is_alive():
        raise CloudopsError(f"the migration job of {name} did not end after it was aborted")
    error = outcome.get("error")
    if error is not None and aborted and not watch.job.postcopy:
        raise _Aborted(aborted)
    if error is not None:
        raise error


@dataclass
class _Presses:
    """Ctrl-C presses seen while a migration job runs."""

    count: int = 0
    seen: int = 0


@contextlib.contextmanager
def _sigint_counted(presses: _Presses):
    """In the main thread, SIGINT counts a press instead of raising KeyboardInterrupt, so no interrupt lands
    inside a libvirt call and leaves a job half-aborted. Elsewhere (evacuate's workers) nothing changes:
    their Ctrl-C comes as ``cancel``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def press(_signum, _frame):
        presses.count += 1

    previous = signal.signal(signal.SIGINT, press)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _sigint_deferred():
    """While finding out where the VM is after a fault, Ctrl-C is ignored (main thread only)."""
    with _sigint_counted(_Presses()):
        yield


class _Watch:
    """Poll the job: feed the progress bar, ramp the downtime, switch to post-copy, enforce the timeout."""

    def __init__(self, dom, policy, progress, start, job):
        self.dom, self.policy, self.progress, self.start, self.job = dom, policy, progress, start, job
        self.iteration = 0
        self.downtime_set = None
        self.max_iteration = 0
        self.starts = IterationStarts()

    @property
    def postcopy(self) -> bool:
        return self.job.postcopy

    def tick(self) -> str | None:
        try:
            stats = self.dom.jobStats()
        except libvirt.libvirtError:
            return None
        if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
            return None
        iteration = int(stats.get("memory_iteration", 0))
        self.max_iteration = max(self.max_iteration, iteration)
        policy = self.policy
        wanted = policy.downtime_for(iteration)
        if wanted != self.downtime_set:
            with contextlib.suppress(libvirt.libvirtError):
                self.dom.migrateSetMaxDowntime(wanted, 0)
                self.downtime_set = wanted
        self.starts.feed(iteration, int(stats.get("memory_processed", 0)), int(stats.get("memory_remaining", 0)),
                         int(stats.get("memory_total", 0)))
        if (not self.postcopy and policy.wants_postcopy(iteration, self.starts.starts)
                and stats.get("memory_remaining", 0)):
            self.job.postcopy = True  # from the request on: if the call's answer is lost, it may have started
            try:
                self.dom.migrateStartPostCopy(0)
            except libvirt.libvirtError:
                if self.dom.jobStats().get("type", 0) == libvirt.VIR_DOMAIN_JOB_NONE:
                    self.job.postcopy = False  # refused and no job left: it did not start
        elapsed = time.monotonic() - self.start
        self.progress(_sample(stats, elapsed, "post-copy" if self.postcopy else None))
        if policy.timeout is not None and elapsed > policy.timeout and not self.postcopy:
            return "timeout"
        return None

    def abort(self, why):
        if self.job.postcopy:
            return  # the VM already runs on the destination: aborting would lose it
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.abortJob()


def _sample(stats, elapsed, phase) -> Progress:
    total = stats.get("data_total", 0)
    remaining = stats.get("data_remaining", 0)
    page = stats.get("memory_page_size", 4096)
    dirty = stats.get("memory_dirty_rate", 0) * page
    speed = stats.get("memory_bps", 0) or stats.get("disk_bps", 0)
    iteration = int(stats.get("memory_iteration", 0))
    if phase is None:
        phase = "memory" if iteration or stats.get("memory_processed") else "storage"
    eta = remaining / speed if speed else None
    return Progress(elapsed=elapsed, percent=100.0 * (total - remaining) / total if total else 0.0, remaining_mib=remaining / MiB,
                    total_mib=total / MiB, dirty_mib_s=dirty / MiB, speed_mib_s=speed / MiB, iteration=iteration,
                    eta=eta, phase=phase)


def completed_stats(*doms) -> dict:
    """The completed job's statistics from the first of ``doms`` that has them. The destination has them
    after a pre-copy migration; after a post-copy one (libvirt 9.0) only the source does, until it is
    undefined."""
    for dom in doms:
        with contextlib.suppress(libvirt.libvirtError):
            stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
            if stats.get("time_elapsed") is not None:
                return stats
    return {}


def _result(dom, name, source, dest, shared, watch, source_dom=None) -> Result:
    stats = completed_stats(*[d for d in (dom, source_dom) if d is not None])
    elapsed = stats.get("time_elapsed")
    return Result(
        name=name, source=source.name, target=dest.name, mode="live", shared_storage=shared, duration=0.0,
        migration_time=round(elapsed / 1000, 3) if elapsed is not None else None,
        downtime_ms=stats.get("downtime"), bytes_moved=stats.get("data_processed"),
        memory_bytes=stats.get("memory_processed"), disk_bytes=stats.get("disk_processed"),
        iterations=stats.get("memory_iteration") or watch.max_iteration or None,
        postcopy=watch.postcopy)


class MigrationBar:
    """The live migration's bar, through ``cloudops.progress`` (live on a terminal, plain lines elsewhere):
    its length is the percent done, its figures the phase, data remaining of the total, dirty rate,
    speed, memory iteration, ETA and time so far."""

    def __init__(self, message, name: str):
        self.bar = bar_for(message, f"migrating {name}", 100, unit=FIGURES, verb=None)

    @staticmethod
    def figures(p: Progress) -> str:
        eta = f"{p.eta:.0f}s" if p.eta is not None else "?"
        return (f"{p.percent:5.1f}%  {p.phase:<9} left {p.remaining_mib:6.1f}/{p.total_mib:.0f} MiB  "
                f"dirty {p.dirty_mib_s:5.1f} MiB/s  {p.speed_mib_s:5.1f} MiB/s  iter {p.iteration:2d}  "
                f"ETA {eta}  {p.elapsed:5.1f}s")

    def __call__(self, p: Progress) -> None:
        self.bar.update(p.percent, figures=self.figures(p))

    def done(self) -> None:
        """The job ended: the last figures stay as a line (where it got to, when an error follows)."""
        if self.bar.started is not None:
            self.bar.finish()


# ---------------------------------------------------------------- offline

def _offline(dom, disks, shared, source, dest, src_conn, dst_conn, message) -> Result:
    """A stopped VM: its disks were copied by _prepare; define it there (_cleanup_source undefines it here)."""
    name = dom.name()
    start = time.monotonic()
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_MIGRATABLE)
    message(f"defining {name} on {dest.name}")
    dst_conn.defineXML(xml)
    moved = 0
    if not shared:
        with connect(dest) as hv:
            out = hv.run("stat -c %s " + " ".join(shlex.quote(d.path) for d in disks), warn=True, hide=True,
                         in_stream=False).stdout
        moved = sum(int(x) for x in out.split() if x.isdigit())
    return Result(name=name, source=source.name, target=dest.name, mode="offline", shared_storage=shared,
                  duration=0.0, migration_time=round(time.monotonic() - start, 3), downtime_ms=None,
                  bytes_moved=moved, disk_bytes=moved)


# ---------------------------------------------------------------- record

HISTORY = "migrations/"


def _record(result: Result) -> None:
    """Keep the result in the state store's history (``migrations/<time>-<name>``), for every operator."""
    now = round(time.time(), 3)
    state.current().create(f"{HISTORY}{now:.3f}-{result.name}", {"time": now, **result.to_dict()})


def history(name: str | None = None) -> list[dict]:
    """Past migrations, oldest first (of one VM when ``name`` is given)."""
    past = [entry.value for entry in state.current().items(HISTORY).values()]
    return sorted((r for r in past if name is None or r.get("name") == name), key=lambda r: r.get("time", 0))


def policy_from(config: dict, **given) -> Policy:
    """A Policy from configuration (``migrate`` section) and command-line values; None means "not given"."""
    fields = Policy.__dataclass_fields__
    values = {k: v for k, v in config.items() if v is not None and k in fields}
    values.update({k: v for k, v in given.items() if v is not None and k in fields})  # a flag not given keeps config
    if values.get("postcopy_stall") is not None:
        try:
            values["postcopy_stall"] = float(values["postcopy_stall"])
        except (TypeError, ValueError):
            raise CloudopsError(f"postcopy_stall must be a share from 0 to 1, got {values['postcopy_stall']!r}") from None
        if not 0 <= values["postcopy_stall"] <= 1:
            raise CloudopsError(f"postcopy_stall must be a share from 0 to 1, got {values['postcopy_stall']:g}")
        if values["postcopy_stall"] == 0:
            values["postcopy_stall"] = None
    for key in ("downtime_ms", "downtime_step_ms", "downtime_max_ms", "postcopy_after", "bandwidth_mib",
                "postcopy_bandwidth_mib"):
        if key in values:
            try:
                values[key] = int(values[key])
            except (TypeError, ValueError):
                raise CloudopsError(f"{key} must be a whole number, got {values[key]!r}") from None
    if "timeout" in values:
        try:
            values["timeout"] = float(values["timeout"])
        except (TypeError, ValueError):
            raise CloudopsError(f"timeout must be a number of seconds, got {values['timeout']!r}") from None
        if values["timeout"] <= 0:
            raise CloudopsError("timeout must be positive")
    if values.get("postcopy_after") == 0:
        values["postcopy_after"] = None
    return Policy(**values)
