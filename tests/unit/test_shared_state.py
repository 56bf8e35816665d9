"""Cloud state that two operators share: each operator is a store handle on the same store.

``as_operator(n)`` switches this process to operator n's own handle (and own state directory, so
nothing is shared through local files): what one writes, the other must see and honour.
"""

import pytest

from cloudops import paths, state
from cloudops.compute import guest
from cloudops.errors import CloudopsError
from cloudops.hosts import maintenance
from cloudops.migration import journal
from cloudops.state.sqlite import SqliteStore


@pytest.fixture
def as_operator(tmp_path, monkeypatch):
    db = tmp_path / "shared.sqlite"

    def switch(n):
        monkeypatch.setenv("CLOUDOPS_STATE_DIR", str(tmp_path / f"operator{n}"))
        state.use(SqliteStore(db))

    return switch


def test_maintenance_set_by_one_operator_is_seen_by_the_other(as_operator):
    as_operator("a")
    assert maintenance.set_maintenance("hv1", True) is True
    as_operator("b")
    assert maintenance.hosts_in_maintenance() == {"hv1"}
    assert maintenance.set_maintenance("hv1", True) is False  # no change
    assert maintenance.set_maintenance("hv1", False) is True
    as_operator("a")
    assert maintenance.hosts_in_maintenance() == set()


def test_a_vm_started_by_one_operator_is_verified_by_the_other(as_operator):
    as_operator("a")
    guest.record_host_keys("web", "10.0.0.5", [("ssh-ed25519", "AAAAkeyA")])
    as_operator("b")
    text = guest.known_hosts().read_text()
    assert text == "web,10.0.0.5 ssh-ed25519 AAAAkeyA\n"
    assert str(guest.known_hosts()).startswith(str(paths.var_dir()))  # B's own file, written from the store
    guest.record_host_keys("db", "10.0.0.5", [("ssh-ed25519", "AAAAkeyB")])  # the address went to another VM
    assert guest.known_hosts().read_text() == "db,10.0.0.5 ssh-ed25519 AAAAkeyB\n"
    guest.forget_host_keys("db", "10.0.0.5")
    as_operator("a")
    assert guest.known_hosts().read_text() == ""


def test_new_vms_trust_every_operators_cloud_key_and_no_private_key_is_stored(as_operator, tmp_path):
    as_operator("a")
    key_a = guest.cloud_public_key()
    guest.trusted_public_keys()
    as_operator("b")
    key_b = guest.cloud_public_key()
    assert key_a != key_b
    assert guest.trusted_public_keys() == [key_b, key_a]  # this machine's own first
    raw = (tmp_path / "shared.sqlite").read_bytes()
    assert b"PRIVATE KEY" not in raw and b"OPENSSH" not in raw


def test_only_one_operator_can_begin_migrating_a_vm(as_operator):
    as_operator("a")
    journal.begin("web", "hv1", "hv2", live=True, shared=False, disks=[])
    as_operator("b")
    with pytest.raises(CloudopsError, match="web is being migrated by .*hv1 -> hv2.*--recover"):
        journal.begin("web", "hv1", "hv3", live=True, shared=False, disks=[])
    assert [r["target"] for r in journal.unfinished()] == ["hv2"]
    journal.end("web")
    assert journal.unfinished() == []


def test_corrupt_host_keys_are_refused_naming_the_key(as_operator):
    as_operator("a")
    state.current().create("hostkeys/web", {"ip": 5})
    with pytest.raises(state.StoreCorrupt, match="hostkeys/web"):
        guest.known_hosts()


def test_the_image_catalog_is_shared_but_image_files_stay_on_their_machine(as_operator, tmp_path):
    import subprocess
    from types import SimpleNamespace

    from cloudops.imaging import store as images

    disk = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "4M"], check=True)
    as_operator("a")
    image, _ = images.add_image(disk, name="base")
    images._record_host(image, "hv2")
    as_operator("b")
    assert images.resolve("base").id == image.id  # B resolves A's name to the same id
    with pytest.raises(CloudopsError, match="image base is not in this machine's image store.*hold it: hv2"):
        images.ensure_on_host(image, SimpleNamespace(name="hv1", vars={}), conn=_NoImages())
    with pytest.raises(CloudopsError, match="image name 'base' is taken"):
        other = tmp_path / "e.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), "8M"], check=True)
        images.add_image(other, name="base")


class _NoImages:
    """A host connection whose image directory is empty."""

    def run(self, command, **_kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(stdout="", stderr="", ok=True)
