"""The IPAM allocator as it was before the state store: one JSON file per network under flock(2).

Kept only as the baseline of bench/state.py (the allocation rule is the same as today's;
only where the document lives differs). Copied from cloudops/net/ipam.py of commit d245555.
"""

import fcntl
import json
import os
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path

from cloudops.net import ipam


@contextmanager
def _locked(spec, root: Path):
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{spec.name}.json"
    with open(root / f"{spec.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            try:
                state = json.loads(path.read_text())
            except FileNotFoundError:
                state = {"format": 1, "network": spec.name, "cidr": spec.cidr, "allocations": {}}
            before = json.dumps(state, sort_keys=True)
            yield state
            if json.dumps(state, sort_keys=True) != before:
                _write_atomically(path, state)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_atomically(path: Path, state: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(state, out, indent=2, sort_keys=True)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def allocate(spec, vm_name: str, root: Path) -> ipam.Allocation:
    with _locked(spec, root) as state:
        return ipam._allocate(spec, vm_name, state)
