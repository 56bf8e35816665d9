"""The fault matrix: one live migration broken at each point by each kind of fault; no VM is ever lost.

Points: before the job starts, during pre-copy, at the switchover (the source paused,
its last state in flight), during post-copy (forced at the first iteration, its
bandwidth capped so it lasts), and after the job ended but before the source was
cleaned. Faults: the destination's libvirtd killed, the source's libvirtd killed,
the connection between the two hosts cut (every packet refused, TCP reset both ways).

For every case, once the fault is repaired: at most one copy runs, and when none
does exactly one is paused and the error named ``--recover``; every domain's disk
opens with ``qemu-img info`` on its host; the running copy's host has the VM's
DHCP reservation. After ``invoke vm.migrate NAME --recover``: one running VM,
defined on one host only, with the file written before the migration, and no
leftover disk on the other host. One VM goes through all cases, moving back and
forth; the oracles are virsh and qemu-img on the hosts, not cloudops.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cloudops import virt
from cloudops.compute import guest, vms
from cloudops.errors import CloudopsError
from cloudops.lab import guestload
from cloudops.lab import hosts as lab_lib
from cloudops.migration import journal as migrate_journal
from cloudops.migration import migrate
from cloudops.ssh import connect
from tests.conftest import ROOT, invoke, own_inventory, own_lab

NAME = "t-fault"
WRITER = guestload.start()  # keeps the guest's memory dirty; guestload.stop() ends it (and fails if it cannot)

lab = own_lab("f", hosts=2)
lab_inventory = own_inventory()

CASES = [
    ("before", "dest"), ("before", "source"),
    ("precopy", "dest"), ("precopy", "source"), ("precopy", "link"),
    ("switchover", "dest"),
    ("postcopy", "dest"), ("postcopy", "source"), ("postcopy", "link"),
    ("after", "source"),
]


@pytest.fixture(autouse=True)
def own_maintenance(no_maintenance):
    """No host of the test lab starts (or stays) in maintenance."""


@pytest.fixture(scope="module")
def vm(lab, lab_inventory, tiny_image):
    for name in (NAME, "t-fault2"):  # a journal an interrupted earlier run left for these new VMs
        migrate_journal.end(name)
    spec = vms.VMSpec(name=NAME, image="tiny", memory=96, host="hv1", timeout=300)
    started = vms.start_vm(spec, lab_inventory)
    guest.wait_until(lambda: _answers(lab_inventory), 60, f"a shell on {NAME}")
    in_vm(lab_inventory, "echo kept-across-faults > /root/mark; sync")
    yield started
    with contextlib.suppress(Exception):  # best effort: the lab goes down after the module anyway
        vms.delete_vm(NAME, lab_inventory)


# ---------------------------------------------------------------- oracles (virsh and qemu-img on the hosts)

def virsh(host, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-q", "-c", host.libvirt_uri, *args], capture_output=True, text=True, timeout=60)


def copies(lab_inventory) -> dict[str, str]:
    """host -> virsh's state of the VM there, for every host that has it."""
    found = {}
    for host in lab_inventory.hosts.values():
        proc = virsh(host, "domstate", NAME)
        if proc.returncode == 0:
            found[host.name] = proc.stdout.strip()
    return found


def disks_open(lab_inventory, host_name) -> list[str]:
    """qemu-img info of each file disk of the VM's domain on that host: the problems found."""
    host = lab_inventory.hosts[host_name]
    out = virsh(host, "domblklist", NAME, "--details").stdout
    paths = [line.split()[3] for line in out.splitlines() if len(line.split()) == 4 and line.split()[0] == "file"]
    problems = []
    with connect(host) as hv:
        for path in paths:
            r = hv.run(f"qemu-img info -U {path}", warn=True, hide=True, in_stream=False)
            if not r.ok:
                problems.append(f"{host_name}:{path}: {r.stderr.strip()}")
    return problems if paths else [f"{host_name}: no disk listed for {NAME}"]


def reservation_on(lab_inventory, host_name, mac) -> bool:
    proc = virsh(lab_inventory.hosts[host_name], "net-dumpxml", "cloudops")
    return mac.lower() in proc.stdout.lower()


def in_vm(lab_inventory, command, diagnose=True) -> str:
    host = vms.locate(NAME, list(lab_inventory.hosts.values()))
    vm = next(v for v in vms.list_on_host(host) if v.name == NAME)
    # 60 s, not 15: the guest's one TCG vCPU is shared with a writer in many cases
    try:
        with connect(host) as hv, guest.connect_vm(hv, vm.ip, timeout=60) as conn:
            return conn.run(command, hide=True, in_stream=False).stdout.strip()
    except Exception as exc:  # say what libvirt, the host and the guest's console saw
        if not diagnose:
            raise
        raise AssertionError(f"no shell on {NAME} ({vm.ip}) on {host.name}: {type(exc).__name__}: {exc}\n"
                             f"{_diagnosis(lab_inventory, host.name)}") from None


def _answers(lab_inventory):
    try:
        return in_vm(lab_inventory, "echo up", diagnose=False) == "up"
    except Exception:
        return False


def _diagnosis(lab_inventory, host_name) -> str:
    """libvirt's state and reason and the VM's interfaces, the host's neighbour table, bridge ports and
    routes, and the tail of the guest's serial console."""
    host = lab_inventory.hosts[host_name]
    seen = [virsh(host, "domstate", "--reason", NAME), virsh(host, "domiflist", NAME)]
    with connect(host) as hv:
        out = hv.run(f"cat /proc/loadavg; ps -eo pid,pcpu,etime,args --sort=-pcpu | head -n 6 | cut -c1-150; "
                     f"ip neigh; bridge link; ip -br addr; ip route; echo '-- console'; "
                     f"tail -n 30 {guest.console_log_path(NAME)}", warn=True, hide=True, in_stream=False)
    libvirt_side = "".join(p.stdout + p.stderr for p in seen)
    return (libvirt_side + out.stdout + out.stderr)[-5000:]


def kernel_oopses(lab_inventory) -> dict[str, list[str]]:
    """host -> the guest kernel's Oops/BUG lines in its serial console log there (the guest's own word)."""
    found = {}
    for name, host in lab_inventory.hosts.items():
        with connect(host) as hv:
            out = hv.run(f"grep -aE 'Oops|BUG:|Kernel panic' {guest.console_log_path(NAME)} 2>/dev/null || true",
                         hide=True, in_stream=False).stdout
        if out.strip():
            found[name] = out.strip().splitlines()[:3]
    return found


def leftovers(lab_inventory, host_name) -> list[str]:
    with connect(lab_inventory.hosts[host_name]) as hv:
        out = hv.run("ls /var/lib/cloudops/disks 2>/dev/null || true", hide=True, in_stream=False).stdout
    return [n for n in out.split() if n.startswith(NAME)]


# ---------------------------------------------------------------- faults

class Fault:
    def __init__(self, lab, lab_inventory, kind, source, dest):
        self.lab, self.inv, self.kind, self.source, self.dest = lab, lab_inventory, kind, source, dest
        self.fired = threading.Event()

    def fire(self):
        if self.fired.is_set():
            return
        self.fired.set()
        state = lab_lib.load(self.lab.prefix)
        if self.kind in ("dest", "source"):
            victim = self.dest if self.kind == "dest" else self.source
            os.kill(state.host(victim).pids["libvirtd"], signal.SIGKILL)
        else:
            self._iptables("-I")

    def _iptables(self, op):
        # Each host refuses every packet from the other, TCP with a reset, so the connections between
        # them break at once (plain DROP leaves QEMU and libvirtd waiting for TCP's own timeout, about
        # 15 minutes). Only INPUT, and resets let in: the reset sent back must reach the other side's socket.
        for here, there in ((self.dest, self.source), (self.source, self.dest)):
            ns = lab_lib.load(self.lab.prefix).host(here).namespace
            peer = self.inv.hosts[there].address
            for rule in (["-j", "REJECT"], ["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"],
                         ["-p", "tcp", "--tcp-flags", "RST", "RST", "-j", "ACCEPT"]):  # -I: the last is on top
                subprocess.run(["ip", "netns", "exec", ns, "iptables", op, "INPUT", "-s", peer, *rule],
                               check=op == "-I", capture_output=True)

    def repair(self):
        if not self.fired.is_set():
            return
        if self.kind in ("dest", "source"):
            victim = self.dest if self.kind == "dest" else self.source
            lab_lib.restart_libvirtd(self.lab.prefix, victim)
            virt.forget(self.inv.hosts[victim])
        else:
            self._iptables("-D")


@pytest.mark.parametrize("point, kind", CASES, ids=[f"{p}-{k}" for p, k in CASES])
def test_a_broken_migration_never_loses_the_vm(lab, lab_inventory, vm, point, kind):
    where = copies(lab_inventory)
    running = [h for h, s in where.items() if s == "running"]
    assert len(running) == 1 and len(where) == 1, f"an earlier case left {where}"
    source = running[0]
    dest = "hv2" if source == "hv1" else "hv1"
    fault = Fault(lab, lab_inventory, kind, source, dest)
    policy = migrate.Policy(postcopy_after=None, auto_converge=False)
    if point in ("precopy", "switchover"):  # a writer and a slow link keep it in pre-copy
        policy = migrate.Policy(downtime_ms=1, downtime_step_ms=0, downtime_max_ms=1, auto_converge=False,
                                postcopy_after=None, bandwidth_mib=4)
    elif point == "postcopy":
        policy = migrate.Policy(auto_converge=False, postcopy_after=1, bandwidth_mib=4, postcopy_bandwidth_mib=1)
    # a writer (start() ends any earlier one) where pages must stay dirty; else the guest made quiet
    in_vm(lab_inventory, WRITER if point in ("precopy", "switchover", "postcopy") else guestload.stop())

    def message(text):
        if point == "before" and text.startswith(f"migrating {NAME} live"):
            fault.fire()
        if point == "after" and text.startswith(f"{NAME} runs on {dest}; removing"):
            fault.fire()

    def progress(sample):
        if point == "precopy" and sample.iteration >= 1 and sample.elapsed > 2:
            fault.fire()
        elif point == "switchover" and sample.iteration >= 1 and not fault.fired.is_set():
            # stop-and-copy: pause the source, as the switchover does, and break it while the rest is in flight
            subprocess.run(["virsh", "-q", "-c", lab_inventory.hosts[source].libvirt_uri, "suspend", NAME],
                           capture_output=True, timeout=30)
            time.sleep(1)
            fault.fire()
        elif point == "postcopy" and sample.phase == "post-copy" and sample.elapsed > 1:
            fault.fire()

    error = None
    try:
        migrate.migrate_vm(NAME, dest, lab_inventory, policy=policy, progress=progress, message=message)
    except CloudopsError as exc:
        error = str(exc)
    finally:
        fault.repair()
    assert fault.fired.is_set(), f"the {point} fault never fired ({error})"
    assert error is None or "\n" not in error

    # once repaired: never two running copies, never none without one paused and the way out named
    time.sleep(2)
    where = copies(lab_inventory)
    running = [h for h, s in where.items() if s.startswith("running")]
    paused = [h for h, s in where.items() if s.startswith("paused")]
    assert len(running) <= 1, where
    if not running:
        assert len(paused) >= 1 and error and "--recover" in error, (where, error)
    for host_name in where:
        assert disks_open(lab_inventory, host_name) == [], where
    mac = vm.mac
    if running:
        assert reservation_on(lab_inventory, running[0], mac), (where, error)
    if error and "keeps running on" not in error and "aborted" not in error:
        assert "--recover" in error, error

    proc = invoke("vm.migrate", NAME, "--recover", "--inventory", str(lab.inventory_path))
    if proc.returncode and point == "postcopy" and "--recover --restart" in proc.stderr:
        # the post-copy's target copy died with it: the source is refused a silent resume (its memory is
        # stale) and offered a restart from its disk, which keeps everything synced before the migration
        assert proc.stderr.strip().splitlines()[-1].endswith(f"starts it again from its disk on {source}")
        proc = invoke("vm.migrate", NAME, "--recover", "--restart", "--inventory", str(lab.inventory_path))
    assert proc.returncode == 0, (proc.stdout, proc.stderr, where, error)
    final = copies(lab_inventory)
    assert list(final.values()) == ["running"], (final, proc.stdout)
    (host_name,) = final
    assert leftovers(lab_inventory, dest if host_name == source else source) == []
    assert reservation_on(lab_inventory, host_name, mac)
    try:
        guest.wait_until(lambda: _answers(lab_inventory), 60, f"a shell on {NAME} after recovery")
    except CloudopsError:  # say what the host and the guest's console saw, to find out why
        raise AssertionError(f"no shell on {NAME} after recovery on {host_name}: "
                             f"{_diagnosis(lab_inventory, host_name)}") from None
    assert in_vm(lab_inventory, "cat /root/mark") == "kept-across-faults"
    # the guest's memory came through whole: its kernel never oopsed (a corrupted page shows up as one)
    assert kernel_oopses(lab_inventory) == {}, f"the guest kernel oopsed during or after the {point}-{kind} case"
    again = invoke("vm.migrate", NAME, "--recover", "--inventory", str(lab.inventory_path))
    assert again.returncode == 0 and "nothing to recover" in again.stdout


# ---------------------------------------------------------------- Ctrl-C

SLOW = "migrate:\n  bandwidth_mib: 4\n  postcopy_after: 0\n  auto_converge: false\n  downtime_ms: 1\n  downtime_step_ms: 0\n  downtime_max_ms: 1\n"


def _cli(lab, tmp_path, *args) -> subprocess.Popen:
    """The real CLI, in the background, with a migration policy that keeps a busy guest in pre-copy."""
    config = tmp_path / "slow.yaml"
    config.write_text(SLOW)
    return subprocess.Popen([str(Path(sys.executable).parent / "invoke"), "-f", str(config), *args,
                             "--inventory", str(lab.inventory_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _interrupt(proc, lab_inventory, host, names, timeout=240):
    """SIGINT to the CLI once a job of one of ``names`` runs on ``host`` and every migration had time to be
    asked for (libvirt may queue a second outgoing job until the first one ends)."""
    started = time.monotonic()
    while not (any(_job_running_for(host, n) for n in names) and time.monotonic() - started > 5):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - started < timeout, "no migration job ever started"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # stuck: where each of its threads is (faulthandler), then end it
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the CLI did not end within 300 s of Ctrl-C; its stderr ends:\n{err[-6000:]}") from None


def _job_running_for(host, name) -> bool:
    out = virsh(host, "domjobinfo", name).stdout
    return "Unbounded" in out and "Memory processed" in out


def test_ctrl_c_aborts_vm_migrate_and_the_vm_keeps_running(lab, lab_inventory, vm, tmp_path):
    (source,) = copies(lab_inventory)
    dest = "hv2" if source == "hv1" else "hv1"
    in_vm(lab_inventory, WRITER)
    proc = _cli(lab, tmp_path, "vm.migrate", NAME, "--to", dest)
    out, err = _interrupt(proc, lab_inventory, lab_inventory.hosts[source], [NAME])
    assert proc.returncode == 130, (out, err)
    assert err.strip().splitlines()[-1] == (f"cloudops: migration of {NAME} to {dest} was interrupted: aborted, "
                                             f"{NAME} keeps running on {source}")
    assert copies(lab_inventory) == {source: "running"}
    assert "Unbounded" not in virsh(lab_inventory.hosts[source], "domjobinfo", NAME).stdout
    assert leftovers(lab_inventory, dest) == []
    assert in_vm(lab_inventory, "cat /root/mark") == "kept-across-faults"


def test_ctrl_c_aborts_every_migration_of_a_parallel_evacuation(lab, lab_inventory, vm, tmp_path):
    (source,) = copies(lab_inventory)
    dest = "hv2" if source == "hv1" else "hv1"
    other = "t-fault2"
    vms.start_vm(vms.VMSpec(name=other, image="tiny", memory=96, host=source, timeout=300), lab_inventory)
    try:
        in_vm(lab_inventory, WRITER)
        proc = _cli(lab, tmp_path, "host.evacuate", source, "--parallel", "2")
        out, err = _interrupt(proc, lab_inventory, lab_inventory.hosts[source], [NAME, other])
        assert proc.returncode == 130, (out, err)
        assert "interrupted" in err.strip().splitlines()[-1]
        for name in (NAME, other):
            assert virsh(lab_inventory.hosts[source], "domstate", name).stdout.strip() == "running"
            assert virsh(lab_inventory.hosts[dest], "domstate", name).returncode != 0
            assert "Unbounded" not in virsh(lab_inventory.hosts[source], "domjobinfo", name).stdout
            assert f"{name} " in out and "cancelled" in out
        assert leftovers(lab_inventory, dest) == []
    finally:  # the CLI put the host in maintenance in the real state, not the test's
        invoke("host.maintenance", source, "off", "--inventory", str(lab.inventory_path))
        with contextlib.suppress(Exception):
            vms.delete_vm(other, lab_inventory)


def test_a_parallel_evacuation_with_one_migration_failing_moves_the_others(lab, lab_inventory, vm, tmp_path):
    """host.evacuate --parallel 2 of three VMs; the job of the first is aborted on its source (virsh
    domjobabort, as a failing link or a refusing target would end it): that VM stays and runs on the source,
    the two others finish on the target, and the summary and the exit status say which failed."""
    (source,) = copies(lab_inventory)
    dest = "hv2" if source == "hv1" else "hv1"
    others = ("t-fault2", "t-fault3")
    for other in others:
        vms.start_vm(vms.VMSpec(name=other, image="tiny", memory=96, host=source, timeout=300), lab_inventory)
    try:
        in_vm(lab_inventory, WRITER)  # NAME stays in pre-copy at the slow policy's bandwidth
        proc = _cli(lab, tmp_path, "host.evacuate", source, "--parallel", "2", "--json")
        started = time.monotonic()
        while not _job_running_for(lab_inventory.hosts[source], NAME):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() - started < 240, "the migration of the first VM never started"
            time.sleep(0.5)
        aborted = virsh(lab_inventory.hosts[source], "domjobabort", NAME)
        assert aborted.returncode == 0, aborted.stderr
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 1, (out, err)
        assert err.strip().splitlines()[-1] == f"cloudops: 1 VM(s) could not leave {source}"
        report = json.loads(out)
        assert {m["vm"]: m["status"] for m in report["moves"]} == {NAME: "failed", **{o: "moved" for o in others}}
        assert copies(lab_inventory) == {source: "running"}  # NAME: on its source, running, nowhere else
        for other in others:
            assert virsh(lab_inventory.hosts[dest], "domstate", other).stdout.strip() == "running"
            assert virsh(lab_inventory.hosts[source], "domstate", other).returncode != 0
        assert in_vm(lab_inventory, "cat /root/mark") == "kept-across-faults"
    finally:
        in_vm(lab_inventory, guestload.stop())
        invoke("host.maintenance", source, "off", "--inventory", str(lab.inventory_path))
        for other in others:
            with contextlib.suppress(Exception):
                vms.delete_vm(other, lab_inventory)


# ---------------------------------------------------------------- snapshots through a broken migration

def test_snapshots_a_broken_migration_carried_come_back_with_recover(lab, lab_inventory, vm):
    """The source's libvirtd killed in pre-copy while the VM has a snapshot, whose metadata snapcarry took
    off the source for the migration (and whose disk got a temporary top layer): after ``--recover`` the
    snapshot is on the VM's host again, no temporary layer is left, and reverting to it works."""
    import xml.etree.ElementTree as ET

    from cloudops import state
    from cloudops.migration import snapcarry

    (source,) = copies(lab_inventory)
    dest = "hv2" if source == "hv1" else "hv1"
    in_vm(lab_inventory, f"{guestload.stop()}; echo at-snapshot > /root/snapped; sync")
    made = invoke("vm.snapshot", NAME, "--create", "carried", "--inventory", str(lab.inventory_path))
    assert made.returncode == 0, made.stderr
    in_vm(lab_inventory, "echo after-snapshot > /root/snapped; sync")
    in_vm(lab_inventory, WRITER)
    fault = Fault(lab, lab_inventory, "source", source, dest)
    policy = migrate.Policy(downtime_ms=1, downtime_step_ms=0, downtime_max_ms=1, auto_converge=False,
                            postcopy_after=None, bandwidth_mib=4)

    def progress(sample):
        if sample.iteration >= 1 and sample.elapsed > 2:
            fault.fire()

    error = None
    try:
        migrate.migrate_vm(NAME, dest, lab_inventory, policy=policy, progress=progress)
    except CloudopsError as exc:
        error = str(exc)
    finally:
        fault.repair()
    assert fault.fired.is_set(), f"the fault never fired ({error})"
    # the source's libvirtd was gone when the migration gave up: the snapshots could not be put back, and
    # the state store still holds them (what --recover restores)
    assert error and "--recover" in error, error
    assert [ET.fromstring(x).findtext("name") for x in state.current().value(snapcarry.PREFIX + NAME)["xmls"]] == \
        ["carried"]
    proc = invoke("vm.migrate", NAME, "--recover", "--inventory", str(lab.inventory_path))
    assert proc.returncode == 0, (proc.stdout, proc.stderr, error)
    final = copies(lab_inventory)
    assert list(final.values()) == ["running"], final
    (host_name,) = final
    host = lab_inventory.hosts[host_name]
    assert virsh(host, "snapshot-list", NAME, "--name").stdout.split() == ["carried"]
    assert state.current().value(snapcarry.PREFIX + NAME) is None  # the record is dropped once restored
    assert not any(p.endswith(snapcarry.SUFFIX) for p in virsh(host, "domblklist", NAME).stdout.split())
    for host_name_ in lab_inventory.hosts:
        assert not [f for f in leftovers(lab_inventory, host_name_) if f.endswith(snapcarry.SUFFIX)]
    in_vm(lab_inventory, guestload.stop())
    reverted = invoke("vm.snapshot", NAME, "--revert", "carried", "--inventory", str(lab.inventory_path))
    assert reverted.returncode == 0, reverted.stderr
    guest.wait_until(lambda: _answers(lab_inventory), 120, f"a shell on {NAME} after the revert")
    assert in_vm(lab_inventory, "cat /root/snapped") == "at-snapshot"
    assert in_vm(lab_inventory, "cat /root/mark") == "kept-across-faults"
    assert invoke("vm.snapshot", NAME, "--delete", "carried", "--inventory", str(lab.inventory_path)).returncode == 0
