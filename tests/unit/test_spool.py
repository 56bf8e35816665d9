"""The on-disk spool: bounded size, oldest dropped and counted, replay oldest first, crash-safe files."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudops.errors import CloudopsError
from cloudops.metrics.carbon import CarbonUnreachable
from cloudops.metrics.spool import Spool


def points(start, count, path="test.m"):
    return [(f"{path}.{i % 7}", (float(1_700_000_000 + i), float(i))) for i in range(start, start + count)]


def timestamps(batches):
    return [int(ts) - 1_700_000_000 for batch in batches for _p, (ts, _v) in batch]


class Collector:
    """A send() that takes everything, or fails after ``fail_after`` datapoints."""

    def __init__(self, fail_after=None):
        self.received = []
        self.fail_after = fail_after

    def __call__(self, batch):
        if self.fail_after is not None and len(self.received) + len(batch) > self.fail_after:
            taken = self.fail_after - len(self.received)
            self.received.extend(batch[:taken])
            raise CarbonUnreachable("carbon at x:1 unreachable after 3 attempts: refused", sent=taken)
        self.received.extend(batch)
        return len(batch)


def test_replay_sends_oldest_first_and_empties_the_spool(tmp_path):
    spool = Spool(tmp_path, per_file=4)
    spool.append(points(0, 10))
    spool.append(points(10, 5))
    send = Collector()
    assert spool.replay(send) == 15
    assert timestamps([send.received]) == list(range(15))
    assert spool.is_empty() and spool.pending() == 0


def test_the_spool_survives_a_restart(tmp_path):
    Spool(tmp_path).append(points(0, 3))
    Spool(tmp_path).append(points(3, 3))
    again = Spool(tmp_path)
    assert again.pending() == 6
    assert timestamps(again.batches()) == list(range(6))


def test_beyond_the_limit_the_oldest_are_dropped_and_counted(tmp_path):
    probe = Spool(tmp_path / "probe", per_file=10)
    probe.append(points(0, 10))
    batch_bytes = probe.size_bytes()

    spool = Spool(tmp_path / "s", max_bytes=3 * batch_bytes + batch_bytes // 2, per_file=10)
    for start in range(0, 100, 10):  # ten batches of 10 into room for three
        spool.append(points(start, 10))
    assert spool.size_bytes() <= spool.max_bytes
    assert spool.pending() == 30
    assert spool.dropped == 70
    assert timestamps(spool.batches()) == list(range(70, 100))  # the newest are kept
    assert Spool(tmp_path / "s").dropped == 70  # the counter is persistent


def test_a_batch_larger_than_the_whole_spool_keeps_its_newest_part(tmp_path):
    spool = Spool(tmp_path, max_bytes=600, per_file=1000)
    dropped = spool.append(points(0, 200))
    kept = timestamps(spool.batches())
    assert 0 < len(kept) < 200
    assert kept == list(range(200 - len(kept), 200))
    assert dropped == 200 - len(kept) == spool.dropped
    assert spool.size_bytes() <= 600


def test_a_failed_replay_keeps_the_unsent_rest_in_order(tmp_path):
    spool = Spool(tmp_path, per_file=5)
    spool.append(points(0, 12))
    failing = Collector(fail_after=7)
    with pytest.raises(CarbonUnreachable) as raised:
        spool.replay(failing)
    assert raised.value.sent == 7
    assert timestamps(spool.batches()) == list(range(7, 12))
    send = Collector()
    spool.replay(send)
    assert timestamps([failing.received, send.received]) == list(range(12))


def test_leftovers_of_a_crash_mid_write_are_ignored_and_cleaned(tmp_path):
    spool = Spool(tmp_path)
    spool.append(points(0, 3))
    (tmp_path / ".tmp-000000000001-3.json").write_bytes(b'[["test.m.0", 17')  # torn temp file
    again = Spool(tmp_path)
    assert not list(tmp_path.glob(".tmp-*"))
    assert timestamps(again.batches()) == [0, 1, 2]


def test_a_corrupt_batch_is_dropped_counted_and_reported(tmp_path):
    spool = Spool(tmp_path, per_file=3)
    spool.append(points(0, 6))
    first = sorted(tmp_path.glob("*.json"))[0]
    first.write_bytes(b"garbage")
    send = Collector()
    assert spool.replay(send) == 3
    assert timestamps([send.received]) == [3, 4, 5]
    assert spool.dropped == 3
    assert "unreadable" in spool.problems[0]


def test_an_unreadable_dropped_counter_is_reported_not_fatal(tmp_path):
    spool = Spool(tmp_path)
    (tmp_path / "dropped").write_text("lots\n")
    assert spool.dropped == 0
    assert spool.problems


@pytest.mark.parametrize("kwargs", [{"max_bytes": 0}, {"max_bytes": -5}, {"per_file": 0}])
def test_bad_limits_are_user_errors(tmp_path, kwargs):
    with pytest.raises(CloudopsError):
        Spool(tmp_path, **kwargs)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=40), max_size=12), st.integers(min_value=200, max_value=3000))
def test_never_over_the_limit_and_nothing_lost_unaccounted(tmp_path_factory, sizes, max_bytes):
    spool = Spool(tmp_path_factory.mktemp("spool"), max_bytes=max_bytes, per_file=8)
    start = 0
    for size in sizes:
        spool.append(points(start, size))
        start += size
        assert spool.size_bytes() <= max_bytes
    assert spool.pending() + spool.dropped == start
    send = Collector()
    spool.replay(send)
    # what is left is always the newest datapoints, in order
    assert timestamps([send.received]) == list(range(start - len(send.received), start))
