"""Containers (libvirt LXC) beside VMs on the lab, from the tiny image: SSH with the user's key at the IPAM
address, listed beside a VM with its kind, counted by placement, shipped by metrics, stopped, powered on,
rebooted from inside, cold-migrated with the same address (live refused), and deleted without leftovers.

Oracles outside cloudops: `virsh -c lxc:///system` and `mountpoint` on the hosts, files in the container's
tree on its host (hostname, authorized_keys, root's hash), SSH into the container with the user's own key.
"""

import shlex
import subprocess
import time

import pytest

from cloudops import state, virt
from cloudops.compute import guest, placement, rootfs, vms
from cloudops.metrics import cycle, rates
from cloudops.net import ipam
from cloudops.ssh import connect
from tests.conftest import TEST_PREFIX, cli, ok_json, one_line_error
from tests.lab.test_vms import leftovers

NAME = f"ct-{TEST_PREFIX}"
VM_NAME = f"ctvm-{TEST_PREFIX}"


def on_host(host, command, warn=False):
    with connect(host) as hv:
        return hv.run(command, hide=True, in_stream=False, warn=warn)


def lxc_state(host, name) -> str:
    result = on_host(host, f"virsh -c lxc:///system domstate {shlex.quote(name)}", warn=True)
    return result.stdout.strip() if result.ok else "absent"


def in_container(lab, name, command) -> str:
    proc = cli(lab, "vm.run", name, command)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def container_leftovers(lab_inventory, name) -> list[str]:
    """What a container called ``name`` could have left: a VM's leftovers, an LXC domain, a tree, a host key."""
    found = leftovers(lab_inventory, name)
    for host in lab_inventory.hosts.values():
        if lxc_state(host, name) != "absent":
            found.append(f"container domain on {host.name}")
        if on_host(host, f"test -e {shlex.quote(rootfs.tree_dir(host, name))}", warn=True).ok:
            found.append(f"tree on {host.name}")
    if guest.HOSTKEYS + name in state.current().items(guest.HOSTKEYS):
        found.append("recorded host key")
    return found


@pytest.fixture(scope="module")
def started(lab, lab_inventory, tiny_image, user_key, tmp_path_factory):
    password = tmp_path_factory.mktemp("pw") / "password"
    password.write_text("container-secret\n")
    password.chmod(0o600)
    try:
        proc = cli(lab, "vm.start", NAME, "--image", "tiny", "--kind", "container", "--memory", "64", "--host",
                   "hv1", "--ssh-key", f"{user_key}.pub", "--password-file", str(password), "--json",
                   timeout=900)
        yield ok_json(proc)
    finally:
        cli(lab, "vm.delete", NAME)
        cli(lab, "vm.delete", VM_NAME)


def test_container_reaches_ssh_with_its_key_hostname_password_and_address(lab, lab_inventory, started, user_key):
    hv1 = lab_inventory.hosts["hv1"]
    assert started["kind"] == "container" and started["host"] == "hv1"
    net = vms.network_spec(None, hv1)
    assert ipam.lookup(net, NAME).ip == started["ip"]  # its address is IPAM's, as a VM's
    assert lxc_state(hv1, NAME) == "running"
    root = rootfs.root_dir(hv1, NAME)
    assert on_host(hv1, f"mountpoint -q {root} && cat {root}/etc/hostname").stdout.strip() == NAME
    assert user_key.with_suffix(".pub").read_text().split()[1] in on_host(hv1, f"cat {root}/root/.ssh/authorized_keys").stdout
    shadow_root = on_host(hv1, f"grep '^root:' {root}/etc/shadow").stdout.split(":")[1]
    assert shadow_root.startswith("$6$")  # the password's hash, set by the seed
    assert "container-secret" not in on_host(hv1, f"cat {root}/etc/shadow {root}/var/lib/cloud/seed/nocloud/*").stdout
    # SSH with the user's own key, through hv1, host key verified against the one cloudops made
    with connect(hv1) as hv, guest.connect_vm(hv, started["ip"], key=user_key) as conn:
        out = conn.run("hostname; ip -4 -o addr show eth0; cat /proc/1/environ | tr '\\0' '\\n' | grep ^container=",
                       hide=True, in_stream=False).stdout
    assert out.splitlines()[0] == NAME and f"inet {started['ip']}/" in out and "container=lxc-libvirt" in out


def test_listed_beside_a_vm_counted_by_placement_and_shipped_by_metrics(lab, lab_inventory, started):
    hv1 = lab_inventory.hosts["hv1"]
    proc = cli(lab, "vm.start", VM_NAME, "--image", "tiny", "--memory", "96", "--host", "hv1", "--no-wait",
               "--json")
    ok_json(proc)
    listed = {vm["name"]: vm for vm in ok_json(cli(lab, "vm.list", "--json"))["vms"]}
    assert listed[NAME]["kind"] == "container" and listed[VM_NAME]["kind"] == "vm"
    table = cli(lab, "vm.list").stdout.splitlines()
    assert "KIND" in table[0] and any(NAME in line and "container" in line for line in table)
    assert ok_json(cli(lab, "vm.info", NAME, "--json"))["root"] == rootfs.root_dir(hv1, NAME)

    state = placement.host_state(hv1, set())
    with virt.open_host(hv1) as conn:
        vm_mib = sum(d.info()[1] // 1024 for d in conn.listAllDomains())
    assert state.memory_committed_mb == vm_mib + 64  # the container's 64 MiB counted with the VMs'

    first = cycle.collect_fleet([hv1])["hv1"]
    in_container(lab, NAME, "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done")  # some CPU time
    second = cycle.collect_fleet([hv1])["hv1"]
    previous = rates.figures(first, None, "cloudops", int(first.taken_at)).state
    points = dict(rates.figures(second, previous, "cloudops", int(second.taken_at)).datapoints)
    assert points[f"cloudops.vm.{NAME}.cpu.util_percent"][1] > 0
    assert points[f"cloudops.vm.{NAME}.memory.current_bytes"][1] > 0
    assert f"cloudops.vm.{VM_NAME}.state" in points  # VMs and containers in one naming
    cli(lab, "vm.delete", VM_NAME)


def test_vm_only_verbs_and_live_migration_refuse_a_container_in_one_line(lab, started):
    one_line_error(cli(lab, "vm.snapshot", NAME, "--list"), f"'{NAME}' is a container on hv1: this is for VMs")
    one_line_error(cli(lab, "vm.migrate", NAME, "--to", "hv2"), "containers do not migrate live")


def test_stop_poweron_and_a_reboot_from_inside(lab, lab_inventory, started):
    hv1 = lab_inventory.hosts["hv1"]
    root = rootfs.root_dir(hv1, NAME)
    in_container(lab, NAME, "echo kept > /root/marker; echo gone > /run/marker")
    stopped = ok_json(cli(lab, "vm.stop", NAME, "--json"))
    assert stopped["changed"] is True and stopped["action"] == "stopped"  # its init powered off: not destroyed
    assert lxc_state(hv1, NAME) == "shut off"
    assert not on_host(hv1, f"mountpoint -q {root}", warn=True).ok  # its overlay unmounted after the stop
    assert "nothing to do" in cli(lab, "vm.stop", NAME).stdout
    assert ok_json(cli(lab, "vm.poweron", NAME, "--json"))["changed"] is True
    assert in_container(lab, NAME, "cat /root/marker; ls /run/marker 2>/dev/null; true").split() == ["kept"]
    # a reboot inside restarts it (libvirt LXC) on a writable root: the next boot's network and SSH work
    cli(lab, "vm.run", NAME, "echo again > /run/marker; reboot")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        proc = cli(lab, "vm.run", NAME, "test ! -e /run/marker && touch /root/rw && echo back")
        if proc.returncode == 0 and "back" in proc.stdout:
            break
        time.sleep(1)
    else:
        pytest.fail(f"{NAME} was not back with a writable root after a reboot from inside: {proc.stderr}")
    assert lxc_state(hv1, NAME) == "running"


def test_a_cold_migration_that_fails_on_the_destination_keeps_the_container_on_its_source(lab, lab_inventory,
                                                                                          started):
    hv1, hv3 = lab_inventory.hosts["hv1"], lab_inventory.hosts["hv3"]
    blocker = shlex.quote(rootfs.tree_dir(hv3, NAME))
    on_host(hv3, f"mkdir -p {blocker}/not-cloudops")  # something of the operator's where hv3's tree would go
    try:
        one_line_error(cli(lab, "vm.migrate", NAME, "--to", "hv3", "--cold"), "hv3: making the tree of container")
        assert lxc_state(hv1, NAME) == "running" and lxc_state(hv3, NAME) == "absent"
        assert on_host(hv3, f"test -d {blocker}/not-cloudops", warn=True).ok  # not cloudops's: left alone
        assert NAME in in_container(lab, NAME, "hostname")  # back on its source, SSH answers
    finally:
        on_host(hv3, f"rm -rf {blocker}")


def test_cold_migration_keeps_the_address_and_the_files(lab, lab_inventory, started):
    hv1, hv2 = lab_inventory.hosts["hv1"], lab_inventory.hosts["hv2"]
    in_container(lab, NAME, "echo travelled > /root/moved")
    moved = ok_json(cli(lab, "vm.migrate", NAME, "--to", "hv2", "--cold", "--json"))
    assert moved["cold"] is True and (moved["source"], moved["destination"]) == ("hv1", "hv2")
    assert moved["ip"] == started["ip"] and moved["running"] is True
    assert lxc_state(hv2, NAME) == "running" and lxc_state(hv1, NAME) == "absent"
    assert not on_host(hv1, f"test -e {rootfs.tree_dir(hv1, NAME)}", warn=True).ok  # nothing left on the source
    assert "name='%s'" % NAME not in on_host(hv1, "virsh -c qemu:///system net-dumpxml cloudops").stdout
    out = in_container(lab, NAME, "cat /root/moved; ip -4 -o addr show eth0")
    assert "travelled" in out and f"inet {started['ip']}/" in out
    assert ipam.lookup(vms.network_spec(None, hv2), NAME).ip == started["ip"]


def test_delete_leaves_nothing(lab, lab_inventory, started):
    host = ok_json(cli(lab, "vm.info", NAME, "--json"))["host"]
    assert ok_json(cli(lab, "vm.delete", NAME, "--json"))["name"] == NAME
    assert container_leftovers(lab_inventory, NAME) == []
    assert host in lab_inventory.hosts


def test_bad_input_is_one_line_and_makes_nothing(lab, lab_inventory, tiny_image, tmp_path):
    name = f"ctbad-{TEST_PREFIX}"
    one_line_error(cli(lab, "vm.start", name, "--image", "tiny", "--kind", "pod"), "unknown kind 'pod'")
    one_line_error(cli(lab, "vm.start", name, "--image", "tiny", "--kind", "container", "--disk-size", "1G"),
                   "--disk-size (a container has no disk")
    # an image with a filesystem and no operating system: nothing a container could run
    disk = tmp_path / "empty.raw"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(disk)], check=True)
    image_name = f"empty-{TEST_PREFIX}"
    ok_json(cli(lab, "image.add", str(disk), "--name", image_name, "--json"))
    try:
        one_line_error(cli(lab, "vm.start", name, "--image", image_name, "--kind", "container", timeout=300),
                       f"image {image_name} has no root filesystem usable for a container")
    finally:
        cli(lab, "image.rm", image_name)
    assert container_leftovers(lab_inventory, name) == []
