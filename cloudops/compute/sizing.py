"""A VM's size: disk sizes like ``4G`` (binary units: 1K = 1024)."""

import re

from cloudops.errors import CloudopsError

UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
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
