"""vm.poweron, vm.reboot and vm.stop --force on a real lab, through the CLI.

Oracles are outside cloudops: ``virsh domstate`` and ``virsh net-dumpxml`` on the host, the
guest's own /proc (uptime, boot id) and its own idea of its address. One tiny VM (96 MiB) serves
every test; each test first powers it on (which changes nothing when it runs). VM names start
with "pw-" so they never meet another test's.
"""

import shlex
import time

import pytest

from cloudops.compute import vms
from cloudops.ssh import connect
from tests.conftest import cli, ok_json, one_line_error

NAME = "pw-vm"
FOREIGN = "pw-foreign"
FOREIGN_XML = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64'>hvm</type></os><devices/></domain>"""


def sh(host, command, warn=False):
    with connect(host) as hv:
        return hv.run(command, hide=True, warn=warn, in_stream=False)


def domstate(host, name=NAME) -> str:
    return sh(host, f"virsh -c qemu:///system domstate {shlex.quote(name)}").stdout.strip()


def in_guest(lab, command) -> str:
    proc = cli(lab, "vm.run", NAME, command)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def boot(lab) -> tuple[str, float, float]:
    """(the guest's boot id, its uptime, this machine's monotonic clock when it was read)."""
    out = in_guest(lab, "cat /proc/sys/kernel/random/boot_id /proc/uptime").split()
    return out[0], float(out[1]), time.monotonic()


def guest_has_address(lab, ip) -> bool:
    return f"inet {ip}/" in in_guest(lab, "ip -4 -o addr show")


@pytest.fixture(scope="module")
def vm(lab, lab_inventory, tiny_image):
    started = vms.start_vm(vms.VMSpec(name=NAME, image="tiny", memory=96, host="hv1", timeout=240), lab_inventory)
    yield started
    vms.delete_vm(NAME, lab_inventory)


def test_stop_force_then_poweron_with_its_reservation_put_back(lab, lab_inventory, vm):
    host = lab_inventory.hosts[vm.host]
    assert ok_json(cli(lab, "vm.poweron", NAME, "--json"))["changed"] is False  # running already
    stopped = ok_json(cli(lab, "vm.stop", NAME, "--force", "--json"))
    assert stopped["changed"] is True and stopped["action"] == "destroyed"
    assert domstate(host) == "shut off"
    again = cli(lab, "vm.stop", NAME, "--force")
    assert again.returncode == 0 and "already stopped, nothing to do" in again.stdout
    one_line_error(cli(lab, "vm.reboot", NAME), "nothing to reboot")

    # the DHCP reservation goes missing while it is off; poweron puts it back from IPAM
    net = shlex.quote(vm.network)
    entry = f"<host mac='{vm.mac}' name='{NAME}' ip='{vm.ip}'/>"
    sh(host, f"virsh -c qemu:///system net-update {net} delete ip-dhcp-host {shlex.quote(entry)} --live --config")
    assert vm.mac not in sh(host, f"virsh -c qemu:///system net-dumpxml {net}").stdout

    proc = cli(lab, "vm.poweron", NAME)
    assert proc.returncode == 0, proc.stderr
    assert f"powered on, SSH answers at {vm.ip}" in proc.stdout
    assert domstate(host) == "running"
    assert vm.mac in sh(host, f"virsh -c qemu:///system net-dumpxml {net}").stdout
    assert guest_has_address(lab, vm.ip)
    second = cli(lab, "vm.poweron", NAME)
    assert second.returncode == 0 and "already running, nothing to do" in second.stdout


@pytest.mark.parametrize("how", ["acpi", "force"])
def test_reboot_comes_back_with_a_new_boot_at_the_same_address(lab, lab_inventory, vm, how):
    assert cli(lab, "vm.poweron", NAME).returncode == 0
    boot_id, _uptime, read_at = boot(lab)
    report = ok_json(cli(lab, "vm.reboot", NAME, "--json", *(["--force"] if how == "force" else [])))
    assert report["changed"] is True and report["action"] == ("reset" if how == "force" else "rebooted")
    assert report["ip"] == vm.ip
    new_id, uptime, now = boot(lab)
    assert new_id != boot_id
    assert uptime < now - read_at  # without a reboot it would be the old uptime plus the time that passed
    assert guest_has_address(lab, vm.ip)
    assert domstate(lab_inventory.hosts[vm.host]) == "running"


@pytest.fixture
def foreign(lab, lab_inventory):
    host = lab_inventory.hosts["hv2"]
    xml = FOREIGN_XML.format(name=FOREIGN)
    sh(host, f"printf %s {shlex.quote(xml)} > /tmp/{FOREIGN}.xml && "
             f"virsh -q -c qemu:///system define /tmp/{FOREIGN}.xml")
    yield host
    sh(host, f"virsh -q -c qemu:///system undefine {FOREIGN}; rm -f /tmp/{FOREIGN}.xml", warn=True)


def test_bad_input_is_one_line_and_changes_nothing(lab, foreign):
    for verb in (["vm.poweron"], ["vm.reboot"], ["vm.stop", "--force"]):
        one_line_error(cli(lab, *verb, "pw-nobody"), "unknown VM 'pw-nobody'")
        one_line_error(cli(lab, *verb, "Bad;name"), "invalid VM name")
        one_line_error(cli(lab, *verb, FOREIGN), "not made by cloudops")
    assert domstate(foreign, FOREIGN) == "shut off"
