"""Offline guest customization (hostname, root SSH keys, root password, files) with libguestfs.

Every disk of one call goes into ONE appliance (a launch costs about 30 s under TCG).
The work runs in three phases so that a failure leaves no disk half-edited:

1. validate every argument and every disk file on the host (no appliance yet);
2. in the appliance, find each disk's root filesystem (a quick probe of its partitions
   first, libguestfs inspection only for what that cannot settle, such as LVM or a
   separate /etc) and *plan* its edits by reading the current state -- any problem (no OS, no root in /etc/shadow, ...) stops here,
   before a single byte is written to any disk;
3. apply the planned writes, each as write-to-temp + rename inside the guest.

A crash of the appliance itself during phase 3 (qemu killed, host out of space) can
leave a disk partly edited; that is out of scope. Use an overlay when in doubt.
"""

import datetime
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cloudops import passwords
from cloudops.compute.guestconfig import key_identity, normalize_ssh_keys, validate_guest_path, validate_hostname
from cloudops.errors import CloudopsError
from cloudops.imaging.appliance import WRITABLE_FORMATS, appliance, disk_format, looks_like_disk


@dataclass
class Op:
    """One planned change inside a guest."""

    kind: str  # "mkdir", "chmod" or "write"
    path: str
    what: str
    mode: int = 0o644
    data: bytes = b""
    uid: int = 0
    gid: int = 0


@dataclass
class DiskPlan:
    path: Path
    root: str
    mounts: list  # [(mountpoint, mountable)] in mount order, "/" first
    ops: list = field(default_factory=list)
    unchanged: list = field(default_factory=list)


# --- phase 1: arguments and disk files -------------------------------------------------


def _disk_list(disks) -> list[Path]:
    items = [disks] if isinstance(disks, (str, os.PathLike)) else list(disks or ())
    if not items:
        raise CloudopsError("no disk image given")
    result = []
    for item in items:
        path = Path(item).expanduser().resolve()
        if path in result:
            raise CloudopsError(f"disk {path} is given twice")
        result.append(path)
    return result


def _check_disk(path: Path) -> str:
    fmt = disk_format(path)
    if fmt not in WRITABLE_FORMATS:
        raise CloudopsError(f"{path}: format {fmt} is not supported (only {', '.join(WRITABLE_FORMATS)})")
    if not os.access(path, os.R_OK | os.W_OK):
        raise CloudopsError(f"{path}: no permission to read and write")
    if not looks_like_disk(path, fmt):
        raise CloudopsError(f"{path} is not a disk image (no partition table or filesystem found)")
    return fmt


def _file_contents(files) -> dict[str, bytes]:
    result = {}
    for guest_path, source in (files or {}).items():
        target = validate_guest_path(guest_path)
        if isinstance(source, bytes):
            data = source
        elif isinstance(source, str):
            data = source.encode()
        elif isinstance(source, os.PathLike):
            local = Path(source).expanduser()
            try:
                data = local.read_bytes()
            except FileNotFoundError:
                raise CloudopsError(f"local file {local} (for {target}) does not exist") from None
            except IsADirectoryError:
                raise CloudopsError(f"local path {local} (for {target}) is a directory, not a file") from None
            except OSError as exc:
                raise CloudopsError(f"cannot read {local}: {exc.strerror}") from None
        else:
            raise CloudopsError(f"content for {target} must be bytes, str or a Path")
        result[target] = data
    return result


# --- phase 2: roots and plans ----------------------------------------------------------


def _disk_of(g, mountable: str, devices: list[str]) -> str | None:
    """The whole-disk device (/dev/sdX) a mountable (partition, LV, btrfs subvolume) lives on."""
    device = g.mountable_device(mountable)
    if device in devices:
        return device
    try:
        return g.part_to_dev(device)
    except RuntimeError:
        pass
    try:  # an LVM logical volume: the disk of its volume group's physical volumes
        vg = g.lvm_canonical_lv_name(device).split("/")[2]
        uuids = set(g.vgpvuuids(vg))
        disks = set()
        for pv in g.pvs():
            if g.pvuuid(pv) in uuids:
                disks.add(pv if pv in devices else g.part_to_dev(pv))
        return disks.pop() if len(disks) == 1 else None
    except (RuntimeError, IndexError):
        return None


# fstab types that are not a filesystem on a disk of this guest
_VIRTUAL_FS = {"proc", "sysfs", "tmpfs", "devpts", "devtmpfs", "swap", "none", "nfs", "nfs4", "cifs", "securityfs",
               "cgroup", "cgroup2", "debugfs", "mqueue", "hugetlbfs", "pstore", "bpf", "efivarfs", "configfs"}


def _fstab_mountpoints(g) -> list[str]:
    """Mountpoints other than / that /etc/fstab of the mounted guest puts on a disk filesystem."""
    text = (_read(g, "/etc/fstab") or b"").decode(errors="replace")
    result = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and not fields[0].startswith("#") and fields[1].startswith("/") and fields[1] != "/":
            if fields[2] not in _VIRTUAL_FS and "bind" not in (fields[3] if len(fields) > 3 else ""):
                result.append(fields[1])
    return result


def _part_to_dev(g, part: str) -> str:
    m = re.fullmatch(r"(/dev/[sv]d[a-z]+)\d+", part)
    return m.group(1) if m else g.part_to_dev(part)


def _quick_root(g, dev: str, partitions: list[str], targets: list[str]) -> str | None:
    """The first partition of ``dev`` (or ``dev`` itself) whose filesystem holds /etc/passwd
    and /bin, and no separate fstab mountpoint above any of ``targets``; else None.

    The root found is left mounted read-only at / (the plan reads it next). This costs
    well under a second per disk under TCG, where list_filesystems takes ~10 s and
    inspect_os ~19 s (they scan LVM, md, btrfs, ...), so it is tried first.
    """
    candidates = [p for p in partitions if _part_to_dev(g, p) == dev] or [dev]
    for part in candidates:
        try:
            g.mount_ro(part, "/")
        except RuntimeError:
            continue
        if g.is_file("/etc/passwd", followsymlinks=True) and g.is_dir("/bin", followsymlinks=True):
            for mountpoint in _fstab_mountpoints(g):
                if any(t == mountpoint or t.startswith(mountpoint.rstrip("/") + "/") for t in targets):
                    g.umount_all()
                    return None  # a multi-filesystem guest: let inspection find its mounts
            return part
        g.umount_all()
    return None


def _inspect_roots(g, pending: list[tuple[Path, str]], targets: list[str]) -> dict[Path, tuple[str, list]]:
    """libguestfs inspection for the disks the quick probe could not settle:
    {disk path: (root mountable, [(mountpoint, mountable)])}; CloudopsError if a disk has none.

    ``targets`` are the guest paths that will be written: one below a mountpoint that
    inspection places on another disk is refused.
    """
    devices = g.list_devices()
    found: dict[str, list[str]] = {dev: [] for dev in devices}
    for root in g.inspect_os():
        dev = _disk_of(g, root, devices)
        if dev is not None:
            found[dev].append(root)
    result = {}
    for path, dev in pending:
        roots = found[dev]
        if not roots:
            raise CloudopsError(f"{path}: no operating system or root filesystem found")
        if len(roots) > 1:
            raise CloudopsError(f"{path}: several operating systems found ({', '.join(roots)})")
        ostype = g.inspect_get_type(roots[0])
        if ostype != "linux":
            raise CloudopsError(f"{path}: the guest OS is {ostype}; only Linux guests can be customized")
        mounts, skipped = [("/", roots[0])], []
        for mountpoint, mountable in sorted(g.inspect_get_mountpoints(roots[0]).items(), key=lambda i: len(i[0])):
            if mountpoint == "/":
                continue
            if _disk_of(g, mountable, devices) == dev:
                mounts.append((mountpoint, mountable))
            else:
                skipped.append(mountpoint)
        for mountpoint in skipped:
            for target in targets:
                if target == mountpoint or target.startswith(mountpoint.rstrip("/") + "/"):
                    raise CloudopsError(f"{path}: {target} is on {mountpoint}, which is not on this disk")
        result[path] = (roots[0], mounts)
    return result


def _mount(g, mounts, readonly=False) -> None:
    for mountpoint, mountable in mounts:
        (g.mount_ro if readonly else g.mount)(mountable, mountpoint)


_CHUNK = 1 << 20  # pread answers in one protocol message (read_file goes through a slow file transfer)


def _stat(g, path: str) -> dict | None:
    try:
        return g.lstatns(path)
    except RuntimeError:
        return None


def _resolve(g, path: str) -> str:
    """Follow a symlink inside the guest, so an edit replaces the file it points to."""
    st = _stat(g, path)
    if st is not None and stat.S_ISLNK(st["st_mode"]):
        return g.realpath(path)
    return path


def _read(g, path: str) -> bytes | None:
    """Content of a regular file (symlinks followed), None if there is none."""
    st = _stat(g, _resolve(g, path))
    if st is None or not stat.S_ISREG(st["st_mode"]):
        return None
    path = _resolve(g, path)
    data, offset = b"", 0
    while True:
        chunk = g.pread(path, _CHUNK, offset)
        data += chunk
        offset += len(chunk)
        if len(chunk) < _CHUNK:
            return data


def _meta(g, path: str, default_mode: int) -> tuple[int, int, int]:
    st = _stat(g, path)
    if st is not None:
        return st["st_mode"] & 0o7777, st["st_uid"], st["st_gid"]
    return default_mode, 0, 0


def _ensure_file(g, plan: DiskPlan, path: str, data: bytes, what: str, default_mode=0o644, force_mode=None):
    """Plan writing ``data`` to ``path`` unless it is already there (with ``force_mode``, if given)."""
    path = _resolve(g, path)
    current = _read(g, path)
    mode, uid, gid = _meta(g, path, default_mode)
    if current == data and (force_mode is None or mode == force_mode):
        plan.unchanged.append(what)
        return
    parent = str(PurePosixPath(path).parent)
    planned = any(op.kind == "mkdir" and op.path == parent for op in plan.ops)
    if not planned and not g.is_dir(parent):
        plan.ops.append(Op("mkdir", parent, f"create {parent}", 0o755))
    plan.ops.append(Op("write", path, what, force_mode or mode, data, uid, gid))


def _plan_hostname(g, plan: DiskPlan, hostname: str) -> None:
    _ensure_file(g, plan, "/etc/hostname", f"{hostname}\n".encode(), f"hostname {hostname}")
    hosts = (_read(g, "/etc/hosts") or b"127.0.0.1 localhost\n").decode(errors="surrogateescape")
    lines = hosts.splitlines()
    wanted = f"127.0.1.1 {hostname}"
    idx = [i for i, ln in enumerate(lines) if ln.split()[:1] == ["127.0.1.1"]]
    if idx:
        lines[idx[0]] = wanted
    else:
        lines.append(wanted)
    text = "\n".join(lines) + "\n"
    _ensure_file(g, plan, "/etc/hosts", text.encode(errors="surrogateescape"), f"/etc/hosts: {wanted}")


def _root_home(g) -> str:
    for line in (_read(g, "/etc/passwd") or b"").decode(errors="replace").splitlines():
        fields = line.split(":")
        if fields[0] == "root" and len(fields) >= 6 and fields[5].startswith("/"):
            return fields[5]
    return "/root"


def _plan_keys(g, plan: DiskPlan, keys: list[str]) -> None:
    home = _resolve(g, _root_home(g))
    ssh_dir = f"{home.rstrip('/')}/.ssh"
    if not g.is_dir(ssh_dir):
        plan.ops.append(Op("mkdir", ssh_dir, f"create {ssh_dir} (0700)", 0o700))
    elif _meta(g, ssh_dir, 0o700)[0] != 0o700:
        plan.ops.append(Op("chmod", ssh_dir, f"{ssh_dir} mode 0700", 0o700))
    path = f"{ssh_dir}/authorized_keys"
    current = (_read(g, path) or b"").decode(errors="surrogateescape")
    have = {key_identity(ln) for ln in current.splitlines() if ln.strip() and not ln.startswith("#")}
    missing = [k for k in keys if key_identity(k) not in have]
    text = current if (not current or current.endswith("\n")) else current + "\n"
    text += "".join(f"{k}\n" for k in missing)
    what = f"{path}: {len(missing)} key(s) added" if missing else f"{path}: keys present"
    _ensure_file(g, plan, path, text.encode(errors="surrogateescape"), what, 0o600, force_mode=0o600)


def _plan_password(g, plan: DiskPlan, password: str) -> None:
    path = _resolve(g, "/etc/shadow")
    data = _read(g, path)
    if data is None:
        raise CloudopsError(f"{plan.path}: the guest has no /etc/shadow")
    lines = data.decode(errors="surrogateescape").splitlines()
    for i, line in enumerate(lines):
        fields = line.split(":")
        if fields[0] == "root" and len(fields) >= 2:
            if passwords.verify(password, fields[1]):
                plan.unchanged.append("root password")
                return
            fields[1] = passwords.hash_password(password)
            if len(fields) >= 3:  # last change: today (0 would force a change at the next login)
                fields[2] = str((datetime.date.today() - datetime.date(1970, 1, 1)).days)
            lines[i] = ":".join(fields)
            break
    else:
        raise CloudopsError(f"{plan.path}: /etc/shadow has no root entry")
    mode, uid, gid = _meta(g, path, 0o600)
    plan.ops.append(Op("write", path, "root password", mode, ("\n".join(lines) + "\n").encode(errors="surrogateescape"),
                       uid, gid))  # fmt: skip


# --- phase 3: apply ---------------------------------------------------------------------


def _apply(g, op: Op) -> None:
    if op.kind == "mkdir":
        g.mkdir_p(op.path)
        g.chmod(op.mode, op.path)
    elif op.kind == "chmod":
        g.chmod(op.mode, op.path)
    else:
        parent, name = str(PurePosixPath(op.path).parent), PurePosixPath(op.path).name
        tmp = f"{parent}/.{name}.cloudops-new"
        g.write(tmp, op.data)
        g.chown(op.uid, op.gid, tmp)
        g.chmod(op.mode, tmp)
        g.rename(tmp, op.path)


def customize_image(disks, root_password=None, ssh_keys=(), hostname=None, files=None, progress=None) -> dict:
    """Apply the same customization to one disk or a list of disks, in ONE appliance launch.

    ``files`` maps guest paths to bytes, str or a local ``Path``. Returns
    ``{disk path: {"root": device, "changed": [...], "unchanged": [...]}}``.
    Raises CloudopsError (and writes nothing to any disk) on bad input, a disk that
    is not an image, or a disk without a recognizable Linux root filesystem.
    """
    say = progress or (lambda message: None)
    paths = _disk_list(disks)
    formats = [_check_disk(p) for p in paths]
    if hostname is not None:
        validate_hostname(hostname)
    keys = normalize_ssh_keys(ssh_keys)
    if root_password is not None:
        passwords.hash_password(root_password)  # validates (empty, newline) without keeping the hash
    contents = _file_contents(files)
    if hostname is None and not keys and root_password is None and not contents:
        raise CloudopsError("nothing to customize: give a hostname, SSH keys, a root password or files")

    started = time.monotonic()
    targets = ["/etc", "/root", *contents]

    def plan_disk(plan: DiskPlan) -> DiskPlan:  # reads only: the guest is mounted read-only
        try:
            if hostname is not None:
                _plan_hostname(g, plan, hostname)
            if keys:
                _plan_keys(g, plan, keys)
            if root_password is not None:
                _plan_password(g, plan, root_password)
            for target, data in contents.items():
                _ensure_file(g, plan, target, data, target)
        finally:
            g.umount_all()
        return plan

    report, plans = {}, {}
    with appliance([(p, fmt, False) for p, fmt in zip(paths, formats)], say) as g:
        devices, partitions = g.list_devices(), g.list_partitions()
        pending = []
        for n, (path, dev) in enumerate(zip(paths, devices), 1):
            root = _quick_root(g, dev, partitions, targets)
            if root is None:
                pending.append((path, dev))
                continue
            say(f"disk {n}/{len(paths)} {path.name}: root {root}, planning")
            plans[path] = plan_disk(DiskPlan(path, root, [("/", root)]))
        if pending:
            say(f"inspecting {len(pending)} disk(s) the quick probe could not settle")
            for path, (root, mounts) in _inspect_roots(g, pending, targets).items():
                say(f"{path.name}: root {root}, planning")
                _mount(g, mounts, readonly=True)
                plans[path] = plan_disk(DiskPlan(path, root, mounts))
        # Every disk is planned: only now is anything written.
        for n, path in enumerate(paths, 1):
            plan = plans[path]
            if not plan.ops:
                say(f"disk {n}/{len(paths)} {path.name}: no changes")
            else:
                say(f"disk {n}/{len(paths)} {path.name}: applying {len(plan.ops)} change(s)")
                _mount(g, plan.mounts)
                for op in plan.ops:
                    _apply(g, op)
                g.umount_all()  # unmounting flushes the filesystem; shutdown syncs the disks
            report[str(path)] = {
                "root": plan.root,
                "changed": [op.what for op in plan.ops],
                "unchanged": plan.unchanged,
            }
    say(f"customized {len(paths)} disk(s) in {time.monotonic() - started:.1f} s")
    return report



# --- a copy's own identity ------------------------------------------------------------------

# What makes a guest one machine and not another, and is made again at its next boot when missing:
# SSH host keys (the tiny image's dropbear key in its boot script; OpenSSH's by cloud-init or
# ssh-keygen -A), the systemd machine id (an empty file: systemd makes a new one), cloud-init's
# record of the instance it last booted as (a new instance-id comes with the new seed anyway).
IDENTITY_GLOBS = ("/etc/dropbear/dropbear_*_host_key", "/etc/ssh/ssh_host_*_key", "/etc/ssh/ssh_host_*_key.pub")
IDENTITY_EMPTIED = ("/etc/machine-id",)


def forget_identity(disk, progress=None) -> list[str]:
    """Remove a disk's SSH host keys and empty its machine id, in one appliance launch; the paths changed.

    For a clone: at its first boot the guest makes keys and an id of its own, so it never shares
    them with the machine it was copied from."""
    say = progress or (lambda message: None)
    path = _disk_list([disk])[0]
    fmt = _check_disk(path)
    changed = []
    with appliance([(path, fmt, False)], say) as g:
        dev = g.list_devices()[0]
        root = _quick_root(g, dev, g.list_partitions(), ["/etc"])
        if root is None:
            (root, mounts), = _inspect_roots(g, [(path, dev)], ["/etc"]).values()
        else:
            mounts = [("/", root)]
        g.umount_all()
        _mount(g, mounts)
        for pattern in IDENTITY_GLOBS:
            for found in g.glob_expand(pattern):
                g.rm_f(found)
                changed.append(found)
        for target in IDENTITY_EMPTIED:
            if g.is_file(target) and g.filesize(target) > 0:
                g.truncate(target)
                changed.append(target)
        g.umount_all()
    say(f"{path.name}: removed {', '.join(changed) if changed else 'nothing (no host keys or machine id)'}")
    return changed
