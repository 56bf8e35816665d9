"""A VM no host has is NotFound (a CloudopsError), and callers branch on the type, not on the message."""

from types import SimpleNamespace

import pytest

from cloudops.compute import vms
from cloudops.errors import CloudopsError, NotFound

HV1, HV2 = SimpleNamespace(name="hv1"), SimpleNamespace(name="hv2")


def finding(monkeypatch, found, unreachable=(), kind="vm"):
    monkeypatch.setattr(vms, "find_guests", lambda name, hosts: ([(h, kind) for h in found], list(unreachable)))


def test_locate_raises_not_found_with_the_same_line(monkeypatch):
    finding(monkeypatch, [], ["hv2: timed out connecting"])
    with pytest.raises(NotFound) as info:
        vms.locate("web1", [HV1, HV2])
    assert isinstance(info.value, CloudopsError)
    assert str(info.value) == "unknown VM 'web1': no selected host has it (unreachable: hv2: timed out connecting)"
    assert info.value.unreachable == ("hv2: timed out connecting",)


def test_several_copies_are_not_a_not_found(monkeypatch):
    finding(monkeypatch, [HV1, HV2])
    with pytest.raises(CloudopsError, match="defined on several hosts: hv1, hv2") as info:
        vms.locate("web1", [HV1, HV2])
    assert not isinstance(info.value, NotFound)


def test_a_name_no_host_has_is_free(monkeypatch):
    finding(monkeypatch, [])
    assert vms._ensure_name_free("web1", [HV1, HV2]) is None


def test_a_name_is_not_free_while_a_host_cannot_be_asked(monkeypatch):
    finding(monkeypatch, [], ["hv2: timed out connecting"])
    with pytest.raises(CloudopsError) as info:
        vms._ensure_name_free("web1", [HV1, HV2])
    assert str(info.value) == "cannot check that VM name 'web1' is free: unreachable: hv2: timed out connecting"
    assert not isinstance(info.value, NotFound)


def test_a_name_a_host_has_is_taken(monkeypatch):
    finding(monkeypatch, [HV2])
    with pytest.raises(CloudopsError, match="VM 'web1' already exists on hv2"):
        vms._ensure_name_free("web1", [HV1, HV2])


def test_a_vm_verb_refuses_a_container_in_one_line_naming_what_it_has(monkeypatch):
    finding(monkeypatch, [HV1], kind="container")
    with pytest.raises(CloudopsError) as info:
        vms.locate("ct1", [HV1, HV2])
    assert not isinstance(info.value, NotFound)
    assert str(info.value).startswith("'ct1' is a container on hv1: this is for VMs")
    assert "vm.migrate --cold" in str(info.value) and "\n" not in str(info.value)
    assert vms.locate_guest("ct1", [HV1, HV2]) == (HV1, "container")


def test_a_container_holds_its_name_against_a_vm(monkeypatch):
    finding(monkeypatch, [HV2], kind="container")
    with pytest.raises(CloudopsError, match="a container called 'web1' already exists on hv2"):
        vms._ensure_name_free("web1", [HV1, HV2])
