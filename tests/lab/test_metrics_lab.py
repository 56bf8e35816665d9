"""Metric shipping on a real lab with a real carbon-cache: values read back from whisper.

Two tiny VMs (96 MiB, TCG) run on hv1 and hv2. Cycles carry explicit, distinct timestamps
in the past under the ``test.`` prefix (1-second whisper slots), so no two cycles share a
slot; rates still come from the real time between samples. Every datapoint carbon took
is recorded on the client side and then looked up in whisper, so "arrived" means
counted, with its value, not "a file exists". Nothing here asserts on timing.
"""

import base64
import contextlib
import json
import shlex
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import libvirt
import pytest
import yaml

from cloudops import virt
from cloudops.compute import vms
from cloudops.imaging import store as images
from cloudops.metrics import cron as metrics_cron
from cloudops.metrics import cycle as metrics
from cloudops.metrics import graphite, graphite_web
from cloudops.metrics.carbon import CarbonClient
from cloudops.metrics.spool import Spool
from cloudops.net import networks
from cloudops.ssh import connect
from tests.conftest import TEST_PREFIX, invoke, one_line_error

PREFIX = f"test.{TEST_PREFIX}"
VM_NAMES = {"hv1": f"tm{TEST_PREFIX}a", "hv2": f"tm{TEST_PREFIX}b"}
MEMORY_MIB = 96
READ_DEADLINE = 90.0

class RecordingCarbon(CarbonClient):
    """A CarbonClient that remembers every datapoint carbon accepted (sent and replayed alike)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.accepted = []

    def send(self, datapoints):
        try:
            sent = super().send(datapoints)
        except Exception as exc:
            self.accepted.extend(datapoints[: getattr(exc, "sent", 0)])
            raise
        self.accepted.extend(datapoints)
        return sent


@pytest.fixture(scope="module")
def metrics_cli():
    """The real `invoke metrics.*` CLI: (run, extra core arguments)."""
    return invoke, []


@pytest.fixture(scope="module")
def carbon_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("graphite"), graphite.Ports(*graphite.free_loopback_ports(3))


@pytest.fixture
def carbon(carbon_dir):
    """A carbon-cache the test may stop and start again on the same ports and storage."""
    directory, ports = carbon_dir
    handles = [graphite.start(directory, ports)]
    yield handles
    for handle in handles:
        graphite.stop(handle)


@pytest.fixture(scope="module")
def two_vms(lab, lab_inventory, tiny_image):
    started = []
    try:
        for host, name in VM_NAMES.items():
            spec = vms.VMSpec(name=name, image="tiny", memory=MEMORY_MIB, host=host, wait=True, timeout=300)
            started.append(vms.start_vm(spec, lab_inventory))
        yield {vm.name: vm for vm in started}
    finally:
        for name in VM_NAMES.values():
            with contextlib.suppress(Exception):
                vms.delete_vm(name, lab_inventory)


def hypervisors(lab_inventory):
    return lab_inventory.hypervisors()


def base_time():
    return int(time.time()) - 1800  # in the past (whisper refuses the future), well inside its 2 h


def arrived(storage, datapoints, deadline=READ_DEADLINE):
    """Poll whisper until every datapoint is there with its value; return the ones missing at the end."""
    expected = defaultdict(dict)
    for path, (ts, value) in datapoints:
        expected[path][int(ts)] = value
    stamps = [int(ts) for _p, (ts, _v) in datapoints] or [0]
    first, last = min(stamps), max(stamps)
    missing = []
    end = time.monotonic() + deadline
    while True:
        missing = []
        for path, points in expected.items():
            found = dict(graphite.read_series(storage, path, first, last))
            missing += [(path, ts, v) for ts, v in points.items() if found.get(ts) != pytest.approx(v, rel=1e-6, abs=1e-9)]
        if not missing or time.monotonic() > end:
            return missing
        time.sleep(1.0)


def series(storage, path, first, last):
    return [v for _ts, v in graphite.read_series(storage, path, first, last)]


def ship(hosts, client, spool, state, ts, **kwargs):
    return metrics.ship_fleet(hosts, client, spool, PREFIX, state_dir=state, now=ts, timeout=60, **kwargs)


def two_cycles_in_whisper(lab_inventory, handle, tmp_path, t0) -> int:
    """Ship two cycles (at t0 and t0 + 10) and wait until whisper holds every datapoint; returns t0."""
    client = RecordingCarbon(handle.pickle_address)
    spool, state = Spool(tmp_path / "spool"), tmp_path / "state"
    assert ship(hypervisors(lab_inventory), client, spool, state, t0)["ok"]
    time.sleep(2)
    assert ship(hypervisors(lab_inventory), client, spool, state, t0 + 10)["ok"]
    assert arrived(handle.whisper_dir, client.accepted) == []
    return t0


def test_three_cycles_give_every_vm_and_host_plausible_series(lab_inventory, two_vms, carbon, tmp_path):
    hosts = hypervisors(lab_inventory)
    client = RecordingCarbon(carbon[0].pickle_address)
    spool, state = Spool(tmp_path / "spool"), tmp_path / "state"
    t0 = base_time()
    summaries = []
    for n in range(3):
        if n:
            time.sleep(3)  # real time between samples for the rates; the timestamps are explicit
        summaries.append(ship(hosts, client, spool, state, t0 + 10 * n))
    for summary in summaries:
        assert summary["ok"], summary
        assert summary["collected"] > 0 and summary["spooled"] == 0
    assert arrived(carbon[0].whisper_dir, client.accepted) == []

    storage, last = carbon[0].whisper_dir, t0 + 20
    for host, name in VM_NAMES.items():
        vm = f"{PREFIX}.vm.{name}"
        assert series(storage, f"{vm}.host.{host}", t0, last) == [1.0, 1.0, 1.0]
        assert series(storage, f"{vm}.state", t0, last) == [float(libvirt.VIR_DOMAIN_RUNNING)] * 3
        cpu = series(storage, f"{vm}.cpu.util_percent", t0, last)
        assert len(cpu) == 2 and all(0 <= v <= 100 * 1 for v in cpu), cpu  # 1 vCPU; rates from cycle 2 on
        vcpu = series(storage, f"{vm}.vcpu.0.util_percent", t0, last)
        assert len(vcpu) == 2 and all(0 <= v <= 100 for v in vcpu), vcpu
        steal = series(storage, f"{vm}.vcpu.0.steal_percent", t0, last)
        assert len(steal) == 2 and all(0 <= v <= 100 for v in steal), steal
        current = series(storage, f"{vm}.memory.current_bytes", t0, last)
        assert current == [MEMORY_MIB * 1024 * 1024.0] * 3
        rss = series(storage, f"{vm}.memory.rss_bytes", t0, last)
        assert len(rss) == 3 and all(1 << 20 < v < 4 << 30 for v in rss), rss  # QEMU's own RSS, TCG included
        for field in ("read_bytes_per_s", "write_bytes_per_s", "read_ops_per_s", "write_ops_per_s"):
            values = series(storage, f"{vm}.disk.vda.{field}", t0, last)
            assert len(values) == 2 and all(v >= 0 for v in values), (field, values)
        for field in ("rx_bytes_per_s", "tx_bytes_per_s", "rx_packets_per_s", "tx_drops_per_s", "rx_errors_per_s"):
            values = series(storage, f"{vm}.net.net0.{field}", t0, last)
            assert len(values) == 2 and all(v >= 0 for v in values), (field, values)
        # no raw counter is ever shipped
        assert not [p for p, _ in client.accepted if p.startswith(vm) and (p.endswith(".time") or ".rd." in p)]

    for host in lab_inventory.hosts:
        hv = f"{PREFIX}.hv.{host}"
        cpus = series(storage, f"{hv}.cpu.count", t0, last)
        assert len(cpus) == 3 and cpus[0] >= 1
        util = series(storage, f"{hv}.cpu.util_percent", t0, last)
        assert len(util) == 2 and all(0 <= v <= 100 for v in util), util
        total, free = series(storage, f"{hv}.memory.total_bytes", t0, last), series(storage, f"{hv}.memory.free_bytes", t0, last)
        assert len(total) == 3 and all(0 < f <= t for f, t in zip(free, total))
        active = series(storage, f"{hv}.vms.active", t0, last)
        assert active == [1.0 if host in VM_NAMES else 0.0] * 3
    own = series(storage, f"{PREFIX}.cloudops.metrics.hosts_failed", t0, last)
    assert own == [0.0, 0.0, 0.0]


def test_graphite_web_renders_the_shipped_series_as_whisper_holds_them(lab_inventory, two_vms, carbon, tmp_path):
    """`invoke graphite.up` adds graphite-web over the running carbon's files: the render API's JSON has the
    values whisper-fetch reads from the .wsp file, and its PNG is a real PNG image."""
    handle = carbon[0]
    t0 = two_cycles_in_whisper(lab_inventory, handle, tmp_path, base_time() + 400)
    (web_port,) = graphite.free_loopback_ports(1)
    where = ["--directory", str(handle.directory), "--line-port", str(handle.ports.line),
             "--pickle-port", str(handle.ports.pickle), "--query-port", str(handle.ports.query)]
    up = invoke("graphite.up", *where, "--web-port", str(web_port))
    try:
        assert up.returncode == 0, up.stderr
        report = json.loads(up.stdout)
        assert report["pid"] == handle.pid and report["web"]["url"] == f"http://127.0.0.1:{web_port}"
        shown = json.loads(invoke("graphite.status", "--directory", str(handle.directory)).stdout)
        assert shown["web"] == report["web"]
        name = VM_NAMES["hv1"]
        path = f"{PREFIX}.vm.{name}.cpu.util_percent"
        wsp = Path(handle.whisper_dir, *path.split(".")).with_suffix(".wsp")
        fetched = subprocess.run([str(Path(sys.executable).parent / "whisper-fetch.py"), "--json", f"--from={t0 - 1}",
                                  f"--until={t0 + 10}", str(wsp)], capture_output=True, text=True, check=True)
        held = json.loads(fetched.stdout)
        expected = {held["start"] + i * held["step"]: v for i, v in enumerate(held["values"]) if v is not None}
        assert list(expected) == [t0 + 10], expected  # a CPU rate from the second cycle on
        body = graphite_web.render_api(web_port, [f"{PREFIX}.vm.*.cpu.util_percent"], "json",
                                       **{"from": str(t0 - 1), "until": str(t0 + 10)})
        rendered = {s["target"]: {ts: v for v, ts in s["datapoints"] if v is not None} for s in json.loads(body)}
        assert set(rendered) == {f"{PREFIX}.vm.{vm}.cpu.util_percent" for vm in VM_NAMES.values()}
        assert rendered[path] == pytest.approx(expected)
        png = graphite_web.render_api(web_port, [f"{PREFIX}.vm.*.cpu.util_percent"], "png",
                                      **{"from": str(t0 - 1), "until": str(t0 + 10), "width": "400", "height": "200"})
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR", png[:16]
        assert struct.unpack(">II", png[16:24]) == (400, 200)
    finally:
        graphite_web.stop(handle.directory)
    assert not graphite_web.status(handle.directory)["running"]
    assert graphite.status(handle.directory)["running"]  # graphite-web's end leaves carbon running


def test_two_cycles_while_carbon_is_down_all_arrive_after_it_returns(lab_inventory, two_vms, carbon, tmp_path):
    hosts = hypervisors(lab_inventory)
    client = RecordingCarbon(carbon[0].pickle_address, connect_timeout=1.0, attempts=2, backoff=0.05)
    spool, state = Spool(tmp_path / "spool"), tmp_path / "state"
    t0 = base_time() + 100
    first = ship(hosts, client, spool, state, t0)
    assert first["ok"]
    directory, ports = carbon[0].directory, carbon[0].ports
    assert graphite.stop(carbon[0])

    down = [ship(hosts, client, spool, state, t0 + 10 * n) for n in (1, 2)]
    for summary in down:
        assert summary["carbon"].startswith(f"carbon at {carbon[0].pickle_address} unreachable")
        assert summary["sent"] == 0 and summary["dropped"] == 0 and not summary["ok"]
    spooled = sum(s["spooled"] for s in down)
    assert spool.pending() == spooled > 0
    outage_points = [p for batch in spool.batches() for p in batch]
    assert {int(ts) for _p, (ts, _v) in outage_points} == {t0 + 10, t0 + 20}

    carbon.append(graphite.start(directory, ports))
    back = ship(hosts, client, spool, state, t0 + 30)
    assert back["ok"] and back["replayed"] == spooled
    assert spool.is_empty() and back["spool_pending"] == 0
    assert arrived(carbon[-1].whisper_dir, outage_points) == []  # every datapoint of both cycles, counted
    replayed = series(carbon[-1].whisper_dir, f"{PREFIX}.cloudops.metrics.replayed", t0 + 30, t0 + 30)
    assert replayed == [float(spooled)]


def test_a_down_host_and_a_corrupt_state_file_are_reported_the_rest_shipped(lab, lab_inventory, two_vms, carbon,
                                                                            tmp_path, metrics_cli):
    run, _core = metrics_cli
    data = yaml.safe_load(Path(lab.inventory_path).read_text())
    data["hosts"]["hv9"] = {**data["hosts"]["hv1"], "address": "127.0.0.1", "port": 1}
    data["groups"]["hypervisors"]["hosts"].append("hv9")
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(yaml.safe_dump(data))
    var = tmp_path / "var"
    state = var / "metrics" / "state"
    state.mkdir(parents=True)
    (state / "hv2.json").write_text("{not json")

    proc = run("metrics.ship", "--once", "--json", "--inventory", str(inventory), "--carbon", carbon[0].pickle_address,
               "--prefix", PREFIX, "--timeout", "60", env={"CLOUDOPS_VAR": str(var)})
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["hosts"]["hv9"]["ok"] is False and "hv9" in summary["hosts"]["hv9"]["error"]
    assert all(summary["hosts"][h]["ok"] for h in ("hv1", "hv2", "hv3"))
    assert any("state file" in p for p in summary["hosts"]["hv2"]["problems"])
    assert summary["carbon"] == "ok" and summary["spooled"] == 0 and summary["hosts_failed"] == 1
    assert "hv9" in proc.stderr and "Traceback" not in proc.stderr
    ts = summary["timestamp"]
    for host, name in VM_NAMES.items():
        assert graphite_has(carbon[0].whisper_dir, f"{PREFIX}.vm.{name}.host.{host}", ts)
    assert graphite_has(carbon[0].whisper_dir, f"{PREFIX}.hv.hv3.vms.defined", ts)
    assert json.loads((state / "hv2.json").read_text())["version"] == 1  # replaced by a good one


def graphite_has(storage, path, ts, deadline=READ_DEADLINE):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if graphite.read_series(storage, path, ts, ts):
            return True
        time.sleep(1.0)
    return False


@pytest.mark.parametrize("args, message", [
    (["--carbon", "graphite"], "has no port"),
    (["--carbon", "no-such-carbon.invalid:2004"], "does not resolve"),
    (["--prefix", "bad prefix!"], "metric prefix"),
    (["--interval", "0"], "> 0 seconds"),
    (["--interval", "-5"], "> 0 seconds"),
])
def test_bad_input_is_one_line_and_nothing_is_collected(lab, metrics_cli, tmp_path, args, message):
    run, _core = metrics_cli
    proc = run("metrics.ship", "--inventory", str(lab.inventory_path), *args, env={"CLOUDOPS_VAR": str(tmp_path)})
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "metrics").exists()


def test_unreachable_carbon_spools_the_cycle_and_says_so(lab, metrics_cli, tmp_path):
    run, _core = metrics_cli
    dead = graphite.free_loopback_ports(1)[0]
    proc = run("metrics.ship", "--once", "--json", "--inventory", str(lab.inventory_path), "--hosts", "hv3",
               "--carbon", f"127.0.0.1:{dead}", "--prefix", PREFIX, env={"CLOUDOPS_VAR": str(tmp_path)})
    assert proc.returncode == 3, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["hosts"]["hv3"]["ok"] and summary["sent"] == 0
    assert summary["spool_pending"] == summary["spooled"] > 0
    assert "unreachable" in proc.stderr and "wait in the spool" in proc.stderr
    assert Spool(tmp_path / "metrics" / "spool").pending() == summary["spooled"]


def test_cron_entry_installed_on_every_host_once_and_its_command_runs(lab, lab_inventory, metrics_cli, carbon):
    run, core = metrics_cli
    args = ["metrics.install-cron", "--inventory", str(lab.inventory_path), "--carbon", "127.0.0.1:2004",
            "--prefix", PREFIX, "--json"]
    try:
        check = run(*args, "--check")
        assert check.returncode == 0, check.stderr
        assert {r["status"] for r in json.loads(check.stdout)["hosts"]} == {"changed"}
        first = run(*args)
        assert first.returncode == 0, first.stderr
        # the entry runs the host's own cloudops: installed with it where missing (another test may have done it)
        values = [r["value"] for r in json.loads(first.stdout)["hosts"]]
        assert len(values) == 3 and all(v.endswith(f"{metrics_cron.CRON_PATH} installed") for v in values), values
        again = run(*args)
        assert {r["status"] for r in json.loads(again.stdout)["hosts"]} == {"ok"}
        assert {r["value"] for r in json.loads(again.stdout)["hosts"]} == {f"{metrics_cron.CRON_PATH} already up to date"}

        host = lab_inventory.hosts["hv1"]
        with connect(host) as hv:
            text = hv.run(f"cat {metrics_cron.CRON_PATH}", hide=True, in_stream=False).stdout
            mode = hv.run(f"stat -c %a {metrics_cron.CRON_PATH}", hide=True, in_stream=False).stdout.strip()
            assert mode == "644"
            assert text == metrics_cron.host_entry(host, "127.0.0.1:2004", PREFIX)
            env = dict(ln.split("=", 1) for ln in text.splitlines() if ln and not ln.startswith("#") and "=" in ln.split()[0])
            job = next(ln for ln in text.splitlines() if ln.startswith("* "))
            command = job.split(None, 6)[6]
            # what cron would run, with cron's environment: the host collects itself; carbon (on this
            # machine's loopback) is not reachable from the host's namespace, so the cycle is spooled there
            hv.run(f"rm -rf {shlex.quote(env['CLOUDOPS_VAR'])}/metrics", hide=True, in_stream=False)
            result = hv.run(f"env -i PATH={shlex.quote(env['PATH'])} CLOUDOPS_VAR={shlex.quote(env['CLOUDOPS_VAR'])} "
                            f"sh -c {shlex.quote(command)}", warn=True, hide=True, in_stream=False)
            assert result.exited == 3, result.stdout + result.stderr
            log = hv.run(f"cat {shlex.quote(env['CLOUDOPS_VAR'])}/metrics/ship.log", hide=True, in_stream=False).stdout
        summary = json.loads(next(ln for ln in log.splitlines() if ln.startswith("{")))
        assert list(summary["hosts"]) == ["hv1"] and summary["hosts"]["hv1"]["ok"]
        assert summary["hosts"]["hv1"]["vms"] == 1 and summary["spooled"] > 0
    finally:
        for host in lab_inventory.hosts.values():
            with connect(host) as hv:
                metrics_cron.remove_cron(hv)


# ---------------------------------------------------------------- migration continuity


def migrate_direct(lab_inventory, name, source, dest):
    """Live migration with libvirt itself (client-driven, disk copied incrementally over NBD).

    The destination gets the image (and its kernel/initrd), an empty overlay on the same
    backing file and the seed ISO first. Returns the completed job's statistics.
    """
    src_host, dst_host = lab_inventory.hosts[source], lab_inventory.hosts[dest]
    image = images.resolve("tiny")
    images.ensure_on_host(image, dst_host)
    with virt.open_host(src_host) as sconn:
        dom = sconn.lookupByName(name)
        xml = dom.XMLDesc(0)
    disk = f"{images.pool_path(src_host)}/disks/{name}.qcow2"
    seed = f"{images.pool_path(src_host)}/disks/{name}-seed.iso"
    assert disk in xml
    with tempfile.TemporaryDirectory() as tmp, connect(src_host) as s, connect(dst_host) as d:
        s.get(seed, f"{tmp}/seed.iso")
        d.run(f"mkdir -p {shlex.quote(str(Path(disk).parent))}", hide=True, in_stream=False)
        d.put(f"{tmp}/seed.iso", seed)
        d.run(f"qemu-img create -q -f qcow2 -F {image.format} -b {shlex.quote(image.remote_path(dst_host))} "
              f"{shlex.quote(disk)} {image.virtual_size}", hide=True, in_stream=False)
    flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_NON_SHARED_INC | libvirt.VIR_MIGRATE_PERSIST_DEST
    params = {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{dst_host.address}"}
    with virt.open_host(src_host) as sconn, virt.open_host(dst_host) as dconn:
        networks.ensure_network(dconn, vms.network_spec(None, dst_host))
        dom = sconn.lookupByName(name)
        moved = dom.migrate3(dconn, params, flags)
        job = {}
        for candidate in (dom, moved):  # completed-job figures: the source keeps them, else the destination
            with contextlib.suppress(libvirt.libvirtError):
                job = job or candidate.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        dom.undefine()  # the source's inactive copy: the VM is now defined on the destination only
    return job


def test_a_migrated_vm_keeps_its_series_and_its_placement_moves(lab_inventory, two_vms, carbon, tmp_path):
    hosts = hypervisors(lab_inventory)
    name = VM_NAMES["hv1"]
    client = RecordingCarbon(carbon[0].pickle_address)
    spool, state = Spool(tmp_path / "spool"), tmp_path / "state"
    t0 = base_time() + 200
    assert ship(hosts, client, spool, state, t0)["ok"]
    time.sleep(2)
    assert ship(hosts, client, spool, state, t0 + 10)["ok"]
    try:
        job = migrate_direct(lab_inventory, name, "hv1", "hv3")
    except libvirt.libvirtError as exc:
        pytest.skip(f"live migration with libvirt directly failed on this lab: {exc}")
    figures = metrics.migration_job_figures(job)
    recorded = metrics.record_migration(name, *figures, carbon=client, spool=spool, prefix=PREFIX, timestamp=t0 + 15)
    assert recorded["sent"] == recorded["datapoints"] >= 3
    after = [ship(hosts, client, spool, state, t0 + 20)]
    time.sleep(2)
    after.append(ship(hosts, client, spool, state, t0 + 30))
    assert all(s["ok"] for s in after)
    assert arrived(carbon[0].whisper_dir, client.accepted) == []

    storage, vm = carbon[0].whisper_dir, f"{PREFIX}.vm.{name}"
    # the same series goes on: one value per cycle, before and after the move
    assert [ts - t0 for ts, _v in graphite.read_series(storage, f"{vm}.state", t0, t0 + 30)] == [0, 10, 20, 30]
    current = series(storage, f"{vm}.memory.current_bytes", t0, t0 + 30)
    assert current == [MEMORY_MIB * 1024 * 1024.0] * 4
    cpu = graphite.read_series(storage, f"{vm}.cpu.util_percent", t0, t0 + 30)
    # rates before the move, and again from the second cycle on the new host (a new QEMU process)
    assert [ts - t0 for ts, _v in cpu] == [10, 30] and all(0 <= v <= 100 for _ts, v in cpu)
    # the placement series tells where it ran
    assert [ts - t0 for ts, _v in graphite.read_series(storage, f"{vm}.host.hv1", t0, t0 + 30)] == [0, 10]
    assert [ts - t0 for ts, _v in graphite.read_series(storage, f"{vm}.host.hv3", t0, t0 + 30)] == [20, 30]
    duration = series(storage, f"{vm}.migration.duration_s", t0 + 15, t0 + 15)
    assert duration and duration[0] > 0
    assert series(storage, f"{vm}.migration.bytes", t0 + 15, t0 + 15)[0] > 0


# ---------------------------------------------------------------- cloud.report, read by a real browser

CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]


def dump_dom(page: Path) -> str:
    """The page's DOM as headless Chromium (Debian's) builds it from the file."""
    proc = subprocess.run([*CHROMIUM, "--dump-dom", page.as_uri()], check=False, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "<html" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


def tags(dom: str, tag: str, css_class: str) -> list[dict]:
    """The attributes of every ``<tag class="css_class" ...>`` in the DOM (html.parser: no regex on markup)."""
    from html.parser import HTMLParser

    found = []

    class Collector(HTMLParser):
        def handle_starttag(self, name, attrs):
            attrs = dict(attrs)
            if name == tag and css_class in (attrs.get("class") or "").split():
                found.append(attrs)

    Collector().feed(dom)
    return found


def test_cloud_report_in_chromium_has_every_host_and_vm_the_maintenance_and_the_migration(
        lab, lab_inventory, two_vms, carbon, no_maintenance, tmp_path):
    from tests.conftest import ROOT

    handle = carbon[0]
    two_cycles_in_whisper(lab_inventory, handle, tmp_path, base_time() + 600)
    (web_port,) = graphite.free_loopback_ports(1)
    graphite_web.start(handle.directory, web_port, handle.ports.query)
    inventory = ["--inventory", str(lab.inventory_path)]
    moved = VM_NAMES["hv2"]
    try:
        where = {vm["name"]: vm["host"] for vm in json.loads(invoke("vm.list", "--json", *inventory).stdout)["vms"]}
        there = "hv1" if where[moved] != "hv1" else "hv2"
        proc = invoke("vm.migrate", moved, "--to", there, *inventory)
        assert proc.returncode == 0, proc.stderr
        proc = invoke("host.maintenance", "hv3", "on", *inventory)
        assert proc.returncode == 0, proc.stderr
        listed = json.loads(invoke("vm.list", "--json", *inventory).stdout)["vms"]
        report_file = tmp_path / "cloud.html"
        proc = invoke("cloud.report", "--output", str(report_file), "--graphite-port", str(web_port),
                      "--prefix", PREFIX, "--since", "-2h", "--cpu-interval", "0.5", "--json", *inventory)
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        assert summary["complete"] and summary["graphs"] == 4 and summary["graphs_unavailable"] == 0, summary
        assert "warning" not in proc.stderr

        dom = dump_dom(report_file)
        host_rows = {row["data-host"]: row for row in tags(dom, "tr", "host")}
        assert set(host_rows) == set(lab_inventory.hosts)
        assert [h for h, row in host_rows.items() if row["data-maintenance"] == "yes"] == ["hv3"]
        assert {row["data-health"] for row in host_rows.values()} == {"up"}
        vm_rows = {(row["data-vm"], row["data-host"], row["data-state"], row["data-ip"]) for row in tags(dom, "tr", "vm")}
        assert vm_rows == {(vm["name"], vm["host"], vm["state"], vm["ip"] or "") for vm in listed}
        migrations = tags(dom, "tr", "migration")
        assert (migrations[0]["data-vm"], migrations[0]["data-target"]) == (moved, there)  # newest first
        images = tags(dom, "img", "graph-image")
        assert len(images) == 4
        for image in images:
            png = base64.b64decode(image["src"].split(",", 1)[1])
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (720, 260)
        artifacts = ROOT / "var" / "test-artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        shot = artifacts / "cloud-report.png"
        shot.unlink(missing_ok=True)
        proc = subprocess.run([*CHROMIUM, f"--screenshot={shot}", "--window-size=1200,1800", report_file.as_uri()],
                              check=False, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", proc.stderr[-2000:]

        # graphite-web down: the page is still written, every graph marked unavailable, one warning line
        graphite_web.stop(handle.directory)
        proc = invoke("cloud.report", "--output", str(report_file), "--graphite-port", str(web_port),
                      "--prefix", PREFIX, "--cpu-interval", "0", *inventory)
        assert proc.returncode == 0, proc.stderr
        warnings = [line for line in proc.stderr.splitlines() if not line.startswith("… ")]
        assert len(warnings) == 1 and "graphs unavailable" in warnings[0], proc.stderr
        dom = dump_dom(report_file)
        assert len(tags(dom, "div", "graph-unavailable")) == 4 and tags(dom, "img", "graph-image") == []
        assert len(tags(dom, "tr", "host")) == 3
        assert len(tags(dom, "tr", "imbalance")) >= 2 and 'id="imbalance-chart"' in dom  # one point per report

        # an output in a missing directory: one line, nothing asked of the hosts, nothing written
        missing = tmp_path / "no-such-dir" / "cloud.html"
        proc = invoke("cloud.report", "--output", str(missing), *inventory)
        one_line_error(proc, "does not exist")
        assert not missing.parent.exists()
    finally:
        graphite_web.stop(handle.directory)
