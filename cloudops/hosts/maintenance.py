"""Which hosts are in maintenance (no new VMs go there): ``maintenance/<host>`` in the state store.

The flag is shared state: with a team on one store, a host one operator puts in maintenance is
skipped by everyone's next ``vm.start`` and migration. The record says who set it and when.
"""

import time

from cloudops import state
from cloudops.state.store import owner

PREFIX = "maintenance/"


def hosts_in_maintenance(store=None) -> set[str]:
    store = store or state.current()
    return {key[len(PREFIX):] for key, entry in store.items(PREFIX).items() if entry.value.get("on")}


def set_maintenance(host: str, on: bool, store=None) -> bool:
    """Turn maintenance on or off; True when that changed anything."""
    store = store or state.current()

    def change(record):
        before = bool(record.get("on"))
        if on and not before:
            record.update({"on": True, "by": owner(), "at": round(time.time(), 3)})
        elif not on:
            record.clear()  # an emptied record is removed from the store
        return before != on

    return store.update(PREFIX + host, change)
