"""The failover plan and the watch cycle, with fakes for the hosts: who restarts where, who stays down,
and that nothing is restarted without fencing."""

import sys
from types import SimpleNamespace

import pytest

from cloudops.compute import records, scheduler
from cloudops.errors import CloudopsError
from cloudops.ha import comeback, failover, probe, watch
from cloudops.ha.probe import Probe


def record(name, storage="shared", group=None, memory=96, host="hv1"):
    return {"name": name, "host": host, "xml": f"<domain><name>{name}</name></domain>", "storage": storage,
            "memory_mb": memory, "vcpus": 1, "group": group,
            "nics": [{"network": "cloudops", "ip": "192.168.150.9", "mac": "52:54:00:00:00:09"}]}


def state(name, free=4096, groups=(), maintenance=False):
    return scheduler.HostState(name=name, memory_total_mb=free + 256, memory_free_mb=free + 256, vcpus_total=4,
                               anti_affinity_groups=frozenset(groups), maintenance=maintenance)


def test_shared_vms_restart_on_the_scheduler_s_host_local_ones_stay_down():
    steps = failover.plan([record("b-local", storage="local"), record("a-shared")],
                          [state("hv1"), state("hv2", free=1024), state("hv3", free=2048)], "hv1")
    assert [(s.vm, s.action, s.target) for s in steps] == [("a-shared", "restart", "hv3"), ("b-local", "down", None)]
    assert "local storage: down until hv1 returns" in steps[1].reason


def test_the_dead_host_is_never_a_target():
    steps = failover.plan([record("a")], [state("hv1", free=100000), state("hv2")], "hv1")
    assert steps[0].target == "hv2"


def test_anti_affinity_spreads_a_group_and_counts_earlier_placements():
    steps = failover.plan([record("w1", group="web"), record("w2", group="web"), record("w3", group="web")],
                          [state("hv1"), state("hv2"), state("hv3", groups={"db"}), state("hv4", groups={"web"})], "hv1")
    assert [(s.vm, s.action, s.target) for s in steps[:2]] == [("w1", "restart", "hv2"), ("w2", "restart", "hv3")]
    assert steps[2].action == "no host"
    assert "hv4: already runs a VM of anti-affinity group 'web'" in steps[2].reason
    assert "hv1" not in steps[2].reason  # the dead host is no candidate at all


def test_capacity_is_claimed_vm_after_vm():
    steps = failover.plan([record("a", memory=600), record("b", memory=600)], [state("hv2", free=1000)], "hv1")
    assert [(s.vm, s.action) for s in steps] == [("a", "restart"), ("b", "no host")]
    assert "needs 600 MiB" in steps[1].reason


def test_maintenance_hosts_take_nothing():
    steps = failover.plan([record("a")], [state("hv2", maintenance=True)], "hv1")
    assert steps[0].action == "no host" and "in maintenance" in steps[0].reason


def test_comeback_finds_only_definitions_whose_record_names_another_host():
    known = {"moved": {"host": "hv2"}, "stays": {"host": "hv1"}}
    assert comeback.stale(["moved", "stays", "unrecorded"], "hv1", known) == ["moved"]


@pytest.mark.parametrize("grace", [0, -1, "x", "nan", "inf", None])
def test_grace_must_be_positive(grace):
    with pytest.raises(CloudopsError, match="--grace must be a positive number of seconds"):
        watch.check_grace(grace)


# ---------------------------------------------------------------- the cycle, with fake probes and hosts

def inventory(fence=None):
    hv = {name: SimpleNamespace(name=name, address=f"10.0.0.{i}", user="root", port=22, tags=(),
                                vars={"fence_command": fence} if fence is not None and name == "hv1" else {})
          for i, name in enumerate(("hv1", "hv2"), 1)}
    return SimpleNamespace(hosts=hv, hypervisors=lambda: list(hv.values()), path="inv.yaml")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def probes(missing=()):
    def probe_all(hosts, timeout):
        return {h.name: Probe(h.name, h.name not in missing, h.name not in missing,
                              "ssh: connection refused" if h.name in missing else "") for h in hosts}
    return probe_all


@pytest.fixture
def fakes(monkeypatch, tmp_path):
    restarted, cleaned = [], []
    monkeypatch.setattr(failover, "restart", lambda rec, target, start=True:
                        restarted.append((rec["name"], target.name) if start else (rec["name"], target.name, "stopped")))
    monkeypatch.setattr(failover.placement, "host_states", lambda hosts: [state(h.name) for h in hosts])
    monkeypatch.setattr(comeback, "clean", lambda host: cleaned.append(host.name) or [f"{host.name}: cleaned"])
    defined = {}  # (host, vm) pairs other hypervisors already have
    monkeypatch.setattr(failover, "_has", lambda host, name: (host.name, name) in defined)
    records.save(record("shared1"))
    records.save(record("local1", storage="local"))
    return SimpleNamespace(restarted=restarted, cleaned=cleaned, marker=tmp_path / "fenced", defined=defined)


def fence_ok(marker):
    return [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('{{host}} ')"]


def test_missing_then_dead_after_grace_fenced_once_and_restarted(fakes):
    clock, inv = Clock(), inventory(fence_ok(fakes.marker))
    first = watch.cycle(inv, 30, now=clock, probe_all=probes({"hv1"}))
    assert [h.status for h in first.hosts] == ["missing", "up"] and fakes.restarted == []
    clock.t += 29
    assert watch.cycle(inv, 30, now=clock, probe_all=probes({"hv1"})).hosts[0].status == "missing"
    clock.t += 1
    shipped = []
    dead = watch.cycle(inv, 30, now=clock, probe_all=probes({"hv1"}), ship=shipped.append).hosts[0]
    assert dead.status == "dead" and dead.failover["fenced"] and dead.failover["complete"]
    assert fakes.marker.read_text() == "hv1 "
    assert fakes.restarted == [("shared1", "hv2")]
    assert {s["vm"]: s["action"] for s in dead.failover["steps"]} == {"shared1": "restarted", "local1": "down"}
    assert shipped and shipped[0].detect_seconds == 30
    assert watch.entry("hv1")["fenced_at"] and failover.history("hv1")
    # the next cycle neither fences again nor restarts anything
    records.moved("shared1", "hv2")
    clock.t += 10
    again = watch.cycle(inv, 30, now=clock, probe_all=probes({"hv1"})).hosts[0]
    assert again.status == "dead" and again.failover["complete"] and fakes.marker.read_text() == "hv1 "
    # the host answers again: cleaned, reported healthy, forgotten
    back = watch.cycle(inv, 30, now=clock, probe_all=probes()).hosts[0]
    assert back.status == "healthy again" and fakes.cleaned == ["hv1"] and watch.entry("hv1") is None


def test_without_fence_command_nothing_is_restarted_and_the_report_says_why(fakes):
    clock, inv = Clock(), inventory()
    watch.cycle(inv, 5, now=clock, probe_all=probes({"hv1"}))
    clock.t += 5
    report = watch.cycle(inv, 5, now=clock, probe_all=probes({"hv1"}))
    dead = report.hosts[0]
    assert dead.status == "dead" and not dead.failover["fenced"] and fakes.restarted == []
    assert "no fence_command for hv1 in the inventory: nothing restarted" in dead.failover["reason"]
    assert report.attention == ["hv1"]
    assert any("not fenced: no fence_command" in line for line in report.lines())


def test_a_failing_fence_restarts_nothing_and_is_tried_again(fakes):
    clock, inv = Clock(), inventory([sys.executable, "-c", "import sys; sys.exit(1)"])
    watch.cycle(inv, 5, now=clock, probe_all=probes({"hv1"}))
    clock.t += 6
    dead = watch.cycle(inv, 5, now=clock, probe_all=probes({"hv1"})).hosts[0]
    assert not dead.failover["fenced"] and "fence_command exited 1" in dead.failover["reason"]
    assert fakes.restarted == [] and "fenced_at" not in watch.entry("hv1")
    clock.t += 6
    assert watch.cycle(inv, 5, now=clock, probe_all=probes({"hv1"})).hosts[0].failover["fence"]["exit_code"] == 1


def test_a_host_missing_less_than_grace_that_answers_is_forgotten_without_cleaning(fakes):
    clock, inv = Clock(), inventory(fence_ok(fakes.marker))
    watch.cycle(inv, 30, now=clock, probe_all=probes({"hv1"}))
    clock.t += 10
    assert watch.cycle(inv, 30, now=clock, probe_all=probes()).hosts[0].status == "up"
    assert watch.entry("hv1") is None and fakes.cleaned == [] and not fakes.marker.exists()


def test_a_malformed_fence_command_fails_the_cycle_before_any_probe(fakes):
    asked = []
    with pytest.raises(CloudopsError, match="unknown variable"):
        watch.cycle(inventory(["fence", "{bmc}"]), 30, probe_all=lambda hosts, t: asked.append(hosts))
    assert asked == []


def test_host_failover_refuses_a_live_host_without_force(fakes, monkeypatch):
    inv = inventory(fence_ok(fakes.marker))
    monkeypatch.setattr(watch.probe, "probe_all", probes())
    with pytest.raises(CloudopsError, match="hv1 answers .*not failing over a live host; --force"):
        watch.failover_now(inv.hosts["hv1"], inv)
    assert not fakes.marker.exists() and fakes.restarted == [] and watch.entry("hv1") is None
    _found, report = watch.failover_now(inv.hosts["hv1"], inv, force=True)
    assert fakes.marker.read_text() == "hv1 " and report.complete and fakes.restarted == [("shared1", "hv2")]
    assert watch.entry("hv1")["fenced_at"]


def test_host_failover_dry_run_fences_and_restarts_nothing(fakes, monkeypatch):
    inv = inventory(fence_ok(fakes.marker))
    monkeypatch.setattr(watch.probe, "probe_all", probes({"hv1"}))
    _found, report = watch.failover_now(inv.hosts["hv1"], inv, dry_run=True)
    assert [(s.vm, s.action, s.target) for s in report.steps] == [("local1", "down", None), ("shared1", "restart", "hv2")]
    assert not fakes.marker.exists() and fakes.restarted == [] and watch.entry("hv1") is None


def test_a_failed_restart_is_reported_and_the_record_stays(fakes, monkeypatch):
    def refuse(rec, target, start=True):
        raise CloudopsError(f"{target.name}: disk not found")

    monkeypatch.setattr(failover, "restart", refuse)
    inv = inventory(fence_ok(fakes.marker))
    report = failover.failover(inv.hosts["hv1"], inv)
    step = next(s for s in report.steps if s.vm == "shared1")
    assert step.action == "failed" and "disk not found" in step.reason and not report.complete
    assert records.get("shared1")["host"] == "hv1"


def test_failover_figures_name_the_host_and_each_restarted_vm(tmp_path):
    from cloudops.ha import figures
    from cloudops.metrics.spool import Spool

    report = failover.Report("hv1", fenced=True, fence={"seconds": 1.5}, detect_seconds=31.0,
                             steps=[failover.Step("a", "restarted", "hv2", seconds=2.25),
                                    failover.Step("b", "down", reason="local storage")])
    points = dict(figures.datapoints(report, "cloudops", timestamp=100))
    assert points == {"cloudops.host.hv1.failover.detect_s": (100, 31.0), "cloudops.host.hv1.failover.fence_s": (100, 1.5),
                      "cloudops.vm.a.failover.restart_s": (100, 2.25), "cloudops.host.hv1.failover.restarted": (100, 1.0),
                      "cloudops.host.hv1.failover.down": (100, 1.0), "cloudops.host.hv1.failover.failed": (100, 0.0)}
    spool = Spool(tmp_path / "spool")
    shipped = figures.ship(report, carbon=None, spool=spool)  # no carbon configured: all spooled, nothing raised
    assert shipped["spooled"] == 6 and shipped["sent"] == 0 and not spool.is_empty()


def test_a_vm_another_host_already_has_is_not_started_twice(fakes):
    fakes.defined[("hv2", "shared1")] = True  # an earlier try started it there, its record write was lost
    inv = inventory(fence_ok(fakes.marker))
    report = failover.failover(inv.hosts["hv1"], inv)
    step = next(s for s in report.steps if s.vm == "shared1")
    assert (step.action, step.target) == ("already elsewhere", "hv2") and "no second copy" in step.reason
    assert fakes.restarted == [] and records.get("shared1")["host"] == "hv2" and report.complete


def test_a_vm_with_an_unfinished_migration_is_not_restarted(fakes):
    from cloudops import state

    state.current().create("migrating/shared1", {"name": "shared1", "source": "hv1", "target": "hv2"})
    inv = inventory(fence_ok(fakes.marker))
    report = failover.failover(inv.hosts["hv1"], inv)
    step = next(s for s in report.steps if s.vm == "shared1")
    assert step.action == "failed" and "--recover" in step.reason and fakes.restarted == [] and not report.complete


def test_a_host_that_ran_vms_after_its_fencing_is_fenced_again(fakes):
    clock, inv = Clock(), inventory(fence_ok(fakes.marker))
    watch.cycle(inv, 5, now=clock, probe_all=probes({"hv1"}))
    clock.t += 5
    watch.cycle(inv, 5, now=clock, probe_all=probes({"hv1"}))
    assert fakes.marker.read_text() == "hv1 "
    # unseen by any cycle, hv1 came back, ran a new shared VM, and went missing again
    records.save(dict(record("later"), updated=watch.entry("hv1")["fenced_at"] + 1))
    watch.cycle(inv, 5, now=clock, probe_all=probes({"hv1"}))
    assert fakes.marker.read_text() == "hv1 hv1 " and ("later", "hv2") in fakes.restarted


def test_a_host_answering_with_another_host_key_is_never_declared_dead(fakes):
    """Something answers at hv1's address with a key cloudops does not trust: past grace, still not dead."""
    clock, inv = Clock(), inventory(fence_ok(fakes.marker))

    def impostor(hosts, timeout):
        wrong = ("ssh: SSH host key of 10.0.0.1 does not match the trusted known_hosts: possible impostor or a "
                 "reinstalled host; cloudops never accepts a changed key")
        return {h.name: Probe(h.name, h.name != "hv1", h.name != "hv1", wrong if h.name == "hv1" else "",
                              untrusted=h.name == "hv1") for h in hosts}

    for _ in range(3):
        report = watch.cycle(inv, 30, now=clock, probe_all=impostor)
        clock.t += 31
    hv1 = report.hosts[0]
    assert hv1.status == "untrusted" and "not declared dead" in hv1.error and report.attention == ["hv1"]
    assert not fakes.marker.exists() and fakes.restarted == [] and watch.entry("hv1") is None


def test_the_probe_tells_a_wrong_host_key_from_silence():
    assert probe.untrusted_key("ssh: SSH host key of 10.0.0.1 does not match the trusted known_hosts")
    assert probe.untrusted_key("libvirt: hv1: SSH host key of 10.0.0.1 is not in the trusted known_hosts")
    assert not probe.untrusted_key("ssh: connection refused (is sshd running?)")
    assert Probe("hv1", False, False, "x", untrusted=True).missing is False
    assert Probe("hv1", False, False, "ssh: timed out connecting").missing is True


def test_a_vm_stopped_before_its_host_died_is_defined_elsewhere_not_started(fakes):
    records.set_running("shared1", False)
    clock, inv = Clock(), inventory(fence_ok(fakes.marker))
    watch.cycle(inv, 30, now=clock, probe_all=probes({"hv1"}))
    clock.t += 30
    dead = watch.cycle(inv, 30, now=clock, probe_all=probes({"hv1"})).hosts[0]
    assert fakes.restarted == [("shared1", "hv2", "stopped")]
    step = next(s for s in dead.failover["steps"] if s["vm"] == "shared1")
    assert step["action"] == "defined" and "left stopped" in step["reason"] and dead.failover["complete"]
