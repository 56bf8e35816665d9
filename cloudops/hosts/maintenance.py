"""Which hosts are in maintenance (no new VMs go there): a small locked state file under var/cloud."""

import fcntl
import json
from contextlib import contextmanager

from cloudops import paths


def _path():
    path = paths.var_dir() / "cloud" / "maintenance.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def _state(write: bool = False):
    path = _path()
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
        data = json.loads(path.read_text()) if path.exists() else {}
        yield data
        if write:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
            tmp.rename(path)


def hosts_in_maintenance() -> set[str]:
    with _state() as data:
        return {name for name, on in data.items() if on}


def set_maintenance(host: str, on: bool) -> bool:
    """Turn maintenance on or off; True when that changed anything."""
    with _state(write=True) as data:
        before = bool(data.get(host))
        if on:
            data[host] = True
        else:
            data.pop(host, None)
        return before != on
