"""The cloud's shared state: one store for everything a team must agree on.

``current()`` is the store of this process, opened on first use from the configuration that
``configure`` was given (every task does that through ``cloudops.tasks._cli.user_errors``):

    state:
      backend: sqlite          # default: <state_dir>/cloud.sqlite, one control machine
      path: /some/file.sqlite  # optional
    state:
      backend: etcd            # a team: every operator's cloudops talks to one etcd cluster
      endpoints: [https://10.0.0.1:2379, https://10.0.0.2:2379, https://10.0.0.3:2379]
      ca: /etc/cloudops/etcd-ca.pem
      cert: /etc/cloudops/operator.pem
      key: /etc/cloudops/operator-key.pem
      prefix: /cloudops/       # optional: keys live under it

``store`` defines the contract (keys, versions, compare-and-swap, leased locks); ``sqlite`` and
``etcd`` implement it; ``keys`` names every key cloudops writes.
"""

import os
import threading

from cloudops import paths
from cloudops.state import keys  # noqa: F401  (the key prefixes, for state.show)
from cloudops.state.store import LockBusy, Store, StoreCorrupt, StoreError, StoreUnavailable

__all__ = ["LockBusy", "Store", "StoreCorrupt", "StoreError", "StoreUnavailable", "configure", "current",
           "open_store", "use"]

_settings: dict = {}
_store: Store | None = None
_guard = threading.Lock()


def _plain(settings) -> dict:
    """A plain dict from a mapping or an Invoke DataProxy."""
    if settings is None:
        return {}
    return {key: settings[key] for key in settings}


def configure(config) -> None:
    """Take ``state_dir`` and ``state`` from an Invoke/Fabric config (or a plain dict)."""
    global _settings, _store
    state_dir = config.get("state_dir") if hasattr(config, "get") else None
    paths.configure(state_dir)
    settings = _plain(config.get("state")) if hasattr(config, "get") else {}
    if settings != _settings:
        with _guard:
            if _store is not None:
                _store.close()
            _settings, _store = settings, None


def open_store(settings: dict) -> Store:
    """A store for ``state:`` settings; StoreError naming the problem when they are wrong."""
    backend = (settings or {}).get("backend") or os.environ.get("CLOUDOPS_STATE_BACKEND") or "sqlite"
    if backend == "sqlite":
        from cloudops.state.sqlite import SqliteStore

        return SqliteStore(settings.get("path") or paths.var_dir() / "cloud.sqlite")
    if backend == "etcd":
        from cloudops.state.etcd import EtcdStore

        return EtcdStore.from_settings(settings)
    raise StoreError(f"state backend {backend!r} is unknown (sqlite or etcd)")


def current() -> Store:
    global _store
    with _guard:
        if _store is None:
            _store = open_store(_settings)
        return _store


def use(store: Store | None) -> None:
    """Make ``store`` this process's store (tests and benchmarks); None: open from settings again."""
    global _store
    with _guard:
        _store = store
