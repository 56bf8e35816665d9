"""Trust on a real lab: a changed host key stops vm.list, host.facts and vm.migrate with one line and moves
nothing; migration goes over the hosts' own key and known_hosts; the migration key runs only libvirt's helper.

Oracles are outside cloudops: virsh inside each host's namespaces, OpenSSH from a peer and from this machine.
VM names start with "t" so they never meet a demo VM's.
"""

import subprocess
from pathlib import Path

import pytest

from cloudops.compute import vms
from cloudops.lab import hosts as lab_lib
from cloudops.migration import migrate
from tests.conftest import invoke, own_inventory, own_lab

# changes host keys and restarts sshd: a lab of its own, not the session's
lab = own_lab("k", hosts=2)
lab_inventory = own_inventory()


@pytest.fixture(autouse=True)
def own_maintenance(no_maintenance):
    """No host of the test lab starts (or stays) in maintenance."""


def on_host(lab, name, *argv, timeout=60) -> subprocess.CompletedProcess:
    """Run ``argv`` inside lab host ``name``'s namespaces (not through cloudops's connections)."""
    return subprocess.run([*lab_lib.enter(lab.host(name)), *argv], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def where(lab, vm) -> dict[str, str]:
    """Host name -> virsh domstate of ``vm``, for every host that has it defined (virsh, not cloudops)."""
    found = {}
    for host in lab.hosts:
        proc = on_host(lab, host.name, "virsh", "-q", "-c", "qemu:///system", "domstate", vm)
        if proc.returncode == 0:
            found[host.name] = proc.stdout.strip()
    return found


@pytest.fixture(scope="module")
def two_vms(lab, lab_inventory, tiny_image):
    """t-kfrom on hv2 (the host whose key will change) and t-kto on hv1."""
    made = []
    try:
        for name, host in (("t-kfrom", "hv2"), ("t-kto", "hv1")):
            vms.start_vm(vms.VMSpec(name=name, image="tiny", memory=96, host=host, timeout=300), lab_inventory)
            made.append(name)
        yield {"t-kfrom": "hv2", "t-kto": "hv1"}
    finally:
        for name in made:
            vms.delete_vm(name, lab_inventory)


def one_line_naming(proc, host) -> str:
    """The one line of the output that names ``host`` and the key mismatch (there must be exactly one)."""
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if host in line and "host key" in line and "does not match" in line]
    assert len(lines) == 1, text
    return lines[0]


def test_a_changed_host_key_stops_list_facts_and_migration_to_and_from_it(lab, two_vms):
    inventory = ["--inventory", str(lab.inventory_path)]
    before = {vm: where(lab, vm) for vm in two_vms}
    assert before == {vm: {host: "running"} for vm, host in two_vms.items()}
    lab_lib.replace_host_key(lab.prefix, "hv2")
    try:
        listing = invoke("vm.list", *inventory)
        assert listing.returncode != 0
        one_line_naming(listing, "hv2")

        facts = invoke("host.facts", *inventory)
        assert facts.returncode != 0
        one_line_naming(facts, "hv2")

        for vm, target in (("t-kto", "hv2"), ("t-kfrom", "hv1")):  # to the changed host, and from it
            moved = invoke("vm.migrate", vm, "--to", target, "--timeout", "120", *inventory)
            assert moved.returncode != 0, moved.stdout
            assert len(moved.stderr.strip().splitlines()) == 1, moved.stderr
            one_line_naming(moved, "hv2")
        assert {vm: where(lab, vm) for vm in two_vms} == before  # nothing moved, nothing was made
        # the changed key was not learnt anywhere
        assert "does not match" in one_line_naming(invoke("vm.list", *inventory), "hv2")
    finally:
        lab_lib.restore_host_key(lab.prefix, "hv2")
    assert invoke("vm.list", *inventory).returncode == 0


def test_the_migration_key_runs_only_libvirts_helper_from_the_clouds_hosts(lab, lab_inventory):
    hv2 = lab.host("hv2")
    ssh = ["ssh", "-F", "/dev/null", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
           "-o", "StrictHostKeyChecking=yes"]
    # from a peer, with the peer's own copy of the key: forced to virt-ssh-helper, never a shell
    peer = on_host(lab, "hv1", *ssh, "-i", "/root/.ssh/cloudops_migration",
                   "-o", "UserKnownHostsFile=/root/.ssh/known_hosts", f"root@{hv2.address}", "id")
    assert "uid=" not in peer.stdout and "virt-ssh-helper" in peer.stderr, (peer.stdout, peer.stderr)
    # from an address that is not one of the cloud's hosts (this machine, on the lab's bridge): refused
    key = Path(lab.dir) / "migration_key"
    stranger = subprocess.run([*ssh, "-i", str(key), "-o", f"UserKnownHostsFile={Path(lab.dir) / 'known_hosts'}",
                               f"root@{hv2.address}", "id"], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=60)
    assert stranger.returncode == 255 and "uid=" not in stranger.stdout
    assert "Permission denied" in stranger.stderr, stranger.stderr
    # and what libvirt needs still works from the peer: its own key and known_hosts, the migration URI
    uri = migrate.migration_uri(lab_inventory.hosts["hv2"])
    assert "/root/.ssh/cloudops_migration" in uri and str(lab.dir) not in uri
    reached = on_host(lab, "hv1", "virsh", "-c", uri, "hostname")
    assert reached.returncode == 0 and reached.stdout.strip() == "hv2", reached.stderr


def test_live_migration_goes_over_the_hosts_own_trust(lab, lab_inventory, two_vms):
    # a lab host sees none of the operator's ~/.ssh (opaque overlay): only its own keys (migration, image
    # distribution between hosts) and known_hosts
    listing = on_host(lab, "hv1", "ls", "-A", "/root/.ssh")
    assert sorted(listing.stdout.split()) == ["authorized_keys", "cloudops_images", "cloudops_images.pub",
                                               "cloudops_migration", "cloudops_migration.pub", "known_hosts"]
    result = migrate.migrate_vm("t-kto", "hv2", lab_inventory)
    assert (result.source, result.target, result.mode) == ("hv1", "hv2", "live")
    assert where(lab, "t-kto") == {"hv2": "running"}
    back = invoke("vm.migrate", "t-kto", "--to", "hv1", "--inventory", str(lab.inventory_path))
    assert back.returncode == 0, back.stderr
    assert where(lab, "t-kto") == {"hv1": "running"}
