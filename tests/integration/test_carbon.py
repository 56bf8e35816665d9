"""Shipping to a REAL carbon-cache on free loopback ports; values are read back from the whisper files.

Carbon writes from its cache to whisper asynchronously, so reads poll until the expected
datapoints are there (or a generous deadline passes, then the comparison shows what is
missing). Timestamps are explicit and distinct per cycle; the ``test.`` prefix has
1-second retention (see graphite.DEFAULT_SCHEMAS), so no two cycles share a slot.
"""

import socket
import time
import uuid
from collections import defaultdict

import libvirt
import pytest

from cloudops.errors import CloudopsError
from cloudops.metrics import graphite
from cloudops.metrics.carbon import CarbonClient, CarbonUnreachable, parse_address
from cloudops.metrics.cycle import cron_entry, ship_cycle
from cloudops.metrics.spool import Spool

SELF_METRICS = 7  # collected, sent, replayed, spooled, dropped, hosts_failed, cycle_time
READ_DEADLINE = 60.0


@pytest.fixture(scope="session")
def carbon(tmp_path_factory):
    handle = graphite.start(tmp_path_factory.mktemp("graphite"), graphite.Ports(*graphite.free_loopback_ports(3)))
    yield handle
    graphite.stop(handle)


@pytest.fixture
def own_carbon(tmp_path):
    """A carbon of this test alone, which the test may stop and start again on the same ports."""
    directory, ports = tmp_path / "graphite", graphite.Ports(*graphite.free_loopback_ports(3))
    handles = [graphite.start(directory, ports)]
    yield handles
    for handle in handles:
        graphite.stop(handle)


@pytest.fixture
def test_driver():
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()


def unique(name):
    return f"test.{name}.{uuid.uuid4().hex[:8]}"


def base_time():
    return int(time.time()) - 1200  # in the past (whisper refuses the future), well inside 2 h


def by_path(datapoints):
    expected = defaultdict(list)
    for path, (ts, value) in datapoints:
        expected[path].append((int(ts), float(value)))
    return {path: sorted(points) for path, points in expected.items()}


def read_back(whisper_dir, expected):
    """Poll whisper until every expected series holds at least the expected points; return what it holds."""
    deadline = time.monotonic() + READ_DEADLINE
    while True:
        actual = {}
        for path, points in expected.items():
            first, last = points[0][0], points[-1][0]
            actual[path] = graphite.read_series(whisper_dir, path, first, last)
        if all(len(actual[p]) >= len(expected[p]) for p in expected) or time.monotonic() > deadline:
            return actual
        time.sleep(0.2)


def client_for(address, **kwargs):
    options = dict(connect_timeout=1.0, send_timeout=2.0, attempts=2, backoff=0.05)
    options.update(kwargs)
    return CarbonClient(address, **options)


# -- protocols -------------------------------------------------------------------------------


def test_pickle_datapoints_arrive_with_their_values(carbon):
    prefix, base = unique("pickle"), base_time()
    sent = [(f"{prefix}.s{i}", (base + j, i * 100 + j + 0.25)) for i in range(30) for j in range(40)]
    with client_for(carbon.pickle_address) as client:
        assert client.send(sent) == 1200  # three frames of at most 500
    expected = by_path(sent)
    assert read_back(carbon.whisper_dir, expected) == expected


def test_plaintext_datapoints_arrive_with_their_values(carbon):
    prefix, base = unique("plain"), base_time()
    sent = [(f"{prefix}.s{i}", (base + j, i / 3 + j)) for i in range(5) for j in range(10)]
    with client_for(carbon.line_address, protocol="plaintext") as client:
        assert client.send(sent) == 50
    expected = by_path(sent)
    actual = read_back(carbon.whisper_dir, expected)
    assert actual == {p: [(ts, pytest.approx(v, rel=1e-12)) for ts, v in pts] for p, pts in expected.items()}


def test_a_metrics_cycle_lands_in_whisper(carbon, test_driver, tmp_path):
    prefix, base = unique("cycle"), base_time()
    summary = ship_cycle({"hv-a": test_driver}, client_for(carbon.pickle_address), Spool(tmp_path / "spool"),
                         prefix, now=base, state_dir=tmp_path / "state")
    assert summary["ok"] and summary["carbon"] == "ok"
    assert summary["sent"] == summary["collected"] + SELF_METRICS
    actual = read_back(carbon.whisper_dir, {
        f"{prefix}.vm.test.host.hv-a": [(base, 1.0)],
        f"{prefix}.hv.hv-a.vms.running": [(base, 1.0)],
        f"{prefix}.cloudops.metrics.collected": [(base, float(summary["collected"]))],
    })
    assert actual[f"{prefix}.vm.test.host.hv-a"] == [(base, 1.0)]
    assert actual[f"{prefix}.hv.hv-a.vms.running"] == [(base, 1.0)]
    assert actual[f"{prefix}.cloudops.metrics.collected"] == [(base, float(summary["collected"]))]


# -- outages and the spool --------------------------------------------------------------------


def test_cycles_during_an_outage_are_spooled_then_all_arrive(own_carbon, test_driver, tmp_path):
    handle = own_carbon[0]
    prefix, base = unique("outage"), base_time()
    spool, state = Spool(tmp_path / "spool"), tmp_path / "state"
    client = client_for(handle.pickle_address)
    hosts = {"hv-a": test_driver}

    assert graphite.stop(handle)
    down = [ship_cycle(hosts, client, spool, prefix, now=base + i, state_dir=state) for i in (0, 1)]
    for summary in down:
        assert summary["carbon"].startswith(f"carbon at {handle.pickle_address} unreachable")
        assert summary["sent"] == 0
        assert summary["spooled"] == summary["collected"] + SELF_METRICS
        assert summary["dropped"] == 0
        assert not summary["ok"]
    spooled = [dp for batch in spool.batches() for dp in batch]
    assert len(spooled) == sum(s["spooled"] for s in down)

    own_carbon.append(graphite.start(handle.directory, handle.ports))
    after = ship_cycle(hosts, client, spool, prefix, now=base + 2, state_dir=state)
    assert after["carbon"] == "ok"
    assert after["replayed"] == len(spooled)
    assert spool.is_empty() and after["spool_pending"] == 0

    expected = by_path(spooled)
    actual = read_back(handle.whisper_dir, expected)
    assert sum(len(points) for points in actual.values()) == len(spooled)
    assert actual == expected


def test_a_full_spool_drops_the_oldest_cycles_and_counts_them(own_carbon, test_driver, tmp_path):
    handle = own_carbon[0]
    prefix, base = unique("full"), base_time()
    spool = Spool(tmp_path / "spool", max_bytes=4000)
    client = client_for(handle.pickle_address)
    graphite.stop(handle)

    down = [ship_cycle({"hv-a": test_driver}, client, spool, prefix, now=base + i, state_dir=tmp_path / "state")
            for i in range(8)]
    dropped = sum(s["dropped"] for s in down)
    assert dropped > 0
    assert spool.dropped == dropped == down[-1]["spool_dropped_total"]
    assert spool.size_bytes() <= 4000
    kept = [dp for batch in spool.batches() for dp in batch]
    assert len(kept) + dropped == sum(s["spooled"] for s in down)
    kept_times = sorted({int(ts) for _p, (ts, _v) in kept})
    assert kept_times[-1] == base + 7 and kept_times[0] > base  # the oldest went, the newest stayed

    own_carbon.append(graphite.start(handle.directory, handle.ports))
    after = ship_cycle({"hv-a": test_driver}, client, spool, prefix, now=base + 8, state_dir=tmp_path / "state")
    assert after["replayed"] == len(kept) and spool.is_empty()
    marker = f"{prefix}.cloudops.metrics.collected"
    points = read_back(handle.whisper_dir, {marker: [(base + 8, 0.0)]})[marker]
    stored = {ts for ts, _v in graphite.read_series(handle.whisper_dir, marker, base, base + 8)}
    assert base not in stored  # dropped while the spool was full
    assert (base + 7) in stored and (base + 8) in {ts for ts, _v in points}


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_an_unreachable_carbon_is_reported_and_spooled(test_driver, tmp_path):
    (port,) = graphite.free_loopback_ports(1)  # nothing listens there
    spool = Spool(tmp_path / "spool")
    summary = ship_cycle({"hv-a": test_driver}, client_for(f"127.0.0.1:{port}"), spool, "test.unreachable",
                         now=base_time(), state_dir=tmp_path / "state")
    assert "unreachable after 2 attempts" in summary["carbon"]
    assert summary["spooled"] == summary["collected"] + SELF_METRICS == spool.pending()
    assert summary["hosts"]["hv-a"]["ok"]


@pytest.mark.timeout(60)
def test_a_carbon_that_never_accepts_fails_within_the_connect_timeout():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        fillers = []
        for _ in range(3):  # fill the accept queue: further SYNs are dropped, connect() hangs
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(server.getsockname())
            fillers.append(s)
        try:
            client = client_for("%s:%d" % server.getsockname(), connect_timeout=0.5)
            with pytest.raises(CarbonUnreachable, match="timed out") as raised:
                client.send([("test.blackhole.x", (base_time(), 1.0))])
            assert raised.value.sent == 0
        finally:
            for s in fillers:
                s.close()


@pytest.mark.timeout(60)
def test_a_carbon_that_stops_reading_fails_within_the_send_timeout():
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        client = client_for("%s:%d" % server.getsockname(), send_timeout=0.5)
        datapoints = [(f"test.stall.m{i % 100}", (1_700_000_000 + i, float(i))) for i in range(200_000)]
        with pytest.raises(CarbonUnreachable, match="timed out") as raised:
            client.send(datapoints)
        assert 0 < raised.value.sent < len(datapoints)
        client.close()


@pytest.mark.parametrize(
    "address",
    ["", "   ", "localhost", "localhost:", ":2004", "host:0", "host:65536", "host:-1", "host:abc",
     "[::1]", "::1:2004", "ho st:2004", "host:20 04"],
)
def test_malformed_addresses_are_user_errors(address):
    with pytest.raises(CloudopsError, match="carbon address"):
        parse_address(address)
    with pytest.raises(CloudopsError):
        CarbonClient(address)


@pytest.mark.parametrize(
    "address, parsed",
    [("localhost:2004", ("localhost", 2004)), ("127.0.0.1:1", ("127.0.0.1", 1)), ("[::1]:65535", ("::1", 65535))],
)
def test_well_formed_addresses(address, parsed):
    assert parse_address(address) == parsed


@pytest.mark.parametrize("prefix", ["bad prefix", "a..b", "a/b", "", ".lead"])
def test_a_prefix_with_illegal_characters_is_refused_before_anything_ships(prefix, tmp_path):
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"{name} called although the prefix is invalid")

    spool = Spool(tmp_path / "spool")
    with pytest.raises(CloudopsError, match="metric prefix"):
        ship_cycle({"hv-a": Untouchable()}, Untouchable(), spool, prefix, state_dir=tmp_path / "state")
    assert spool.is_empty()


@pytest.mark.parametrize("interval", [0, -1, 61, 1.5, True])
def test_an_interval_that_is_not_a_whole_positive_minute_count_is_refused(interval):
    with pytest.raises(CloudopsError, match="interval"):
        cron_entry("127.0.0.1:2004", "cloudops", interval_minutes=interval)


@pytest.mark.parametrize("option", ["connect_timeout", "send_timeout"])
@pytest.mark.parametrize("value", [0, -1.0])
def test_timeouts_must_be_positive(option, value):
    with pytest.raises(CloudopsError, match=option):
        CarbonClient("127.0.0.1:2004", **{option: value})


def test_graphite_refuses_a_port_that_is_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        line, query = graphite.free_loopback_ports(2)
        ports = graphite.Ports(line=line, pickle=busy.getsockname()[1], query=query)
        with pytest.raises(CloudopsError, match="in use"):
            graphite.start(tmp_path, ports)
    assert graphite.status(tmp_path)["running"] is False


def test_graphite_start_is_idempotent_and_stop_reports_whether_it_ran(carbon):
    again = graphite.start(carbon.directory, carbon.ports)
    assert not again.started and again.pid == carbon.pid
    report = graphite.status(carbon.directory)
    assert report["running"] and report["accepting"] == {"line": True, "pickle": True, "query": True}
