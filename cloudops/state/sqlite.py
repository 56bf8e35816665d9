"""The embedded state store: one SQLite file in the state directory, for one control machine.

Every write is one transaction (``BEGIN IMMEDIATE``: writers queue on SQLite's own lock, readers
never block), so compare-and-swap is exact even with many cloudops processes at once. Versions
come from one counter that every write bumps, like etcd's revision. Locks are rows with an
expiry that the holder's lease thread pushes forward; a row whose holder died simply expires.
The file is created with mode 0600 in a 0700 directory: it holds the cloud's address book.
"""

import os
import random
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from cloudops.state.store import Entry, Store, StoreUnavailable, check_key, decode, encode

OPEN_TIMEOUT = 60  # seconds a busy database is waited for

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS locks (name TEXT PRIMARY KEY, token TEXT NOT NULL, owner TEXT NOT NULL,
                                  expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS revision (id INTEGER PRIMARY KEY CHECK (id = 0), value INTEGER NOT NULL);
INSERT OR IGNORE INTO revision VALUES (0, 0);
"""


class SqliteStore(Store):
    name = "sqlite"

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not self.path.exists():
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            self._db = self._open()
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"state store {self.path}: {exc}") from None
        self._mutex = threading.Lock()  # one connection shared by a process's threads

    def _open(self) -> sqlite3.Connection:
        """Connect, switch to WAL and make the tables, when many processes open a new file at once.

        Switching the journal mode takes an exclusive lock for which SQLite does not always wait
        (12 vm.start at once on a fresh file saw "database is locked"): a busy open is tried again.
        """
        deadline = time.monotonic() + OPEN_TIMEOUT
        while True:
            db = sqlite3.connect(self.path, timeout=OPEN_TIMEOUT, isolation_level=None, check_same_thread=False)
            try:
                if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.executescript(SCHEMA)
                return db
            except sqlite3.OperationalError as exc:
                db.close()
                busy = "locked" in str(exc) or "busy" in str(exc)
                if not busy or time.monotonic() > deadline:
                    raise
                time.sleep(0.02 + random.random() * 0.1)

    def describe(self) -> str:
        return f"sqlite {self.path}"

    def _write(self, func):
        with self._mutex:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = func(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                return result
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"state store {self.path}: {exc}") from None

    @staticmethod
    def _bump(db) -> int:
        db.execute("UPDATE revision SET value = value + 1 WHERE id = 0")
        return db.execute("SELECT value FROM revision WHERE id = 0").fetchone()[0]

    def get(self, key):
        check_key(key)
        with self._mutex:
            try:
                row = self._db.execute("SELECT value, version FROM kv WHERE key = ?", (key,)).fetchone()
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"state store {self.path}: {exc}") from None
        return None if row is None else Entry(decode(key, row[0]), row[1])

    def items(self, prefix):
        with self._mutex:
            try:
                rows = self._db.execute("SELECT key, value, version FROM kv WHERE substr(key, 1, ?) = ? ORDER BY key",
                                        (len(prefix), prefix)).fetchall()
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"state store {self.path}: {exc}") from None
        return {key: Entry(decode(key, value), version) for key, value, version in rows}

    def create(self, key, value):
        check_key(key)
        text = encode(value)

        def txn(db):
            if db.execute("SELECT 1 FROM kv WHERE key = ?", (key,)).fetchone():
                return False
            db.execute("INSERT INTO kv VALUES (?, ?, ?)", (key, text, self._bump(db)))
            return True

        return self._write(txn)

    def replace(self, key, value, version):
        check_key(key)
        text = encode(value)

        def txn(db):
            row = db.execute("SELECT version FROM kv WHERE key = ?", (key,)).fetchone()
            if row is None or row[0] != version:
                return False
            db.execute("UPDATE kv SET value = ?, version = ? WHERE key = ?", (text, self._bump(db), key))
            return True

        return self._write(txn)

    def delete(self, key, version=None):
        check_key(key)

        def txn(db):
            row = db.execute("SELECT version FROM kv WHERE key = ?", (key,)).fetchone()
            if row is None or (version is not None and row[0] != version):
                return False
            db.execute("DELETE FROM kv WHERE key = ?", (key,))
            self._bump(db)
            return True

        return self._write(txn)

    def _acquire(self, name, owner, ttl):
        token = uuid.uuid4().hex

        def txn(db):
            now = time.time()
            row = db.execute("SELECT expires FROM locks WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] > now:
                return None
            db.execute("INSERT OR REPLACE INTO locks VALUES (?, ?, ?, ?)", (name, token, owner, now + ttl))
            return (name, token, ttl)

        return self._write(txn)

    def _refresh(self, handle):
        name, token, ttl = handle
        return self._write(lambda db: db.execute("UPDATE locks SET expires = ? WHERE name = ? AND token = ?",
                                                 (time.time() + ttl, name, token)).rowcount == 1)

    def _release(self, handle):
        name, token, _ttl = handle
        self._write(lambda db: db.execute("DELETE FROM locks WHERE name = ? AND token = ?", (name, token)))

    def close(self):
        with self._mutex:
            self._db.close()
