"""One libguestfs appliance for a batch of disks: backend choice, launch, clean close.

Launching the appliance is the expensive part (about 30 s under TCG), so callers
add every disk they will touch and launch once.
"""

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

from cloudops import kvm
from cloudops.errors import CloudopsError

# What qemu-img may report that libguestfs can open read-write.
WRITABLE_FORMATS = ("raw", "qcow2")


def disk_format(path) -> str:
    """The image format qemu-img detects (``raw``, ``qcow2``, ...); CloudopsError if unreadable."""
    path = Path(path)
    if not path.exists():
        raise CloudopsError(f"disk image {path} does not exist")
    if not path.is_file() and not path.is_block_device():
        raise CloudopsError(f"{path} is not a file or block device")
    proc = subprocess.run(
        ["qemu-img", "info", "--force-share", "--output=json", str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CloudopsError(f"{path} is not a disk image: {last}")
    return json.loads(proc.stdout)["format"]


def looks_like_disk(path, fmt: str) -> bool:
    """For raw files: an MBR/GPT signature or an ext2/3/4 superblock; random bytes fail."""
    if fmt != "raw":
        return True
    with open(path, "rb") as f:
        head = f.read(2048)
    if len(head) < 1082:
        return False
    return head[510:512] == b"\x55\xaa" or head[1080:1082] == b"\x53\xef"


def _new_handle():
    try:
        import guestfs  # noqa: PLC0415 - Debian's python3-guestfs, only needed here
    except ImportError:
        raise CloudopsError("the libguestfs Python binding is missing (apt-get install python3-guestfs)") from None
    g = guestfs.GuestFS(python_return_dict=True)
    if "LIBGUESTFS_BACKEND" not in os.environ:
        g.set_backend("direct")
    if "LIBGUESTFS_BACKEND_SETTINGS" not in os.environ and not kvm.usable_here():
        g.set_backend_settings(["force_tcg"])
    return g


@contextlib.contextmanager
def appliance(drives, progress=None):
    """Yield a launched GuestFS handle with ``drives`` ([(path, format, readonly)]) added in order.

    The devices inside are /dev/sda, /dev/sdb, ... in the same order. On leaving, the
    appliance is shut down (which syncs every disk) and the handle closed.
    """
    g = _new_handle()
    try:
        for path, fmt, readonly in drives:
            g.add_drive_opts(str(path), format=fmt, readonly=readonly)
        if progress:
            progress(f"launching the libguestfs appliance ({len(drives)} disk(s))")
        started = time.monotonic()
        try:
            g.launch()
        except RuntimeError as exc:
            message = str(exc).splitlines()[0] if str(exc) else "unknown error"
            if "lock" in message.lower():
                raise CloudopsError(f"a disk is in use (locked by a running VM?): {message}") from None
            raise CloudopsError(f"libguestfs appliance failed to start: {message}") from None
        if progress:
            progress(f"appliance up in {time.monotonic() - started:.1f} s")
        yield g
        g.shutdown()
    finally:
        g.close()
