"""Checksums of downloaded images: the lists distributions publish (SHA512SUMS, SHA256SUMS, BSD style), and checking.

``parse`` reads a checksum list: GNU coreutils lines ``<hex>  <file>`` (text mode) or ``<hex> *<file>``
(binary mode), and BSD lines ``SHA512 (<file>) = <hex>``; anything else (comments, the armour of a
clearsigned file) is skipped. ``algorithm_for`` guesses the algorithm from the length of the hex
digest. ``expectations`` gathers what the operator asked to be checked (``--sha256``, ``--sha512``,
``--checksums``) and ``verify`` checks a file against all of them in one read.
"""

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from cloudops.errors import CloudopsError

# hex length -> algorithm; md5 and sha1 are not accepted (not safe against a tampered mirror).
ALGORITHMS = {64: "sha256", 96: "sha384", 128: "sha512"}
GNU_LINE = re.compile(r"^\\?(?P<hex>[0-9a-fA-F]{32,128}) [ *](?P<file>.+)$")
BSD_LINE = re.compile(r"^(?P<algo>[A-Za-z0-9-]+) ?\((?P<file>.+)\) ?= ?(?P<hex>[0-9a-fA-F]{32,128})$")


@dataclass(frozen=True)
class Expected:
    """One checksum the file must have: algorithm, hex digest, and where it came from (for messages)."""

    algorithm: str
    hexdigest: str
    source: str


def algorithm_for(hexdigest: str, what: str = "checksum") -> str:
    """The algorithm a hex digest of this length belongs to (sha256, sha384, sha512); refused otherwise."""
    if not re.fullmatch(r"[0-9a-fA-F]+", hexdigest or ""):
        raise CloudopsError(f"{what} {hexdigest!r} is not a hex digest")
    algorithm = ALGORITHMS.get(len(hexdigest))
    if algorithm is None:
        weak = {32: " (md5 is not accepted)", 40: " (sha1 is not accepted)"}.get(len(hexdigest), "")
        raise CloudopsError(f"{what} has {len(hexdigest)} hex digits: expected 64 (sha256), 96 (sha384) "
                            f"or 128 (sha512){weak}")
    return algorithm


def parse(text: str) -> dict[str, str]:
    """A checksum list -> {file name: hex digest (lower case)}; lines of no known form are skipped."""
    found = {}
    for raw in text.splitlines():
        line = raw.strip()
        match = GNU_LINE.match(line) or BSD_LINE.match(line)
        if not match:
            continue
        name = match["file"].strip()
        if raw.lstrip().startswith("\\"):  # coreutils escapes a name holding a backslash or a newline
            name = name.replace("\\n", "\n").replace("\\\\", "\\")
        found[name.removeprefix("./")] = match["hex"].lower()
    return found


def lookup(text: str, filename: str, source: str) -> Expected:
    """The entry for ``filename`` in the checksum list ``text`` (fetched from ``source``)."""
    entries = parse(text)
    if not entries:
        raise CloudopsError(f"{source} holds no checksum lines (expected '<hex>  <file>' or 'SHA512 (<file>) = <hex>')")
    hexdigest = entries.get(filename)
    if hexdigest is None:  # a list may name files with their directory: match the base name when it is unique
        same = [h for name, h in entries.items() if name.rsplit("/", 1)[-1] == filename]
        hexdigest = same[0] if len(same) == 1 else None
    if hexdigest is None:
        raise CloudopsError(f"{source} has no checksum for {filename!r} ({len(entries)} other file(s) listed)")
    return Expected(algorithm_for(hexdigest, f"checksum of {filename} in {source}"), hexdigest, source)


def expectations(sha256: str | None = None, sha512: str | None = None, listed: Expected | None = None) -> list[Expected]:
    """What the file must match: --sha256, --sha512 (each checked for its length), the checksum list's entry."""
    wanted = []
    for option, value in (("sha256", sha256), ("sha512", sha512)):
        if value:
            value = value.strip().lower()
            if algorithm_for(value, f"--{option}") != option:
                raise CloudopsError(f"--{option} {value[:16]}...: {len(value)} hex digits is not a {option}")
            wanted.append(Expected(option, value, f"--{option}"))
    if listed:
        wanted.append(listed)
    return wanted


def digests(path: Path, algorithms, chunk: int = 4 << 20) -> dict[str, str]:
    """{algorithm: hex digest} of the file, every algorithm in one read."""
    hashes = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as f:
        while block := f.read(chunk):
            for h in hashes.values():
                h.update(block)
    return {name: h.hexdigest() for name, h in hashes.items()}


def verify(path: Path, wanted: list[Expected], label: str) -> None:
    """Refuse the file (one line naming what differs) unless it matches every expectation."""
    if not wanted:
        return
    got = digests(path, {e.algorithm for e in wanted})
    for expected in wanted:
        actual = got[expected.algorithm]
        if actual != expected.hexdigest:
            raise CloudopsError(f"checksum mismatch for {label}: {expected.algorithm} is {actual[:16]}..., "
                                f"{expected.source} says {expected.hexdigest[:16]}...")
