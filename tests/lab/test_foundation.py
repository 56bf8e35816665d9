"""The foundation on a real 3-host lab: facts, fan-out, faults, CLI errors."""

import json
import threading
import time

import pytest

from cloudops import facts, fleet, inventory, virt
from cloudops.errors import CloudopsError
from cloudops.lab import hosts as lab_lib
from tests.conftest import ROOT, TEST_PREFIX, invoke


def test_lab_hosts_are_distinct_machines(lab, lab_inventory):
    uuids, hostnames = set(), set()
    for host in lab_inventory.hosts.values():
        with virt.open_host(host) as conn:
            caps = conn.getCapabilities()
            uuids.add(caps.split("<uuid>")[1].split("</uuid>")[0])
            hostnames.add(conn.getHostname())
            assert conn.getType() == "QEMU"
    assert len(uuids) == 3, "every host needs its own host_uuid for migration"
    assert hostnames == {"hv1", "hv2", "hv3"}


def test_lab_hosts_have_private_etc_and_a_shared_directory(lab, lab_inventory):
    shared = lab_inventory.hosts["hv1"].vars["shared_path"]
    marker = f"{shared}/written-by-hv1"
    result = fleet.run_command([lab_inventory.hosts["hv1"]], f"echo private > /etc/cloudops-test && echo hi > {marker}")
    assert result.exit_code == 0, result.to_dict()
    result = fleet.run_command(list(lab_inventory.hosts.values()),
                               f"cat {marker}; test -e /etc/cloudops-test && echo has-private || echo no-private")
    assert result.exit_code == 0
    outputs = {r.host: r.value.stdout.split() for r in result}
    assert outputs["hv1"] == ["hi", "has-private"]
    assert outputs["hv2"] == ["hi", "no-private"] and outputs["hv3"] == ["hi", "no-private"]


def test_host_facts_on_every_host(lab, lab_inventory):
    result = fleet.run(list(lab_inventory.hosts.values()), facts.host_facts, timeout=60)
    assert result.exit_code == 0, result.to_dict()
    for r in result:
        assert r.value["hostname"] == r.host
        assert r.value["libvirt_version"].count(".") == 2
        assert r.value["qemu_version"].count(".") == 2
        assert r.value["cpus"] >= 1 and r.value["memory_total_mb"] > r.value["memory_free_mb"] > 0
        assert isinstance(r.value["kvm"], bool)
        assert r.value["domains_running"] == [] or isinstance(r.value["domains_running"], list)


def test_host_facts_cli_json(lab):
    proc = invoke("host.facts", "--inventory", str(lab.inventory_path), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["summary"] == {"ok": 3, "changed": 0, "failed": 0}
    assert sorted(h["value"]["hostname"] for h in data["hosts"]) == ["hv1", "hv2", "hv3"]


def test_fleet_run_cli_table_and_selection(lab):
    proc = invoke("fleet.run", "hostname", "--inventory", str(lab.inventory_path), "--hosts", "hv1,hv3")
    assert proc.returncode == 0, proc.stderr
    assert "hv1" in proc.stdout and "hv3" in proc.stdout and "hv2 " not in proc.stdout
    assert "2 hosts: 2 ok, 0 changed, 0 failed" in proc.stdout


def test_sshd_stopped_mid_run_fails_only_that_host(lab, lab_inventory):
    hosts = list(lab_inventory.hosts.values())
    stopper = threading.Timer(1.0, lab_lib.stop_sshd, args=(TEST_PREFIX, "hv2"))
    stopper.start()
    try:
        result = fleet.run_command(hosts, "sleep 3; hostname", timeout=30)
    finally:
        stopper.join()
        lab_lib.start_sshd(TEST_PREFIX, "hv2")
    assert result["hv1"].status == "ok" and result["hv1"].value.stdout.strip() == "hv1"
    assert result["hv3"].status == "ok"
    assert result["hv2"].status == "failed" and result["hv2"].error
    assert result.exit_code == 1
    # and the host is back for the tests after this one
    assert fleet.run_command([lab_inventory.hosts["hv2"]], "hostname").exit_code == 0


def test_a_host_whose_address_does_not_answer_fails_after_its_timeout(lab, tmp_path):
    inv_file = tmp_path / "inv.yaml"
    inv_file.write_text(lab.inventory_path.read_text().replace(
        "hosts:\n", "hosts:\n  ghost:\n    address: 10.252.0.99\n    key: /nonexistent\n", 1).replace(
        "hosts: [hv1", "hosts: [ghost, hv1"))
    inv = inventory.load(inv_file)
    t0 = time.monotonic()
    result = fleet.run_command(inv.select(hosts="ghost,hv1"), "hostname", timeout=4)
    assert time.monotonic() - t0 < 60, "a dead address must never hang the run"
    assert result["ghost"].status == "failed" and result["ghost"].error
    assert result["hv1"].status == "ok"


def test_unknown_host_key_is_refused(lab, lab_inventory, tmp_path):
    """Host keys are verified: an empty known_hosts means the connection is refused, not trusted."""
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    host = lab_inventory.hosts["hv1"]
    from dataclasses import replace

    stranger = replace(host, vars={**host.vars, "known_hosts": str(empty)})
    result = fleet.run_command([stranger], "hostname", timeout=10)
    assert result["hv1"].status == "failed"
    assert "host key not verified" in result["hv1"].error


@pytest.mark.parametrize("args, message", [
    (["lab.up", "--hosts", "0", "--prefix", "cotx"], "at least 1 host"),
    (["lab.up", "--hosts", "1000", "--prefix", "cotx"], "at most 32 hosts"),
    (["lab.up", "--hosts", "2", "--prefix", TEST_PREFIX], "already up"),
    (["host.facts", "--hosts", "hv9"], "unknown host 'hv9'"),
    (["fleet.run", "true", "--group", "nosuchgroup"], "unknown group 'nosuchgroup'"),
])
def test_bad_input_is_one_line_and_nonzero(lab, args, message):
    if args[0] != "lab.up":
        args = [*args, "--inventory", str(lab.inventory_path)]
    proc = invoke(*args)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert lab_lib.status(TEST_PREFIX)["up"], "a refused command must not disturb the running lab"
    assert lab_lib.status("cotx")["hosts"] == []


def test_malformed_inventory_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hosts:\n  hv1: {address: 10.0.0.1\n")
    proc = invoke("fleet.run", "true", "--inventory", str(bad))
    assert proc.returncode != 0 and str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_teardown_leaves_nothing_and_a_killed_lab_comes_back():
    prefix = "cotd"
    lab_lib.down(prefix)
    first = lab_lib.up(2, prefix=prefix)
    # kill the lab without teardown: every process in its namespaces, by pid
    for host in first.hosts:
        for pid in lab_lib.namespace_pids(host.namespace):
            lab_lib._signal(pid, 9)
    assert not lab_lib.status(prefix)["up"]
    again = lab_lib.up(2, prefix=prefix)
    assert lab_lib.status(prefix)["up"]
    pids = [p for h in again.hosts for p in lab_lib.namespace_pids(h.namespace)]
    assert pids
    lab_lib.down(prefix)
    assert lab_lib._namespaces(prefix) == []
    assert lab_lib._links(prefix) == []
    assert not any(lab_lib._alive(p) for p in pids)
    assert not lab_lib.lab_dir(prefix).exists()
    with open("/proc/mounts") as mounts:
        assert str(lab_lib.lab_dir(prefix)) not in mounts.read()
    from pathlib import Path
    config = Path.home() / ".ssh" / "config"
    assert f"cloudops lab {prefix} " not in (config.read_text() if config.exists() else "")


def test_plain_ssh_fab_and_qemu_ssh_reach_lab_hosts(lab):
    """lab.up's block in ~/.ssh/config serves OpenSSH, Fabric (paramiko) and libvirt's ssh transport."""
    import subprocess
    import sys
    from pathlib import Path

    host = lab.hosts[1]
    ssh = subprocess.run(["ssh", host.address, "hostname"], capture_output=True, text=True, timeout=60)
    assert ssh.returncode == 0 and ssh.stdout.strip() == host.name, ssh.stderr
    fab = subprocess.run([str(Path(sys.executable).parent / "fab"), "-H", host.address, "--", "hostname"],
                         capture_output=True, text=True, timeout=60)
    assert fab.returncode == 0 and fab.stdout.strip() == host.name, fab.stderr
    virsh = subprocess.run(["virsh", "-c", f"qemu+ssh://{host.address}/system", "hostname"],
                           capture_output=True, text=True, timeout=60)
    assert virsh.returncode == 0 and virsh.stdout.strip() == host.name, virsh.stderr


def test_a_cached_libvirt_connection_survives_an_sshd_restart(lab, lab_inventory):
    """The ssh under a cached qemu+ssh connection can die quietly; the next use must reconnect, not fail."""
    host = lab_inventory.hosts["hv2"]
    with virt.open_host(host) as conn:
        assert conn.getHostname() == "hv2"
    lab_lib.stop_sshd(TEST_PREFIX, "hv2")  # ends the listener and every session, ours included
    lab_lib.start_sshd(TEST_PREFIX, "hv2")
    with virt.open_host(host) as conn:
        assert conn.getHostname() == "hv2"


def test_a_live_lab_of_another_checkout_is_not_taken_for_stale(tmp_path):
    """Same prefix, another var dir (another clone, e.g. CI's): lab.up refuses instead of killing it."""
    import os
    import subprocess
    import sys

    prefix = f"{TEST_PREFIX}f"
    env = {**os.environ, "CLOUDOPS_VAR": str(tmp_path / "other-var")}

    def in_other_checkout(call):
        subprocess.run([sys.executable, "-c", f"from cloudops.lab import hosts as lab; lab.{call}"], env=env, check=True, cwd=ROOT)

    in_other_checkout(f"up(1, prefix={prefix!r}, bare=True)")
    try:
        with pytest.raises(CloudopsError, match="another checkout"):
            lab_lib.up(1, prefix=prefix, bare=True)
        assert lab_lib.namespace_pids(f"{prefix}-hv1"), "the other lab must still run"
    finally:
        in_other_checkout(f"down({prefix!r})")
    assert lab_lib._namespaces(prefix) == []
