"""Asking IPAM for a given address (vm.start --ip, a stack's ip:): what is refused and why, in one line; one winner
when two processes ask for one address; and what IPAM never hands out on its own (gateway, network, broadcast,
DHCP range, reserved:)."""

import ipaddress
import multiprocessing
import time

import pytest

from cloudops.compute import stack, vms
from cloudops.errors import CloudopsError
from cloudops.net import ipam
from cloudops.net.networks import NetworkSpec, spec_from_mapping
from cloudops.state.sqlite import SqliteStore

# gateway .1, DHCP range .128-.254 (the default upper half), reserved .2-.9 and .20
NET = spec_from_mapping({"name": "front", "cidr": "10.20.0.0/24", "reserved": ["10.20.0.2-10.20.0.9", "10.20.0.20"],
                         "reservations": [{"mac": "52:54:00:00:00:01", "ip": "10.20.0.30", "name": "printer"}]})


def _store(directory):
    return SqliteStore(directory / "cloud.sqlite")


def test_the_address_asked_for_is_the_one_allocated(tmp_path):
    got = ipam.allocate(NET, "web1", store=_store(tmp_path), ip="10.20.0.77")
    assert got.ip == "10.20.0.77" and got.mac == ipam.derived_mac("front", "web1")
    assert ipam.lookup(NET, "web1", store=_store(tmp_path)) == got
    assert ipam.allocate(NET, "web1", store=_store(tmp_path), ip=" 10.20.0.77 ") == got  # asking again: the same
    assert ipam.allocate(NET, "web1", store=_store(tmp_path)) == got
    # the next VM without --ip gets the lowest free address, not the one asked for
    assert ipam.allocate(NET, "web2", store=_store(tmp_path)).ip == "10.20.0.10"


@pytest.mark.parametrize("ip, why", [
    ("10.20.0.300", "address '10.20.0.300' for web1 is not an IPv4 address"),
    ("web", "address 'web' for web1 is not an IPv4 address"),
    ("fd00::5", "address 'fd00::5' for web1 is not an IPv4 address"),
    ("10.20.1.5", "address 10.20.1.5 for web1 is outside network front (10.20.0.0/24)"),
    ("10.20.0.0", "address 10.20.0.0 for web1 is the network address of network front (10.20.0.0/24)"),
    ("10.20.0.255", "address 10.20.0.255 for web1 is the broadcast address of network front (10.20.0.0/24)"),
    ("10.20.0.1", "address 10.20.0.1 for web1 is the gateway of network front (10.20.0.0/24)"),
    ("10.20.0.128", "address 10.20.0.128 for web1 is in the DHCP range 10.20.0.128-10.20.0.254 of network front"),
    ("10.20.0.254", "address 10.20.0.254 for web1 is in the DHCP range"),
    ("10.20.0.5", "address 10.20.0.5 for web1 is reserved on network front (10.20.0.0/24) (its reserved: list)"),
    ("10.20.0.20", "address 10.20.0.20 for web1 is reserved on network front"),
    ("10.20.0.30", "address 10.20.0.30 for web1 is reserved on network front (10.20.0.0/24) for 52:54:00:00:00:01 "
                   "(printer) by its reservations"),
])
def test_an_address_the_network_does_not_allow_is_one_line_and_nothing_is_written(tmp_path, ip, why):
    for attempt in (lambda: ipam.allocate(NET, "web1", store=_store(tmp_path), ip=ip),
                    lambda: ipam.peek(NET, "web1", store=_store(tmp_path), ip=ip)):
        with pytest.raises(CloudopsError) as exc:
            attempt()
        assert str(exc.value).startswith(why) and "\n" not in str(exc.value)
    assert ipam.allocations(NET, store=_store(tmp_path)) == {}
    assert _store(tmp_path).value("ipam/front") is None


def test_an_address_another_vm_holds_names_that_vm(tmp_path):
    ipam.allocate(NET, "db1", store=_store(tmp_path), ip="10.20.0.40")
    auto = ipam.allocate(NET, "app1", store=_store(tmp_path))
    for ip, holder in (("10.20.0.40", "db1"), (auto.ip, "app1")):
        with pytest.raises(CloudopsError) as exc:
            ipam.allocate(NET, "web1", store=_store(tmp_path), ip=ip)
        assert str(exc.value) == f"address {ip} for web1 is already allocated to VM {holder} on network front"
    with pytest.raises(CloudopsError, match="already allocated to VM db1"):
        ipam.peek(NET, "web1", store=_store(tmp_path), ip="10.20.0.40")
    with pytest.raises(CloudopsError, match="already allocated to a VM planned before it"):
        ipam.peek(NET, "web1", store=_store(tmp_path), ip="10.20.0.41", also_taken=["10.20.0.41"])
    # a VM that already holds another address cannot take a second one
    with pytest.raises(CloudopsError, match="IPAM already allocates db1 10.20.0.40 on network front"):
        ipam.allocate(NET, "db1", store=_store(tmp_path), ip="10.20.0.41")
    assert set(ipam.allocations(NET, store=_store(tmp_path))) == {"db1", "app1"}


def test_a_just_released_address_is_refused_to_another_vm_but_not_to_its_own(tmp_path, monkeypatch):
    ipam.allocate(NET, "old", store=_store(tmp_path), ip="10.20.0.50")
    ipam.release(NET, "old", store=_store(tmp_path))
    with pytest.raises(CloudopsError, match=r"address 10.20.0.50 for new was released 0 min ago on network front: "
                                            r"its DHCP lease to 52:54:00:.* may live 60 min more"):
        ipam.allocate(NET, "new", store=_store(tmp_path), ip="10.20.0.50")
    assert ipam.allocate(NET, "old", store=_store(tmp_path), ip="10.20.0.50").ip == "10.20.0.50"  # same MAC
    ipam.release(NET, "old", store=_store(tmp_path))
    later = time.time() + ipam.QUARANTINE + 1
    monkeypatch.setattr(ipam.time, "time", lambda: later)
    assert ipam.allocate(NET, "new", store=_store(tmp_path), ip="10.20.0.50").ip == "10.20.0.50"


def _worker(state_dir, vm, barrier, results):
    barrier.wait()
    try:
        results.put((vm, ipam.allocate(NET, vm, store=_store(state_dir), ip="10.20.0.99").to_dict()))
    except CloudopsError as exc:
        results.put((vm, str(exc)))
    except Exception as exc:  # said in the test's failure, not lost in a child's stderr
        results.put((vm, repr(exc)))


def test_of_processes_asking_for_one_address_exactly_one_gets_it(tmp_path):
    count = 6
    ctx = multiprocessing.get_context("spawn")  # not fork: see test_ipam
    barrier, results = ctx.Barrier(count), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(tmp_path, f"vm{i}", barrier, results)) for i in range(count)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    winners = [vm for vm, value in got.items() if isinstance(value, dict)]
    assert len(winners) == 1, got
    (winner,) = winners
    assert got[winner]["ip"] == "10.20.0.99"
    for vm, value in got.items():
        if vm != winner:
            assert value == f"address 10.20.0.99 for {vm} is already allocated to VM {winner} on network front"
    assert list(ipam.allocations(NET, store=_store(tmp_path))) == [winner]


def test_ipam_never_hands_out_gateway_network_broadcast_dhcp_range_or_reserved(tmp_path):
    spec = spec_from_mapping({"name": "small", "cidr": "10.30.0.0/27", "gateway": "10.30.0.14",
                              "dhcp_start": "10.30.0.16", "dhcp_end": "10.30.0.30",
                              "reserved": ["10.30.0.1-10.30.0.3", "10.30.0.9"]})
    expected = ["10.30.0.4", "10.30.0.5", "10.30.0.6", "10.30.0.7", "10.30.0.8", "10.30.0.10", "10.30.0.11",
                "10.30.0.12", "10.30.0.13", "10.30.0.15"]
    assert [str(a) for a in spec.static_pool()] == expected
    got = [ipam.allocate(spec, f"vm{i}", store=_store(tmp_path)).ip for i in range(len(expected))]
    assert got == expected
    with pytest.raises(CloudopsError, match="no free address left for vm10"):
        ipam.allocate(spec, "vm10", store=_store(tmp_path))


def test_the_default_gateway_is_never_handed_out_even_when_not_first():
    spec = NetworkSpec(name="gw", cidr="10.40.0.0/29", gateway="10.40.0.3", dhcp_start="10.40.0.5",
                       dhcp_end="10.40.0.6")
    assert [str(a) for a in spec.static_pool()] == ["10.40.0.1", "10.40.0.2", "10.40.0.4"]


@pytest.mark.parametrize("reserved, message", [
    (["10.20.1.1"], "reserved address 10.20.1.1 is not a host address of 10.20.0.0/24"),
    (["10.20.0.255"], "reserved address 10.20.0.255 is not a host address"),
    (["10.20.0.9-10.20.0.2"], "reserved range 10.20.0.9-10.20.0.2 is empty"),
    (["nope"], "invalid reserved address 'nope'"),
    (["10.20.0.2-10.20.0.3-10.20.0.4"], "is neither an address nor a range"),
    ("10.20.0.2", "reserved must be a list"),
])
def test_bad_reserved_entries_are_refused_when_the_network_is_read(reserved, message):
    with pytest.raises(CloudopsError, match=message):
        spec_from_mapping({"name": "front", "cidr": "10.20.0.0/24", "reserved": reserved}, "networks[0]")


def test_reserved_round_trips_and_needs_a_cidr():
    spec = spec_from_mapping({"name": "front", "cidr": "10.20.0.0/24", "reserved": [" 10.20.0.2 - 10.20.0.4"]})
    assert spec.reserved == ("10.20.0.2-10.20.0.4",) and spec.to_dict()["reserved"] == ["10.20.0.2-10.20.0.4"]
    assert spec_from_mapping(spec.to_dict()) == spec
    assert spec_from_mapping({"name": "x", "cidr": "10.1.0.0/24", "reserved": None}).reserved == ()
    with pytest.raises(CloudopsError, match="need a cidr"):
        spec_from_mapping({"name": "lan", "mode": "bridge", "bridge": "br0", "reserved": ["10.0.0.1"]})
    assert ipaddress.IPv4Address("10.20.0.3") not in spec.static_pool()


def test_vm_spec_ip_is_checked_as_an_address():
    assert vms.validate(vms.VMSpec(name="web1", image="tiny", ip=" 10.20.0.7")).ip == "10.20.0.7"
    with pytest.raises(CloudopsError, match=r"^ip '10.20.0' is not an IPv4 address"):
        vms.validate(vms.VMSpec(name="web1", image="tiny", ip="10.20.0"))


def test_a_stack_vm_takes_ip_and_those_asking_are_made_first(tmp_path):
    path = tmp_path / "stack.yaml"
    path.write_text("networks:\n  - {name: web, cidr: 192.168.160.0/24}\n"
                    "vms:\n  - {name: web1, image: tiny, network: web}\n"
                    "  - {name: db1, image: tiny, network: web, ip: 192.168.160.10}\n"
                    "  - {name: web2, image: tiny, network: web}\n")
    loaded = stack.load(path)
    assert [(v.name, v.ip) for v in loaded.vms] == [("db1", "192.168.160.10"), ("web1", None), ("web2", None)]
    path.write_text("vms:\n  - {name: a, image: tiny, ip: 192.168.150.10}\n  - {name: b, image: tiny, ip: 192.168.150.10}\n")
    with pytest.raises(CloudopsError, match=r"vms\[1\]: b asks for ip 192.168.150.10, as a does"):
        stack.load(path)
    path.write_text("vms:\n  - {name: a, image: tiny, ip: 192.168.150}\n")
    with pytest.raises(CloudopsError, match=r"vms\[0\]: ip '192.168.150' is not an IPv4 address"):
        stack.load(path)
