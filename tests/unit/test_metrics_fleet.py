"""The fleet cycle, the loop, migration figures and the cron install, without a lab or a carbon."""

import contextlib
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from invoke import Context
from libvirt_fake import FakeConnection, vm_stats

from cloudops.errors import CloudopsError
from cloudops.metrics import cron as metrics_cron
from cloudops.metrics import cycle as metrics
from cloudops.metrics.carbon import CarbonUnreachable
from cloudops.metrics.spool import Spool

T0 = 1_700_000_000
UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"


class FakeCarbon:
    def __init__(self, down=False):
        self.received, self.down = [], down

    def send(self, datapoints):
        if self.down:
            raise CarbonUnreachable("carbon at fake:2004 unreachable after 3 attempts: Connection refused")
        self.received.extend(datapoints)
        return len(datapoints)


@dataclass(frozen=True)
class FakeHost:
    name: str


def opener(conns):
    @contextlib.contextmanager
    def open_host(host):
        conn = conns[host.name]
        if isinstance(conn, BaseException):
            raise conn
        yield conn
    return open_host


def test_fleet_cycle_reports_each_failed_host_and_ships_the_rest(tmp_path):
    conns = {
        "hv1": FakeConnection(vms={"web": (UUID, 3, vm_stats(cpu_ns=10**9))}),
        "hv2": CloudopsError("hv2: cannot reach libvirtd at qemu+ssh://root@10.0.0.2/system: Connection refused"),
        "hv3": FakeConnection(fail_stats=True),
    }
    carbon = FakeCarbon()
    summary = metrics.ship_fleet([FakeHost(n) for n in conns], carbon, Spool(tmp_path / "spool"), "p",
                                 state_dir=tmp_path / "state", now=T0, open_host=opener(conns))
    assert summary["hosts"]["hv1"] == {**summary["hosts"]["hv1"], "ok": True, "vms": 1}
    assert summary["hosts"]["hv2"]["error"].startswith("hv2: cannot reach libvirtd")
    assert summary["hosts"]["hv3"]["error"].startswith("hv3: domain stats failed")
    assert summary["hosts_failed"] == 2
    assert any(p == "p.vm.web.host.hv1" for p, _ in carbon.received)
    assert [call[0] for call in conns["hv1"].calls] == ["getAllDomainStats"]  # one bulk call for the host


def test_a_second_cycle_on_the_same_state_is_refused_while_one_runs(tmp_path):
    with metrics.cycle_lock(tmp_path / "state"):
        with pytest.raises(metrics.CycleBusy, match="another metrics cycle is running"):
            metrics.ship_fleet([], FakeCarbon(), Spool(tmp_path / "spool"), "p", state_dir=tmp_path / "state")
    metrics.ship_fleet([], FakeCarbon(), Spool(tmp_path / "spool"), "p", state_dir=tmp_path / "state")


class FakeClock:
    def __init__(self, durations):
        self.now, self.durations, self.starts, self.sleeps = 0.0, list(durations), [], []

    def cycle(self):
        self.starts.append(self.now)
        self.now += self.durations.pop(0)

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def test_the_loop_keeps_a_fixed_grid_and_skips_ticks_a_long_cycle_missed():
    clock = FakeClock([1, 1, 25, 1, 1])
    done = metrics.run_every(10, clock.cycle, cycles=5, clock=lambda: clock.now, sleep=clock.sleep)
    assert done == 5
    # 0, 10, 20 (runs 25 s: ticks 30 and 40 are missed, never run late), 50, 60
    assert clock.starts == [0, 10, 20, 50, 60]
    assert all(s >= 0 for s in clock.sleeps)


@pytest.mark.parametrize("interval", [0, -1, "10", True])
def test_the_loop_refuses_a_bad_interval(interval):
    with pytest.raises(CloudopsError, match="interval"):
        metrics.run_every(interval, lambda: None, cycles=1)


def test_record_migration_ships_or_spools_and_never_raises_for_carbon(tmp_path):
    spool = Spool(tmp_path / "spool")
    up = FakeCarbon()
    sent = metrics.record_migration("web", 12.5, 80, 64 << 20, carbon=up, spool=spool, prefix="p", timestamp=T0)
    assert sent == {"datapoints": 4, "sent": 4, "spooled": 0, "dropped": 0, "carbon": "ok"}
    assert dict((p, v) for p, (_t, v) in up.received)["p.vm.web.migration.downtime_ms"] == 80
    down = metrics.record_migration("web", 12.5, 80, 64 << 20, carbon=FakeCarbon(down=True), spool=spool, prefix="p")
    assert down["sent"] == 0 and down["spooled"] == 4 and "unreachable" in down["carbon"]
    assert spool.pending() == 4
    later = metrics.record_migration("web", 1, 1, 1, spool=spool, prefix="p")  # no carbon: straight to the spool
    assert later["spooled"] == 4 and spool.pending() == 8
    with pytest.raises(CloudopsError, match="downtime_ms"):
        metrics.record_migration("web", 1, -5, 1, spool=spool)


def test_migration_figures_from_libvirt_job_stats():
    stats = {"type": 3, "time_elapsed": 64_250, "downtime": 120, "data_processed": 300 << 20}
    assert metrics.migration_job_figures(stats) == (64.25, 120.0, 300 << 20)
    assert metrics.migration_job_figures({"time_elapsed": 1000, "memory_processed": 5, "disk_processed": 7}) == (1.0, 0.0, 12)


def test_a_hypervisor_cron_entry_collects_itself_with_private_files(tmp_path):
    host = SimpleNamespace(name="hv1", vars={"pool_path": "/srv/cloudops"})
    text = metrics_cron.host_entry(host, "graphite:2004", "cloudops")
    assert "CLOUDOPS_VAR=/srv/cloudops\n" in text
    job = [ln for ln in text.splitlines() if ln.startswith("* ")][0]
    assert "/opt/cloudops/venv/bin/cloudops metrics.ship" in job  # the host's own cloudops, not a checkout
    assert str(tmp_path) not in job and ".venv" not in job
    assert "--local" in job and "--once" in job and "--json" in job
    assert "flock -n /srv/cloudops/metrics/ship.lock" in job


class FakeRemote:
    """Fabric's run/put on a dict of files; records the commands."""

    def __init__(self, files=None, tools=True):
        self.files, self.tools, self.commands = dict(files or {}), tools, []

    def run(self, command, **_kwargs):
        self.commands.append(command)
        out = ""
        if command.startswith("test -x"):
            if not self.tools:
                out += "missing-cloudops\nmissing-flock\n"
            path = command.split("cat ", 1)[1].split(" ", 1)[0]
            if path in self.files:
                out += self.files[path] + "#cloudops-present\n"
        elif command.startswith("chmod"):
            tmp, final = command.split("mv -f ", 1)[1].split()
            self.files[final] = self.files.pop(tmp)
        return SimpleNamespace(stdout=out, ok=True)

    def put(self, local, remote):
        self.files[remote] = local.read().decode()


def test_ensure_cron_installs_once_then_reports_no_change(tmp_path):
    remote, entry = FakeRemote(), metrics.cron_entry("graphite:2004", "cloudops", program=tmp_path / "cloudops")
    assert metrics_cron.ensure_cron(remote, entry, check=True) == (True, f"{metrics_cron.CRON_PATH} would be installed")
    assert remote.files == {}
    assert metrics_cron.ensure_cron(remote, entry) == (True, f"{metrics_cron.CRON_PATH} installed")
    assert remote.files == {metrics_cron.CRON_PATH: entry}
    assert metrics_cron.ensure_cron(remote, entry) == (False, f"{metrics_cron.CRON_PATH} already up to date")
    changed = metrics.cron_entry("graphite:2004", "other", program=tmp_path / "cloudops")
    assert metrics_cron.ensure_cron(remote, changed) == (True, f"{metrics_cron.CRON_PATH} updated")


def test_ensure_cron_refuses_a_host_without_the_toolkit():
    with pytest.raises(CloudopsError, match="cloudops, flock not found"):
        metrics_cron.ensure_cron(FakeRemote(tools=False), "x\n")


@pytest.mark.parametrize("args, message", [
    ({"interval": "0"}, "> 0"), ({"interval": "-2"}, "> 0"), ({"interval": "nan"}, "> 0"),
    ({"interval": "1", "once": True}, "either --once or --interval"),
])
def test_ship_task_refuses_bad_intervals(args, message):
    from cloudops.tasks.metrics import _interval

    c = Context(config=None)
    with pytest.raises(CloudopsError, match=message):
        _interval(c, args["interval"], args.get("once", False))
