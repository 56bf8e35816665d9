"""A container's root filesystem: the image's tree, unpacked once per host, and an overlay per container.

This machine (the control side) reads an image's root filesystem once with libguestfs into a tar kept
beside the image in the store (``root_tar``). On a host, over SSH (every value quoted):

- ``<pool_path>/containers/base/<image id>``: that tar unpacked, shared by every container of the image
  on the host (unpacked into a temporary directory and renamed: an interrupted copy is never used);
- ``<pool_path>/containers/<name>/``: the container's own ``upper`` and ``work`` directories and the
  ``root`` it runs on, an overlay of its upper over the base (copy on write, per container).

The overlay is mounted before every start and unmounted after every stop: a guest's shutdown script
that remounts its root read-only (the tiny image's ``rcK``) changes the mount's superblock, so the
next boot would find a read-only root on an overlay left mounted.
"""

import io
import json
import os
import secrets
import shlex
import tarfile
import tempfile
from pathlib import Path

from invoke.exceptions import UnexpectedExit

from cloudops import hostfiles
from cloudops.errors import CloudopsError
from cloudops.imaging import store as images
from cloudops.imaging.appliance import appliance

LEFT_OUT = ("./boot", "./lib/modules", "./usr/lib/modules")  # a container runs on its host's kernel
SEED_WAYS = ("/etc/cloudops/seed-apply", "/usr/bin/cloud-init")  # how a guest takes its hostname, keys, address


def unusable(image_name: str, why: str) -> CloudopsError:
    return CloudopsError(f"image {image_name} has no root filesystem usable for a container: {why}")


# ---------------------------------------------------------------- the image's tree, on this machine

# How each init is asked to power off from outside (libvirt's ``virDomainSendProcessSignal`` to pid 1). Not
# SIGTERM, libvirt's own "shutdown": busybox's init reboots on it, and libvirt 9.0 restarts a container that
# rebooted whatever its on_reboot says.
STOP_SIGNALS = {"busybox": "usr2", "systemd": "rt4"}  # SIGUSR2; SIGRTMIN+4 (systemd's poweroff)
DEFAULT_STOP_SIGNAL = "term"


def tar_path(image) -> Path:
    return images.store_dir() / f"{image.id}.rootfs.tar"


def facts(image) -> dict:
    """What ``root_tar`` found in the image: {"stop_signal": ...} (read from its note beside the tar)."""
    note = tar_path(image).with_suffix(".json")
    try:
        return json.loads(note.read_text())
    except (OSError, ValueError):
        return {"stop_signal": DEFAULT_STOP_SIGNAL}


def stop_signal_of(init_target: str) -> str:
    """The power-off signal's name for an image whose /sbin/init is (or links to) ``init_target``."""
    return next((sig for init, sig in STOP_SIGNALS.items() if init in init_target), DEFAULT_STOP_SIGNAL)


def root_tar(image, progress=lambda m: None) -> Path:
    """The image's root filesystem as a tar in the store, made on first use (one libguestfs launch), with a
    note of what its init needs to power off (``facts``).

    Refused with one line when the image holds no operating system libguestfs can find, no
    ``/sbin/init``, or no way to take its seed (cloudops's ``seed-apply`` or cloud-init)."""
    path = tar_path(image)
    if path.exists() and path.with_suffix(".json").exists():
        return path
    if not image.local_path.exists():
        raise CloudopsError(f"image {image.name} is not in this machine's image store: a container's tree is read "
                            "from it here (`invoke image.add` it)")
    progress(f"reading the root filesystem of image {image.name} for containers (once per image)")
    partial = path.with_name(f".{path.name}.partial-{secrets.token_hex(4)}")
    try:
        with appliance([(image.local_path, image.format, True)], progress) as g:
            roots = g.inspect_os()
            if not roots:
                raise unusable(image.name, "libguestfs finds no operating system in it")
            mounts = g.inspect_get_mountpoints(roots[0])
            for mountpoint in sorted(mounts, key=len):
                g.mount_ro(mounts[mountpoint], mountpoint)
            if not g.exists("/sbin/init"):
                raise unusable(image.name, "it has no /sbin/init to run")
            if not any(g.exists(p) for p in SEED_WAYS):
                raise unusable(image.name, "it has neither cloudops's seed-apply nor cloud-init, so it cannot take "
                                           "its hostname, keys and address")
            init = g.readlink("/sbin/init") if g.is_symlink("/sbin/init") else "/sbin/init"
            g.tar_out("/", str(partial), excludes=list(LEFT_OUT), numericowner=True)
        path.with_suffix(".json").write_text(json.dumps({"stop_signal": stop_signal_of(init), "init": init}))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------- on a host

def containers_dir(host) -> str:
    return f"{images.pool_path(host)}/containers"


def base_dir(host, image_id: str) -> str:
    return f"{containers_dir(host)}/base/{image_id}"


def tree_dir(host, name: str) -> str:
    return f"{containers_dir(host)}/{name}"


def root_dir(host, name: str) -> str:
    return f"{tree_dir(host, name)}/root"


def _sh(hv, host, command: str, what: str):
    try:
        return hv.run(command, hide=True, in_stream=False)
    except UnexpectedExit as exc:
        last = (exc.result.stderr.strip().splitlines() or [f"exit {exc.result.exited}"])[-1]
        raise CloudopsError(f"{host.name}: {what} failed: {last}") from None


def ensure_base(image, host, hv, tar: Path, progress=lambda m: None) -> bool:
    """The image's tree unpacked on ``host`` where missing; True when it was copied now."""
    base = base_dir(host, image.id)
    if hv.run(f"test -d {shlex.quote(base)}", warn=True, hide=True, in_stream=False).ok:
        return False
    progress(f"unpacking the tree of image {image.name} on {host.name} ({tar.stat().st_size >> 20} MiB, once per "
             "host)")
    token = secrets.token_hex(4)
    upload, partial = f"{base}.tar.partial-{token}", f"{base}.partial-{token}"
    q = {k: shlex.quote(v) for k, v in (("parent", os.path.dirname(base)), ("upload", upload),
                                        ("partial", partial), ("base", base))}
    try:
        _sh(hv, host, f"mkdir -p {q['parent']}", "making the containers directory")
        hostfiles.put_private(hv, str(tar), upload)
        _sh(hv, host, f"mkdir {q['partial']} && tar -xpf {q['upload']} --numeric-owner -C {q['partial']} "
                      f"&& chmod 0755 {q['partial']} && mv -T {q['partial']} {q['base']}",
            f"unpacking image {image.name}")
    finally:
        hv.run(f"rm -rf {q['upload']} {q['partial']}", warn=True, hide=True, in_stream=False)
    return True


def make_tree(hv, host, name: str) -> None:
    """The container's directory (0700: its files are its own) with an empty upper, work and root."""
    tree = shlex.quote(tree_dir(host, name))
    _sh(hv, host, f"mkdir -m 0700 {tree} && mkdir -m 0755 {tree}/upper {tree}/work {tree}/root",
        f"making the tree of container {name}")


def tree_exists(hv, host, name: str) -> bool:
    return hv.run(f"test -d {shlex.quote(tree_dir(host, name))}/upper", warn=True, hide=True, in_stream=False).ok


def mount(hv, host, name: str, image_id: str) -> None:
    """A fresh overlay on the container's root (one left mounted is unmounted first)."""
    tree, base = tree_dir(host, name), base_dir(host, image_id)
    options = shlex.quote(f"lowerdir={base},upperdir={tree}/upper,workdir={tree}/work")
    root = shlex.quote(f"{tree}/root")
    _sh(hv, host, f"test -d {shlex.quote(base)} || {{ echo 'the image tree {base} is missing' >&2; exit 1; }}; "
                  f"if mountpoint -q {root}; then umount {root}; fi; mount -t overlay overlay -o {options} {root}",
        f"mounting the root of container {name}")


def umount(hv, host, name: str) -> None:
    root = shlex.quote(root_dir(host, name))
    _sh(hv, host, f"if mountpoint -q {root}; then umount {root} || umount -l {root}; fi",
        f"unmounting the root of container {name}")


def remove_tree(hv, host, name: str) -> None:
    """The container's overlay unmounted and its directory removed (nothing is left of it on the host)."""
    if not name or "/" in name or name.startswith("."):
        raise CloudopsError(f"refusing to remove a container tree called {name!r}")
    umount(hv, host, name)
    _sh(hv, host, f"rm -rf --one-file-system {shlex.quote(tree_dir(host, name))}", f"removing container {name}")


def write_files(hv, host, name: str, files: dict) -> None:
    """Files into the container's upper directory before its first start: {path in the guest: (bytes, mode)},
    owned by root; parents made as needed (0755). The upload is 0600 from its first byte (it may hold a hash)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode, info.uid, info.gid = len(data), mode, 0, 0
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    upload = f"{tree_dir(host, name)}/files.tar"
    hostfiles.put_private(hv, buffer, upload)
    q = shlex.quote(upload)
    _sh(hv, host, f"tar -xpf {q} --numeric-owner --no-overwrite-dir -C {shlex.quote(tree_dir(host, name))}/upper"
                  f"; status=$?; rm -f {q}; exit $status", f"writing the seed of container {name}")


def pack_upper(hv, host, name: str, local: Path) -> int:
    """The container's own changes (its upper directory, overlay whiteouts and xattrs kept) fetched to
    ``local`` as a tar; its size in bytes."""
    tree = tree_dir(host, name)
    remote = f"{tree}/upper.tar"
    _sh(hv, host, f"umask 077 && tar -cpf {shlex.quote(remote)} --numeric-owner --xattrs "
                  f"--xattrs-include='trusted.*' -C {shlex.quote(tree)}/upper .", f"packing container {name}")
    try:
        hv.get(remote, local=str(local))
    finally:
        hv.run(f"rm -f {shlex.quote(remote)}", warn=True, hide=True, in_stream=False)
    return local.stat().st_size


def unpack_upper(hv, host, name: str, local: Path) -> None:
    """``pack_upper``'s tar unpacked as the container's upper directory on ``host`` (its tree made already)."""
    tree = tree_dir(host, name)
    remote = f"{tree}/upper.tar"
    hostfiles.put_private(hv, str(local), remote)
    q = shlex.quote(remote)
    _sh(hv, host, f"tar -xpf {q} --numeric-owner --xattrs --xattrs-include='trusted.*' -C {shlex.quote(tree)}/upper"
                  f"; status=$?; rm -f {q}; exit $status", f"unpacking container {name}")


def dropbear_key(private_openssh: str) -> bytes:
    """An ed25519 private key (OpenSSH format, ``guest.make_host_key``) in dropbear's own key file format,
    for an image whose SSH server is dropbear: ``string "ssh-ed25519"``, then ``string`` of the 32-byte seed
    followed by the 32-byte public key (each with its big-endian 32-bit length)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_private_key(private_openssh.encode(), password=None)
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def string(data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + data

    return string(b"ssh-ed25519") + string(seed + public)


def scratch_dir():
    """A private temporary directory on this machine for a container's tar in transit."""
    return tempfile.TemporaryDirectory(prefix="cloudops-container-")
