"""The cloud's shared storage: where a host sees it, its libvirt pool, the images on it, what lies under it.

A VM started with ``--storage shared`` keeps its overlay and seed in the dir pool
``cloudops-shared`` at ``<shared_path>/disks``, and its image (with a direct-boot image's
kernel and initrd) at ``<shared_path>/images/``: every file the VM needs is on storage every
host sees at the same path, so a migration moves no disk and another host can start it
(failover). ``shared_path`` is an inventory variable (``vars``, a group's or a host's); the
lab writes its own. Which storage a VM uses is recorded in its cloudops metadata
(``<cloudops:storage>``); a VM without that element predates it and is local.
"""

import os
import secrets
import shlex
import time

from cloudops import state, storage
from cloudops.errors import CloudopsError
from cloudops.state.store import LockBusy

KINDS = ("local", "shared")
POOL_NAME = "cloudops-shared"
IMAGE_LOCK_TTL = 120  # seconds a dead copier can block the image's copy on the shared path
IMAGE_WAIT = 900  # seconds a start waits for another start's copy of the same image


def validate_kind(kind) -> str:
    if kind not in KINDS:
        raise CloudopsError(f"storage must be one of {', '.join(KINDS)}, got {kind!r}")
    return kind


def kind_of(meta: dict) -> str:
    """The storage kind a VM's cloudops metadata records (local when it records none)."""
    return meta.get("storage") or "local"


def path_of(host) -> str:
    """The host's ``shared_path`` (normalized); one clear line when the inventory gives it none."""
    value = (getattr(host, "vars", None) or {}).get("shared_path")
    if not value or not isinstance(value, str) or not value.startswith("/"):
        raise CloudopsError(f"host {host.name} has no shared_path in the inventory (an absolute path, under vars "
                            "or the host's vars): --storage shared needs one")
    return os.path.normpath(value)


def disks_dir(host) -> str:
    return f"{path_of(host)}/disks"


def images_dir(host) -> str:
    return f"{path_of(host)}/images"


def image_path(image, host) -> str:
    return f"{images_dir(host)}/{image.filename}"


def boot_files(image, host) -> dict | None:
    """Kernel, initrd and command line on the shared path, for the domain template (None: bootloader)."""
    if not image.direct_boot:
        return None
    base = f"{images_dir(host)}/{image.id}"
    return {"kernel": f"{base}.kernel", "initrd": f"{base}.initrd", "cmdline": image.boot["cmdline"]}


def under(path: str, root: str) -> bool:
    """Whether ``path`` lies inside directory ``root`` (both absolute; no ``..`` tricks)."""
    path, root = os.path.normpath(path), os.path.normpath(root)
    return os.path.commonpath([path, root]) == root and path != root


def check_present(host, hv) -> None:
    """The shared path must exist on the host (a mount that is missing would fill the host's own disk)."""
    root = path_of(host)
    if not hv.run(f"test -d {shlex.quote(root)}", warn=True, hide=True, in_stream=False).ok:
        raise CloudopsError(f"{host.name}: shared path {root} does not exist (is the shared storage mounted?)")


def ensure_pool(conn, host):
    """The ``cloudops-shared`` dir pool at ``<shared_path>/disks`` on ``host``: (pool, changed)."""
    return storage.ensure_pool(conn, disks_dir(host), name=POOL_NAME)


def ensure_image(image, host, hv, progress=lambda m: None) -> bool:
    """The image's files on the shared path, copied once from the host's own pool (where ``ensure_on_host``
    put them): temp name, sha256 verified, rename, under a cloud-wide lock so two starts never copy at
    once (the second waits, then finds the files there). True when this call copied anything."""
    from cloudops.imaging import store as images

    deadline = time.monotonic() + IMAGE_WAIT
    said = False
    while True:
        if not _missing(image, host, hv):
            return False
        try:
            with state.current().lock(f"shared-image/{image.id}", ttl=IMAGE_LOCK_TTL):
                missing = _missing(image, host, hv)
                if not missing:
                    return False
                progress(f"copying image {image.name} to the shared path {images_dir(host)}")
                _copy(host, hv, f"{images.pool_path(host)}/images", images_dir(host), missing)
                return True
        except LockBusy:
            if time.monotonic() > deadline:
                raise CloudopsError(f"image {image.name} is being copied to the shared path by another cloudops "
                                    f"command for more than {IMAGE_WAIT}s; try again later") from None
            if not said:
                progress(f"waiting for another command's copy of image {image.name} to the shared path")
                said = True
            time.sleep(1)


def _missing(image, host, hv) -> dict:
    present = hv.run(f"cd {shlex.quote(images_dir(host))} 2>/dev/null && ls", warn=True, hide=True,
                     in_stream=False).stdout.split()
    return {local: spec for local, spec in image.files().items() if spec[0] not in present}


def _copy(host, hv, source_dir: str, target_dir: str, missing: dict) -> None:
    hv.run(f"mkdir -p {shlex.quote(target_dir)}", hide=True, in_stream=False)
    for remote, digest in missing.values():
        source, final = f"{source_dir}/{remote}", f"{target_dir}/{remote}"
        tmp = f"{target_dir}/.{remote}.partial-{secrets.token_hex(4)}"
        try:
            hv.run(f"cp --sparse=always {shlex.quote(source)} {shlex.quote(tmp)}", hide=True, in_stream=False)
            got = hv.run(f"sha256sum {shlex.quote(tmp)}", hide=True, in_stream=False).stdout.split()[0]
            if got != digest:
                raise CloudopsError(f"{host.name}: copy of {remote} to the shared path failed verification "
                                    f"(sha256 {got[:12]})")
            hv.run(f"chmod 0644 {shlex.quote(tmp)} && mv -f {shlex.quote(tmp)} {shlex.quote(final)}",
                   hide=True, in_stream=False)
        finally:
            hv.run(f"rm -f {shlex.quote(tmp)}", warn=True, hide=True, in_stream=False)
