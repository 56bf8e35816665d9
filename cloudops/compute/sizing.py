"""A VM's size: disk sizes like ``4G`` (binary units) and flavors, the named sizes of the inventory or config.

A flavor is ``{memory: MiB, vcpus: N, disk_size: 4G}`` (each key optional) under ``flavors:`` in
the inventory's vars or ``vm.flavors`` in the configuration (the inventory's wins for one name);
options given explicitly override the flavor's values, which override the configured defaults.
"""

import re

from cloudops.errors import CloudopsError

UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
FLAVOR_KEYS = ("memory", "vcpus", "disk_size")
MAX_DISK = 1 << 50  # 1 PiB: far beyond any sane root disk, refused as a typo


def parse_size(value) -> int:
    """Bytes of ``4G``, ``512M``, ``1.5T``, ``10737418240`` (K/M/G/T are binary: 1K = 1024)."""
    if isinstance(value, bool):
        raise CloudopsError(f"disk size {value!r} is not a size like 4G (K, M, G, T: binary units)")
    if isinstance(value, int):
        number, unit = value, ""
    else:
        match = _SIZE_RE.match(str(value))
        if not match:
            raise CloudopsError(f"disk size {value!r} is not a size like 4G (K, M, G, T: binary units)")
        number, unit = float(match.group(1)), match.group(2).upper()
    size = int(number * UNITS[unit])
    if size <= 0 or size > MAX_DISK:
        raise CloudopsError(f"disk size {value!r} must be more than 0 and at most 1P")
    return size


def format_size(size: int) -> str:
    """``4G``, ``1.5G``, ``700M``: the largest unit that keeps at most one decimal."""
    for unit in "TGMK":
        scaled = size / UNITS[unit]
        if scaled >= 1 and round(scaled, 1) * UNITS[unit] == size:
            return f"{scaled:g}{unit}"
    return f"{size}B" if size < 1024 else f"{size / UNITS['K']:.1f}K"


def check_disk_size(size: int | None, image_virtual_size: int, image_name: str) -> int:
    """The root disk's capacity: ``size`` (refused when smaller than the image), else the image's."""
    if size is None:
        return image_virtual_size
    if size < image_virtual_size:
        raise CloudopsError(f"disk size {format_size(size)} is smaller than image {image_name}'s virtual size "
                            f"{format_size(image_virtual_size)}")
    return size


MEMORY_MARGIN = 12 << 20  # above the kernel and initrd: a tiny guest at 96 MiB reaches SSH; at 64 it halts


def image_memory_floor(image) -> int | None:
    """Bytes of RAM below which a direct-boot image cannot even start (None: not known, e.g. a bootloader).

    An uncompressed (PVH) kernel is placed in guest RAM at its physical addresses, the
    initrd after it; the tiny image's kernel alone ends at about 74 MiB."""
    from cloudops.imaging import kernel

    if not image.direct_boot:
        return None
    path = image.local_path.with_name(f"{image.id}.kernel")
    initrd = image.local_path.with_name(f"{image.id}.initrd")
    try:
        with open(path, "rb") as f:
            end = kernel.load_end(f.read(8192))
        initrd_size = initrd.stat().st_size
    except OSError:
        return None
    if end is None:  # a bzImage: decompressed in the guest, its size is not known here
        return None
    return end + initrd_size + MEMORY_MARGIN


def check_memory(memory_mib: int, image) -> None:
    """Refuse a memory size in which the image's kernel cannot start (it would halt silently)."""
    floor = image_memory_floor(image)
    if floor is not None and memory_mib << 20 < floor:
        need = -(-floor // (1 << 20))
        raise CloudopsError(f"{memory_mib} MiB is too little for image {image.name}: its kernel and initrd "
                            f"need at least {need} MiB (the guest would halt before printing anything)")


def inventory_flavors(inventory) -> dict | None:
    """The ``flavors`` of the inventory's vars (as the hypervisors see them; the first one's)."""
    hosts = inventory.hypervisors()
    return hosts[0].vars.get("flavors") if hosts else None


def flavors_from(config_flavors, inventory_flavors) -> dict[str, dict]:
    """Every flavor known: config ``vm.flavors`` then the inventory's ``flavors`` (which wins); each checked."""
    merged = {}
    for where, flavors in (("config vm.flavors", config_flavors), ("inventory flavors", inventory_flavors)):
        if flavors is None:
            continue
        if not isinstance(flavors, dict):
            raise CloudopsError(f"{where}: must be a mapping of flavor names to {{memory, vcpus, disk_size}}")
        for name, values in flavors.items():
            merged[str(name)] = _checked_flavor(f"{where}.{name}", values)
    return merged


def _checked_flavor(where: str, values) -> dict:
    if not isinstance(values, dict):
        raise CloudopsError(f"{where}: must be a mapping with {', '.join(FLAVOR_KEYS)}")
    unknown = sorted(set(values) - set(FLAVOR_KEYS))
    if unknown:
        raise CloudopsError(f"{where}: unknown key {unknown[0]!r} (expected: {', '.join(FLAVOR_KEYS)})")
    flavor = dict(values)
    if flavor.get("disk_size") is not None:
        try:
            flavor["disk_size"] = parse_size(flavor["disk_size"])
        except CloudopsError as exc:
            raise CloudopsError(f"{where}: {exc}") from None
    for key in ("memory", "vcpus"):
        if key in flavor and (isinstance(flavor[key], bool) or not isinstance(flavor[key], int)):
            raise CloudopsError(f"{where}: {key} must be a whole number, got {flavor[key]!r}")
    return flavor


def flavor(name: str, known: dict[str, dict]) -> dict:
    """The flavor called ``name``; one line listing the known ones when there is none."""
    if name not in known:
        listed = ", ".join(sorted(known)) if known else "none defined (flavors: in the inventory's vars or vm.flavors)"
        raise CloudopsError(f"unknown flavor {name!r} (known: {listed})")
    return known[name]


def sized(explicit: dict, flavor_values: dict | None, defaults: dict) -> dict:
    """memory, vcpus and disk_size: each from ``explicit`` (not None), else the flavor, else ``defaults``."""
    flavor_values = flavor_values or {}
    chosen = {}
    for key in FLAVOR_KEYS:
        for source in (explicit, flavor_values, defaults):
            if source.get(key) is not None:
                chosen[key] = source[key]
                break
        else:
            chosen[key] = None
    return chosen
