"""Uncompressed kernels for PVH direct boot: under TCG, decompressing a bzImage costs seconds.

QEMU boots an ELF ``vmlinux`` that carries the PVH entry note (Xen note type 18,
present when the kernel has CONFIG_PVH, as Debian's does) without running the
bzImage's decompressor. ``pvh_kernel`` finds the compressed payload in a bzImage,
decompresses it, and returns it only if that note is there.
"""

import gzip
import lzma
import struct
import zlib

_PAYLOADS = ((b"\xfd7zXZ\x00", "xz"), (b"\x1f\x8b\x08", "gzip"))
_PT_NOTE = 4
_XEN_ELFNOTE_PHYS32_ENTRY = 18


def _decompress(data: bytes, kind: str) -> bytes:
    if kind == "xz":
        return lzma.LZMADecompressor().decompress(data)
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)


def has_pvh_note(elf: bytes) -> bool:
    """True for a 64-bit little-endian ELF with a Xen PHYS32_ENTRY note in a PT_NOTE segment."""
    if elf[:5] != b"\x7fELF\x02" or elf[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != _PT_NOTE:
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def pvh_kernel(bzimage: bytes) -> bytes | None:
    """The uncompressed, PVH-bootable kernel inside ``bzimage``, or None when there is none."""
    for magic, kind in _PAYLOADS:
        start = bzimage.find(magic)
        while start >= 0:
            try:
                elf = _decompress(bzimage[start:], kind)
            except (lzma.LZMAError, zlib.error, EOFError, gzip.BadGzipFile):
                elf = b""
            if elf[:4] == b"\x7fELF":
                return elf if has_pvh_note(elf) else None
            start = bzimage.find(magic, start + 1)
    return None


_PT_LOAD = 1


def load_end(elf_head: bytes) -> int | None:
    """The highest guest-physical byte an ELF kernel's PT_LOAD segments occupy; None when it is not an ELF.

    ``elf_head`` needs only the ELF and program headers (the first few KiB of the file). QEMU
    copies those segments into guest RAM before the kernel runs: a guest with less memory
    than this halts at once, without one line on its console."""
    if elf_head[:5] != b"\x7fELF\x02" or elf_head[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", elf_head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf_head, 0x36)
    end = 0
    for i in range(phnum):
        if phoff + (i + 1) * phentsize > len(elf_head):
            return None
        p_type, _flags, _off, _va, paddr, _filesz, memsz = struct.unpack_from("<IIQQQQQ", elf_head, phoff + i * phentsize)
        if p_type == _PT_LOAD:
            end = max(end, paddr + memsz)
    return end or None
