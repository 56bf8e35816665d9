"""cloud.watch and host.failover on a real lab of 3 hosts: a host loses power, is declared dead, fenced, and
its VMs restarted elsewhere or reported down; nothing restarts without fencing; a host coming back is tidied.

"Power loss" is ``cloudops.lab.power.power_off``: every process of hv1 (libvirtd, virtlogd, sshd, every
QEMU) killed at once by pid; its files stay, as a machine's disks do. The lab's fence_command is the same
power-off, run by cloud.watch. The oracles are virsh on each host over SSH, qemu-img on the host, and the
state store only for what cloudops alone knows (the records).

The matrix of reports (no fencing, failing fencing, anti-affinity) uses diskless domains with a cloudops
record saying ``storage: shared`` (cheap: nothing to boot), each with its own IPAM address and MAC; two
tests use real tiny VMs on the lab's shared storage (``vm.start --storage shared``): one whose host loses
power, one whose host is cut off from the control machine only, its VM still running, where a sampler
counts the VM's QEMU processes on the whole machine (the lab's hosts share one process table) and
must never see two. VM names start with "fo-".
"""

import subprocess
import threading
import json
import shlex
import sys
import time

import pytest
import yaml

from cloudops import virt
from cloudops.compute import records, vms
from cloudops.lab import power
from cloudops.net import ipam, networks
from cloudops.ssh import connect
from cloudops.templating import render
from tests.conftest import cli, ok_json, one_line_error, own_inventory, own_lab, refuse_control_tcp, run_in_vm

lab = own_lab("h")
lab_inventory = own_inventory()

LOCAL = "fo-local"
SHARED = ("fo-web1", "fo-web2")  # one anti-affinity group: never on one host


@pytest.fixture(autouse=True)
def own_maintenance(no_maintenance):
    """No host of the test lab starts (or stays) in maintenance."""


def sh(host, command, warn=False):
    with connect(host) as hv:
        return hv.run(command, hide=True, warn=warn, in_stream=False)


def virsh_list(host) -> dict[str, str]:
    """{domain: state} of every domain defined on the host, from virsh."""
    out = sh(host, "virsh -c qemu:///system list --all --name").stdout.split()
    return {name: sh(host, f"virsh -c qemu:///system domstate {shlex.quote(name)}").stdout.strip() for name in out}


def where(lab_inventory, name) -> dict[str, str]:
    """{host: state} of every host that answers and has a domain ``name``."""
    found = {}
    for host in lab_inventory.hypervisors():
        try:
            states = virsh_list(host)
        except Exception:  # noqa: BLE001 - a powered-off host has no say
            continue
        if name in states:
            found[host.name] = states[name]
    return found


def inventory_with_fence(lab, tmp_path_factory, fence):
    data = yaml.safe_load(lab.inventory_path.read_text())
    if fence is None:
        del data["vars"]["fence_command"]
    else:
        data["hosts"]["hv1"].setdefault("vars", {})["fence_command"] = fence
    path = tmp_path_factory.mktemp("inv") / "inventory.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def watch(inventory_path, *args):
    return _cli(inventory_path, "cloud.watch", "--grace", "1", "--timeout", "3", *args)


def _cli(inventory_path, *args):
    from tests.conftest import invoke

    return invoke(*args, "--inventory", str(inventory_path), timeout=300)


def watch_until_dead(inventory_path):
    """Cycles until hv1 (powered off) is declared dead: the first finds it missing, one after grace acts."""
    first = ok_json(watch(inventory_path, "--json"))
    assert status_of(first, "hv1") == "missing", first
    time.sleep(1.1)
    proc = watch(inventory_path, "--json")
    report = json.loads(proc.stdout)
    assert status_of(report, "hv1") == "dead", report
    return proc, report


def status_of(report, host):
    return next(h for h in report["hosts"] if h["host"] == host)["status"]


def hv1_of(report):
    return next(h for h in report["hosts"] if h["host"] == "hv1")


def forget_watch_state(lab_inventory):
    """No host of this lab is remembered as missing or dead (by an earlier run on the same state store)."""
    from cloudops import state

    for host in lab_inventory.hypervisors():
        state.current().delete(f"ha/{host.name}")


@pytest.fixture(scope="module")
def vms_on_hv1(lab, lab_inventory, tiny_image):
    """A real tiny VM on local storage and two diskless "shared" ones, all on hv1, with records."""
    forget_watch_state(lab_inventory)
    hv1 = lab_inventory.hosts["hv1"]
    local = vms.start_vm(vms.VMSpec(name=LOCAL, image="tiny", memory=96, host="hv1", timeout=240), lab_inventory)
    net = vms.network_spec("cloudops", hv1)
    with virt.open_host(hv1) as conn:
        networks.ensure_network(conn, net)
        for name in SHARED:
            allocation = ipam.allocate(net, name)
            networks.add_reservation(conn, net.name, allocation.mac, allocation.ip, name)
            dom = conn.defineXML(render("lab/diskless-domain.xml.j2", name=name, ns=virt.METADATA_NS,
                                                 ip=allocation.ip, mac=allocation.mac, group="web"))
            dom.create()
            records.save_domain(dom, "hv1")
    yield local
    power.power_on(lab.prefix, "hv1")
    for name in (LOCAL, *SHARED):
        try:
            vms.delete_vm(name, lab_inventory)
        except Exception:  # noqa: BLE001 - teardown goes on; the lab goes down after the module anyway
            pass
        records.forget(name)
    forget_watch_state(lab_inventory)


def running_again_on_hv1(lab, lab_inventory):
    """hv1 powered on with its VMs running again (between scenarios)."""
    power.power_on(lab.prefix, "hv1")
    virt.forget(lab_inventory.hosts["hv1"])
    sh(lab_inventory.hosts["hv1"], "virsh -c qemu:///system net-start cloudops", warn=True)  # dnsmasq died with it
    for name in (LOCAL, *SHARED):
        state = virsh_list(lab_inventory.hosts["hv1"]).get(name)
        if state == "shut off":
            sh(lab_inventory.hosts["hv1"], f"virsh -c qemu:///system start {name}")
    assert records.get(SHARED[0])["host"] == "hv1"


def test_bad_input_is_one_line(lab, lab_inventory, tmp_path_factory):
    one_line_error(cli(lab, "host.failover", "hv9"), "unknown host 'hv9'")
    one_line_error(cli(lab, "cloud.watch", "--grace", "0"), "--grace must be a positive number")
    one_line_error(cli(lab, "host.failover", "hv1", "--grace", "-1"), "--grace must be a positive number")
    bad = inventory_with_fence(lab, tmp_path_factory, ["fence", "{bmc}"])
    one_line_error(_cli(bad, "cloud.watch"), "references unknown variable {bmc}")
    worse = inventory_with_fence(lab, tmp_path_factory, "ipmitool power off")
    one_line_error(_cli(worse, "host.failover", "hv1", "--force"), "must be a list of argument strings")


def test_a_live_host_is_refused_without_force_and_force_fences_first(lab, lab_inventory, vms_on_hv1,
                                                                      tmp_path_factory):
    failing = inventory_with_fence(lab, tmp_path_factory, [sys.executable, "-c", "import sys; sys.exit(2)"])
    one_line_error(_cli(failing, "host.failover", "hv1"), "not failing over a live host; --force")
    planned = ok_json(_cli(failing, "host.failover", "hv1", "--dry-run", "--json"))
    assert planned["dry_run"] and planned["fence"] is None and planned["probe"]["status"] == "up"
    steps = {s["vm"]: s for s in planned["steps"]}
    assert steps[LOCAL]["action"] == "down" and {steps[n]["target"] for n in SHARED} == {"hv2", "hv3"}
    proc = _cli(failing, "host.failover", "hv1", "--force", "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["fence"]["exit_code"] == 2 and not report["fenced"] and report["restarted"] == []
    for name in SHARED:
        assert list(where(lab_inventory, name)) == ["hv1"]


def test_without_fence_command_nothing_restarts_and_the_report_says_why(lab, lab_inventory, vms_on_hv1,
                                                                          tmp_path_factory):
    unfenced = inventory_with_fence(lab, tmp_path_factory, None)
    power.power_off(lab.prefix, "hv1")
    try:
        proc, report = watch_until_dead(unfenced)
        assert proc.returncode == 1
        assert "no fence_command for hv1 in the inventory: nothing restarted" in hv1_of(report)["failover"]["reason"]
        assert report["attention"] == ["hv1"]
        for other in ("hv2", "hv3"):
            assert not set(virsh_list(lab_inventory.hosts[other])) & {LOCAL, *SHARED}
    finally:
        running_again_on_hv1(lab, lab_inventory)
    back = ok_json(watch(unfenced, "--json"))
    assert status_of(back, "hv1") == "healthy again" and hv1_of(back)["actions"] == []
    assert set(virsh_list(lab_inventory.hosts["hv1"])) >= {LOCAL, *SHARED}


def test_a_failing_fence_command_restarts_nothing(lab, lab_inventory, vms_on_hv1, tmp_path_factory):
    failing = inventory_with_fence(lab, tmp_path_factory,
                                   [sys.executable, "-c", "import sys; print('BMC unreachable', file=sys.stderr); "
                                    "sys.exit(3)"])
    power.power_off(lab.prefix, "hv1")
    try:
        proc, report = watch_until_dead(failing)
        assert proc.returncode == 1
        failed = hv1_of(report)["failover"]
        assert not failed["fenced"] and "fence_command exited 3: BMC unreachable" in failed["reason"]
        for other in ("hv2", "hv3"):
            assert not set(virsh_list(lab_inventory.hosts[other])) & {LOCAL, *SHARED}
    finally:
        running_again_on_hv1(lab, lab_inventory)
    assert status_of(ok_json(watch(failing, "--json")), "hv1") == "healthy again"


def test_power_loss_fenced_shared_vms_restart_elsewhere_local_one_down_then_hv1_returns(
        lab, lab_inventory, vms_on_hv1, tmp_path_factory):
    fence = lab.inventory_path  # lab.up gives every host the lab's power-off as its fence_command
    hv1 = lab_inventory.hosts["hv1"]
    disk = next(p for p in sh(hv1, f"virsh -c qemu:///system domblklist {LOCAL} --details").stdout.split()
                if p.endswith(f"{LOCAL}.qcow2"))
    macs = {name: records.get(name)["nics"][0]["mac"] for name in SHARED}
    power.power_off(lab.prefix, "hv1")
    proc, report = watch_until_dead(fence)
    assert proc.returncode == 0, proc.stderr
    done = hv1_of(report)["failover"]
    assert done["fenced"] and done["fence"]["exit_code"] == 0 and done["complete"]
    steps = {s["vm"]: s for s in done["steps"]}
    assert steps[LOCAL]["action"] == "down" and "local storage" in steps[LOCAL]["reason"]
    targets = {steps[name]["target"] for name in SHARED}
    assert targets == {"hv2", "hv3"}  # anti-affinity: one web VM per host
    for name in SHARED:
        target = lab_inventory.hosts[steps[name]["target"]]
        assert steps[name]["action"] == "restarted"
        assert where(lab_inventory, name) == {target.name: "running"}  # hv1 is off: not listed
        assert macs[name] in sh(target, f"virsh -c qemu:///system domiflist {name}").stdout
        assert macs[name] in sh(target, "virsh -c qemu:///system net-dumpxml cloudops").stdout
        assert records.get(name)["host"] == target.name
    assert not set(virsh_list(lab_inventory.hosts["hv2"])) & {LOCAL} and \
        not set(virsh_list(lab_inventory.hosts["hv3"])) & {LOCAL}
    # the next cycle finds nothing more to do and fences nothing again
    again = ok_json(watch(fence, "--json"))
    assert hv1_of(again)["failover"]["fence"] is None and hv1_of(again)["failover"]["complete"]

    power.power_on(lab.prefix, "hv1")
    virt.forget(hv1)
    back = ok_json(watch(fence, "--json"))
    assert status_of(back, "hv1") == "healthy again"
    on_hv1 = virsh_list(hv1)
    assert not set(on_hv1) & set(SHARED)  # the stale definitions are gone: no second copy can start there
    assert on_hv1[LOCAL] == "shut off"  # left alone, for the operator
    assert sh(hv1, f"qemu-img info -U {shlex.quote(disk)}", warn=True).ok
    for name in SHARED:
        assert list(where(lab_inventory, name)) == [steps[name]["target"]]


def test_a_shared_storage_vm_restarts_elsewhere_with_its_address_and_file(lab, lab_inventory, tiny_image,
                                                                         tmp_path_factory):
    fence = inventory_with_fence(lab, tmp_path_factory,
                                 [sys.executable, "-m", "cloudops.lab.power", "off", "--prefix", lab.prefix, "{host}"])
    name = "fo-disk"
    vm = vms.start_vm(vms.VMSpec(name=name, image="tiny", memory=96, host="hv1", timeout=240, storage="shared"),
                      lab_inventory)
    try:
        run_in_vm(lab_inventory, name, "echo before-the-power-loss > /root/mark; sync")
        power.power_off(lab.prefix, "hv1")
        proc, report = watch_until_dead(fence)
        assert proc.returncode == 0, proc.stderr
        step = next(s for s in hv1_of(report)["failover"]["steps"] if s["vm"] == name)
        assert step["action"] == "restarted" and step["target"] in ("hv2", "hv3")
        target = lab_inventory.hosts[step["target"]]
        answer_within(240, lambda: run_in_vm(lab_inventory, name, "true"))
        assert run_in_vm(lab_inventory, name, "cat /root/mark") == "before-the-power-loss"
        moved = next(v for v in vms.list_on_host(target) if v.name == name)
        assert (moved.ip, moved.mac) == (vm.ip, vm.mac)
        power.power_on(lab.prefix, "hv1")
        virt.forget(lab_inventory.hosts["hv1"])
        assert status_of(ok_json(watch(fence, "--json")), "hv1") == "healthy again"
        assert name not in virsh_list(lab_inventory.hosts["hv1"])
    finally:
        power.power_on(lab.prefix, "hv1")
        vms.delete_vm(name, lab_inventory)



def answer_within(seconds, probe):
    """``probe()`` once it stops raising (a guest booting on its new host), for at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return probe()
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def qemus_of(name) -> list[str]:
    """PIDs of the QEMU processes running VM ``name``, on every lab host of this machine."""
    out = subprocess.run(["pgrep", "-f", f"qemu-system-x86_64 -name guest={name},"], capture_output=True, text=True)
    return out.stdout.split()


def test_a_host_cut_off_from_the_control_machine_is_fenced_before_its_vm_runs_elsewhere(lab, lab_inventory,
                                                                                      tiny_image, tmp_path_factory):
    """hv1 answers nobody here but still runs its VM (a network partition): the failover fences it first, so the
    VM's disk is never open twice; a sampler over the machine's processes must never see two QEMUs of it."""
    fence = inventory_with_fence(lab, tmp_path_factory,
                                 [sys.executable, "-m", "cloudops.lab.power", "off", "--prefix", lab.prefix, "{host}"])
    name = "fo-part"
    vm = vms.start_vm(vms.VMSpec(name=name, image="tiny", memory=96, host="hv1", timeout=240, storage="shared"),
                      lab_inventory)
    seen, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            seen.append(len(qemus_of(name)))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        run_in_vm(lab_inventory, name, "echo before-the-partition > /root/mark; sync")
        (before,) = qemus_of(name)
        refuse_control_tcp(lab, "hv1", True)
        virt.forget(lab_inventory.hosts["hv1"])
        sampler.start()
        proc, report = watch_until_dead(fence)
        assert proc.returncode == 0, proc.stderr
        failed_over = hv1_of(report)["failover"]
        assert failed_over["fenced"] and failed_over["fence"]["ok"]
        step = next(s for s in failed_over["steps"] if s["vm"] == name)
        assert step["action"] == "restarted" and step["target"] in ("hv2", "hv3")
        answer_within(240, lambda: run_in_vm(lab_inventory, name, "true"))
        stop.set()
        sampler.join(10)
        assert seen and max(seen) == 1, seen  # one QEMU at every sample: the fenced one died before the new one
        (after,) = qemus_of(name)
        assert after != before
        assert run_in_vm(lab_inventory, name, "cat /root/mark") == "before-the-partition"
        moved = next(v for v in vms.list_on_host(lab_inventory.hosts[step["target"]]) if v.name == name)
        assert (moved.ip, moved.mac) == (vm.ip, vm.mac)
    finally:
        stop.set()
        refuse_control_tcp(lab, "hv1", False)
        power.power_on(lab.prefix, "hv1")
        virt.forget(lab_inventory.hosts["hv1"])
    try:
        assert status_of(ok_json(watch(fence, "--json")), "hv1") == "healthy again"
        assert name not in virsh_list(lab_inventory.hosts["hv1"])  # no second copy can start there
        assert list(where(lab_inventory, name)) == [step["target"]]
    finally:
        vms.delete_vm(name, lab_inventory)

