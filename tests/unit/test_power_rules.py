"""vm.poweron, vm.reboot, vm.stop --force: what they refuse and when they change nothing.

libvirt's in-process test driver stands in for a host (as in test_delete_foreign); the real
boots, reboots and addresses are tested on the lab (tests/lab/test_power.py)."""

from types import SimpleNamespace

import pytest

from cloudops import state, virt
from cloudops.compute import power, vms
from cloudops.errors import CloudopsError
from tests.unit.libvirt_fake import libvirt_test_host

DOMAIN = """<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type>hvm</type></os>{metadata}<devices/></domain>"""
META = (f"<metadata><cloudops:vm xmlns:cloudops='{virt.METADATA_NS}'><cloudops:image>x</cloudops:image>"
        "<cloudops:network>cloudops</cloudops:network><cloudops:ip>192.168.150.9</cloudops:ip>"
        "<cloudops:mac>52:54:00:aa:bb:cc</cloudops:mac></cloudops:vm></metadata>")


@pytest.fixture
def host(monkeypatch):
    conn, hv, inventory = libvirt_test_host(monkeypatch)
    return SimpleNamespace(conn=conn, hv=hv, inventory=inventory, hosts=[hv])


def define(host, name, ours=True, running=False):
    dom = host.conn.defineXML(DOMAIN.format(name=name, metadata=META if ours else ""))
    if running:
        dom.create()
    return dom


@pytest.mark.parametrize("verb", ["poweron", "reboot", "stop"])
def test_a_foreign_domain_is_refused_in_one_line_and_left_as_it_was(host, verb):
    dom = define(host, "u-foreign", ours=False, running=True)
    call = {"poweron": lambda: power.poweron_vm("u-foreign", host.inventory),
            "reboot": lambda: power.reboot_vm("u-foreign", host.hosts),
            "stop": lambda: power.force_stop_vm("u-foreign", host.hosts)}[verb]
    with pytest.raises(CloudopsError, match="not made by cloudops") as info:
        call()
    assert "\n" not in str(info.value)
    assert dom.isActive()


def test_poweron_of_a_running_vm_changes_nothing(host):
    dom = define(host, "u-up", running=True)
    result = power.poweron_vm("u-up", host.inventory)
    assert (result.changed, result.action) == (False, "none")
    assert "already running" in result.message and result.to_dict()["changed"] is False
    assert dom.isActive()


def test_poweron_without_its_ipam_allocation_is_refused_and_not_started(host):
    dom = define(host, "u-noaddr")
    with pytest.raises(CloudopsError, match="no longer allocated"):
        power.poweron_vm("u-noaddr", host.inventory)
    assert not dom.isActive()


def test_reboot_of_a_stopped_vm_is_an_error(host):
    define(host, "u-down")
    with pytest.raises(CloudopsError, match="shut off: nothing to reboot"):
        power.reboot_vm("u-down", host.hosts)


def test_force_stop_destroys_at_once_then_changes_nothing(host):
    dom = define(host, "u-run", running=True)
    first = power.force_stop_vm("u-run", host.hosts)
    assert (first.changed, first.action, first.vm.state) == (True, "destroyed", "shut off")
    assert not dom.isActive()
    second = power.force_stop_vm("u-run", host.hosts)
    assert (second.changed, second.action) == (False, "none") and "nothing to do" in second.message


def test_an_unfinished_migration_is_refused(host):
    dom = define(host, "u-moving", running=True)
    state.current().put("migrating/u-moving", {"name": "u-moving", "source": "hv1", "target": "hv2"})
    for call in (lambda: power.force_stop_vm("u-moving", host.hosts), lambda: power.reboot_vm("u-moving", host.hosts)):
        with pytest.raises(CloudopsError, match="--recover"):
            call()
    assert dom.isActive()


def test_a_name_being_changed_by_another_command_is_refused(host):
    dom = define(host, "u-busy", running=True)
    with vms._name_lock("u-busy"), pytest.raises(CloudopsError, match="being changed by another"):
        power.force_stop_vm("u-busy", host.hosts)
    assert dom.isActive()


def test_unknown_and_invalid_names(host):
    with pytest.raises(CloudopsError, match="unknown VM"):
        power.force_stop_vm("u-nobody", host.hosts)
    with pytest.raises(CloudopsError, match="invalid VM name"):
        power.reboot_vm("x;reboot", host.hosts)


@pytest.mark.parametrize("before, now, stage", [
    ("a", "a", "waiting"),    # the old boot still answers
    ("a", None, "down"),      # the old boot went away
    ("a", "b", "back"),       # a new boot answers
    (None, None, "waiting"),  # never answered: nothing to tell yet
    (None, "b", "back"),
])
def test_reboot_progress(before, now, stage):
    assert power.reboot_progress(before, now) == stage


def test_parse_probe():
    assert power.parse_probe("0c4f3e5e-1d2a-4a57-9a43-3f0c2b8d1e11\n7.93 5.10\n") == \
        ("0c4f3e5e-1d2a-4a57-9a43-3f0c2b8d1e11", 7.93)
    assert power.parse_probe("") is None and power.parse_probe("x\nnot-a-number\n") is None
