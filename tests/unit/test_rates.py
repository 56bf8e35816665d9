"""Rates from getAllDomainStats-shaped samples: values, backwards counters, VM restarts, corrupt state."""

import json

import libvirt
import pytest
from libvirt_fake import FakeConnection, vm_stats

from cloudops.errors import CloudopsError
from cloudops.metrics import rates
from cloudops.metrics.collect import FLAGS, STATS, HostSample, VmSample, collect_host

UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"
T0 = 1_700_000_000.0


def sample(t, vms, cpu_times=None, host="hv1"):
    """A HostSample at wall time t; vms: name -> (domain_id, stats)."""
    return HostSample(
        host=host, taken_at=t, cpus=8, cpu_mhz=2400, memory_total_bytes=16 << 30, memory_free_bytes=8 << 30,
        cpu_times_ns=cpu_times or {},
        vms=[VmSample(name, UUID, dom_id, stats) for name, (dom_id, stats) in vms.items()],
    )


def as_dict(figures):
    values = {path: value for path, (_ts, value) in figures.datapoints}
    assert len(values) == len(figures.datapoints), "a path appears twice in one cycle"
    return values


def two_cycles(before, after, dt=10.0, dom_ids=(7, 7)):
    first = rates.figures(sample(T0, {"web": (dom_ids[0], before)}), None, "p", int(T0))
    second = rates.figures(sample(T0 + dt, {"web": (dom_ids[1], after)}), first.state, "p", int(T0 + dt))
    return as_dict(first), as_dict(second)


def test_rates_from_two_samples():
    before = vm_stats(cpu_ns=10 * 10**9, vcpu_ns=(4 * 10**9, 6 * 10**9), delay_ns=(0, 0),
                      rd_bytes=0, rd_reqs=0, rd_ns=0, wr_bytes=0, wr_reqs=0, wr_ns=0, rx_bytes=0, tx_bytes=0)
    after = vm_stats(cpu_ns=25 * 10**9, vcpu_ns=(9 * 10**9, 16 * 10**9), delay_ns=(10**9, 0),
                     rd_bytes=40960, rd_reqs=10, rd_ns=20_000_000, wr_bytes=8192, wr_reqs=0, wr_ns=0,
                     rx_bytes=100_000, tx_bytes=50_000)
    first, second = two_cycles(before, after, dt=10.0)

    # 15 s of CPU in 10 s of wall time on 2 vCPUs: 150 %
    assert second["p.vm.web.cpu.util_percent"] == pytest.approx(150.0)
    assert second["p.vm.web.vcpu.0.util_percent"] == pytest.approx(50.0)
    assert second["p.vm.web.vcpu.1.util_percent"] == pytest.approx(100.0)
    assert second["p.vm.web.vcpu.0.steal_percent"] == pytest.approx(10.0)
    assert second["p.vm.web.vcpu.1.steal_percent"] == 0.0
    assert second["p.vm.web.disk.vda.read_bytes_per_s"] == pytest.approx(4096.0)
    assert second["p.vm.web.disk.vda.read_ops_per_s"] == pytest.approx(1.0)
    assert second["p.vm.web.disk.vda.read_latency_ms"] == pytest.approx(2.0)
    assert second["p.vm.web.disk.vda.write_bytes_per_s"] == pytest.approx(819.2)
    assert "p.vm.web.disk.vda.write_latency_ms" not in second  # no write requests: no latency, not 0
    assert second["p.vm.web.net.net0.rx_bytes_per_s"] == pytest.approx(10_000.0)
    assert second["p.vm.web.net.net0.tx_packets_per_s"] == pytest.approx(5.0)
    assert second["p.vm.web.memory.current_bytes"] == 1048576 * 1024
    assert second["p.vm.web.memory.rss_bytes"] == 524288 * 1024
    assert second["p.vm.web.host.hv1"] == 1
    assert second["p.vm.web.state"] == libvirt.VIR_DOMAIN_RUNNING

    # the first cycle has gauges but no rates
    assert "p.vm.web.cpu.util_percent" not in first
    assert first["p.vm.web.memory.current_bytes"] == 1048576 * 1024


def test_raw_counters_are_never_shipped():
    _first, second = two_cycles(vm_stats(cpu_ns=10**9), vm_stats(cpu_ns=2 * 10**9))
    for path in second:
        assert not path.endswith((".time", ".bytes", ".reqs", ".pkts", ".rd.times"))


def test_steal_falls_back_to_wait_without_delay():
    before, after = vm_stats(vcpu_ns=(0,)), vm_stats(vcpu_ns=(0,))
    after["vcpu.0.wait"] = 2 * 10**9
    _first, second = two_cycles(before, after, dt=10.0)
    assert second["p.vm.web.vcpu.0.steal_percent"] == pytest.approx(20.0)


def test_a_counter_that_went_backwards_gives_no_rate_never_a_negative_one():
    before = vm_stats(cpu_ns=50 * 10**9, rd_bytes=10**9, rx_bytes=10**9)
    after = vm_stats(cpu_ns=51 * 10**9, rd_bytes=10, rx_bytes=2 * 10**9)  # disk counter reset
    _first, second = two_cycles(before, after)
    assert "p.vm.web.disk.vda.read_bytes_per_s" not in second
    assert second["p.vm.web.cpu.util_percent"] == pytest.approx(10.0)
    assert second["p.vm.web.net.net0.rx_bytes_per_s"] == pytest.approx(10**8)
    assert all(value >= 0 for path, value in second.items() if "per_s" in path or "percent" in path)


def test_a_restarted_vm_gives_no_rates_that_cycle():
    # counters happen to be higher, but the domain id changed: another QEMU process
    _first, second = two_cycles(vm_stats(cpu_ns=10**9), vm_stats(cpu_ns=9 * 10**9), dom_ids=(7, 8))
    assert "p.vm.web.cpu.util_percent" not in second
    assert second["p.vm.web.memory.current_bytes"] > 0


def test_clock_not_advancing_gives_no_rates_and_a_problem():
    first = rates.figures(sample(T0, {"web": (7, vm_stats(cpu_ns=0))}), None, "p", int(T0))
    second = rates.figures(sample(T0, {"web": (7, vm_stats(cpu_ns=10**9))}), first.state, "p", int(T0))
    assert "p.vm.web.cpu.util_percent" not in as_dict(second)
    assert "clock" in second.problems[0]


def test_inactive_vms_are_counted_not_shipped():
    off = {"state.state": libvirt.VIR_DOMAIN_SHUTOFF, "state.reason": 0}
    result = rates.figures(sample(T0, {"web": (7, vm_stats()), "old": (-1, off)}), None, "p", int(T0))
    values = as_dict(result)
    assert not any(".vm.old." in path for path in values)
    assert values["p.hv.hv1.vms.defined"] == 2
    assert values["p.hv.hv1.vms.running"] == 1
    assert result.vms == 1


def test_host_cpu_utilisation_from_cpu_time_counters():
    t0 = {"kernel": 100, "user": 300, "idle": 1000, "iowait": 0}
    t1 = {"kernel": 200, "user": 500, "idle": 1600, "iowait": 100}
    first = rates.figures(sample(T0, {}, t0), None, "p", int(T0))
    second = as_dict(rates.figures(sample(T0 + 10, {}, t1), first.state, "p", int(T0 + 10)))
    assert second["p.hv.hv1.cpu.util_percent"] == pytest.approx(30.0)
    assert second["p.hv.hv1.cpu.iowait_percent"] == pytest.approx(10.0)
    assert second["p.hv.hv1.cpu.count"] == 8


def test_every_datapoint_of_a_cycle_has_the_cycle_timestamp():
    result = rates.figures(sample(T0 + 0.7, {"web": (7, vm_stats())}), None, "p", 1234)
    assert {ts for _path, (ts, _value) in result.datapoints} == {1234}


# -- state files ----------------------------------------------------------------------------


def test_state_round_trip_gives_rates_across_processes(tmp_path):
    rates.host_figures_with_state(sample(T0, {"web": (7, vm_stats(cpu_ns=0))}), tmp_path, "p", int(T0))
    second = rates.host_figures_with_state(sample(T0 + 10, {"web": (7, vm_stats(cpu_ns=10**10))}), tmp_path, "p", int(T0 + 10))
    assert as_dict(second)["p.vm.web.cpu.util_percent"] == pytest.approx(100.0)
    assert json.loads((tmp_path / "hv1.json").read_text())["vms"]["web"]["domain_id"] == 7


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\x00\x00\x00",
        b"[]",
        b'{"version": 1, "taken_at": "yesterday", "vms": {}}',
        b'{"version": 1, "taken_at": 1.0, "vms": {"web": {"counters": {"cpu.time": "many"}}}}',
        b'{"version": 99, "taken_at": 1.0, "vms": {}}',
    ],
)
def test_a_corrupt_state_file_is_reported_and_replaced(tmp_path, content):
    (tmp_path / "hv1.json").write_bytes(content)
    first = rates.host_figures_with_state(sample(T0, {"web": (7, vm_stats(cpu_ns=0))}), tmp_path, "p", int(T0))
    assert "state file" in first.problems[0]
    assert "p.vm.web.cpu.util_percent" not in as_dict(first)
    # replaced by a good one: the next cycle has rates again
    second = rates.host_figures_with_state(sample(T0 + 10, {"web": (7, vm_stats(cpu_ns=10**9))}), tmp_path, "p", int(T0 + 10))
    assert second.problems == []
    assert as_dict(second)["p.vm.web.cpu.util_percent"] == pytest.approx(10.0)


def test_state_forgets_vms_that_left_the_host(tmp_path):
    rates.host_figures_with_state(sample(T0, {"web": (7, vm_stats()), "db": (9, vm_stats())}), tmp_path, "p", int(T0))
    rates.host_figures_with_state(sample(T0 + 10, {"web": (7, vm_stats())}), tmp_path, "p", int(T0 + 10))
    assert set(json.loads((tmp_path / "hv1.json").read_text())["vms"]) == {"web"}


def test_vm_counters_key_devices_by_stable_names():
    counters = rates.vm_counters(vm_stats(rd_bytes=5, rx_bytes=7))
    assert counters["disk.vda.rd.bytes"] == 5
    assert counters["net.net0.rx.bytes"] == 7  # not the tap name vnet3, which changes per start


# -- collect_host -----------------------------------------------------------------------------


def test_collect_host_uses_one_bulk_call_with_nowait():
    conn = FakeConnection(vms={"web": (UUID, 7, vm_stats(cpu_ns=5))})
    result = collect_host(conn, "hv1", taken_at=T0)
    assert conn.calls == [("getAllDomainStats", STATS, FLAGS)]
    assert FLAGS & libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
    assert [vm.name for vm in result.vms] == ["web"]
    assert result.vms[0].stats["cpu.time"] == 5
    assert result.pools["default"]["available"] == 60 << 30
    assert result.memory_stats_kib["cached"] == 2 << 20
    assert result.taken_at == T0


def test_collect_host_notes_unsupported_extras_as_problems():
    result = collect_host(FakeConnection(memory_stats=False), "hv1", taken_at=T0)
    assert result.memory_stats_kib == {}
    assert any("memory stats" in p for p in result.problems)


def test_collect_host_failure_is_a_user_error_naming_the_host():
    with pytest.raises(CloudopsError, match="hv1: domain stats failed"):
        collect_host(FakeConnection(fail_stats=True), "hv1")


def test_collect_host_shape_with_the_libvirt_test_driver():
    """Unit test only: the test driver answers the bulk call with the state group alone."""
    conn = libvirt.open("test:///default")
    try:
        result = collect_host(conn, "testhost")
        figures = rates.figures(result, None, "p", int(result.taken_at))
    finally:
        conn.close()
    assert [vm.name for vm in result.vms] == ["test"]
    assert result.vms[0].active and result.vms[0].domain_id == 1
    assert result.cpus > 0 and result.memory_total_bytes > 0
    assert "default-pool" in result.pools
    values = as_dict(figures)
    assert values["p.vm.test.host.testhost"] == 1
    assert values["p.hv.testhost.vms.running"] == 1


def test_the_top_layer_counts_even_with_a_backing_index_and_backing_layers_do_not():
    from cloudops.metrics.rates import vm_counters

    stats = {
        "block.count": 2,
        "block.0.name": "vda", "block.0.backingIndex": 2, "block.0.rd.bytes": 100, "block.0.rd.reqs": 1,
        "block.1.name": "vda", "block.1.backingIndex": 1, "block.1.rd.bytes": 999, "block.1.rd.reqs": 9,
    }
    counters = vm_counters(stats)
    assert counters["disk.vda.rd.bytes"] == 100 and counters["disk.vda.rd.reqs"] == 1
