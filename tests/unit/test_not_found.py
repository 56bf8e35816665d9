"""A VM no host has is NotFound (a CloudopsError), and callers branch on the type, not on the message."""

from types import SimpleNamespace

import pytest

from cloudops.compute import vms
from cloudops.errors import CloudopsError, NotFound

HV1, HV2 = SimpleNamespace(name="hv1"), SimpleNamespace(name="hv2")


def finding(monkeypatch, found, unreachable=()):
    monkeypatch.setattr(vms, "find", lambda name, hosts: (list(found), list(unreachable)))


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
