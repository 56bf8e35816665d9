"""The image store: add a disk image once, get its id (sha256), copy it to hosts only where missing.

Local store (on the operator's machine): ``<state_dir>/images/store/<id>.<format>``. The
catalog (id -> name, format, sizes, boot files, the hosts it was copied to) is one document
of the cloud's state store, ``images/catalog``, so every operator of the cloud resolves the
same names to the same ids. On every hypervisor an image
lives at ``<pool_path>/images/<id>.<format>``. Copies are atomic: upload to a
temporary name, verify the sha256 on the host, then rename; an interrupted copy
is never used. Formats: qcow2 and raw, detected by ``qemu-img info``.

``add_from`` also takes an http(s) URL: the download waits in ``<store>/.partial/`` (resumed by the
next run when interrupted) until its checksums are verified, then is renamed into the store.
"""

import hashlib
import json
import posixpath
import re
import secrets
import shlex
import shutil
import stat
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cloudops import fleet, paths, state
from cloudops.errors import CloudopsError
from cloudops.progress import bar_for, no_progress
from cloudops.ssh import connect

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
FORMATS = ("qcow2", "raw")
DEFAULT_POOL = "/var/lib/cloudops"
STREAM_CIPHERS = "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com"  # AES-GCM first: cheap with AES-NI


@dataclass
class Image:
    id: str
    name: str
    format: str
    virtual_size: int
    size: int
    added: float
    # Direct kernel boot, when the image came with its kernel and initrd (recipe builds do):
    # {"cmdline": ..., "kernel": sha256, "initrd": sha256}; None boots through the image's bootloader.
    boot: dict | None = None

    @property
    def filename(self) -> str:
        return f"{self.id}.{self.format}"

    def files(self) -> dict[str, tuple[str, str]]:
        """What a host needs of this image: local file name -> (remote file name, sha256)."""
        files = {self.filename: (self.filename, self.id)}
        if self.direct_boot:
            for part in ("kernel", "initrd"):
                files[f"{self.id}.{part}"] = (f"{self.id}.{part}", self.boot[part])
        return files

    @property
    def direct_boot(self) -> bool:
        return bool(self.boot) and {"kernel", "initrd", "cmdline"} <= set(self.boot)

    def remote_boot(self, host) -> dict | None:
        """Kernel, initrd and command line on ``host``, for the domain template (None: bootloader)."""
        if not self.direct_boot:
            return None
        base = f"{pool_path(host)}/images/{self.id}"
        return {"kernel": f"{base}.kernel", "initrd": f"{base}.initrd", "cmdline": self.boot["cmdline"]}

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

CATALOG_KEY = "images/catalog"


def _images_of(data: dict) -> list[Image]:
    try:
        return [Image(**{k: v for k, v in fields.items() if k != "hosts"}) for fields in data.values()]
    except TypeError:
        raise state.StoreCorrupt(f"state store: {CATALOG_KEY} holds an entry that is not an image") from None


def _catalog() -> dict:
    """The catalog {id: Image fields + hosts}, as stored."""
    data = state.current().value(CATALOG_KEY, {})
    _images_of(data)
    return data


def _change_catalog(change):
    """Compare-and-swap ``change(data)`` into the catalog (it may run more than once: no side effects)."""
    def checked(data):
        _images_of(data)
        return change(data)

    return state.current().update(CATALOG_KEY, checked)


def list_images() -> list[Image]:
    return sorted(_images_of(_catalog()), key=lambda i: i.name)


def recorded_hosts(image: Image) -> list[str]:
    """The hosts the catalog says this image was copied to (``holders`` asks the hosts themselves)."""
    return sorted(_catalog().get(image.id, {}).get("hosts", []))


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

def inspect(path: Path, label=None) -> dict:
    """Format and virtual size from qemu-img; refuses what is not a standalone qcow2 or raw disk.
    Messages name the file ``label`` (a download's URL), else ``path``."""
    shown = label or path
    if not path.is_file():
        raise CloudopsError(f"image file {shown} does not exist")
    proc = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        why = proc.stderr.strip().splitlines()[-1:]
        raise CloudopsError(f"{shown} is not a disk image qemu-img can read: {why}")
    info = json.loads(proc.stdout)
    fmt = info.get("format")
    if fmt not in FORMATS:
        raise CloudopsError(f"{shown}: format {fmt!r} is not supported (use qcow2 or raw)")
    if info.get("backing-filename"):
        raise CloudopsError(f"{shown} has a backing file; add a standalone image (qemu-img convert it first)")
    if fmt == "raw" and not _has_partition_table_or_fs(path):
        raise CloudopsError(f"{shown} is not a disk image: no partition table or filesystem found")
    if fmt == "qcow2":
        check = subprocess.run(["qemu-img", "check", "-q", str(path)], capture_output=True, text=True)
        if check.returncode not in (0, 3):  # 3: leaked clusters only, harmless
            raise CloudopsError(f"{shown}: qcow2 image is corrupt (qemu-img check exit {check.returncode})")
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

def _store_boot_files(path: Path, image_id: str) -> dict | None:
    """Copy ``<image>.boot/{kernel,initrd.img,cmdline}`` (written by image builds) into the store."""
    source = path.with_name(path.name + ".boot")
    if not all((source / f).is_file() for f in ("kernel", "initrd.img", "cmdline")):
        return None
    store_dir().mkdir(parents=True, exist_ok=True)
    boot = {"cmdline": " ".join((source / "cmdline").read_text().split())}
    for part, src in (("kernel", "kernel"), ("initrd", "initrd.img")):
        target = store_dir() / f"{image_id}.{part}"
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}")
        shutil.copyfile(source / src, tmp)
        tmp.rename(target)
        boot[part] = sha256_file(target)
    return boot


def add_image(path, name: str | None = None, sha256: str | None = None, replace: bool = False,
              progress=lambda m: None, move: bool = False, label=None) -> tuple[Image, bool]:
    """Add a local image file to the store. Returns (image, changed); the same content twice changes nothing.

    A name belongs to one image; ``replace`` moves it to the new content and renames the
    old image ``<name>-<id[:8]>`` (still usable by id by the VMs made from it). ``move``: the file is
    a private one of the store's own (a finished download), renamed into place instead of copied.
    ``label`` is what messages call the file (a download's URL).
    """
    path = Path(path)
    label = label or path
    name = validate_name(name or path.name.split(".")[0])
    info = inspect(path, label)
    progress(f"checksumming {Path(str(label)).name} ({info['size'] // (1 << 20)} MiB)")
    digest = sha256_file(path)
    if sha256 and sha256.lower() != digest:
        raise CloudopsError(f"checksum mismatch for {label}: expected {sha256}, got {digest}")
    _name_is_free(_catalog(), name, digest, replace)
    known = _catalog().get(digest)
    if known and known["name"] == name and (store_dir() / f"{digest}.{known['format']}").exists() \
            and (known.get("boot") or not path.with_name(path.name + ".boot").exists()):
        return _images_of({digest: known})[0], False
    image = Image(id=digest, name=name, added=time.time(), boot=_store_boot_files(path, digest), **info)
    store_dir().mkdir(parents=True, exist_ok=True)
    if not image.local_path.exists() and move:
        path.chmod(0o644)  # readable like a copied image: hosts get it with its mode, libvirt's qemu reads it
        path.rename(image.local_path)
    elif not image.local_path.exists():
        tmp = image.local_path.with_name(f".{image.filename}.{secrets.token_hex(4)}")
        try:
            shutil.copyfile(path, tmp)
            if sha256_file(tmp) != digest:
                raise CloudopsError(f"copy of {path} into the store does not match its checksum")
            tmp.rename(image.local_path)
        finally:
            tmp.unlink(missing_ok=True)

    def record(data):
        holder = _name_is_free(data, name, digest, replace)
        if holder:
            holder["name"] = f"{name}-{holder['id'][:8]}"
        data[digest] = {**asdict(image), "hosts": data.get(digest, {}).get("hosts", [])}

    _change_catalog(record)
    return image, True


def partial_dir() -> Path:
    """Where downloads wait until they are verified: ``<store>/.partial/<sha256 of the URL>`` (files 0600)."""
    return store_dir() / ".partial"


def add_from(source: str, name: str | None = None, sha256: str | None = None, sha512: str | None = None,
             checksums: str | None = None, replace: bool = False, progress=no_progress,
             timeout: float = 30) -> tuple[Image, bool]:
    """Add an image from a local path or an http(s) URL, checked against every checksum given first.

    ``checksums`` is a checksum list (a URL or a file: SHA512SUMS, SHA256SUMS, BSD style) holding the
    entry for the file's name (a URL's basename). A URL is downloaded into ``partial_dir()`` (resuming
    what an interrupted run left there), verified, then renamed into the store; whatever goes wrong
    after the download, the partial file is removed: nothing stays but a stored image. ``progress`` gets
    the stages and the download's bar.
    """
    from cloudops.imaging import checksums as sums
    from cloudops.imaging import download

    is_url = download.is_url(source)
    filename = download.basename(download.check_url(source)) if is_url else Path(source).name
    name = validate_name(name or filename.split(".")[0])
    listed = None
    if checksums:
        if download.is_url(checksums):
            text = download.fetch_text(checksums, timeout=timeout)
        elif Path(checksums).is_file():
            text = Path(checksums).read_text(errors="replace")
        else:
            raise CloudopsError(f"checksum list {checksums} does not exist")
        listed = sums.lookup(text, filename, checksums)
    wanted = sums.expectations(sha256, sha512, listed)
    if not is_url:
        path = Path(source)
        if path.is_file():
            sums.verify(path, wanted, str(path))
        return add_image(path, name=name, replace=replace, progress=progress)

    known = _catalog().get(next((e.hexdigest for e in wanted if e.algorithm == "sha256"), ""))
    if known and known["name"] == name and (store_dir() / f"{known['id']}.{known['format']}").exists():
        return _images_of({known["id"]: known})[0], False  # that content is already here: no download
    partial = download.Partial.of(source, partial_dir())
    path = download.download(partial, verified=bool(wanted), timeout=timeout, progress=progress)
    try:
        if wanted:
            progress(f"verifying {filename} ({', '.join(f'{e.algorithm} from {e.source}' for e in wanted)})")
        else:
            progress("no --sha256, --sha512 or --checksums given: the download is not verified")
        sums.verify(path, wanted, source)
        return add_image(path, name=name, replace=replace, progress=progress, move=True, label=source)
    finally:
        partial.discard()


def _name_is_free(data: dict, name: str, digest: str, replace: bool) -> dict | None:
    """The entry of another image that holds ``name`` (to be renamed: ``replace``), else None; refused otherwise."""
    holder = next((v for v in data.values() if v["name"] == name), None)
    if holder and holder["id"] != digest:
        if not replace:
            raise CloudopsError(f"image name {name!r} is taken by {holder['id'][:12]}; "
                                "choose another name, remove it, or replace it")
        return holder
    return None


def remove_image(ref: str, hosts: list, in_use: dict[str, list[str]]) -> fleet.FleetResult:
    """Remove an image from the hosts and the store; refused while a VM uses it (``in_use``: image id -> VMs)."""
    image = resolve(ref)
    users = in_use.get(image.id, [])
    if users:
        raise CloudopsError(f"image {image.name!r} is used by VM(s) or container(s) {', '.join(sorted(users))}; delete them first")

    def one(host):
        directory = f"{pool_path(host)}/images"
        paths_ = " ".join(shlex.quote(f"{directory}/{remote}") for remote, _sum in image.files().values())
        tree = shlex.quote(f"{pool_path(host)}/containers/base/{image.id}")  # containers' tree (compute.rootfs)
        with connect(host) as conn:
            res = conn.run(f"ls {paths_} >/dev/null 2>&1 && echo removed; rm -f {paths_}; rm -rf {tree}", hide=True,
                           in_stream=False)
        return fleet.Changed("removed") if "removed" in res.stdout else "not present"

    result = fleet.run(hosts, one)
    if not result.failed:
        _change_catalog(lambda data: data.pop(image.id, None))
        for local in [*image.files(), f"{image.id}.rootfs.tar", f"{image.id}.rootfs.json"]:  # and containers' tar
            (store_dir() / local).unlink(missing_ok=True)
    return result


# ---------------------------------------------------------------- distribution

def ensure_on_host(image: Image, host, conn=None, progress=no_progress) -> bool:
    """Copy the image (and its boot files) to ``host`` where missing. Atomic: temp name, verify sha256 there,
    rename; an interrupted copy is never used. True when anything was copied. ``progress`` gets the copy's
    bar (bytes and rate; see ``cloudops.progress``)."""
    if conn is None:
        with connect(host) as c:
            return ensure_on_host(image, host, c, progress)
    missing = missing_on_host(image, host, conn)
    if not missing:
        return False
    put_files(image, host, conn, missing, progress, f"image {image.name} to {host.name}")
    _record_host(image, host.name)
    return True


def put_files(image: Image, host, conn, missing: dict, progress=no_progress, label: str | None = None) -> None:
    """Copy ``missing`` ({local name: (remote name, sha256)}, from ``missing_on_host``) from this machine's store
    to ``host``, each verified there before it is renamed into place; one bar named ``label``.

    Streamed with OpenSSH into the host's image receiver where it has one (deploy and the lab install it:
    the host hashes as it writes, one pass), else over ``conn`` by SFTP then ``sha256sum`` (``_put_verified``).
    OpenSSH, not paramiko, because paramiko's SFTP stayed at about 23 MiB/s on this machine where a 300mbit
    link carries 36 (BENCHMARKS.md, "Image distribution")."""
    directory = f"{pool_path(host)}/images"
    for local in missing:
        if not (store_dir() / local).exists():
            where = ", ".join(recorded_hosts(image)) or "none recorded"
            raise CloudopsError(f"image {image.name} is not in this machine's image store ({local} missing), so it "
                                f"cannot be copied to {host.name}; hosts that hold it: {where}. Add it here with "
                                "`invoke image.add`, or start the VM on one of those hosts")
    conn.run(f"mkdir -p {shlex.quote(directory)}", hide=True, in_stream=False)
    total = sum((store_dir() / local).stat().st_size for local in missing)
    with bar_for(progress, label or f"image {image.name} to {host.name}", total) as bar:
        copied = 0
        for local, (remote, digest) in missing.items():
            source = store_dir() / local
            if not _put_streamed(host, source, remote, digest):
                _put_verified(conn, host, source, f"{directory}/{remote}", digest,
                              lambda done, _size, before=copied: bar.update(before + done))
            copied += source.stat().st_size
            bar.update(copied)


def _put_verified(conn, host, source: Path, final: str, digest: str, callback) -> None:
    """Upload ``source`` to a temporary name beside ``final`` through SFTP (``callback(bytes done, size)`` as it
    goes), check its sha256 on the host, then rename it to ``final``; the temporary file never stays."""
    tmp = f"{posixpath.dirname(final)}/.{posixpath.basename(final)}.partial-{secrets.token_hex(4)}"
    try:
        sftp = conn.sftp()
        sftp.put(str(source), tmp, callback=callback)
        sftp.chmod(tmp, stat.S_IMODE(source.stat().st_mode))  # the store's mode, as Fabric's put kept it
        remote_sum = conn.run(f"sha256sum {shlex.quote(tmp)}", hide=True, in_stream=False).stdout.split()[0]
        if remote_sum != digest:
            raise CloudopsError(f"{host.name}: copy of {posixpath.basename(final)} failed verification "
                                f"(sha256 {remote_sum[:12]})")
        conn.run(f"mv -f {shlex.quote(tmp)} {shlex.quote(final)}", hide=True, in_stream=False)
    finally:
        conn.run(f"rm -f {shlex.quote(tmp)}", warn=True, hide=True, in_stream=False)


def _ssh_from_here(host) -> list[str]:
    """OpenSSH from this machine to ``host``: the inventory's key, its host key checked against the same
    known_hosts files Fabric connections trust (``ssh.known_hosts_files``), never asked about."""
    from cloudops import ssh as ssh_

    files = ssh_.known_hosts_files(host)
    argv = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={files[0]}", "-o", f"GlobalKnownHostsFile={files[1] if len(files) > 1 else '/dev/null'}",
            "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
            "-c", STREAM_CIPHERS, "-p", str(host.port)]
    if host.key:
        argv += ["-i", str(host.key), "-o", "IdentitiesOnly=yes"]
    return [*argv, f"{host.user}@{host.address}"]


def _put_streamed(host, source: Path, remote: str, digest: str, timeout: float = 1800) -> bool:
    """Stream ``source`` into the host's image receiver (``cloudkeys.RECEIVER``, run with the file's name and
    sha256 as arguments: it hashes as it writes, then renames) with OpenSSH. False when the host has no
    receiver (an older deploy): the caller falls back to SFTP; raises with one line when the copy failed."""
    from cloudops import cloudkeys

    command = " ".join(shlex.quote(a) for a in (cloudkeys.RECEIVER, remote, digest))
    with open(source, "rb") as data:
        try:
            proc = subprocess.run([*_ssh_from_here(host), command], stdin=data, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CloudopsError(f"{host.name}: copy of {remote} timed out after {timeout:g}s") from None
    if proc.returncode == 127:
        return False
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise CloudopsError(f"{host.name}: copy of {remote} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return True


def missing_on_host(image: Image, host, conn) -> dict:
    """The image's files ``host`` lacks ({local name: (remote name, sha256)}); only reads (one ``ls``)."""
    directory = f"{pool_path(host)}/images"
    present = conn.run(f"cd {shlex.quote(directory)} 2>/dev/null && ls", warn=True, hide=True, in_stream=False).stdout.split()
    return {local: spec for local, spec in image.files().items() if spec[0] not in present}


def _record_host(image: Image, host_name: str) -> None:
    def add(data):
        entry = data.get(image.id)
        if entry is not None and host_name not in entry.setdefault("hosts", []):
            entry["hosts"] = sorted([*entry["hosts"], host_name])

    _change_catalog(add)


WAYS = ("tree", "parallel", "sequential")
DEFAULT_WAY = "tree"  # the fastest on shaped links (bench/distribute.py, BENCHMARKS.md "Image distribution")


def distribute(image: Image, hosts: list, workers: int = 16, progress=no_progress, way: str | None = None,
               timeout: float = 1800) -> fleet.FleetResult:
    """Copy the image to every host that lacks it; one result per host (copied, present, or why it failed).

    ``way``: ``tree`` (the default: every host that holds it, this machine among them, serves the next
    one, so the copies double each round; ``cloudops.imaging.distribution``), ``parallel`` (from this
    machine to every host at once, at most ``workers``) or ``sequential`` (from this machine, one host
    after the other). Each copy's bar goes through ``progress``."""
    way = way or DEFAULT_WAY
    if way not in WAYS:
        raise CloudopsError(f"unknown way {way!r} to distribute an image: {', '.join(WAYS)}")
    if way == "tree":
        from cloudops.imaging import distribution

        return distribution.tree(image, hosts, progress=progress, timeout=timeout)
    return fleet.run(hosts, lambda h: fleet.Changed("copied") if ensure_on_host(image, h, progress=progress)
                     else "present", workers=workers if way == "parallel" else 1, timeout=timeout)


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
