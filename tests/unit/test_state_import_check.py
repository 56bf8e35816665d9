"""state.import (older cloudops's JSON files into the store) and state.check's comparison (pure)."""

import json

import pytest

from cloudops.errors import CloudopsError
from cloudops.state import check, importer


@pytest.fixture
def legacy(tmp_path):
    """A state directory as cloudops wrote it before the state store."""
    root = tmp_path / "var"
    (root / "cloud" / "ipam").mkdir(parents=True)
    (root / "cloud" / "migrating").mkdir()
    (root / "images").mkdir()
    (root / "cloud" / "ipam" / "lan.json").write_text(json.dumps(
        {"format": 1, "network": "lan", "cidr": "10.0.0.0/24", "allocations": {"web": {"ip": "10.0.0.2", "mac": "52:54:00:00:00:02"}}}))
    (root / "cloud" / "maintenance.json").write_text(json.dumps({"hv2": True, "hv3": False}))
    (root / "images" / "catalog.json").write_text(json.dumps({"a" * 64: {"id": "a" * 64, "name": "tiny"}}))
    (root / "cloud" / "known_hosts").write_text("web,10.0.0.2 ssh-ed25519 AAAAweb\n")
    (root / "cloud" / "migrating" / "db.json").write_text(json.dumps({"name": "db", "source": "hv1", "target": "hv2"}))
    (root / "cloud" / "migrations.jsonl").write_text(json.dumps({"time": 1.5, "name": "web", "source": "hv1"}) + "\n")
    return root


def test_import_moves_every_kind_and_a_second_run_changes_nothing(legacy, _own_state_store):
    store = _own_state_store
    dry = importer.apply(store, importer.read_legacy(legacy), dry_run=True)
    assert len(dry.added) == 6 and store.items("") == {}  # dry run: nothing written
    report = importer.apply(store, importer.read_legacy(legacy))
    assert sorted(report.added) == sorted(dry.added) and report.conflicts == []
    assert store.value("ipam/lan")["allocations"]["web"]["ip"] == "10.0.0.2"
    assert store.value("maintenance/hv2")["on"] is True and store.get("maintenance/hv3") is None
    assert store.value("images/catalog")["a" * 64]["name"] == "tiny"
    assert store.value("hostkeys/web") == {"ip": "10.0.0.2", "keys": [["ssh-ed25519", "AAAAweb"]]}
    assert store.value("migrating/db")["target"] == "hv2"
    assert store.value("migrations/1.500-web")["source"] == "hv1"
    again = importer.apply(store, importer.read_legacy(legacy))
    assert again.added == [] and again.conflicts == [] and len(again.unchanged) == 6


def test_import_never_overwrites_what_the_store_holds(legacy, _own_state_store):
    _own_state_store.create("hostkeys/web", {"ip": "10.0.0.9", "keys": []})
    report = importer.apply(_own_state_store, importer.read_legacy(legacy))
    assert report.conflicts == ["hostkeys/web"]
    assert _own_state_store.value("hostkeys/web")["ip"] == "10.0.0.9"


def test_unreadable_legacy_files_are_one_clear_error(legacy):
    (legacy / "cloud" / "ipam" / "bad.json").write_text("{not json")
    with pytest.raises(CloudopsError, match="cannot import .*bad.json"):
        importer.read_legacy(legacy)
    with pytest.raises(CloudopsError, match="is not a directory"):
        importer.read_legacy(legacy / "nothing")


def _facts(vms, files=None, local=(), unreachable=()):
    return check.Facts(vms=vms, image_files=files or {}, local_images=set(local), unreachable=list(unreachable))


def test_check_lists_orphans_both_ways(_own_state_store):
    store = _own_state_store
    store.create("ipam/lan", {"cidr": "10.0.0.0/24", "allocations": {
        "web": {"ip": "10.0.0.2", "mac": "m2"}, "gone": {"ip": "10.0.0.3", "mac": "m3"},
        "moved": {"ip": "10.0.0.4", "mac": "m4"}}})
    store.create("images/catalog", {"a" * 64: {"id": "a" * 64, "name": "tiny"}, "b" * 64: {"id": "b" * 64, "name": "lost"}})
    store.create("hostkeys/ghost", {"ip": "10.0.0.7", "keys": []})
    store.create("migrating/db", {"source": "hv1", "target": "hv2", "phase": "unknown"})
    vms = [{"name": "web", "host": "hv1", "network": "lan", "ip": "10.0.0.2", "mac": "m2"},
           {"name": "moved", "host": "hv2", "network": "lan", "ip": "10.0.0.9", "mac": "m4"},
           {"name": "stray", "host": "hv2", "network": "lan", "ip": "10.0.0.5", "mac": "m5"}]
    report = check.compare(store, _facts(vms, files={"a" * 64: ["hv1"], "c" * 64: ["hv2"]}))
    kinds = sorted((f.kind, f.detail.split()[0]) for f in report.findings)
    assert kinds == [("allocation-mismatch", "moved"), ("allocation-without-vm", "gone"),
                     ("catalog-entry-without-files", "lost"), ("host-keys-without-vm", "ghost"),
                     ("image-file-not-in-catalog", "c" * 12), ("unfinished-migration", "hv1"),
                     ("vm-without-allocation", "stray")]
    assert not report.clean


def test_check_with_a_host_missing_calls_nothing_an_orphan_it_could_not_see(_own_state_store):
    _own_state_store.create("ipam/lan", {"cidr": "10.0.0.0/24", "allocations": {"web": {"ip": "10.0.0.2", "mac": "m"}}})
    report = check.compare(_own_state_store, _facts([], unreachable=["hv3: connection refused"]))
    assert report.findings == [] and report.unreachable == ["hv3: connection refused"] and not report.clean


def test_check_of_an_agreeing_cloud_is_clean(_own_state_store):
    _own_state_store.create("ipam/lan", {"cidr": "10.0.0.0/24", "allocations": {"web": {"ip": "10.0.0.2", "mac": "m"}}})
    report = check.compare(_own_state_store, _facts([{"name": "web", "host": "hv1", "network": "lan",
                                                      "ip": "10.0.0.2", "mac": "m"}]))
    assert report.clean and report.findings == []


def test_check_compares_every_nic_of_a_vm_with_its_allocation_on_that_network(_own_state_store):
    store = _own_state_store
    store.create("ipam/nat", {"cidr": "192.168.150.0/24", "allocations": {"two": {"ip": "192.168.150.2", "mac": "m1"},
                                                                           "three": {"ip": "192.168.150.3", "mac": "m3"}}})
    store.create("ipam/lan", {"cidr": "10.0.0.0/24", "allocations": {"two": {"ip": "10.0.0.100", "mac": "m2"},
                                                                      "three": {"ip": "10.0.0.101", "mac": "m4"}}})
    nic = lambda network, ip, mac: {"network": network, "ip": ip, "mac": mac}  # noqa: E731
    two = {"name": "two", "host": "hv1", "network": "nat", "ip": "192.168.150.2", "mac": "m1",
           "nics": [nic("nat", "192.168.150.2", "m1"), nic("lan", "10.0.0.100", "m2")]}
    assert check.compare(store, _facts([two, {"name": "three", "host": "hv2", "network": "nat", "ip": "192.168.150.3",
                                              "mac": "m3", "nics": [nic("nat", "192.168.150.3", "m3"),
                                                                    nic("lan", "10.0.0.101", "m4")]}])).clean
    # the second NIC's address differs from the store's; a VM's NIC on a network it holds nothing on
    moved = {**two, "nics": [two["nics"][0], nic("lan", "10.0.0.150", "m2")]}
    stray = {"name": "three", "host": "hv2", "network": "nat", "ip": "192.168.150.3", "mac": "m3",
             "nics": [nic("nat", "192.168.150.3", "m3"), nic("lan", "10.0.0.101", "m4"), nic("dmz", "10.9.0.5", "m5")]}
    store.create("ipam/dmz", {"cidr": "10.9.0.0/24", "allocations": {}})
    kinds = sorted((f.kind, f.key, f.detail.split()[0]) for f in check.compare(store, _facts([moved, stray])).findings)
    assert kinds == [("allocation-mismatch", "ipam/lan", "two"), ("vm-without-allocation", "ipam/dmz", "three")]


def test_check_compares_vm_records_with_where_the_vms_are(_own_state_store):
    store = _own_state_store
    for name, host in (("web", "hv1"), ("moved", "hv1"), ("gone", "hv2")):
        store.create(f"vms/{name}", {"name": name, "host": host})
    store.create("ha/hv3", {"missing_since": 1.0, "dead_since": 31.0})
    store.create("ha/hv4", {"missing_since": 1.0})  # missing, not dead yet: nothing to say
    vms = [{"name": "web", "host": "hv1"}, {"name": "moved", "host": "hv2"}]
    report = check.compare(store, _facts(vms))
    assert sorted((f.kind, f.key) for f in report.findings) == [
        ("dead-host", "ha/hv3"), ("record-elsewhere", "vms/moved"), ("record-without-vm", "vms/gone")]
    assert "not fenced" in next(f.detail for f in report.findings if f.kind == "dead-host")
    unseen = check.compare(store, _facts(vms, unreachable=["hv2: refused"]))
    assert "record-without-vm" not in {f.kind for f in unseen.findings}
