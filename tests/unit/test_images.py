"""The image store's checks that need no host: names, formats, checksums, replace."""

import subprocess

import pytest

from cloudops.errors import CloudopsError
from cloudops.imaging import store as images


@pytest.fixture(autouse=True)
def private_store(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDOPS_VAR", str(tmp_path / "var"))


def qcow2(path, size="4M"):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


@pytest.mark.parametrize("name", ["a<b>", "x';rm -rf /;'", "$(reboot)", "a b", "-lead", "a" * 64, "A/B"])
def test_bad_image_names_are_refused_and_nothing_is_stored(tmp_path, name):
    with pytest.raises(CloudopsError, match="invalid image name"):
        images.add_image(qcow2(tmp_path / "d.qcow2"), name=name)
    assert images.list_images() == []


def test_add_is_content_addressed_and_idempotent(tmp_path):
    image, changed = images.add_image(qcow2(tmp_path / "d.qcow2"), name="d")
    assert changed and len(image.id) == 64 and image.format == "qcow2" and image.virtual_size == 4 << 20
    again, changed_again = images.add_image(tmp_path / "d.qcow2", name="d")
    assert again.id == image.id and not changed_again
    assert images.resolve(image.id[:12]).name == "d"


def test_checksum_mismatch_is_refused(tmp_path):
    with pytest.raises(CloudopsError, match="checksum mismatch"):
        images.add_image(qcow2(tmp_path / "d.qcow2"), name="d", sha256="0" * 64)
    assert images.list_images() == []


def test_a_taken_name_needs_replace(tmp_path):
    first, _ = images.add_image(qcow2(tmp_path / "a.qcow2", "4M"), name="web")
    with pytest.raises(CloudopsError, match="taken"):
        images.add_image(qcow2(tmp_path / "b.qcow2", "8M"), name="web")
    second, _ = images.add_image(tmp_path / "b.qcow2", name="web", replace=True)
    assert images.resolve("web").id == second.id
    assert images.resolve(first.id).name == f"web-{first.id[:8]}"


def test_raw_without_partition_table_and_backed_qcow2_are_refused(tmp_path):
    raw = tmp_path / "r.img"
    raw.write_bytes(b"\0" * 65536)
    with pytest.raises(CloudopsError, match="not a disk image"):
        images.add_image(raw, name="r")
    base = qcow2(tmp_path / "base.qcow2")
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(top)], check=True)
    with pytest.raises(CloudopsError, match="backing file"):
        images.add_image(top, name="top")


def test_unknown_image_names_the_known_ones(tmp_path):
    images.add_image(qcow2(tmp_path / "d.qcow2"), name="known")
    with pytest.raises(CloudopsError, match="unknown image 'nope'.*known"):
        images.resolve("nope")
