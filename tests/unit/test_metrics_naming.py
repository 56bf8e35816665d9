"""Metric paths: sanitized components, validated prefixes, VM series independent of the host."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudops.errors import CloudopsError
from cloudops.metrics import naming

SAFE = re.compile(r"^[A-Za-z0-9_\-]+$")


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("web-01", "web-01"),
        ("web.prod", "web_prod"),
        ("my vm", "my_vm"),
        ("a/b\\c", "a_b_c"),
        ("tab\there", "tab_here"),
        ("ünïcode", "_n_code"),
        ("", "_"),
        (3, "3"),
    ],
)
def test_sanitize(raw, clean):
    assert naming.sanitize(raw) == clean


@given(st.text())
def test_sanitize_always_gives_one_safe_component(text):
    assert SAFE.match(naming.sanitize(text))


@pytest.mark.parametrize("prefix", ["cloudops", "test.run-1", "a.b_c.d"])
def test_valid_prefixes(prefix):
    assert naming.validate_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["", ".cloudops", "cloudops.", "a..b", "cloud ops", "a/b", "metrics!", "ü", None])
def test_invalid_prefixes_are_user_errors(prefix):
    with pytest.raises(CloudopsError, match="metric prefix"):
        naming.validate_prefix(prefix)


def test_vm_paths_do_not_name_the_host():
    path = naming.vm_path("cloudops", "web.01", "disk", "vda", "read_bytes_per_s")
    assert path == "cloudops.vm.web_01.disk.vda.read_bytes_per_s"
    assert naming.vm_path("cloudops", "db", "cpu", "util_percent") == "cloudops.vm.db.cpu.util_percent"


def test_placement_and_hypervisor_paths():
    assert naming.placement_path("cloudops", "web", "hv1.lab") == "cloudops.vm.web.host.hv1_lab"
    assert naming.hv_path("cloudops", "hv1.lab", "memory", "free_bytes") == "cloudops.hv.hv1_lab.memory.free_bytes"
    assert naming.self_path("cloudops", "sent") == "cloudops.cloudops.metrics.sent"


@given(st.text(min_size=1), st.text(min_size=1), st.text(min_size=1))
def test_a_vm_path_always_has_the_same_depth(vm, device, field):
    path = naming.vm_path("p", vm, "disk", device, field)
    assert path.count(".") == 5
