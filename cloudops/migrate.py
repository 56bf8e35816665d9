"""Live migration of a VM to another host: preflight checks, storage, progress, convergence, abort.

``migrate_vm`` checks everything before anything moves (VM and host known, not the
same host, destination not in maintenance, room, anti-affinity, network, CPU,
storage reachable or copying allowed), then prepares the destination (image and
boot files, network, IP reservation, pre-created overlay and seed), and migrates
peer to peer with ``migrateToURI3``: live, persistent on the destination,
undefined on the source. Disks on storage both hosts see (a marker file written
on one is read on the other) stay where they are; otherwise the overlay's top
layer is copied with the migration (NBD, ``NON_SHARED_INC``) and the read-only
seed is copied ahead.

While the job runs, this thread polls ``jobStats()``: it draws the progress and
applies the ``Policy``: a max-downtime ramp per memory iteration, auto-converge,
a switch to post-copy after N iterations, and the timeout, which aborts the job
(as does Ctrl-C) so the VM keeps running on the source. Whatever was prepared
on the destination is removed again when the migration does not complete.
A stopped VM migrates offline: its disks are copied, it is defined on the
destination and undefined on the source.
"""

import contextlib
import json
import os
import shlex
import sys
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

import libvirt

from . import cloudkeys, guest, images, maintenance, networks, placement, scheduler, storage, virt, vms
from .errors import CloudopsError
from .ssh import connect

MiB = 1 << 20


@dataclass
class Policy:
    """How a live migration is made to converge; the defaults suit small, busy VMs."""

    downtime_ms: int = 50  # max downtime allowed at the first iteration...
    downtime_step_ms: int = 50  # ...raised by this much per memory iteration...
    downtime_max_ms: int = 300  # ...up to this
    auto_converge: bool = True  # let QEMU throttle the vCPUs when memory is dirtied faster than it is sent
    postcopy_after: int | None = 4  # switch to post-copy once this memory iteration starts (None: never)
    bandwidth_mib: int | None = None  # MiB/s cap (None: unlimited)
    timeout: float | None = None  # seconds before the job is aborted (pre-copy only)
    poll: float = 0.5

    def downtime_for(self, iteration: int) -> int:
        return min(self.downtime_max_ms, self.downtime_ms + self.downtime_step_ms * max(iteration - 1, 0))


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
    reservation: tuple | None = None


# ---------------------------------------------------------------- public entry

def migrate_vm(name: str, to_host: str, inventory, *, copy_storage: bool = True, policy: Policy | None = None,
               progress=None, message=lambda m: None) -> Result:
    """Move VM ``name`` to host ``to_host``: live when it runs, offline when it is stopped.

    ``progress(Progress)`` is called about twice a second during a live migration
    (default: a bar on stderr); ``message(str)`` gets the stage-by-stage notes.
    """
    policy = policy or Policy()
    progress = progress if progress is not None else ProgressBar()
    vms.validate_name(name)
    hypervisors = [h for h in inventory.hosts.values() if "bare" not in h.tags]
    if to_host not in inventory.hosts:
        raise CloudopsError(f"unknown host {to_host!r} (inventory {inventory.path}; known: {', '.join(inventory.hosts)})")
    dest = inventory.hosts[to_host]
    if "bare" in dest.tags:
        raise CloudopsError(f"host {to_host} is a bare host: it runs no VMs")
    t0 = time.monotonic()
    with vms._name_lock(name):
        source = _locate(name, hypervisors, dest)
        with virt.open_host(source) as src_conn, virt.open_host(dest) as dst_conn:
            dom = src_conn.lookupByName(name)
            running = dom.isActive()
            disks = _disks(src_conn, dom)
            meta = vms.metadata(dom)
            message(f"checking {dest.name} can take {name}")
            shared = preflight(dom, meta, disks, source, dest, src_conn, dst_conn, copy_storage)
            image = _image(meta)
            prepared = _Prepared()
            try:
                _prepare(dom, meta, disks, shared, image, source, dest, dst_conn, prepared, message)
                if running:
                    result = _live(dom, disks, shared, source, dest, dst_conn, policy, progress, message)
                else:
                    result = _offline(dom, disks, shared, source, dest, src_conn, dst_conn, message)
            except BaseException:
                if _arrived(src_conn, dst_conn, name):
                    raise  # it did arrive: nothing to undo
                message(f"migration failed; removing what was prepared on {dest.name}")
                _undo(dst_conn, dest, prepared)
                raise
            _cleanup_source(src_conn, source, meta, disks, shared, name, message)
    result.duration = round(time.monotonic() - t0, 3)
    result.ip = meta.get("ip") or None
    _record(result)
    return result


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
        raise CloudopsError(f"unknown VM {name!r}: no host has it{extra}")
    if len(found) > 1:
        raise CloudopsError(f"VM {name!r} is defined on several hosts: {', '.join(h.name for h in found)}")
    return found[0]


def _arrived(src_conn, dst_conn, name) -> bool:
    """True when the VM is on the destination and gone from the source (asked safely after a fault)."""
    try:
        return vms.defined_on(dst_conn, name) and not vms.defined_on(src_conn, name)
    except libvirt.libvirtError:
        return False


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
    if meta.get("network"):
        try:
            vms.network_spec(meta["network"], dest)
        except CloudopsError:
            raise CloudopsError(f"cannot migrate {name} to {dest.name}: it has no network {meta['network']!r} "
                                "and the inventory does not describe it") from None
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


def _check_cpu(dom, src_conn, dst_conn, dest) -> None:
    root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))
    if root.get("type") == "kvm" and placement.virt_type(dst_conn) != "kvm":
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
            if images.ensure_on_host(image, dest, hv):
                message(f"copied image {image.name} to {dest.name}")
    if meta.get("network"):
        net = vms.network_spec(meta["network"], dest)
        changed, what = networks.ensure_network(dst_conn, net)
        if changed:
            message(f"{dest.name}: {what}")
        if meta.get("mac") and meta.get("ip"):
            added, _ = networks.add_reservation(dst_conn, net.name, meta["mac"], meta["ip"], name)
            if added:
                prepared.reservation = (net.name, meta["mac"], meta["ip"], name)
    if shared:
        return
    for disk in disks:
        directory = os.path.dirname(disk.path)
        pool, _ = storage.ensure_pool(dst_conn, directory, name=_pool_name(source, disk.path, directory))
        volume = os.path.basename(disk.path)
        with contextlib.suppress(libvirt.libvirtError):
            pool.refresh(0)
        try:
            pool.storageVolLookupByName(volume)
            raise CloudopsError(f"{dest.name} already has a disk {disk.path}; remove it or choose another host")
        except libvirt.libvirtError:
            pass
        if disk.readonly or not dom.isActive() or not disk.backing:
            message(f"copying {volume} to {dest.name}")
            prepared.files.append(disk.path)
            _copy_file(source, dest, disk.path)
        else:
            prepared.files.append(disk.path)
            storage.create_overlay(pool, volume, disk.backing, disk.backing_format, disk.capacity)
        pool.refresh(0)


def _pool_name(source, path, directory) -> str:
    with virt.open_host(source) as conn, contextlib.suppress(libvirt.libvirtError):
        return conn.storageVolLookupByPath(path).storagePoolLookupByVolume().name()
    return "cloudops-" + uuid.uuid5(uuid.NAMESPACE_URL, directory).hex[:8]


def _copy_file(source, dest, path):
    """Copy one file between hosts through this machine (seeds are small; offline disks are rare)."""
    with tempfile.TemporaryDirectory(prefix="cloudops-") as tmp, connect(source) as src, connect(dest) as dst:
        local = str(Path(tmp) / "f")
        src.get(path, local)
        partial = f"{path}.partial-{uuid.uuid4().hex[:8]}"
        dst.run(f"mkdir -p {shlex.quote(os.path.dirname(path))}", hide=True, in_stream=False)
        dst.put(local, partial)
        dst.run(f"chmod 600 {shlex.quote(partial)} && mv -f {shlex.quote(partial)} {shlex.quote(path)}",
                hide=True, in_stream=False)


def _undo(dst_conn, dest, prepared):
    for path in prepared.files:
        with contextlib.suppress(Exception):
            vms._delete_path(dst_conn, path)
        with contextlib.suppress(Exception), connect(dest) as hv:
            hv.run(f"rm -f {shlex.quote(path)}", hide=True, in_stream=False)
    if prepared.reservation:
        with contextlib.suppress(Exception):
            networks.remove_reservation(dst_conn, *prepared.reservation)


def _cleanup_source(src_conn, source, meta, disks, shared, name, message):
    if meta.get("network") and meta.get("mac") and meta.get("ip"):
        with contextlib.suppress(CloudopsError, libvirt.libvirtError):
            networks.remove_reservation(src_conn, meta["network"], meta["mac"], meta["ip"], name)
    if shared:
        return
    message(f"removing {name}'s disks from {source.name}")
    for disk in disks:
        vms._delete_path(src_conn, disk.path)


# ---------------------------------------------------------------- live

def _flags(shared, policy, disks) -> int:
    flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
             | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
    if not shared:
        flags |= libvirt.VIR_MIGRATE_NON_SHARED_INC
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
    return params


def _live(dom, disks, shared, source, dest, dst_conn, policy, progress, message) -> Result:
    name = dom.name()
    flags, params = _flags(shared, policy, disks), _params(dest, shared, disks, policy)
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
    worker.start()
    watch = _Watch(control.lookupByName(name), policy, progress, start)
    try:
        return _follow(worker, watch, outcome, dom, name, source, dest, dst_conn, shared, policy, progress)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            control.close()


def _follow(worker, watch, outcome, dom, name, source, dest, dst_conn, shared, policy, progress) -> Result:
    aborted = None
    try:
        while worker.is_alive():
            worker.join(policy.poll)
            if worker.is_alive():
                aborted = watch.tick() or aborted
                if aborted:
                    break
    except KeyboardInterrupt:
        aborted = "interrupted"
    if aborted:
        watch.abort(aborted)
        worker.join(120)
    progress_done = getattr(progress, "done", None)
    if progress_done:
        progress_done()
    error = outcome.get("error")
    if error is not None and aborted:
        what = "was interrupted" if aborted == "interrupted" else f"did not complete within {policy.timeout:g}s"
        raise CloudopsError(f"migration of {name} to {dest.name} {what}: aborted, {name} keeps running on "
                            f"{source.name}", exit_code=130 if aborted == "interrupted" else 1)
    if error is not None:
        if isinstance(error, libvirt.libvirtError):
            text = (error.get_error_message() or str(error)).strip().splitlines()
            still = "keeps running on" if _still_running(dom) else "is left on"
            raise CloudopsError(f"migration of {name} to {dest.name} failed: {text[-1] if text else error}; "
                                f"{name} {still} {source.name}")
        raise error
    if worker.is_alive():
        raise CloudopsError(f"migration of {name} to {dest.name} did not end after it was aborted; "
                            f"check both hosts (`virsh domjobinfo {name}` on {source.name})")
    new = dst_conn.lookupByName(name)
    return _result(new, name, source, dest, shared, watch)


def _still_running(dom) -> bool:
    with contextlib.suppress(libvirt.libvirtError):
        return bool(dom.isActive())
    return False


class _Watch:
    """Poll the job: feed the progress bar, ramp the downtime, switch to post-copy, enforce the timeout."""

    def __init__(self, dom, policy, progress, start):
        self.dom, self.policy, self.progress, self.start = dom, policy, progress, start
        self.iteration = 0
        self.downtime_set = None
        self.postcopy = False
        self.max_iteration = 0

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
        if (policy.postcopy_after is not None and not self.postcopy and iteration >= policy.postcopy_after
                and stats.get("memory_remaining", 0)):
            with contextlib.suppress(libvirt.libvirtError):
                self.dom.migrateStartPostCopy(0)
                self.postcopy = True
        elapsed = time.monotonic() - self.start
        self.progress(_sample(stats, elapsed, "post-copy" if self.postcopy else None))
        if policy.timeout is not None and elapsed > policy.timeout and not self.postcopy:
            return "timeout"
        return None

    def abort(self, why):
        if self.postcopy:
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


def _result(dom, name, source, dest, shared, watch) -> Result:
    stats = {}
    with contextlib.suppress(libvirt.libvirtError):
        stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    elapsed = stats.get("time_elapsed")
    return Result(
        name=name, source=source.name, target=dest.name, mode="live", shared_storage=shared, duration=0.0,
        migration_time=round(elapsed / 1000, 3) if elapsed is not None else None,
        downtime_ms=stats.get("downtime"), bytes_moved=stats.get("data_processed"),
        memory_bytes=stats.get("memory_processed"), disk_bytes=stats.get("disk_processed"),
        iterations=stats.get("memory_iteration") or watch.max_iteration or None,
        postcopy=watch.postcopy)


class ProgressBar:
    """A one-line live bar on stderr: percent, data remaining, dirty rate, iteration, ETA."""

    def __init__(self, stream=None, width: int = 24):
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = self.stream.isatty()
        self.last_line = 0.0
        self.drawn = False

    def __call__(self, p: Progress):
        filled = int(self.width * p.percent / 100)
        eta = f"{p.eta:4.0f}s" if p.eta is not None else "   ?"
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {p.percent:5.1f}%  {p.phase:<9} "
                f"left {p.remaining_mib:6.1f}/{p.total_mib:.0f} MiB  dirty {p.dirty_mib_s:5.1f} MiB/s  "
                f"{p.speed_mib_s:5.1f} MiB/s  iter {p.iteration:2d}  ETA {eta}  {p.elapsed:5.1f}s")
        if self.tty:
            self.stream.write("\r" + line + "\033[K")
            self.drawn = True
        elif time.monotonic() - self.last_line >= 2:
            self.stream.write(line + "\n")
            self.last_line = time.monotonic()
        self.stream.flush()

    def done(self):
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


# ---------------------------------------------------------------- offline

def _offline(dom, disks, shared, source, dest, src_conn, dst_conn, message) -> Result:
    """A stopped VM: its disks were copied by _prepare; define it there, undefine it here."""
    name = dom.name()
    start = time.monotonic()
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_MIGRATABLE)
    message(f"defining {name} on {dest.name}")
    new = dst_conn.defineXML(xml)
    try:
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
    except libvirt.libvirtError:
        new.undefine()
        raise
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

def history_path() -> Path:
    return guest.cloud_dir() / "migrations.jsonl"


def _record(result: Result) -> None:
    """Append the result to var/cloud/migrations.jsonl (one JSON object a line)."""
    with open(history_path(), "a") as f:
        f.write(json.dumps({"time": round(time.time(), 3), **result.to_dict()}) + "\n")


def policy_from(config: dict, **given) -> Policy:
    """A Policy from configuration (``migrate`` section) and command-line values; None means "not given"."""
    fields = Policy.__dataclass_fields__
    values = {k: v for k, v in {**config, **given}.items() if v is not None and k in fields}
    for key in ("downtime_ms", "downtime_step_ms", "downtime_max_ms", "postcopy_after", "bandwidth_mib"):
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
