"""Build bootable qcow2 images from recipes (cloudops/imaging/recipes/*.yaml), cached by content hash.

The ``tiny`` recipe needs only packages already on the build host: the Debian kernel
and its modules, busybox-static, dropbear-bin, syslinux-common and extlinux. A tree
is staged in a temporary directory, then ONE libguestfs appliance partitions the disk
(MBR), makes the ext4 root, unpacks the tree, installs extlinux and the MBR boot code.
The ``debian`` recipe stages the tree with debootstrap instead (needs root and a mirror).

Images land in ``var/images/build/<recipe>-<hash>.qcow2``; the hash covers the recipe,
the image templates, this module, the kernel version and the host binaries copied in,
so a second build with the same inputs returns the cached file at once. A build
writes to a temporary name and renames it on success: a failed build leaves nothing.
"""

import datetime
import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cloudops import atomicfile, paths
from cloudops.errors import CloudopsError
from cloudops.imaging.appliance import appliance
from cloudops.imaging.kernel import pvh_kernel
from cloudops.templating import render

RECIPES = Path(__file__).resolve().parent / "recipes"
IMAGE_TEMPLATES = paths.TEMPLATES / "image"
MBR_BIN = Path("/usr/lib/syslinux/mbr/mbr.bin")
SYSTEMD_BOOT_EFI = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi"  # in the image's tree (systemd-boot-efi)
ESP_MOUNT = "/boot/efi"
SEED_LABEL = "cidata"
TINY_VERSION = "1"
_SIZE_RE = re.compile(r"^(\d+)([KMG]?)$")


@dataclass
class Recipe:
    name: str
    builder: str
    path: Path
    disk_size: str
    cmdline: str
    hostname: str
    fs_label: str = "cloudops-root"
    kernel: str = "newest"
    modules: list = field(default_factory=list)
    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    variant: str = "minbase"
    packages: list = field(default_factory=list)
    description: str = ""
    esp_size: str | None = None  # an EFI system partition of this size: the image also boots with UEFI


def build_dir() -> Path:
    return paths.var_dir() / "images" / "build"


def load_recipe(name: str) -> Recipe:
    """Read and check ``cloudops/imaging/recipes/<name>.yaml``."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name or ""):
        raise CloudopsError(f"bad recipe name {name!r}")
    path = RECIPES / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise CloudopsError(f"no recipe {name!r} (known: {known})")
    data = yaml.safe_load(path.read_text()) or {}
    fields = set(Recipe.__dataclass_fields__) - {"path"}
    unknown = set(data) - fields
    if unknown:
        raise CloudopsError(f"recipe {name}: unknown keys {', '.join(sorted(unknown))}")
    try:
        recipe = Recipe(path=path, **data)
    except TypeError as exc:
        raise CloudopsError(f"recipe {name}: {exc}") from None
    if recipe.builder not in BUILDERS:
        raise CloudopsError(f"recipe {name}: unknown builder {recipe.builder!r}")
    if not _SIZE_RE.match(str(recipe.disk_size)):
        raise CloudopsError(f"recipe {name}: disk_size {recipe.disk_size!r} is not like 128M or 2G")
    if recipe.esp_size is not None and not _SIZE_RE.match(str(recipe.esp_size)):
        raise CloudopsError(f"recipe {name}: esp_size {recipe.esp_size!r} is not like 128M")
    return recipe


def _bytes(size: str) -> int:
    number, unit = _SIZE_RE.match(str(size)).groups()
    return int(number) << {"": 0, "K": 10, "M": 20, "G": 30}[unit]


# --- kernel and modules -------------------------------------------------------


def _version_key(version: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", version)]


def find_kernel(spec: str = "newest", boot: Path = Path("/boot"), moddir: Path = Path("/lib/modules")) -> str:
    """Kernel version to use: ``spec`` itself, or the newest with both vmlinuz and modules."""
    found = sorted(
        (p.name[len("vmlinuz-"):] for p in boot.glob("vmlinuz-*") if (moddir / p.name[len("vmlinuz-"):]).is_dir()),
        key=_version_key,
    )
    if spec != "newest":
        if spec not in found:
            raise CloudopsError(f"kernel {spec} not found in {boot} with modules in {moddir}")
        return spec
    if not found:
        raise CloudopsError(f"no kernel in {boot} with modules in {moddir} (apt-get install linux-image-amd64)")
    return found[-1]


def _modname(path: str) -> str:
    name = Path(path).name
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def resolve_modules(wanted, kernel: str, moddir: Path = Path("/lib/modules")) -> list[tuple[str, Path]]:
    """[(name, file)] for ``wanted`` and their dependencies, each after what it needs.

    Modules built into the kernel (modules.builtin) are skipped; an unknown one is an error.
    """
    base = moddir / kernel
    deps, files = {}, {}
    for line in (base / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        name = _modname(target)
        files[name] = base / target
        deps[name] = [_modname(d) for d in rest.split()]
    builtin_file = base / "modules.builtin"
    builtin = {_modname(x) for x in builtin_file.read_text().split()} if builtin_file.exists() else set()
    order, seen = [], set()

    def visit(name, chain):
        if name in seen or name in builtin:
            return
        if name not in files:
            raise CloudopsError(f"kernel {kernel} has no module {name!r}")
        if name in chain:
            raise CloudopsError(f"module dependency cycle: {' -> '.join(chain + [name])}")
        for dep in deps[name]:
            visit(dep, chain + [name])
        seen.add(name)
        order.append(name)

    for name in wanted:
        visit(name.replace("-", "_"), [])
    return [(name, files[name]) for name in order]


# --- archives -----------------------------------------------------------------


def newc_archive(root: Path, extra_nodes=()) -> bytes:
    """A newc cpio archive of ``root`` owned by root:root with mtime 0, plus char-device nodes.

    ``extra_nodes`` is [(path, mode, major, minor)]; this avoids needing mknod (and root) at build time.
    """
    out = io.BytesIO()
    ino = 1

    def entry(name: str, mode: int, data: bytes = b"", rdev=(0, 0), nlink=1):
        nonlocal ino
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
        out.write(b"070701" + b"".join(b"%08x" % v for v in fields) + encoded)
        out.write(b"\0" * (-(110 + len(encoded)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
        ino += 1

    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(dirnames) + sorted(filenames):
            full = Path(dirpath) / name
            rel = str(rel_dir / name) if str(rel_dir) != "." else name
            st = full.lstat()
            if full.is_symlink():
                entry(rel, st.st_mode, os.readlink(full).encode())
            elif full.is_dir():
                entry(rel, st.st_mode, nlink=2)
            else:
                entry(rel, st.st_mode, full.read_bytes())
    for name, mode, major, minor in extra_nodes:
        entry(name.lstrip("/"), 0o020000 | mode, rdev=(major, minor))
    entry("TRAILER!!!", 0)
    return out.getvalue()


def tar_tree(root: Path, tar_path: Path, extra_nodes=()) -> None:
    """Tar ``root`` with every member owned by root:root; add char-device nodes without mknod."""

    def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        for child in sorted(root.iterdir()):
            tar.add(child, arcname=child.name, filter=as_root)
        for name, mode, major, minor in extra_nodes:
            info = as_root(tarfile.TarInfo(name.lstrip("/")))
            info.type, info.mode, info.devmajor, info.devminor = tarfile.CHRTYPE, mode, major, minor
            tar.addfile(info)


# --- staging ------------------------------------------------------------------


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)


def _copy(src: Path, dst: Path, mode: int | None = None) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    os.chmod(dst, mode if mode is not None else (src.stat().st_mode & 0o777))


def shared_libraries(binary: Path) -> list[Path]:
    """Absolute paths (as the dynamic loader names them) of the libraries ``binary`` needs, via ldd."""
    proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CloudopsError(f"ldd {binary} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    libs = []
    for line in proc.stdout.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def _is_static(binary: Path) -> bool:
    proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    return proc.returncode != 0 or "statically linked" in proc.stdout + proc.stderr


def _busybox_links(bindir: Path, busybox: Path) -> None:
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox" and not (bindir / applet).exists():
            (bindir / applet).symlink_to("busybox")


def _host_binary(name: str, package: str) -> Path:
    found = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if not found:
        raise CloudopsError(f"{name} not found on this host (apt-get install {package})")
    return Path(found)


def stage_tiny(recipe: Recipe, kernel: str, stage: Path) -> dict:
    """Stage the tiny image's root tree in ``stage/root``; return the build plan for the appliance."""
    busybox = _host_binary("busybox", "busybox-static")
    if not _is_static(busybox):
        raise CloudopsError(f"{busybox} is not statically linked (apt-get install busybox-static)")
    dropbear = _host_binary("dropbear", "dropbear-bin")
    dropbearkey = _host_binary("dropbearkey", "dropbear-bin")
    resize2fs = _host_binary("resize2fs", "e2fsprogs")  # grows the root on a disk bigger than the image
    modules = resolve_modules(recipe.modules, kernel)

    # initramfs: busybox, the modules, /init.
    initrd = stage / "initramfs"
    _copy(busybox, initrd / "bin/busybox", 0o755)
    _busybox_links(initrd / "bin", busybox)
    for name, src in modules:
        _copy(src, initrd / "lib/modules" / f"{name}.ko", 0o644)
    for d in ("dev", "proc", "sys", "newroot"):
        (initrd / d).mkdir(parents=True, exist_ok=True)
    _write(
        initrd / "init",
        render("image/tiny/initramfs-init.j2", modules=[n for n, _ in modules],
               default_root=f"LABEL={recipe.fs_label}", fstype="ext4"),  # fmt: skip
        0o755,
    )
    console = [("/dev/console", 0o600, 5, 1), ("/dev/null", 0o666, 1, 3)]
    initrd_bytes = subprocess.run(
        ["gzip", "-9n"], input=newc_archive(initrd, console), capture_output=True, check=True
    ).stdout

    # root tree
    root = stage / "root"
    for d in ("bin", "lib", "dev", "proc", "sys", "run", "tmp", "root", "mnt", "var/log", "etc/dropbear",
              "etc/init.d", "etc/udhcpc", "etc/cloudops", "etc/acpi/PWRF", "boot/extlinux", "usr"):  # fmt: skip
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "root", 0o700)
    for link, target in (("sbin", "bin"), ("usr/bin", "../bin"), ("usr/sbin", "../bin"), ("lib64", "lib")):
        (root / link).symlink_to(target)
    _copy(busybox, root / "bin/busybox", 0o755)
    _busybox_links(root / "bin", busybox)
    _copy(dropbear, root / "bin/dropbear", 0o755)
    _copy(dropbearkey, root / "bin/dropbearkey", 0o755)
    _copy(resize2fs, root / "bin/resize2fs", 0o755)
    for lib in sorted(set(shared_libraries(dropbear) + shared_libraries(dropbearkey) + shared_libraries(resize2fs))):
        # As ldd names it (/lib64/ld-linux-x86-64.so.2, /lib/x86_64-linux-gnu/...); /lib64 links to lib.
        rel = lib.relative_to("/")
        if rel.parts[0] == "usr":
            rel = Path(*rel.parts[1:])
        _copy(lib.resolve(), root / rel, 0o755)

    ctx = {"hostname": recipe.hostname, "seed_label": SEED_LABEL, "dhcp_tries": 30}
    days = (datetime.date.today() - datetime.date(1970, 1, 1)).days
    etc = {
        "passwd": ({}, 0o644),
        "group": ({}, 0o644),
        "shadow": ({"days": days}, 0o600),
        "hosts": (ctx, 0o644),
        "hostname": (ctx, 0o644),
        "os-release": ({"version": TINY_VERSION, "kernel_version": kernel}, 0o644),
        "shells": ({}, 0o644),
        "profile": ({}, 0o644),
        "fstab": ({}, 0o644),
    }
    for name, (context, mode) in etc.items():
        _write(root / "etc" / name, render(f"image/tiny/etc/{name}.j2", **context), mode)
    _write(root / "etc/inittab", render("image/tiny/inittab.j2"))
    _write(root / "etc/init.d/rcS", render("image/tiny/rcS.j2", **ctx), 0o755)
    _write(root / "etc/init.d/rcK", render("image/tiny/rcK.j2"), 0o755)
    _write(root / "etc/udhcpc/default.script", render("image/tiny/udhcpc.script.j2"), 0o755)
    _write(root / "etc/cloudops/seed-apply", render("image/tiny/seed-apply.j2"), 0o755)
    _write(root / "etc/acpi/PWRF/00000080", render("image/tiny/acpi-power.j2"), 0o755)
    (root / "etc/resolv.conf").touch()

    _copy(Path(f"/boot/vmlinuz-{kernel}"), root / "boot/vmlinuz", 0o644)
    (root / "boot/initrd.img").write_bytes(initrd_bytes)
    _write(
        root / "boot/extlinux/extlinux.conf",
        render("image/extlinux.conf.j2", recipe=recipe.name, kernel="/boot/vmlinuz",
               initrd="/boot/initrd.img", cmdline=recipe.cmdline),  # fmt: skip
    )
    return {"root": root, "nodes": console, "extlinux_dir": "/boot/extlinux"}


def stage_debootstrap(recipe: Recipe, kernel: str, stage: Path) -> dict:
    """Stage a minimal Debian with debootstrap (root only); kernel and initrd come from the chroot."""
    if os.geteuid() != 0:
        raise CloudopsError("the debian recipe needs root (debootstrap)")
    _host_binary("debootstrap", "debootstrap")
    root = stage / "root"
    cmd = ["debootstrap", f"--variant={recipe.variant}", f"--include={','.join(recipe.packages)}",
           recipe.suite, str(root), recipe.mirror]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        # The staging directory (and debootstrap's own log in it) is removed on failure:
        # name the failing step from the log first.
        log = root / "debootstrap/debootstrap.log"
        text = log.read_text(errors="replace") if log.exists() else proc.stdout + proc.stderr
        errors = [ln for ln in text.splitlines() if ln.startswith(("E:", "dpkg: error", "Errors were"))]
        last = errors[:1] or text.strip().splitlines()[-1:] or ["no output"]
        raise CloudopsError(f"debootstrap failed: {last[0].strip()}")
    kernels = sorted((p.name[len("vmlinuz-"):] for p in (root / "boot").glob("vmlinuz-*")), key=_version_key)
    if not kernels:
        raise CloudopsError("debootstrap installed no kernel (is linux-image-amd64 in the recipe?)")
    version = kernels[-1]
    ctx = {"hostname": recipe.hostname, "fs_label": recipe.fs_label}
    _write(root / "etc/hostname", render("image/tiny/etc/hostname.j2", **ctx))
    _write(root / "etc/hosts", render("image/tiny/etc/hosts.j2", **ctx))
    _write(root / "etc/fstab", render("image/debian/fstab.j2", **ctx))
    _write(root / "etc/default/locale", render("image/debian/default-locale.j2"))
    # No interfaces file of our own: cloud-init writes the NIC's (from the seed's network-config,
    # or its own DHCP fallback), and a second stanza for the same interface would make ifup fail.
    # Per-instance identity must not be baked into an image that is cloned: SSH host keys
    # are made at first boot (ssh-keygen -A before sshd), the machine-id by systemd.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    _write(root / "etc/systemd/system/ssh.service.d/cloudops-hostkeys.conf", render("image/debian/ssh-hostkeys.conf.j2"))
    (root / "etc/machine-id").write_text("")
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    (root / "boot/extlinux").mkdir(exist_ok=True)
    _write(
        root / "boot/extlinux/extlinux.conf",
        render("image/extlinux.conf.j2", recipe=recipe.name, kernel=f"/boot/vmlinuz-{version}",
               initrd=f"/boot/initrd.img-{version}", cmdline=recipe.cmdline),  # fmt: skip
    )
    plan = {"root": root, "nodes": [], "extlinux_dir": "/boot/extlinux"}
    if recipe.esp_size:
        efi = root / SYSTEMD_BOOT_EFI.lstrip("/")
        if not efi.is_file():
            raise CloudopsError(f"recipe {recipe.name}: esp_size needs systemd-boot-efi in its packages ({SYSTEMD_BOOT_EFI})")
        plan["esp"] = {"efi": SYSTEMD_BOOT_EFI, "kernel": f"/boot/vmlinuz-{version}",
                       "initrd": f"/boot/initrd.img-{version}"}
    return plan


BUILDERS = {"tiny": stage_tiny, "debootstrap": stage_debootstrap}


# --- cache key, appliance, build ------------------------------------------------


def cache_key(recipe: Recipe, kernel: str) -> str:
    """Hash of everything the image is made from (recipe, templates, builder code, kernel, host binaries)."""
    h = hashlib.sha256()
    h.update(recipe.path.read_bytes())
    for path in sorted(IMAGE_TEMPLATES.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(IMAGE_TEMPLATES)).encode() + b"\0" + path.read_bytes())
    h.update(Path(__file__).read_bytes())
    h.update(kernel.encode())
    if recipe.builder == "tiny":
        for name in ("busybox", "dropbear", "dropbearkey", "resize2fs"):
            found = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
            if found:
                st = Path(found).stat()
                h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    st = MBR_BIN.stat() if MBR_BIN.exists() else None
    h.update(f"mbr:{st.st_size if st else 0}:{st.st_mtime_ns if st else 0}".encode())
    return h.hexdigest()[:12]


def _write_disk(disk: Path, recipe: Recipe, plan: dict, tarball: Path, progress) -> None:
    mbr = MBR_BIN.read_bytes()[:440]
    if len(mbr) != 440:
        raise CloudopsError(f"{MBR_BIN} is not a 440-byte MBR boot code (apt-get install syslinux-common)")
    with appliance([(disk, "qcow2", False)], progress) as g:
        if not g.feature_available(["extlinux"]):
            raise CloudopsError("the libguestfs appliance has no extlinux (apt-get install extlinux)")
        dev = g.list_devices()[0]
        esp = None
        if plan.get("esp"):
            # MBR: 1 = EFI system partition (type 0xef, what UEFI firmware looks for), 2 = the root,
            # active, for the MBR boot code and extlinux (BIOS). The root is last: growpart grows it.
            progress(f"partitioning (MBR: a {recipe.esp_size} EFI system partition, then the ext4 root)")
            esp_end = 2048 + _bytes(recipe.esp_size) // 512 - 1
            g.part_init(dev, "mbr")
            g.part_add(dev, "p", 2048, esp_end)
            g.part_add(dev, "p", esp_end + 1, -1)
            g.part_set_mbr_id(dev, 1, 0xEF)
            g.part_set_bootable(dev, 2, True)
            esp, part = g.list_partitions()[:2]
        else:
            progress("partitioning (MBR, one ext4 partition)")
            g.part_disk(dev, "mbr")
            g.part_set_bootable(dev, 1, True)
            part = g.list_partitions()[0]
        # No 64bit/metadata_csum: a small root needs neither, and extlinux and the
        # initramfs (no crc32c module) are simpler without.
        g.mkfs("ext4", part, features="^64bit,^metadata_csum", label=recipe.fs_label)
        g.mount(part, "/")
        progress("copying the root tree")
        g.tar_in(str(tarball), "/")
        progress("installing extlinux and the MBR boot code")
        g.extlinux(plan["extlinux_dir"])
        g.pwrite_device(dev, mbr, 0)
        if esp:
            progress("making the EFI system partition (systemd-boot, the kernel and initrd)")
            _write_esp(g, esp, recipe, plan["esp"])
        g.sync()
        g.umount_all()


def _write_esp(g, esp: str, recipe: Recipe, files: dict) -> None:
    """FAT on ``esp`` with systemd-boot as the removable-media loader (no NVRAM entry needed) and one entry."""
    g.mkfs("vfat", esp, label="EFI")
    g.mkdir_p(ESP_MOUNT)
    g.mount(esp, ESP_MOUNT)
    for directory in ("EFI/BOOT", "loader/entries"):
        g.mkdir_p(f"{ESP_MOUNT}/{directory}")
    g.cp(files["efi"], f"{ESP_MOUNT}/EFI/BOOT/BOOTX64.EFI")
    g.cp(files["kernel"], f"{ESP_MOUNT}/vmlinuz")
    g.cp(files["initrd"], f"{ESP_MOUNT}/initrd.img")
    g.write(f"{ESP_MOUNT}/loader/loader.conf", render("image/esp/loader.conf.j2", recipe=recipe.name).encode())
    g.write(f"{ESP_MOUNT}/loader/entries/cloudops.conf",
            render("image/esp/entry.conf.j2", recipe=recipe.name, cmdline=" ".join(recipe.cmdline.split())).encode())
    g.umount(ESP_MOUNT)


def _cached(out: Path, recipe: Recipe) -> bool:
    return out.exists() and (recipe.builder != "tiny" or (boot_dir(out) / "kernel").exists())


def boot_dir(image: Path) -> Path:
    """Beside a built image: its kernel, initrd and command line, for direct kernel boot.

    ``kernel`` is the uncompressed PVH-bootable vmlinux when the kernel has one (seconds
    faster under TCG: no decompression), else the bzImage itself.
    """
    return image.with_name(image.name + ".boot")


def _keep_boot_files(root: Path, recipe: Recipe, target: Path) -> None:
    kernel, initrd = root / "boot/vmlinuz", root / "boot/initrd.img"
    if not (kernel.exists() and initrd.exists()):
        return  # e.g. debootstrap images: they boot through their bootloader
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    bzimage = kernel.read_bytes()
    (tmp / "kernel").write_bytes(pvh_kernel(bzimage) or bzimage)
    shutil.copyfile(initrd, tmp / "initrd.img")
    (tmp / "cmdline").write_text(" ".join(recipe.cmdline.split()) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    atomicfile.replace(tmp, target)


def build_image(recipe_name: str = "tiny", force: bool = False, progress=None) -> Path:
    """Build (or find in the cache) the image of ``recipe_name``; return its path.

    ``force`` rebuilds even when a cached image exists. The new file replaces the old
    one at the same path, so overlays made on the old one must not be used afterwards.
    """
    say = progress or (lambda message: None)
    recipe = load_recipe(recipe_name)
    kernel = find_kernel(recipe.kernel) if recipe.builder == "tiny" else "debootstrap"
    out = build_dir() / f"{recipe.name}-{cache_key(recipe, kernel)}.qcow2"
    if _cached(out, recipe) and not force:
        say(f"cached: {out}")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomicfile.locked(out.parent / f".{recipe.name}.lock"):  # a concurrent build of the same recipe finishes first
        if _cached(out, recipe) and not force:
            say(f"cached (built by another process): {out}")
            return out
        started = time.monotonic()
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        try:
            with tempfile.TemporaryDirectory(prefix=".stage-", dir=out.parent) as stage:
                stage = Path(stage)
                say(f"staging the {recipe.name} tree (kernel {kernel})")
                plan = BUILDERS[recipe.builder](recipe, kernel, stage)
                tarball = stage / "root.tar"
                tar_tree(plan["root"], tarball, plan["nodes"])
                subprocess.run(
                    ["qemu-img", "create", "-q", "-f", "qcow2", str(tmp), str(recipe.disk_size)],
                    check=True, capture_output=True,
                )  # fmt: skip
                _write_disk(tmp, recipe, plan, tarball, say)
                _keep_boot_files(plan["root"], recipe, boot_dir(out))
            atomicfile.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        say(f"built {out} in {time.monotonic() - started:.1f} s")
        return out
