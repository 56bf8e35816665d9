"""`deploy` on a real lab: check mode, idempotence, drift repair, a host down, migration trust, bad input, fab -H."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cloudops import fleet
from cloudops.lab import hosts as lab_lib
from cloudops.migration import migrate
from tests.conftest import ROOT, invoke, own_inventory, own_lab

SNAPSHOT = ("cat /etc/libvirt/libvirtd.conf /etc/motd; ls -la ~/.ssh; cat ~/.ssh/known_hosts ~/.ssh/authorized_keys "
            "~/.ssh/config 2>/dev/null; virsh -q -c qemu:///system net-list --all; "
            "virsh -q -c qemu:///system pool-list --all; md5sum /etc/cron.d/* 2>/dev/null; true")


@pytest.fixture(scope="module")
def var_dir(tmp_path_factory):
    """The cloud's state (migration key, maintenance) of this test run, apart from the developer's."""
    return tmp_path_factory.mktemp("var")


# restarts libvirtd, rewrites configuration and stops sshd: its own lab, not the session's
lab = own_lab("p")
lab_inventory = own_inventory()


@pytest.fixture(scope="module")
def cli(lab, var_dir):
    def run(*args, inventory=None):
        return invoke(*args, "--inventory", str(inventory or lab.inventory_path),
                      env={"CLOUDOPS_VAR": str(var_dir)})
    return run


def deploy_json(cli, *args, inventory=None):
    proc = cli("deploy", "--json", *args, inventory=inventory)
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"no JSON: rc={proc.returncode} stderr={proc.stderr}") from None
    return proc, {h["host"]: h for h in data["hosts"]}


def changed_steps(host_result) -> set[str]:
    return {s["name"] for s in host_result["value"] or [] if s["changed"]}


def sh(host, command) -> str:
    result = fleet.run_command([host], command, timeout=60)
    assert result.exit_code == 0, result.to_dict()
    return result[host.name].value.stdout


def snapshot(lab_inventory) -> dict:
    return {name: sh(host, SNAPSHOT) for name, host in lab_inventory.hosts.items()}


def variant(lab, tmp_path, edit) -> Path:
    data = yaml.safe_load(lab.inventory_path.read_text())
    edit(data)
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_check_changes_nothing(lab, lab_inventory, cli, var_dir):
    before = snapshot(lab_inventory)
    proc, hosts = deploy_json(cli, "--check")
    assert proc.returncode == 0, proc.stderr
    assert all(h["status"] == "changed" for h in hosts.values()), hosts
    assert "libvirtd" in changed_steps(hosts["hv1"])
    assert snapshot(lab_inventory) == before
    assert not (var_dir / "cloud" / "migration_key").exists()


def test_deploy_twice_the_second_changes_nothing(lab, lab_inventory, cli):
    uuid_before = sh(lab_inventory.hosts["hv1"], "grep ^host_uuid /etc/libvirt/libvirtd.conf")
    proc, hosts = deploy_json(cli)
    assert proc.returncode == 0, proc.stderr
    assert all(h["status"] == "changed" for h in hosts.values())
    assert {"libvirtd", "pool", "networks", "migration-key", "known-hosts", "banner"} <= changed_steps(hosts["hv2"])
    assert sh(lab_inventory.hosts["hv1"], "grep ^host_uuid /etc/libvirt/libvirtd.conf") == uuid_before
    assert lab_lib.status(lab.prefix)["up"]  # libvirtd restarted, and the lab knows its new pid

    proc, hosts = deploy_json(cli)
    assert proc.returncode == 0, proc.stderr
    assert {name: (h["status"], h["changed"]) for name, h in hosts.items()} == \
        {name: ("ok", 0) for name in lab_inventory.hosts}
    table = cli("deploy")
    assert table.returncode == 0 and "3 hosts: 0 changed, 3 unchanged, 0 failed" in table.stdout


def test_hv1_reaches_hv2_libvirtd_with_the_migration_key_and_verified_host_keys(lab_inventory):
    hv2 = lab_inventory.hosts["hv2"]
    # the URI the source's libvirtd opens for a migration: the host's own key and known_hosts, as deployed
    uri = migrate.migration_uri(hv2)
    assert "cloudops_migration" in uri and "var/lab" not in uri
    assert sh(lab_inventory.hosts["hv1"], f"virsh -c {shlex.quote(uri)} hostname").strip() == "hv2"
    # and libvirt's own qemu+ssh through the managed ssh config
    out = sh(lab_inventory.hosts["hv3"], f"virsh -c qemu+ssh://root@{hv2.address}/system hostname")
    assert out.strip() == "hv2"
    # the deployed key reaches libvirt's helper only: no shell, no `id`
    out = sh(lab_inventory.hosts["hv1"],
             f"ssh -i ~/.ssh/cloudops_migration -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes "
             f"-o UserKnownHostsFile=~/.ssh/known_hosts root@{hv2.address} id </dev/null 2>&1; true")
    assert "uid=" not in out and "virt-ssh-helper" in out, out
    authorized = sh(hv2, "cat ~/.ssh/authorized_keys")
    assert 'restrict,from="' in authorized and 'command="virt-ssh-helper qemu:///system"' in authorized
    # the deployed image key reaches the image receiver only: a command that is not an image file is refused
    out = sh(lab_inventory.hosts["hv1"],
             f"ssh -F /dev/null -i ~/.ssh/cloudops_images -o IdentitiesOnly=yes -o BatchMode=yes "
             f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile=~/.ssh/known_hosts root@{hv2.address} id "
             f"</dev/null 2>&1; true")
    assert "uid=" not in out and "cloudops-receive-image: refused" in out, out
    assert 'command="/opt/cloudops/bin/cloudops-receive-image"' in authorized


def test_drift_is_repaired_only_where_it_is(lab_inventory, cli):
    hv2, hv3 = lab_inventory.hosts["hv2"], lab_inventory.hosts["hv3"]
    sh(hv2, "virsh -c qemu:///system net-destroy cloudops && virsh -c qemu:///system net-undefine cloudops")
    uuid_before = sh(hv3, "grep ^host_uuid /etc/libvirt/libvirtd.conf")
    sh(hv3, "sed -i 's/^keepalive_count = .*/keepalive_count = 99/' /etc/libvirt/libvirtd.conf")
    proc, hosts = deploy_json(cli)
    assert proc.returncode == 0, proc.stderr
    assert changed_steps(hosts["hv1"]) == set()
    assert changed_steps(hosts["hv2"]) == {"networks"}
    assert changed_steps(hosts["hv3"]) == {"libvirtd"}
    assert "libvirtd restarted" in next(s["message"] for s in hosts["hv3"]["value"] if s["name"] == "libvirtd")
    assert "active" in sh(hv2, "virsh -q -c qemu:///system net-list --autostart")
    assert sh(hv3, "grep ^host_uuid /etc/libvirt/libvirtd.conf") == uuid_before
    assert "keepalive_count = 5" in sh(hv3, "cat /etc/libvirt/libvirtd.conf")


def test_disk_leases_are_set_up_again_when_gone(lab, lab_inventory, cli):
    hv1 = lab_inventory.hosts["hv1"]
    sh(hv1, "sed -i '/^# BEGIN cloudops disk leases$/,/^# END cloudops disk leases$/d' /etc/libvirt/qemu.conf && "
            "rm /etc/libvirt/qemu-lockd.conf && kill $(cat /run/cloudops-lab/host/virtlockd.pid) && "
            "while virt-admin -c virtlockd:///system srv-list >/dev/null 2>&1; do sleep 0.1; done")
    proc, hosts = deploy_json(cli, "--check")
    assert proc.returncode == 0, proc.stderr
    message = next(s["message"] for s in hosts["hv1"]["value"] if s["name"] == "leases")
    assert "would start virtlockd" in message and message.endswith("would restart libvirtd"), message
    proc, hosts = deploy_json(cli)
    assert proc.returncode == 0, proc.stderr
    assert changed_steps(hosts["hv1"]) == {"leases"} and changed_steps(hosts["hv2"]) == set()
    assert 'lock_manager = "lockd"' in sh(hv1, "cat /etc/libvirt/qemu.conf")
    lockspace = lab_inventory.hosts["hv1"].vars["shared_path"] + "/.leases"
    assert f'file_lockspace_dir = "{lockspace}"' in sh(hv1, "cat /etc/libvirt/qemu-lockd.conf")
    sh(hv1, "virt-admin -c virtlockd:///system srv-list")  # virtlockd answers again
    proc, hosts = deploy_json(cli)  # nothing left to do
    assert proc.returncode == 0 and all(h["changed"] == 0 for h in hosts.values()), hosts


def test_one_host_down_the_others_complete(lab, lab_inventory, cli):
    sh(lab_inventory.hosts["hv1"], "echo edited > /etc/motd")
    sh(lab_inventory.hosts["hv3"], "echo edited > /etc/motd")
    lab_lib.stop_sshd(lab.prefix, "hv2")
    try:
        proc, hosts = deploy_json(cli)
    finally:
        lab_lib.start_sshd(lab.prefix, "hv2")
    assert proc.returncode == 1
    assert "deploy failed on 1 host(s): hv2" in proc.stderr
    assert hosts["hv2"]["status"] == "failed" and hosts["hv2"]["error"]
    assert changed_steps(hosts["hv1"]) == changed_steps(hosts["hv3"]) == {"banner"}
    proc, hosts = deploy_json(cli)  # back up: nothing left to do anywhere
    assert proc.returncode == 0 and all(h["changed"] == 0 for h in hosts.values()), hosts


def test_fab_hosts_deploys_through_fabric_connections(lab, lab_inventory, var_dir):
    addresses = ",".join(h.address for h in lab_inventory.hosts.values())
    sh(lab_inventory.hosts["hv2"], "echo edited > /etc/motd")
    fab = str(Path(sys.executable).parent / "fab")
    proc = subprocess.run([fab, "-F", str(lab.ssh_config_path), "-H", addresses, "deploy"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "CLOUDOPS_VAR": str(var_dir),
                               "CLOUDOPS_INVENTORY": str(lab.inventory_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 hosts: 1 changed, 2 unchanged, 0 failed; 1 step(s) changed" in proc.stdout
    assert "hv2   banner" in proc.stdout


def test_fab_unknown_host_changes_nothing(lab, lab_inventory, var_dir):
    sh(lab_inventory.hosts["hv1"], "echo edited > /etc/motd")
    fab = str(Path(sys.executable).parent / "fab")
    proc = subprocess.run([fab, "-F", str(lab.ssh_config_path), "-H",
                           f"{lab_inventory.hosts['hv1'].address},10.9.9.9", "deploy"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "CLOUDOPS_VAR": str(var_dir),
                               "CLOUDOPS_INVENTORY": str(lab.inventory_path)})
    assert proc.returncode == 1 and "unknown host '10.9.9.9'" in proc.stderr
    assert sh(lab_inventory.hosts["hv1"], "cat /etc/motd") == "edited\n"


def test_missing_package_is_reported_in_check_mode(lab, cli, tmp_path):
    inv = variant(lab, tmp_path, lambda d: d["vars"].update(packages=["libvirt-clients", "cloudops-no-such-pkg"]))
    proc, hosts = deploy_json(cli, "--check", "--hosts", "hv1", inventory=inv)
    assert proc.returncode == 0, proc.stderr
    step = next(s for s in hosts["hv1"]["value"] if s["name"] == "packages")
    assert step["changed"] and step["message"] == "would install cloudops-no-such-pkg"


def test_metrics_cron_entry_installed_once(lab, lab_inventory, cli, tmp_path):
    inv = variant(lab, tmp_path, lambda d: d["vars"].update(metrics={"carbon": "127.0.0.1:2003", "prefix": "labtest"}))
    proc, hosts = deploy_json(cli, "--hosts", "hv1", inventory=inv)
    assert proc.returncode == 0, proc.stderr
    assert "metrics-cron" in changed_steps(hosts["hv1"])
    assert "--carbon=127.0.0.1:2003 --prefix=labtest" in sh(lab_inventory.hosts["hv1"],
                                                                          "cat /etc/cron.d/cloudops-metrics")
    proc, hosts = deploy_json(cli, "--hosts", "hv1", inventory=inv)
    assert changed_steps(hosts["hv1"]) == set()
    sh(lab_inventory.hosts["hv1"], "rm /etc/cron.d/cloudops-metrics")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["hosts"]["hv3"].setdefault("vars", {}).update(pool_path="var/pool"),
     "cloudops: hv3: pool_path must be an absolute path"),
    (lambda d: d["vars"].update(networks=[{"name": "a", "cidr": "10.77.0.0/24"}, {"name": "b", "cidr": "10.77.0.0/24"}]),
     "cloudops: hv1: networks: DHCP ranges of a (10.77.0.0/24) and b (10.77.0.0/24) overlap"),
    (lambda d: d["vars"].update(networks=[{"name": "a", "cidr": "10.77.0.300/24"}]),
     "cloudops: hv1: networks[0]: network a"),
    (lambda d: d["hosts"]["hv2"].update(port=70000), "cloudops: inventory "),
])
def test_bad_input_is_refused_before_any_host_changes(lab, lab_inventory, cli, tmp_path, edit, message):
    sh(lab_inventory.hosts["hv1"], "echo edited > /etc/motd")
    proc = cli("deploy", inventory=variant(lab, tmp_path, edit))
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    if "port" in proc.stderr:
        assert "hosts.hv2.port: must be an integer in 1..65535, got int 70000" in proc.stderr
    assert sh(lab_inventory.hosts["hv1"], "cat /etc/motd") == "edited\n"


def test_unknown_host_and_missing_template_variable(lab, lab_inventory, cli, tmp_path):
    proc = cli("deploy", "--hosts", "hv1,hv9")
    assert proc.returncode == 1 and "unknown host 'hv9'" in proc.stderr
    (tmp_path / "overrides").mkdir()
    (tmp_path / "overrides" / "motd.j2").write_text("{{ host }} in {{ datacenter }}\n")
    inv = variant(lab, tmp_path, lambda d: d["vars"].update(deploy_templates="overrides"))
    proc = cli("deploy", inventory=inv)
    assert proc.returncode == 1 and "'datacenter' is undefined" in proc.stderr
    assert sh(lab_inventory.hosts["hv1"], "cat /etc/motd") == "edited\n"
    assert cli("deploy").returncode == 0  # put the banners back for the next tests
