"""The embedded state store (SQLite) against the store contract, plus what only SQLite does."""

import os
import sqlite3
import subprocess
import sys

import pytest

from cloudops.state.sqlite import SqliteStore
from cloudops.state.store import LockBusy, StoreUnavailable
from tests import state_contract


@pytest.fixture
def db(tmp_path):
    return tmp_path / "cloud.sqlite"


@pytest.mark.parametrize("check", state_contract.CHECKS, ids=lambda f: f.__name__)
def test_contract(check, db):
    check(SqliteStore(db), lambda: SqliteStore(db))


def test_corrupt_values_are_refused_naming_the_key(db):
    store = SqliteStore(db)

    def write_raw(key, raw):
        with sqlite3.connect(db) as conn:
            conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, 99)", (key, raw.decode("latin-1")))

    state_contract.check_corrupt_value_names_the_key(store, None, write_raw)


def test_the_file_is_private(db):
    SqliteStore(db)
    assert oct(db.stat().st_mode & 0o777) == "0o600"


def test_an_unusable_path_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreUnavailable, match="state store"):
        SqliteStore(tmp_path / "file" / "cloud.sqlite")


def test_a_lock_of_a_killed_process_expires_after_its_ttl(db):
    code = ("import sys, time; from cloudops.state.sqlite import SqliteStore; "
            "s = SqliteStore(sys.argv[1]); l = s.lock('vm/x', ttl=1.5); l.__enter__(); print('held', flush=True); "
            "time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(db)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert child.stdout.readline().strip() == "held"
        store = SqliteStore(db)
        with pytest.raises(LockBusy):
            with store.lock("vm/x", ttl=5):
                pass
        child.kill()
        child.wait()
        import time

        deadline = time.monotonic() + 10
        while True:
            try:
                with store.lock("vm/x", ttl=5):
                    break
            except LockBusy:
                assert time.monotonic() < deadline, "the dead holder's lock never expired"
                time.sleep(0.2)
    finally:
        child.kill()
        child.wait()
