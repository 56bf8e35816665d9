"""The image store: add a disk image once, get its id (sha256), copy it to hosts only where missing.

Local store (on the operator's machine): ``var/images/store/<id>.<format>`` plus a
catalog ``var/images/catalog.json`` of names -> ids. On every hypervisor an image
lives at ``<pool_path>/images/<id>.<format>``. Copies are atomic: upload to a
temporary name, verify the sha256 on the host, then rename; an interrupted copy
is never used. Formats: qcow2 and raw, detected by ``qemu-img info``.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import fleet, paths
from .errors import CloudopsError
from .ssh import connect

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
FORMATS = ("qcow2", "raw")
DEFAULT_POOL = "/var/lib/cloudops"


@dataclass
class Image:
    id: str
    name: str
    format: str
    virtual_size: int
    size: int
    added: float

    @property
    def filename(self) -> str:
        return f"{self.id}.{self.format}"

    @property
    def local_path(self) -> Path:
        return store_dir() / self.filename

    def remote_path(self, host) -> str:
        return f"{pool_path(host)}/images/{self.filename}"


def store_dir() -> Path:
    return paths.var_dir() / "images" / "store"


def pool_path(host) -> str:
    return str(host.vars.get("pool_path") or DEFAULT_POOL)


def validate_name(name: str, what: str = "image") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise CloudopsError(f"invalid {what} name {name!r}: use 1-63 of a-z 0-9 . _ -, starting with a letter or digit")
    return name


# ---------------------------------------------------------------- catalog

@contextlib.contextmanager
def _catalog(write: bool = False):
    """The catalog {id: Image fields}, locked; saved atomically when ``write``."""
    path = paths.var_dir() / "images" / "catalog.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            raise CloudopsError(f"image catalog {path} is corrupt") from None
        yield data
        if write:
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
            tmp.rename(path)


def list_images() -> list[Image]:
    with _catalog() as data:
        return sorted((Image(**v) for v in data.values()), key=lambda i: i.name)


def resolve(ref: str) -> Image:
    """An image by name, full id, or an id prefix of at least 8 characters."""
    images = list_images()
    for image in images:
        if ref in (image.name, image.id):
            return image
    matches = [i for i in images if len(ref) >= 8 and i.id.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(i.name for i in images) or "none (add one with `invoke image.add`)"
    raise CloudopsError(f"unknown image {ref!r} (known: {known})")


# ---------------------------------------------------------------- inspection

def inspect(path: Path) -> dict:
    """Format and virtual size from qemu-img; refuses what is not a standalone qcow2 or raw disk."""
    if not path.is_file():
        raise CloudopsError(f"image file {path} does not exist")
    proc = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CloudopsError(f"{path} is not a disk image qemu-img can read: {proc.stderr.strip().splitlines()[-1:]}")
    info = json.loads(proc.stdout)
    fmt = info.get("format")
    if fmt not in FORMATS:
        raise CloudopsError(f"{path}: format {fmt!r} is not supported (use qcow2 or raw)")
    if info.get("backing-filename"):
        raise CloudopsError(f"{path} has a backing file; add a standalone image (qemu-img convert it first)")
    if fmt == "raw" and not _has_partition_table_or_fs(path):
        raise CloudopsError(f"{path} is not a disk image: no partition table or filesystem found")
    if fmt == "qcow2":
        check = subprocess.run(["qemu-img", "check", "-q", str(path)], capture_output=True, text=True)
        if check.returncode not in (0, 3):  # 3: leaked clusters only, harmless
            raise CloudopsError(f"{path}: qcow2 image is corrupt (qemu-img check exit {check.returncode})")
    return {"format": fmt, "virtual_size": int(info["virtual-size"]), "size": path.stat().st_size}


def _has_partition_table_or_fs(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    if len(head) >= 512 and head[510:512] == b"\x55\xaa":
        return True  # MBR (or protective MBR of GPT)
    if len(head) > 1082 and head[1080:1082] == b"\x53\xef":
        return True  # ext2/3/4 superblock magic
    return False


def sha256_file(path: Path, chunk: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- add and remove

def add_image(path, name: str | None = None, sha256: str | None = None, progress=lambda m: None) -> tuple[Image, bool]:
    """Add a local image file to the store. Returns (image, changed); the same content twice changes nothing."""
    path = Path(path)
    name = validate_name(name or path.name.split(".")[0])
    info = inspect(path)
    progress(f"checksumming {path.name} ({info['size'] // (1 << 20)} MiB)")
    digest = sha256_file(path)
    if sha256 and sha256.lower() != digest:
        raise CloudopsError(f"checksum mismatch for {path}: expected {sha256}, got {digest}")
    with _catalog(write=True) as data:
        holder = next((v for v in data.values() if v["name"] == name), None)
        if holder and holder["id"] != digest:
            raise CloudopsError(f"image name {name!r} is taken by {holder['id'][:12]}; choose another name or remove it")
        if digest in data and data[digest]["name"] == name and Image(**data[digest]).local_path.exists():
            return Image(**data[digest]), False
        image = Image(id=digest, name=name, added=time.time(), **info)
        store_dir().mkdir(parents=True, exist_ok=True)
        if not image.local_path.exists():
            tmp = image.local_path.with_name(f".{image.filename}.{secrets.token_hex(4)}")
            try:
                shutil.copyfile(path, tmp)
                if sha256_file(tmp) != digest:
                    raise CloudopsError(f"copy of {path} into the store does not match its checksum")
                tmp.rename(image.local_path)
            finally:
                tmp.unlink(missing_ok=True)
        data[digest] = asdict(image)
    return image, True


def remove_image(ref: str, hosts: list, in_use: dict[str, list[str]]) -> fleet.FleetResult:
    """Remove an image from the hosts and the store; refused while a VM uses it (``in_use``: image id -> VMs)."""
    image = resolve(ref)
    users = in_use.get(image.id, [])
    if users:
        raise CloudopsError(f"image {image.name!r} is used by VM(s) {', '.join(sorted(users))}; delete them first")

    def one(host):
        path = image.remote_path(host)
        with connect(host) as conn:
            res = conn.run(f"test -e {shlex.quote(path)} && rm -f {shlex.quote(path)} && echo removed || true",
                           hide=True, in_stream=False)
        return fleet.Changed("removed") if "removed" in res.stdout else "not present"

    result = fleet.run(hosts, one)
    if not result.failed:
        with _catalog(write=True) as data:
            data.pop(image.id, None)
        image.local_path.unlink(missing_ok=True)
    return result


# ---------------------------------------------------------------- distribution

def ensure_on_host(image: Image, host, conn=None) -> bool:
    """Copy the image to ``host`` unless present. Atomic: temp name, verify sha256 there, rename. True if copied."""
    if conn is None:
        with connect(host) as c:
            return ensure_on_host(image, host, c)
    final = image.remote_path(host)
    directory = os.path.dirname(final)
    if conn.run(f"test -f {shlex.quote(final)}", warn=True, hide=True, in_stream=False).ok:
        return False
    if not image.local_path.exists():
        raise CloudopsError(f"image {image.name} is missing from the local store ({image.local_path}); add it again")
    tmp = f"{directory}/.{image.filename}.partial-{secrets.token_hex(4)}"
    conn.run(f"mkdir -p {shlex.quote(directory)}", hide=True, in_stream=False)
    try:
        conn.put(str(image.local_path), tmp)
        remote_sum = conn.run(f"sha256sum {shlex.quote(tmp)}", hide=True, in_stream=False).stdout.split()[0]
        if remote_sum != image.id:
            raise CloudopsError(f"{host.name}: copy of {image.name} failed verification (sha256 {remote_sum[:12]})")
        conn.run(f"mv -f {shlex.quote(tmp)} {shlex.quote(final)}", hide=True, in_stream=False)
    finally:
        conn.run(f"rm -f {shlex.quote(tmp)}", warn=True, hide=True, in_stream=False)
    return True


def distribute(image: Image, hosts: list, workers: int = 16) -> fleet.FleetResult:
    """Copy the image to every host that lacks it, in parallel."""
    return fleet.run(hosts, lambda h: fleet.Changed("copied") if ensure_on_host(image, h) else "present",
                     workers=workers, timeout=1800)


def holders(hosts: list) -> dict[str, list[str]]:
    """image id -> names of the hosts that hold it (one `ls` per host, in parallel)."""
    def one(host):
        with connect(host) as conn:
            out = conn.run(f"ls {shlex.quote(pool_path(host) + '/images')} 2>/dev/null || true",
                           hide=True, in_stream=False).stdout
        return [n.split(".")[0] for n in out.split() if not n.startswith(".")]

    found: dict[str, list[str]] = {}
    for r in fleet.run(hosts, one):
        for image_id in r.value or []:
            found.setdefault(image_id, []).append(r.host)
    return found
