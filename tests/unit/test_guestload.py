"""The lab guest's memory writer (cloudops.lab.guestload), run by the busybox the tiny image is built from
(Debian's busybox-static, which has no pkill): at most one writer runs, stop ends it, and a writer that
will not die makes stop fail. The oracle is this machine's procps, not the commands' own count."""

import shutil
import subprocess
import time

import pytest

from cloudops.lab import guestload

BUSYBOX = shutil.which("busybox")
pytestmark = pytest.mark.skipif(BUSYBOX is None, reason="busybox-static is installed by make setup")


@pytest.fixture
def bb(tmp_path):
    """Run a command as the tiny guest would: busybox's sh with only busybox's applets on PATH."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for applet in subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split():
        (bindir / applet).symlink_to(BUSYBOX)
    assert not (bindir / "pkill").exists()  # the reason guestload exists: pkill ...; true did nothing
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def run(command):
        return subprocess.run([str(bindir / "sh"), "-c", command], capture_output=True, text=True,
                              env={"PATH": str(bindir)}, timeout=30)

    yield run, str(run_dir)
    run(guestload.stop(str(run_dir)))


def writers_seen(run_dir) -> list[str]:
    """Writer pids by procps' ps on this machine: the processes running ``sh <run_dir>/dirty.sh`` whose
    parent is not one (a writer's child between fork and exec of its dd carries the same arguments)."""
    out = subprocess.run(["ps", "-e", "-ww", "-o", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    procs = {}
    for line in out.splitlines():
        pid, ppid, args = line.split(None, 2)
        if args == f"sh {run_dir}/dirty.sh":
            procs[pid] = ppid
    return sorted(pid for pid, ppid in procs.items() if ppid not in procs)


def test_start_twice_leaves_one_writer_and_stop_ends_it(bb):
    run, run_dir = bb
    first = run(guestload.start(1, run_dir))
    assert first.returncode == 0, first.stderr
    second = run(guestload.start(1, run_dir))
    assert second.returncode == 0, second.stderr
    time.sleep(0.3)
    assert writers_seen(run_dir) == [second.stdout.strip()]
    assert run(guestload.count(run_dir)).stdout.strip() == "1"
    stopped = run(guestload.stop(run_dir))
    assert stopped.returncode == 0, stopped.stderr
    assert writers_seen(run_dir) == []
    assert run(guestload.count(run_dir)).stdout.strip() == "0"
    assert run(guestload.stop(run_dir)).returncode == 0  # nothing to stop is fine


def test_stop_fails_when_a_writer_survives_kill(bb, tmp_path):
    run, run_dir = bb
    stubborn = tmp_path / "run" / "dirty.sh"
    stubborn.write_text("trap '' TERM; while :; do sleep 1; done\n")
    proc = subprocess.Popen(["sh", str(stubborn)], executable=str(tmp_path / "bin" / "sh"),
                            env={"PATH": str(tmp_path / "bin")})
    try:
        # the writer matched by its exact arguments: "sh <run_dir>/dirty.sh"
        time.sleep(0.3)
        stopped = run(guestload.stop(run_dir))
        assert stopped.returncode == 1
        assert stopped.stderr.strip() == f"a writer survived kill: {proc.pid}"
    finally:
        proc.kill()
        proc.wait()


def pages_writers(run_dir) -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"python3? {run_dir}/dirty.py "], capture_output=True, text=True).stdout
    return out.split()


@pytest.mark.skipif(shutil.which("python3") is None, reason="the python writer runs python3")
def test_pages_writer_starts_once_reports_its_rate_and_stops(tmp_path):
    """The Debian guest's writer (python3, dash): a second start replaces the first, the rate file fills
    within its first seconds, stop ends it and is fine with nothing to stop."""
    run_dir = str(tmp_path)

    def run(command):
        return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=30)

    try:
        assert run(guestload.start_pages(2, run_dir=run_dir)).returncode == 0
        second = run(guestload.start_pages(2, run_dir=run_dir))
        assert second.returncode == 0, second.stderr
        deadline = time.monotonic() + 10
        while not run(guestload.rate_pages(run_dir)).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert int(run(guestload.rate_pages(run_dir)).stdout) > 0
        assert pages_writers(run_dir) == [second.stdout.strip()]
        stopped = run(guestload.stop_pages(run_dir))
        assert stopped.returncode == 0, stopped.stderr
        assert pages_writers(run_dir) == []
        assert run(guestload.stop_pages(run_dir)).returncode == 0
    finally:
        run(guestload.stop_pages(run_dir))
