"""atomicfile: atomic replace (temp file beside the target, fsync, rename, fsync the directory) and
read-modify-write under flock."""

import os
import stat
import threading

import pytest

from cloudops import atomicfile
from cloudops.metrics.spool import Spool


def mode_of(path):
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(directory):
    return [p.name for p in directory.iterdir() if p.name.startswith(atomicfile.TMP_PREFIX)]


def test_write_creates_and_replaces(tmp_path):
    target = tmp_path / "state.json"
    assert atomicfile.write(target, "one\n") == target
    assert target.read_text() == "one\n"
    atomicfile.write(target, b"two\n")
    assert target.read_bytes() == b"two\n" and leftovers(tmp_path) == []


def test_write_gives_the_mode_open_would_unless_told(tmp_path):
    old = os.umask(0o022)
    try:
        atomicfile.write(tmp_path / "plain", "x")
        atomicfile.write(tmp_path / "script", "#!/bin/sh\n", mode=0o755)
        atomicfile.write(tmp_path / "private", "secret", mode=0o600)
        os.umask(0o077)
        atomicfile.write(tmp_path / "strict", "x")
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "plain") == 0o644
    assert mode_of(tmp_path / "script") == 0o755  # exactly, whatever the umask
    assert mode_of(tmp_path / "private") == 0o600
    assert mode_of(tmp_path / "strict") == 0o600


def test_write_fsyncs_the_file_and_the_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomicfile.write(tmp_path / "f", "x")
    assert synced == [False, True]  # the file before the rename, the directory after


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    target.write_text("old")

    def broken(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        atomicfile.write(target, "new")
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_the_temporary_is_beside_the_target_and_unique(tmp_path):
    a, b = atomicfile.temp_path(tmp_path / "x"), atomicfile.temp_path(tmp_path / "x")
    assert a.parent == b.parent == tmp_path and a != b and a.name.startswith(atomicfile.TMP_PREFIX + "x.")


def test_replace_renames_a_file_made_elsewhere(tmp_path):
    made = tmp_path / ".made"
    made.write_text("image")
    atomicfile.replace(made, tmp_path / "disk")
    assert (tmp_path / "disk").read_text() == "image" and not made.exists()
    tree = tmp_path / ".tree"
    tree.mkdir()
    (tree / "kernel").write_text("k")
    atomicfile.replace(tree, tmp_path / "boot")  # a directory too (an empty or missing target)
    assert (tmp_path / "boot" / "kernel").read_text() == "k"


def test_update_writes_only_a_difference(tmp_path):
    target = tmp_path / "config"
    assert atomicfile.update(target, lambda text: text) is False and not target.exists()
    assert atomicfile.update(target, lambda text: text + "a\n", mode=0o600) is True
    assert target.read_text() == "a\n" and mode_of(target) == 0o600
    before = target.stat().st_ino
    assert atomicfile.update(target, lambda text: text) is False
    assert target.stat().st_ino == before  # not rewritten
    assert (tmp_path / ".config.lock").exists()


def test_concurrent_updates_lose_nothing(tmp_path):
    target, lock = tmp_path / "counter", tmp_path / "counter.lock"

    def bump():
        for _ in range(25):
            atomicfile.update(target, lambda text: f"{int(text or 0) + 1}", lock_path=lock)

    threads = [threading.Thread(target=bump) for _ in range(6)]  # flock: each open() is its own lock holder
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_text() == "150" and leftovers(tmp_path) == []


def test_locked_excludes_and_shares(tmp_path):
    lock = tmp_path / ".lock"
    inside, order = threading.Event(), []

    def other():
        inside.wait()
        with atomicfile.locked(lock):
            order.append("other")

    t = threading.Thread(target=other)
    t.start()
    with atomicfile.locked(lock):
        inside.set()
        t.join(0.2)
        order.append("first")
    t.join()
    assert order == ["first", "other"]
    with atomicfile.locked(lock, shared=True), atomicfile.locked(lock, shared=True):
        pass  # two shared holders at once


def test_the_spool_sweeps_what_a_crash_left(tmp_path):
    Spool(tmp_path)
    stray = atomicfile.temp_path(tmp_path / "000000000001-3.json")
    stray.write_text("half")
    Spool(tmp_path)
    assert not stray.exists()
