"""fleet.run: every host accounted for, bounded pool, per-host timeout, exit code."""

import threading
import time

import pytest

from cloudops import fleet
from cloudops.errors import CloudopsError


def test_every_host_gets_a_result_in_input_order():
    def func(host):
        if host == "b":
            raise CloudopsError("disk full")
        if host == "c":
            return fleet.Changed("edited")
        return host.upper()

    result = fleet.run(["a", "b", "c", "d"], func, workers=2, timeout=5)
    assert [r.host for r in result] == ["a", "b", "c", "d"]
    assert [r.status for r in result] == ["ok", "failed", "changed", "ok"]
    assert result["a"].value == "A"
    assert result["b"].error == "disk full"
    assert result["c"].value == "edited"
    assert result.counts() == {"ok": 2, "changed": 1, "failed": 1}
    assert result.exit_code == 1


def test_all_ok_exits_zero_and_serializes():
    result = fleet.run(["x", "y"], lambda h: 1, workers=4, timeout=5)
    assert result.exit_code == 0
    data = result.to_dict()
    assert data["summary"] == {"ok": 2, "changed": 0, "failed": 0}
    assert {h["host"] for h in data["hosts"]} == {"x", "y"}
    assert "2 hosts: 2 ok, 0 changed, 0 failed" in result.table()


def test_pool_is_bounded():
    active, peak, lock = 0, 0, threading.Lock()

    def func(host):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.05)
        with lock:
            active -= 1

    result = fleet.run(list(range(12)), func, workers=3, timeout=5)
    assert result.exit_code == 0
    assert peak <= 3


def test_a_hanging_host_is_reported_failed_and_does_not_block_the_others():
    release = threading.Event()

    def func(host):
        if host == "stuck":
            release.wait(30)
        return "done"

    result = fleet.run(["a", "stuck", "b"], func, workers=3, timeout=0.5)
    release.set()
    assert result["stuck"].status == "failed"
    assert "timed out" in result["stuck"].error
    assert result["a"].status == result["b"].status == "ok"


def test_unexpected_exception_is_a_failed_host_not_a_crash():
    result = fleet.run(["a"], lambda h: 1 / 0, timeout=5)
    assert result["a"].status == "failed"
    assert "ZeroDivisionError" in result["a"].error


def test_workers_must_be_positive():
    with pytest.raises(ValueError):
        fleet.run(["a"], lambda h: 1, workers=0)


# ---------------------------------------------------------------- a host given up at its timeout stops working

def test_bounded_command_ends_the_whole_process_group_at_the_deadline(tmp_path):
    import os
    import subprocess

    late = tmp_path / "late"
    started = time.monotonic()
    proc = subprocess.run(["sh", "-c", fleet.bounded(f"sleep 3; touch {late}", 1)], capture_output=True,
                          env={**os.environ, "SHELL": "/bin/sh"}, timeout=20)
    assert proc.returncode in fleet.TIMEOUT_EXITS
    assert time.monotonic() - started < 2.9
    time.sleep(3)
    assert not late.exists(), "the rest of the command ran after the deadline"


def test_bounded_connection_refuses_after_its_deadline_or_stop():
    class Conn:
        calls = []

        def run(self, command, **kwargs):
            self.calls.append(command)

        def put(self, *a, **k):
            self.calls.append("put")

        def close(self):
            self.calls.append("close")

    conn = Conn()
    expired = fleet.Bounded(conn, time.monotonic() - 1, 3)
    with pytest.raises(fleet.TimedOut, match="timed out after 3s; stopped"):
        expired.run("touch /tmp/x")
    with pytest.raises(fleet.TimedOut):
        expired.put("a", "b")
    live = fleet.Bounded(conn, time.monotonic() + 60, 60)
    live.stop()
    with pytest.raises(fleet.TimedOut):
        live.run("true")
    assert conn.calls == ["close"]


def test_a_host_abandoned_at_its_timeout_is_stopped_and_reported_so():
    import threading

    release = threading.Event()
    stopped = []
    result = fleet.run(["slow", "fast"], lambda h: release.wait(10) if h == "slow" else "ok", timeout=0.3,
                       grace=0.2, on_timeout=lambda name: (stopped.append(name), release.set()))
    assert stopped == ["slow"]
    assert result["slow"].error == "timed out after 0.3s; stopped"
    assert result["fast"].status == fleet.OK
