"""The cloud-wide IP allocator: idempotence, release, exhaustion, state file, and concurrent processes."""

import ipaddress
import json
import multiprocessing

import pytest

from cloudops.errors import CloudopsError
from cloudops.net import ipam
from cloudops.net.networks import NetworkSpec
from cloudops.state.sqlite import SqliteStore

NET = NetworkSpec(name="front", cidr="10.20.0.0/24")


def _store(directory):
    return SqliteStore(directory / "cloud.sqlite")


def test_allocate_is_idempotent_and_stable(tmp_path):
    first = ipam.allocate(NET, "web1", store=_store(tmp_path))
    assert first.ip == "10.20.0.2"  # lowest free: after the gateway, below the DHCP range
    assert first.mac.startswith("52:54:00:") and first.mac == ipam.derived_mac("front", "web1")
    assert ipam.allocate(NET, "web1", store=_store(tmp_path)) == first
    second = ipam.allocate(NET, "web2", store=_store(tmp_path))
    assert second.ip == "10.20.0.3" and second.mac != first.mac
    assert ipam.lookup(NET, "web1", store=_store(tmp_path)) == first
    assert ipam.lookup(NET, "nobody", store=_store(tmp_path)) is None
    assert list(ipam.allocations(NET, store=_store(tmp_path))) == ["web1", "web2"]


def test_addresses_stay_out_of_gateway_dhcp_range_and_reservations(tmp_path):
    spec = NetworkSpec(name="tiny", cidr="10.20.1.0/28", reservations=(
        {"mac": "52:54:00:00:00:01", "ip": "10.20.1.3", "name": "static"},))
    got = [ipaddress.IPv4Address(ipam.allocate(spec, f"vm{i}", store=_store(tmp_path)).ip) for i in range(5)]
    assert [str(a) for a in got] == ["10.20.1.2", "10.20.1.4", "10.20.1.5", "10.20.1.6", "10.20.1.7"]
    with pytest.raises(CloudopsError, match="no free address left for vm5") as exc:
        ipam.allocate(spec, "vm5", store=_store(tmp_path))
    assert "\n" not in str(exc.value)


def test_release_frees_the_address_for_reuse(tmp_path):
    spec = NetworkSpec(name="small", cidr="10.20.2.0/29")  # pool: .2 and .3
    a = ipam.allocate(spec, "a", store=_store(tmp_path))
    ipam.allocate(spec, "b", store=_store(tmp_path))
    with pytest.raises(CloudopsError, match="no free address"):
        ipam.allocate(spec, "c", store=_store(tmp_path))
    assert ipam.release(spec, "a", store=_store(tmp_path)) is True
    assert ipam.release(spec, "a", store=_store(tmp_path)) is False
    assert ipam.allocate(spec, "c", store=_store(tmp_path)).ip == a.ip


def test_allocations_are_one_plain_json_document_in_the_state_store(tmp_path):
    import sqlite3

    alloc = ipam.allocate(NET, "web1", store=_store(tmp_path))
    with sqlite3.connect(tmp_path / "cloud.sqlite") as db:  # the oracle: SQLite itself, not cloudops
        (raw,) = db.execute("SELECT value FROM kv WHERE key = 'ipam/front'").fetchone()
    data = json.loads(raw)
    assert data["network"] == "front" and data["cidr"] == "10.20.0.0/24"
    assert data["allocations"] == {"web1": {"ip": alloc.ip, "mac": alloc.mac}}


def test_a_foreign_document_is_refused_naming_its_key(tmp_path):
    store = _store(tmp_path)
    store.create("ipam/front", {"something": "else"})
    with pytest.raises(CloudopsError, match="ipam/front"):
        ipam.allocate(NET, "web1", store=store)


def test_changed_cidr_refuses_instead_of_mixing_subnets(tmp_path):
    ipam.allocate(NET, "web1", store=_store(tmp_path))
    moved = NetworkSpec(name="front", cidr="10.99.0.0/24")
    with pytest.raises(CloudopsError, match="is for 10.20.0.0/24, but network front is now 10.99.0.0/24"):
        ipam.allocate(moved, "web2", store=_store(tmp_path))


def test_mac_collision_takes_the_next_derivation(tmp_path, monkeypatch):
    real = ipam.derived_mac
    monkeypatch.setattr(ipam, "derived_mac",
                        lambda net, vm, attempt=0: "52:54:00:00:00:99" if attempt == 0 else real(net, vm, attempt))
    a = ipam.allocate(NET, "a", store=_store(tmp_path))
    b = ipam.allocate(NET, "b", store=_store(tmp_path))
    assert a.mac == "52:54:00:00:00:99" and b.mac == real("front", "b", 1)


@pytest.mark.parametrize("vm", ["", "a b", "a;b", "x" * 64, "../etc"])
def test_bad_vm_names(tmp_path, vm):
    with pytest.raises(CloudopsError, match="invalid VM name"):
        ipam.allocate(NET, vm, store=_store(tmp_path))


def test_bridge_network_without_cidr_has_no_ipam(tmp_path):
    with pytest.raises(CloudopsError, match="IPAM needs one"):
        ipam.allocate(NetworkSpec(name="lan", mode="bridge", bridge="br0"), "vm", store=_store(tmp_path))


def _worker(state_dir, vm, barrier, results):
    barrier.wait()
    try:
        results.put((vm, ipam.allocate(NET, vm, store=_store(state_dir)).to_dict()))
    except Exception as exc:  # said in the test's failure, not lost in a child's stderr
        results.put((vm, repr(exc)))


def test_concurrent_processes_never_share_an_address(tmp_path):
    count = 12
    # spawn, not fork: a fork of this many-threaded test process can inherit a lock some other thread held
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(count), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(tmp_path, f"vm{i}", barrier, results)) for i in range(count)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=60) for _ in procs)
    assert all(isinstance(v, dict) for v in got.values()), got
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    ips = [entry["ip"] for entry in got.values()]
    assert len(got) == count and len(set(ips)) == count
    assert {str(ipaddress.IPv4Address("10.20.0.2") + i) for i in range(count)} == set(ips)
    stored = ipam.allocations(NET, store=_store(tmp_path))
    assert {vm: a.to_dict() for vm, a in stored.items()} == got


def test_a_released_address_rests_so_a_stale_dhcp_lease_cannot_steal_it(tmp_path):
    from cloudops.net.networks import NetworkSpec

    spec = NetworkSpec(name="rest", mode="nat", cidr="192.168.77.0/24")
    first = ipam.allocate(spec, "a", store=_store(tmp_path))
    assert ipam.release(spec, "a", store=_store(tmp_path))
    second = ipam.allocate(spec, "b", store=_store(tmp_path))
    assert second.ip != first.ip, "a just-released address may still be leased to the old MAC"
    # the same VM (same MAC) coming back may have its old address at once
    ipam.release(spec, "b", store=_store(tmp_path))
    again = ipam.allocate(spec, "a", store=_store(tmp_path))
    assert again == first


def test_quarantined_addresses_are_used_when_nothing_else_is_free():
    assert ipam._pick(["10.0.0.5", "10.0.0.6"], {"10.0.0.5": {"mac": "x", "at": 100.0},
                                                 "10.0.0.6": {"mac": "y", "at": 50.0}}, "z", now=200.0) == "10.0.0.6"
    assert ipam._pick(["10.0.0.5"], {"10.0.0.5": {"mac": "x", "at": 100.0}}, "z", now=100.0 + ipam.QUARANTINE) == "10.0.0.5"
