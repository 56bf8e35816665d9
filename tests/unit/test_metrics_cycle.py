"""ship_cycle's bookkeeping with a fake carbon; migration figures; the cron file."""

import json

import pytest
from libvirt_fake import FakeConnection, vm_stats

from cloudops.errors import CloudopsError
from cloudops.metrics.carbon import CarbonUnreachable
from cloudops.metrics.cycle import cron_entry, migration_datapoints, ship_cycle, summary_line
from cloudops.metrics.spool import Spool

T0 = 1_700_000_000
UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"


class FakeCarbon:
    """Takes ``capacity`` datapoints in all, then is unreachable."""

    def __init__(self, capacity=None):
        self.received = []
        self.capacity = capacity

    def send(self, datapoints):
        if self.capacity is not None and len(self.received) + len(datapoints) > self.capacity:
            taken = max(0, self.capacity - len(self.received))
            self.received.extend(datapoints[:taken])
            raise CarbonUnreachable("carbon at fake:2004 unreachable after 3 attempts: Connection refused", sent=taken)
        self.received.extend(datapoints)
        return len(datapoints)


def hosts():
    return {
        "hv1": FakeConnection(vms={"web": (UUID, 3, vm_stats(cpu_ns=10**9))}),
        "hv2": FakeConnection(fail_stats=True),
        "hv3": ConnectionRefusedError("ssh: connect to host hv3 port 22: Connection refused"),
    }


def test_every_host_is_reported_and_the_good_ones_ship(tmp_path):
    carbon, spool = FakeCarbon(), Spool(tmp_path / "spool")
    summary = ship_cycle(hosts(), carbon, spool, "p", now=T0, state_dir=tmp_path / "state")
    assert summary["hosts"]["hv1"]["ok"] and summary["hosts"]["hv1"]["vms"] == 1
    assert "domain stats failed" in summary["hosts"]["hv2"]["error"]
    assert "no connection" in summary["hosts"]["hv3"]["error"]
    assert summary["hosts_failed"] == 2 and not summary["ok"]
    assert summary["sent"] == len(carbon.received) == summary["collected"] + 7
    paths = {p for p, _ in carbon.received}
    assert "p.vm.web.host.hv1" in paths and "p.cloudops.metrics.hosts_failed" in paths
    own = {p: v for p, (_ts, v) in carbon.received if p.startswith("p.cloudops.")}
    assert own["p.cloudops.metrics.hosts_failed"] == 2
    assert own["p.cloudops.metrics.collected"] == summary["collected"]


def test_a_carbon_failing_mid_cycle_spools_exactly_the_rest(tmp_path):
    carbon, spool = FakeCarbon(capacity=5), Spool(tmp_path / "spool")
    summary = ship_cycle(hosts(), carbon, spool, "p", now=T0, state_dir=tmp_path / "state")
    assert summary["sent"] == 5
    assert summary["spooled"] == spool.pending() == summary["collected"] + 7 - 5
    assert summary["carbon"].startswith("carbon at fake:2004 unreachable")

    later = FakeCarbon()
    again = ship_cycle(hosts(), later, spool, "p", now=T0 + 60, state_dir=tmp_path / "state")
    assert again["replayed"] == summary["spooled"]
    # replayed first, oldest first: the spooled cycle's points precede the new cycle's
    stamps = [ts for _p, (ts, _v) in later.received]
    assert stamps == sorted(stamps) and stamps[0] == T0 and stamps[-1] == T0 + 60
    assert spool.is_empty()


def test_the_summary_is_one_json_line(tmp_path):
    summary = ship_cycle(hosts(), FakeCarbon(), Spool(tmp_path / "s"), "p", now=T0, state_dir=tmp_path / "st")
    line = summary_line(summary)
    assert "\n" not in line and json.loads(line)["collected"] == summary["collected"]


def test_migration_datapoints():
    points = dict(
        (p, v) for p, (_ts, v) in migration_datapoints("web.1", 64.0, 120, 300 << 20, prefix="p", timestamp=T0)
    )
    assert points == {
        "p.vm.web_1.migration.duration_s": 64.0,
        "p.vm.web_1.migration.downtime_ms": 120.0,
        "p.vm.web_1.migration.bytes": float(300 << 20),
        "p.vm.web_1.migration.bytes_per_s": (300 << 20) / 64.0,
    }


@pytest.mark.parametrize("bad", [{"duration": -1}, {"downtime_ms": float("nan")}, {"bytes": "many"}])
def test_migration_figures_must_be_non_negative_numbers(bad):
    args = {"duration": 1.0, "downtime_ms": 1.0, "bytes": 1, **bad}
    with pytest.raises(CloudopsError, match="migration"):
        migration_datapoints("web", **args)


def test_cron_entry_runs_one_cycle_a_minute_under_flock(tmp_path):
    text = cron_entry("graphite.lab:2004", "cloudops", program=tmp_path / "my venv/bin/cloudops", var=tmp_path / "var")
    line = [ln for ln in text.splitlines() if ln and not ln.startswith(("#", "SHELL=", "PATH=", "CLOUDOPS_VAR="))]
    assert len(line) == 1
    fields = line[0].split()
    assert fields[:6] == ["*", "*", "*", "*", "*", "root"]
    assert "flock -n" in line[0] and "metrics.ship" in line[0]
    assert " cd / && " in line[0] and f"'{tmp_path / 'my venv/bin/cloudops'}' metrics.ship" in line[0]  # quoted: a space
    assert "--carbon=graphite.lab:2004" in line[0] and "--prefix=cloudops" in line[0]
    assert text.endswith("\n")  # cron ignores a last line without newline


def test_cron_entry_every_five_minutes():
    assert "\n*/5 * * * * root " in cron_entry("graphite:2004", "cloudops", interval_minutes=5)


@pytest.mark.parametrize("kwargs", [{"user": "root; rm"}, {"max_runtime": 0}, {"prefix": "a b"}, {"carbon_address": "nohost"}])
def test_cron_entry_refuses_bad_values(kwargs):
    args = {"carbon_address": "graphite:2004", "prefix": "cloudops", **kwargs}
    with pytest.raises(CloudopsError):
        cron_entry(**args)


def test_a_vm_active_on_two_hosts_is_shipped_once_from_where_it_runs(tmp_path):
    import libvirt

    paused = vm_stats(cpu_ns=10**8, state=libvirt.VIR_DOMAIN_PAUSED)
    conns = {
        "hv-dest": FakeConnection(vms={"web": (UUID, 12, paused)}),
        "hv-src": FakeConnection(vms={"web": (UUID, 3, vm_stats(cpu_ns=10**9))}),
    }
    carbon = FakeCarbon()
    summary = ship_cycle(conns, carbon, Spool(tmp_path / "spool"), "p", now=T0, state_dir=tmp_path / "state")
    vm_points = [(p, v) for p, (_ts, v) in carbon.received if p.startswith("p.vm.web.")]
    assert len({p for p, _v in vm_points}) == len(vm_points)  # no series written twice
    assert ("p.vm.web.host.hv-src", 1.0) in vm_points
    assert ("p.vm.web.state", float(libvirt.VIR_DOMAIN_RUNNING)) in vm_points
    assert not any(p == "p.vm.web.host.hv-dest" for p, _v in vm_points)
    assert any("migrating" in note for note in summary["hosts"]["hv-dest"]["problems"])


def test_samples_collected_elsewhere_are_shipped_like_connections(tmp_path):
    from cloudops.metrics.collect import collect_host

    sample = collect_host(FakeConnection(vms={"web": (UUID, 3, vm_stats())}), "hv1", taken_at=T0)
    carbon = FakeCarbon()
    summary = ship_cycle({"hv1": sample}, carbon, Spool(tmp_path / "s"), "p", now=T0, state_dir=tmp_path / "st")
    assert summary["ok"] and ("p.vm.web.host.hv1", (T0, 1.0)) in carbon.received
