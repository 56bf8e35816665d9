"""A bounded on-disk spool for datapoints carbon did not take; replayed oldest first.

Layout of the spool directory::

    000000000042-500.json   one batch: sequence number, datapoint count; JSON [[path, ts, value], ...]
    dropped                 datapoints dropped so far because the spool was full (persistent)
    .lock                   flock(2) held while the spool is changed

Every file is written to a temporary name, fsync'ed and renamed over the final name, so a
crash mid-write leaves either the old state or the new one, never a torn batch (stray
temporary files are removed on the next open). The size limit counts the batch files;
when a new batch does not fit, the oldest batches are dropped and counted.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from cloudops import atomicfile
from cloudops.errors import CloudopsError
from cloudops.metrics.carbon import CarbonUnreachable, Datapoint

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_PER_FILE = 5000
_BATCH = re.compile(r"^(\d{12})-(\d+)\.json$")


class Spool:
    """Batches of datapoints on disk under ``directory``, at most ``max_bytes`` of batch files."""

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_MAX_BYTES, per_file: int = DEFAULT_PER_FILE):
        if max_bytes <= 0:
            raise CloudopsError(f"spool size limit must be > 0 bytes, got {max_bytes}")
        if per_file <= 0:
            raise CloudopsError(f"spool datapoints per file must be > 0, got {per_file}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.per_file = per_file
        self.problems: list[str] = []
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CloudopsError(f"spool directory {self.directory}: {exc.strerror}") from None
        with self._locked():
            for entry in self.directory.iterdir():
                if entry.name.startswith(atomicfile.TMP_PREFIX):
                    entry.unlink(missing_ok=True)  # left by a crash before its rename

    # -- reading the state -------------------------------------------------------------

    @property
    def dropped(self) -> int:
        """Datapoints dropped since the spool was created (kept across restarts)."""
        try:
            return int((self.directory / "dropped").read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except ValueError:
            self.problems.append(f"spool counter {self.directory / 'dropped'} was unreadable; restarted at 0")
            return 0

    def size_bytes(self) -> int:
        return sum(size for _seq, _count, _path, size in self._batches())

    def pending(self) -> int:
        """Datapoints waiting in the spool."""
        return sum(count for _seq, count, _path, _size in self._batches())

    def is_empty(self) -> bool:
        return not self._batches()

    # -- changing it -------------------------------------------------------------------

    def append(self, datapoints: Sequence[Datapoint]) -> int:
        """Store datapoints (oldest first); return how many datapoints were dropped to make room."""
        if not datapoints:
            return 0
        dropped = 0
        with self._locked():
            batches = self._batches()
            total = sum(b[3] for b in batches)
            seq = batches[-1][0] + 1 if batches else 0
            for start in range(0, len(datapoints), self.per_file):
                chunk = list(datapoints[start:start + self.per_file])
                data = _encode(chunk)
                while len(data) > self.max_bytes and chunk:
                    cut = max(1, len(chunk) // 10)  # this batch alone exceeds the limit: lose its oldest
                    chunk = chunk[cut:]
                    dropped += cut
                    data = _encode(chunk)
                if not chunk:
                    continue
                while batches and total + len(data) > self.max_bytes:
                    _seq, count, path, size = batches.pop(0)
                    path.unlink(missing_ok=True)
                    total -= size
                    dropped += count
                self._write(f"{seq:012d}-{len(chunk)}.json", data)
                batches.append((seq, len(chunk), self.directory / f"{seq:012d}-{len(chunk)}.json", len(data)))
                total += len(data)
                seq += 1
            if dropped:
                self._add_dropped(dropped)
        return dropped

    def replay(self, send: Callable[[list[Datapoint]], int]) -> int:
        """Send spooled batches oldest first, removing each once sent; return datapoints sent.

        If ``send`` raises CarbonUnreachable, the unsent rest of that batch stays in the
        spool and the exception propagates.
        """
        replayed = 0
        with self._locked():
            for seq, count, path, _size in self._batches():
                batch = self._read(path, count)
                if batch is None:
                    continue
                try:
                    replayed += send(batch)
                except CarbonUnreachable as exc:
                    replayed += exc.sent
                    if exc.sent:
                        rest = batch[exc.sent:]
                        self._write(f"{seq:012d}-{len(rest)}.json", _encode(rest))
                        path.unlink()
                    exc.sent = replayed
                    raise
                path.unlink()
        return replayed

    def batches(self) -> Iterator[list[Datapoint]]:
        """The spooled batches, oldest first, without removing them (for inspection and tests)."""
        for _seq, count, path, _size in self._batches():
            batch = self._read(path, count, drop_corrupt=False)
            if batch is not None:
                yield batch

    # -- internals ---------------------------------------------------------------------

    def _batches(self) -> list[tuple[int, int, Path, int]]:
        found = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                match = _BATCH.match(entry.name)
                if match:
                    found.append((int(match[1]), int(match[2]), Path(entry.path), entry.stat().st_size))
        found.sort()
        return found

    def _read(self, path: Path, count: int, drop_corrupt: bool = True) -> list[Datapoint] | None:
        try:
            rows = json.loads(path.read_bytes())
            batch = [(str(p), (float(ts), float(v))) for p, ts, v in rows]
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            if drop_corrupt:
                path.unlink(missing_ok=True)
                self._add_dropped(count)
                self.problems.append(f"spool batch {path.name} was unreadable; dropped {count} datapoints")
            return None
        return batch

    def _write(self, name: str, data: bytes) -> None:
        try:
            atomicfile.write(self.directory / name, data)
        except OSError as exc:
            raise CloudopsError(f"spool {self.directory}: cannot write {name}: {exc.strerror}") from None

    def _add_dropped(self, count: int) -> None:
        self._write("dropped", f"{self.dropped + count}\n".encode())

    def _locked(self):
        return atomicfile.locked(self.directory / ".lock")


def _encode(batch: Sequence[Datapoint]) -> bytes:
    return json.dumps([[p, ts, v] for p, (ts, v) in batch], separators=(",", ":")).encode()
