"""The journal of migrations in flight: one record per moving VM, kept until its outcome is settled.

``migrate_vm`` writes the record before it changes anything (source, target,
shared storage, the disk paths), adds what it prepares on the target as it makes
it (files, the DHCP reservation) and notes when post-copy starts. A migration
that completes, or fails in a way known for certain and undone, removes the
record; any other fault leaves it, so ``vm.migrate NAME --recover`` knows which
two hosts were involved and what may be left where, and a new migration of that
VM is refused until it is recovered.

Records are ``migrating/<name>`` in the cloud's state store: shared, so a VM one operator is
moving (or left unsettled) cannot be migrated by another, and ``begin`` is a create that
only one of two concurrent migrations of a VM wins.
"""

import time

from cloudops import state
from cloudops.errors import CloudopsError

PREFIX = "migrating/"


def read(name: str) -> dict | None:
    """The record of ``name``'s unfinished migration, or None."""
    try:
        return state.current().value(PREFIX + name)
    except state.StoreCorrupt:
        return {"name": name, "corrupt": True}


def begin(name: str, source: str, target: str, *, live: bool, shared: bool, disks: list[str],
          shared_path: bool = False) -> dict:
    """``shared``: no disk is copied; ``shared_path``: every disk is under the proven shared_path (UNSAFE is passed)."""
    record = {"name": name, "source": source, "target": target, "live": live, "shared": shared,
              "shared_path": shared_path,
              "disks": list(disks), "prepared_files": [], "reservations": [], "postcopy": False,
              "phase": "preparing", "started": round(time.time(), 3), "by": state.store.owner()}
    if not state.current().create(PREFIX + name, record):
        other = read(name) or {}
        raise CloudopsError(f"VM {name} is being migrated by {other.get('by', 'another cloudops command')} "
                            f"({other.get('source')} -> {other.get('target')}); if that command died, "
                            f"run `invoke vm.migrate {name} --recover`")
    return record


def update(name: str, **fields) -> None:
    state.current().update(PREFIX + name, lambda record: record.update(fields) if record else None)


def end(name: str) -> None:
    state.current().delete(PREFIX + name)


def unfinished() -> list[dict]:
    """Every record left by a migration whose outcome was not settled."""
    found = []
    for key in state.current().items(PREFIX):
        record = read(key[len(PREFIX):])
        if record:
            found.append(record)
    return found
