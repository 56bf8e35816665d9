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
