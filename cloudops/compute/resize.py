"""Resize a VM (``vm.resize``): memory, vCPUs and the root disk, live where libvirt and the guest allow.

Everything is read and checked first (ranges as ``vms.validate``, a shrinking disk, memory the
host does not have free, memory in which the image's kernel cannot start), then applied, so a
refusal changes nothing. Each change goes into the persistent definition; on a running VM it
is also made live when it can be:

- memory through the balloon, up to the maximum the domain was started with (``vm.start
  --max-memory`` leaves room above its size; the guest needs a balloon driver: the tiny image
  loads virtio_balloon), checked by the balloon's actual size;
- vCPUs by CPU hotplug up to the domain's maximum (``--max-vcpus``), then brought online in
  the guest over SSH (nothing there does it by itself in a guest without udev);
- the root disk with ``blockResize`` (the guest sees the new size at once), then its
  filesystem grown in the guest over SSH where cloudops can: a filesystem on the whole disk,
  or on a partition when the guest has ``growpart``; otherwise the result says the image grows
  it at the next boot (the tiny image's initramfs and cloud-init's growpart both do).

What cannot be made live is "applied at the next boot", and the result says so and why.
"""

import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field

import libvirt

from cloudops.compute import diskfacts, guest, placement, power, records, sizing, vms
from cloudops.errors import CloudopsError
from cloudops.ssh import connect

BALLOON_WAIT = 20  # seconds the guest's balloon has to reach a new size
CPU_ONLINE_WAIT = 10  # seconds for hot-plugged vCPUs to appear in the guest
NEXT_BOOT = "applied at the next boot"
# libvirt's persistent definition takes effect when QEMU starts again: a reboot from inside the guest
# (vm.reboot) keeps the running QEMU and its size.
NEXT_START = f"{NEXT_BOOT} (the next power-on: vm.stop, then vm.poweron; a reboot keeps the running size)"


@dataclass
class Change:
    what: str    # "memory", "vcpus" or "disk"
    before: str
    after: str
    live: bool   # in effect in the running guest now
    note: str    # how it was done, or why only at the next boot

    def line(self) -> str:
        return f"{self.what} {self.before} -> {self.after} {self.note}"


@dataclass
class ResizeResult:
    vm: str
    host: str
    changed: bool
    changes: list = field(default_factory=list)
    message: str = ""

    def to_dict(self) -> dict:
        return {**asdict(self), "changes": [asdict(c) for c in self.changes]}


def check_request(memory=None, vcpus=None, disk_size=None) -> tuple[int | None, int | None, int | None]:
    """(memory MiB, vCPUs, disk bytes) checked as ``vms.validate`` checks a new VM's; at least one given."""
    if memory is None and vcpus is None and disk_size is None:
        raise CloudopsError("vm.resize needs --memory, --vcpus or --disk-size")
    checked = []
    for what, value, (low, high) in (("memory (MiB)", memory, vms.MEMORY_RANGE), ("vCPUs", vcpus, vms.VCPU_RANGE)):
        if value is not None:
            try:
                value = int(value) if not isinstance(value, bool) else None
            except (TypeError, ValueError):
                value = None
            if value is None or not low <= value <= high:
                raise CloudopsError(f"{what} must be a whole number from {low} to {high}")
        checked.append(value)
    return checked[0], checked[1], sizing.parse_size(disk_size) if disk_size is not None else None


def resize_vm(name: str, hosts: list, memory=None, vcpus=None, disk_size=None, progress=lambda m: None,
              balloon_wait: float = BALLOON_WAIT) -> ResizeResult:
    """Give VM ``name`` this memory (MiB), vCPUs and root disk size (bytes or ``4G``); None keeps one as it is."""
    vms.validate_name(name)
    memory, vcpus, disk_size = check_request(memory, vcpus, disk_size)
    with power._own_vm(name, hosts, "resize it") as (host, conn, dom):
        vm = vms.describe(dom, host.name)
        if dom.isActive() and vm.state != "running":
            raise CloudopsError(f"VM {name} on {host.name} is {vm.state}: resize it running or stopped")
        running = bool(dom.isActive())
        plans = []  # every check first: a refusal changes nothing
        if memory is not None:
            plans.append(_plan_memory(dom, host, vm, memory, running))
        if vcpus is not None:
            plans.append(_plan_vcpus(dom, vcpus, running))
        if disk_size is not None:
            plans.append(_plan_disk(dom, conn, name, disk_size, running))
        changes = [step(progress) for step in plans if step is not None]
        if not changes:
            return ResizeResult(name, host.name, False, [], f"{name} on {host.name}: already that size, nothing to do")
        records.refresh(name, dom, host.name)  # a failover defines the VM at its new size
        if any(c.what in ("vcpus", "disk") and c.live for c in changes) and vm.ip:
            _in_guest(host, vm.ip, changes, vcpus, disk_size, progress)
    lines = "\n".join(f"{name} on {host.name}: {c.line()}" for c in changes)
    return ResizeResult(name, host.name, True, changes, lines)


# ---------------------------------------------------------------- memory

def _kib(root: ET.Element, tag: str) -> int:
    element = root.find(tag)
    unit = element.get("unit", "KiB")
    factor = {"KiB": 1, "k": 1, "MiB": 1024, "M": 1024, "GiB": 1 << 20, "G": 1 << 20, "b": 1 / 1024,
              "bytes": 1 / 1024}.get(unit, 1)
    return int(int(element.text) * factor)


def _plan_memory(dom, host, vm, memory: int, running: bool):
    config = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    cfg_max, cfg_cur = _kib(config, "memory"), _kib(config, "currentMemory")
    live_max = live_cur = None
    if running:
        live = ET.fromstring(dom.XMLDesc(0))
        live_max, live_cur = _kib(live, "memory"), _kib(live, "currentMemory")
    new = memory * 1024
    now = live_cur if running else cfg_cur
    if new == now and new == cfg_cur:
        return None
    _check_floor(memory, vm)
    uses_now = now // 1024 if running else 0
    if memory > uses_now:
        free = placement.host_state(host, set()).memory_free_mb
        if free is not None and memory - uses_now > free:
            raise CloudopsError(f"cannot give {vm.name} {memory} MiB: {host.name} has only {free} MiB of memory free "
                                f"(it would need {memory - uses_now} MiB more)")
    new_max = cfg_max if cfg_max > cfg_cur and new <= cfg_max else new  # room to grow is kept when it still fits

    def apply(progress):
        _set_config(dom, new, new_max, cfg_max, libvirt.VIR_DOMAIN_MEM_MAXIMUM, dom.setMemoryFlags)
        before, after = f"{now // 1024} MiB", f"{memory} MiB"
        if not running:
            return Change("memory", before, after, False, f"{NEXT_BOOT} (the VM is stopped: when it is powered on)")
        if new > live_max:
            return Change("memory", before, after, False,
                          f"{NEXT_START}: above the maximum the running VM was started with ({live_max // 1024} MiB; "
                          "vm.start --max-memory leaves room to grow live)")
        if new == live_cur:
            return Change("memory", before, after, True, "live already; now in its definition too")
        if new != live_cur:
            progress(f"setting {vm.name}'s balloon to {memory} MiB")
            try:
                dom.setMemoryFlags(new, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError as exc:
                return Change("memory", before, after, False, f"{NEXT_START}; live it failed: {_line(exc)}")
            if not _balloon_reached(dom, new, BALLOON_WAIT):
                return Change("memory", before, after, False,
                              f"{NEXT_START}: the guest's balloon did not reach it within {BALLOON_WAIT}s "
                              "(no balloon driver in the guest?)")
        return Change("memory", before, after, True, "live (memory balloon) and in its definition")

    return apply


def _check_floor(memory: int, vm) -> None:
    """The image's kernel must still start in the new size (checked when the image is known here)."""
    from cloudops.imaging import store as images

    try:
        image = images.resolve(vm.image) if vm.image else None
    except CloudopsError:
        return
    if image is not None:
        sizing.check_memory(memory, image)


def _balloon_reached(dom, kib: int, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            actual = dom.memoryStats().get("actual")
        except libvirt.libvirtError:
            actual = None
        if actual is not None and abs(actual - kib) <= 1024:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def _set_config(dom, new, new_max, cfg_max, maximum_flag, setter) -> None:
    """Current and maximum in the persistent definition, in the order libvirt accepts (current <= maximum)."""
    config = libvirt.VIR_DOMAIN_AFFECT_CONFIG
    if new_max > cfg_max:
        setter(new_max, config | maximum_flag)
        setter(new, config)
    else:
        setter(new, config)
        if new_max != cfg_max:
            setter(new_max, config | maximum_flag)


# ---------------------------------------------------------------- vCPUs

def _plan_vcpus(dom, vcpus: int, running: bool):
    config, maximum = libvirt.VIR_DOMAIN_AFFECT_CONFIG, libvirt.VIR_DOMAIN_VCPU_MAXIMUM
    cfg_cur, cfg_max = dom.vcpusFlags(config), dom.vcpusFlags(config | maximum)
    live_cur = live_max = None
    if running:
        live = libvirt.VIR_DOMAIN_AFFECT_LIVE
        live_cur, live_max = dom.vcpusFlags(live), dom.vcpusFlags(live | maximum)
    now = live_cur if running else cfg_cur
    if vcpus == now and vcpus == cfg_cur:
        return None
    new_max = cfg_max if cfg_max > cfg_cur and vcpus <= cfg_max else vcpus

    def apply(progress):
        _set_config(dom, vcpus, new_max, cfg_max, maximum, dom.setVcpusFlags)
        before, after = str(now), str(vcpus)
        if not running:
            return Change("vcpus", before, after, False, f"{NEXT_BOOT} (the VM is stopped: when it is powered on)")
        if vcpus > live_max:
            return Change("vcpus", before, after, False,
                          f"{NEXT_START}: above the maximum the running VM was started with ({live_max}; "
                          "vm.start --max-vcpus leaves room to grow live)")
        if vcpus == live_cur:
            return Change("vcpus", before, after, True, "live already; now in its definition too")
        how = "hot-plugged" if vcpus > live_cur else "unplugged"
        progress(f"{'hot-plugging' if vcpus > live_cur else 'unplugging'} vCPUs of {dom.name()}: {live_cur} -> {vcpus}")
        try:
            dom.setVcpusFlags(vcpus, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            return Change("vcpus", before, after, False, f"{NEXT_START}; live it failed: {_line(exc)}")
        return Change("vcpus", before, after, True, f"live ({how}) and in its definition")

    return apply


# ---------------------------------------------------------------- root disk

def _plan_disk(dom, conn, name: str, size: int, running: bool):
    root = diskfacts.root_disk(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), name)
    try:
        volume = conn.storageVolLookupByPath(root.path)
    except libvirt.libvirtError:
        volume = None
    if running:
        capacity = dom.blockInfo(root.target)[0]
    elif volume is not None:
        capacity = volume.info()[1]
    else:
        raise CloudopsError(f"{name}'s root disk {root.path} is in no storage pool: cannot resize it while stopped")
    if size < capacity:
        raise CloudopsError(f"{name}'s root disk is {sizing.format_size(capacity)}: shrinking it to "
                            f"{sizing.format_size(size)} is refused (it would cut off its filesystem)")
    if size == capacity:
        return None

    def apply(progress):
        before, after = sizing.format_size(capacity), sizing.format_size(size)
        if running:
            progress(f"growing {name}'s root disk ({root.target}) to {after} live")
            dom.blockResize(root.target, size, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
            return Change("disk", before, after, True, "live (blockResize: the guest sees the new size)")
        volume.resize(size, 0)
        return Change("disk", before, after, False,
                      f"{NEXT_BOOT} (the VM is stopped; images that grow their root at boot, such as tiny and "
                      "cloud-init ones, grow the filesystem then)")

    return apply


# ---------------------------------------------------------------- in the guest

# Grows the root filesystem to its disk where it can; prints one verdict line last. No user value in it:
# WANT is a number cloudops formats itself.
GROW_ROOT = r"""
want=WANT
dev=$(awk '$2 == "/" && $1 ~ "^/dev/" {print $1; exit}' /proc/mounts)
fs=$(awk '$2 == "/" && $1 ~ "^/dev/" {print $3; exit}' /proc/mounts)
[ -b "$dev" ] || { echo "verdict unknown-root"; exit 0; }
name=${dev##*/}
part=""
disk=$name
if [ -r "/sys/class/block/$name/partition" ]; then
  part=$(cat "/sys/class/block/$name/partition")
  disk=$(basename "$(readlink -f "/sys/class/block/$name/..")")
fi
i=0
while [ $(( $(cat "/sys/block/$disk/size") * 512 )) -lt "$want" ] && [ "$i" -lt 20 ]; do i=$((i + 1)); sleep 1; done
echo "disk /dev/$disk $(( $(cat "/sys/block/$disk/size") * 512 ))"
if [ -n "$part" ]; then
  if ! command -v growpart > /dev/null 2>&1; then echo "verdict no-growpart $dev $fs"; exit 0; fi
  growpart "/dev/$disk" "$part" > /dev/null 2>&1
  [ $? -le 1 ] || { echo "verdict growpart-failed $dev $fs"; exit 0; }
fi
case "$fs" in
  ext2|ext3|ext4) resize2fs "$dev" > /dev/null 2>&1 ;;
  xfs) xfs_growfs / > /dev/null 2>&1 ;;
  btrfs) btrfs filesystem resize max / > /dev/null 2>&1 ;;
  *) echo "verdict unknown-fs $dev $fs"; exit 0 ;;
esac && echo "verdict grown $dev $fs" || echo "verdict grow-failed $dev $fs"
"""

ONLINE_CPUS = r"""
want=WANT
i=0
while :; do
  for f in /sys/devices/system/cpu/cpu[0-9]*/online; do
    [ -w "$f" ] && [ "$(cat "$f")" = 0 ] && echo 1 > "$f" 2> /dev/null
  done
  n=$(grep -c '^processor' /proc/cpuinfo)
  [ "$n" -ge "$want" ] || [ "$i" -ge TRIES ] && break
  i=$((i + 1)); sleep 1
done
echo "online $n"
"""


def _in_guest(host, ip: str, changes: list, vcpus, disk_size, progress) -> None:
    """Bring hot-plugged vCPUs online and grow the root filesystem, in the guest over SSH; notes added to changes."""
    cpu = next((c for c in changes if c.what == "vcpus" and c.live), None)
    disk = next((c for c in changes if c.what == "disk" and c.live), None)
    if cpu is None and disk is None:
        return
    try:
        with connect(host) as hv, guest.connect_vm(hv, ip) as conn:
            if cpu is not None:
                progress("bringing the new vCPUs online in the guest")
                script = ONLINE_CPUS.replace("WANT", str(int(vcpus))).replace("TRIES", str(CPU_ONLINE_WAIT))
                out = conn.run(script, hide=True, warn=True, in_stream=False, timeout=60).stdout.split()
                online = out[-1] if out and out[-1].isdigit() else "?"
                cpu.note += f"; {online} online in the guest"
            if disk is not None:
                progress("growing the root filesystem in the guest")
                out = conn.run(GROW_ROOT.replace("WANT", str(int(disk_size))), hide=True, warn=True,
                               in_stream=False, timeout=120).stdout
                disk.note += "; " + grow_note(out)
    except Exception as exc:  # noqa: BLE001 - the resize is done; only the guest's part is reported missing
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        for change in (cpu, disk):
            if change is not None:
                change.note += f"; the guest did not answer SSH ({reason}): nothing was done inside it"


def grow_note(output: str) -> str:
    """What the GROW_ROOT script's verdict line means, for the operator."""
    verdict = next((line.split()[1:] for line in reversed(output.splitlines()) if line.startswith("verdict ")), [])
    kind, dev, fs = (verdict + ["", "", ""])[:3]
    if kind == "grown":
        return f"root filesystem ({fs} on {dev}) grown in the guest"
    if kind == "no-growpart":
        return (f"its root filesystem ({fs} on {dev}, a partition) was not grown live: the guest has no growpart; "
                f"images that grow their root at boot (tiny, cloud-init) grow it at the next boot (a reboot will do)")
    if kind == "unknown-fs":
        return f"its root filesystem ({fs or '?'} on {dev}) is of a kind cloudops does not grow: grow it in the guest"
    if kind in ("growpart-failed", "grow-failed"):
        return f"growing its root filesystem ({fs} on {dev}) in the guest failed: grow it there by hand"
    return "the guest's root filesystem could not be found: grow it in the guest"


def _line(exc: libvirt.libvirtError) -> str:
    text = (exc.get_error_message() or str(exc)).strip().splitlines()
    return text[-1] if text else str(exc)

