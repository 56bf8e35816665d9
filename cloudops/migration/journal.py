"""The journal of migrations in flight: one record per moving VM, kept until its outcome is settled.

``migrate_vm`` writes the record before it changes anything (source, target,
shared storage, the disk paths), adds what it prepares on the target as it makes
it (files, the DHCP reservation) and notes when post-copy starts. A migration
that completes, or fails in a way known for certain and undone, removes the
record; any other fault leaves it, so ``vm.migrate NAME --recover`` knows which
two hosts were involved and what may be left where, and a new migration of that
VM is refused until it is recovered.

Records live in ``var/cloud/migrating/<name>.json``, written atomically.
"""

import json
import time
from pathlib import Path

from cloudops import atomicfile
from cloudops.compute import guest


def _dir() -> Path:
    path = guest.cloud_dir() / "migrating"
    path.mkdir(exist_ok=True)
    return path


def _path(name: str) -> Path:
    return _dir() / f"{name}.json"


def read(name: str) -> dict | None:
    """The record of ``name``'s unfinished migration, or None."""
    try:
        return json.loads(_path(name).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {"name": name, "corrupt": True}


def _write(record: dict) -> None:
    atomicfile.write(_path(record["name"]), json.dumps(record, indent=1) + "\n")


def begin(name: str, source: str, target: str, *, live: bool, shared: bool, disks: list[str]) -> dict:
    record = {"name": name, "source": source, "target": target, "live": live, "shared": shared,
              "disks": list(disks), "prepared_files": [], "reservation": None, "postcopy": False,
              "phase": "preparing", "started": round(time.time(), 3)}
    _write(record)
    return record


def update(name: str, **fields) -> None:
    record = read(name)
    if record is None:
        return
    record.update(fields)
    _write(record)


def end(name: str) -> None:
    _path(name).unlink(missing_ok=True)


def unfinished() -> list[dict]:
    """Every record left by a migration whose outcome was not settled."""
    return [r for r in (read(p.stem) for p in sorted(_dir().glob("*.json"))) if r]
