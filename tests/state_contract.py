"""The state store contract, run against every backend (sqlite in tests/unit, etcd in tests/lab).

Each ``check_*`` takes a fresh, empty store and a function that opens a second handle on the
same store (another process's view), and asserts what every backend must do.
"""

import threading
import time

import pytest

from cloudops.state.store import LockBusy, StoreCorrupt, StoreError


def check_create_replace_delete(store, _other):
    assert store.get("images/a") is None
    assert store.create("images/a", {"n": 1}) is True
    assert store.create("images/a", {"n": 2}) is False
    entry = store.get("images/a")
    assert entry.value == {"n": 1}
    assert store.replace("images/a", {"n": 3}, entry.version) is True
    assert store.replace("images/a", {"n": 4}, entry.version) is False  # stale version
    newer = store.get("images/a")
    assert newer.value == {"n": 3} and newer.version > entry.version
    assert store.delete("images/a", entry.version) is False
    assert store.delete("images/a", newer.version) is True
    assert store.get("images/a") is None and store.delete("images/a") is False


def check_items_by_prefix(store, _other):
    for key in ("images/a", "images/b", "imagesx/c", "ipam/lan"):
        store.create(key, {"k": key})
    assert sorted(store.items("images/")) == ["images/a", "images/b"]
    assert store.items("nothing/") == {}


def check_update_is_atomic_across_handles(store, other):
    """Two handles, 4 threads each, 25 increments per thread: no increment lost."""
    handles = [store, other()]

    def bump(handle):
        for _ in range(25):
            handle.update("ipam/counter", lambda v: v.__setitem__("n", v.get("n", 0) + 1))

    threads = [threading.Thread(target=bump, args=(handles[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get("ipam/counter").value == {"n": 200}


def check_update_without_change_writes_nothing(store, _other):
    store.create("maintenance/hv1", {"on": True})
    version = store.get("maintenance/hv1").version
    assert store.update("maintenance/hv1", lambda v: "same") == "same"
    assert store.get("maintenance/hv1").version == version
    store.update("maintenance/hv1", lambda v: v.clear())  # emptied: removed
    assert store.get("maintenance/hv1") is None
    with pytest.raises(ZeroDivisionError):
        store.update("maintenance/hv2", lambda v: (v.__setitem__("on", True), 1 / 0))
    assert store.get("maintenance/hv2") is None


def check_lock_is_exclusive_and_released(store, other):
    second = other()
    with store.lock("vm/web", ttl=5):
        with pytest.raises(LockBusy, match="vm/web|busy"):
            with second.lock("vm/web", ttl=5):
                pass
    with second.lock("vm/web", ttl=5):  # released: free again
        pass


def check_lock_outlives_its_ttl_while_held(store, other):
    """The lease thread keeps a held lock alive past its ttl."""
    with store.lock("vm/long", ttl=2):
        time.sleep(3.5)
        with pytest.raises(LockBusy):
            with other().lock("vm/long", ttl=2):
                pass


def check_corrupt_value_names_the_key(store, _other, write_raw):
    write_raw("images/bad", b"\x00not json")
    with pytest.raises(StoreCorrupt, match="images/bad"):
        store.get("images/bad")
    write_raw("hostkeys/list", b"[1, 2]")
    with pytest.raises(StoreCorrupt, match="hostkeys/list"):
        store.items("hostkeys/")


def check_bad_keys_are_refused(store, _other):
    for key in ("", "/abs", "images", "images/../x", "Images/a", "images/a b", None):
        with pytest.raises(StoreError):
            store.get(key)


CHECKS = [check_create_replace_delete, check_items_by_prefix, check_update_is_atomic_across_handles,
          check_update_without_change_writes_nothing, check_lock_is_exclusive_and_released,
          check_lock_outlives_its_ttl_while_held, check_bad_keys_are_refused]
