"""The contract of a state store: versioned JSON documents under keys, compare-and-swap, leased locks.

The cloud's shared state (IPAM, maintenance flags, the image catalog, VM host keys, the keys new
VMs trust, the migration journal and history) is a set of small JSON objects under keys such as
``ipam/lan`` or ``maintenance/hv1``. Every backend offers the same few operations, so the code
that owns a piece of state never knows where it lives:

- ``get(key)`` gives an ``Entry`` (value and version) or None; ``items(prefix)`` every entry under
  a prefix;
- ``create`` writes only when the key is absent, ``replace`` only when the version is still the
  one read (compare-and-swap), ``delete`` optionally on a version too;
- ``update(key, change)`` is the read-modify-write loop on top: read, let ``change`` edit a copy,
  swap it in, and start again when someone else wrote in between;
- ``lock(name, ttl)`` holds a lock as long as this process keeps its lease alive (a thread
  refreshes it); a process that dies stops refreshing and the lock expires by itself after ``ttl``.

Versions are opaque integers that grow with every write (etcd's ``mod_revision``). A value that
is not a JSON object (corrupt, or written by something else under cloudops' prefix) is refused
with ``StoreCorrupt`` naming the key; a backend that cannot be reached raises ``StoreUnavailable``.
"""

import contextlib
import copy
import json
import re
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass

from cloudops.errors import CloudopsError

KEY_RE = re.compile(r"^[a-z][a-z0-9_-]*(/[A-Za-z0-9_.:@-]+)+$")


class StoreError(CloudopsError):
    """Something about the state store itself (not the cloud) went wrong."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or has no quorum: the call did not happen (see StoreOutcomeUnknown)."""


class StoreOutcomeUnknown(StoreUnavailable):
    """A write reached the store, and the store went silent before it answered: it may have been applied.

    Never retried blindly (an allocation could be made twice); ``state.check`` finds what it left.
    """


class StoreCorrupt(StoreError):
    """A value under cloudops' keys is not what cloudops writes."""


class LockBusy(StoreError):
    """Another process (on this machine or another) holds the lock."""


@dataclass(frozen=True)
class Entry:
    value: dict
    version: int


def check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_RE.match(key) or ".." in key:
        raise StoreError(f"invalid state key {key!r}")
    return key


def decode(key: str, raw) -> dict:
    """A stored value as a dict; StoreCorrupt naming the key when it is anything else."""
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        raise StoreCorrupt(f"state store: {key} does not hold JSON (corrupt, or not written by cloudops)") from None
    if not isinstance(value, dict):
        raise StoreCorrupt(f"state store: {key} holds {type(value).__name__}, not an object cloudops wrote")
    return value


def encode(value: dict) -> str:
    if not isinstance(value, dict):
        raise TypeError(f"state values are JSON objects, not {type(value).__name__}")
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class Store(ABC):
    """A state store backend. Subclasses implement the six primitives; the rest is built on them."""

    name = "store"

    @abstractmethod
    def get(self, key: str) -> Entry | None: ...

    @abstractmethod
    def items(self, prefix: str) -> dict[str, Entry]:
        """Every entry whose key starts with ``prefix`` (a whole path segment, e.g. ``images/``)."""

    @abstractmethod
    def create(self, key: str, value: dict) -> bool:
        """Write ``value`` only if ``key`` is absent; False when it exists."""

    @abstractmethod
    def replace(self, key: str, value: dict, version: int) -> bool:
        """Write ``value`` only if ``key`` still has ``version``; False when it changed or vanished."""

    @abstractmethod
    def delete(self, key: str, version: int | None = None) -> bool:
        """Remove ``key`` (only at ``version`` when given); False when it was absent or changed."""

    @abstractmethod
    def _acquire(self, name: str, owner: str, ttl: float):
        """Take lock ``name`` for ``ttl`` seconds: a handle for ``_refresh``/``_release``, or None when held."""

    @abstractmethod
    def _refresh(self, handle) -> bool: ...

    @abstractmethod
    def _release(self, handle) -> None: ...

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return self.name

    # ---------------------------------------------------------------- built on the primitives

    def value(self, key: str, default=None):
        entry = self.get(key)
        return default if entry is None else entry.value

    def put(self, key: str, value: dict) -> None:
        """Write ``value`` whatever is there (for state one writer owns, such as a VM's host keys)."""
        self.update(key, lambda current: (current.clear(), current.update(value)))

    def update(self, key: str, change, default=dict, attempts: int = 100):
        """Read-modify-write ``key``: ``change(value)`` edits a copy in place and returns the result.

        The copy is written with compare-and-swap; when another writer got there first the loop
        reads again and calls ``change`` again (it must not have side effects outside ``value``).
        Nothing is written when ``change`` leaves the value as it was; a value emptied to ``{}``
        that was absent stays absent. Raising in ``change`` writes nothing.
        """
        check_key(key)
        for _ in range(attempts):
            entry = self.get(key)
            current = copy.deepcopy(entry.value) if entry else default()
            result = change(current)
            if entry is not None and current == entry.value:
                return result
            if entry is None and current == default():
                return result
            if entry is None:
                ok = self.create(key, current)
            elif current == {} and default() == {}:
                ok = self.delete(key, entry.version)
            else:
                ok = self.replace(key, current, entry.version)
            if ok:
                return result
        raise StoreError(f"state store: {key} kept changing under {attempts} attempts to update it")

    @contextlib.contextmanager
    def lock(self, name: str, ttl: float = 30.0, holder: str = "", busy_message: str | None = None):
        """Hold lock ``name`` while the block runs; LockBusy at once when someone else holds it."""
        check_key(f"locks/{name}")
        handle = self._acquire(name, holder or owner(), ttl)
        if handle is None:
            raise LockBusy(busy_message or f"lock {name} is held by another cloudops command")
        stop = threading.Event()
        lost = threading.Event()

        def keep_alive():
            while not stop.wait(ttl / 3):
                try:
                    if not self._refresh(handle):
                        lost.set()
                        return
                except Exception:  # a store hiccup: try again next period, the lease is still valid
                    continue

        thread = threading.Thread(target=keep_alive, name=f"lease {name}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            with contextlib.suppress(Exception):
                self._release(handle)


def owner() -> str:
    """Who holds a lock or set a flag: this machine and process."""
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"
