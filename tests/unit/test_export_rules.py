"""Export and import without a hypervisor: the backup XML, the target checks, streaming, and what an import refuses."""

import errno
import hashlib
import io
import json
import subprocess
import xml.etree.ElementTree as ET

import pytest

from cloudops.compute import export, vmimport, vms
from cloudops.errors import CloudopsError
from cloudops.imaging import store as images

DOMAIN = """<domain type='qemu'><name>vm1</name><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/d/vm1.qcow2'/><target dev='vda'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/d/vm1-data.qcow2'/><target dev='vdb'/>
</disk>
<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='/d/vm1-seed.iso'/><target dev='hdc'/>
<readonly/></disk></devices></domain>"""


def test_the_backup_copies_the_root_disk_alone_into_a_new_qcow2():
    assert export.root_disk(DOMAIN) == ("vda", "/d/vm1.qcow2")
    assert export.other_disks(DOMAIN, "vda") == ["vdb"]
    root = ET.fromstring(export.backup_xml(DOMAIN, "vda", "/d/vm1.export-1.qcow2"))
    assert root.get("mode") == "push"
    disks = {d.get("name"): d for d in root.findall("disks/disk")}
    assert {n: d.get("backup") for n, d in disks.items()} == {"vda": "yes", "vdb": "no", "hdc": "no"}
    assert disks["vda"].find("target").get("file") == "/d/vm1.export-1.qcow2"
    assert disks["vda"].find("driver").get("type") == "qcow2"


def test_a_domain_without_a_qcow2_disk_cannot_be_exported():
    with pytest.raises(CloudopsError, match="no writable qcow2 disk"):
        export.root_disk("<domain><devices/></domain>")


def test_qemu_img_info_says_whether_there_is_a_backing_file():
    flat = export.parse_qemu_img_info(json.dumps({"format": "qcow2", "virtual-size": 134217728}))
    assert flat == {"format": "qcow2", "virtual_size": 134217728, "backing": None}
    overlay = export.parse_qemu_img_info(json.dumps({"format": "qcow2", "virtual-size": 1,
                                                     "backing-filename": "/images/x.qcow2"}))
    assert overlay["backing"] == "/images/x.qcow2"


def test_an_existing_target_is_refused_without_force(tmp_path):
    target = tmp_path / "out.qcow2"
    assert export.check_target(target, force=False) == target
    target.write_bytes(b"old")
    with pytest.raises(CloudopsError, match="exists: not overwriting it"):
        export.check_target(target, force=False)
    assert export.check_target(target, force=True) == target
    target.unlink()
    (tmp_path / "out.qcow2.json").write_text("{}")
    with pytest.raises(CloudopsError, match=r"out\.qcow2\.json exists"):
        export.check_target(target, force=False)
    with pytest.raises(CloudopsError, match="is a directory"):
        export.check_target(tmp_path, force=True)
    with pytest.raises(CloudopsError, match="is not a directory"):
        export.check_target(tmp_path / "nowhere" / "x.qcow2", force=True)


def test_too_little_free_space_is_refused_before_copying(tmp_path):
    with pytest.raises(CloudopsError, match="not enough space"):
        export.check_free_space(tmp_path, 1 << 60)


class _Remote(io.BytesIO):
    def prefetch(self, _size):
        pass


class _Channel:
    timeout = None

    def settimeout(self, seconds):
        self.timeout = seconds


class _Sftp:
    def __init__(self, data, fail_after=None):
        self.data, self.fail_after, self.channel = data, fail_after, _Channel()

    def get_channel(self):
        return self.channel

    def open(self, _path, _mode):
        if self.fail_after is None:
            return _Remote(self.data)
        remote = _Remote(self.data)
        first = remote.read

        def read(n, served=[0]):  # noqa: B006 - the bytes served so far, across calls
            if served[0] >= self.fail_after:
                raise EOFError()  # paramiko's word for a transport that went away
            chunk = first(min(n, self.fail_after - served[0]))
            served[0] += len(chunk)
            return chunk

        remote.read = read
        return remote


class _Bar:
    """What export.stream draws on (cloudops.progress.Bar's calls), recorded."""

    label = "disk"

    def __init__(self):
        self.updates = []

    def start(self):
        self.updates.append("started")
        return self

    def update(self, done):
        self.updates.append(done)

    def stop(self):
        self.updates.append("stopped")

    def finish(self):
        self.updates.append("finished")


def test_streaming_checksums_what_it_writes():
    data = b"x" * (export.CHUNK * 2 + 5)
    out, bar = io.BytesIO(), _Bar()
    assert export.stream(_Sftp(data), "/r", len(data), out, bar) == hashlib.sha256(data).hexdigest()
    assert out.getvalue() == data and bar.updates[-2:] == [len(data), "finished"] and bar.updates[0] == "started"


def test_a_short_read_is_an_error_not_a_short_export():
    with pytest.raises(CloudopsError, match="got 3 of 10 bytes"):
        export.stream(_Sftp(b"abc"), "/r", 10, io.BytesIO(), bar := _Bar())
    assert bar.updates[-1] == "stopped"  # no final line for a copy that failed


def test_a_host_that_stops_answering_is_one_line_and_reads_never_wait_forever():
    sftp = _Sftp(b"y" * (export.CHUNK * 3), fail_after=export.CHUNK)
    with pytest.raises(CloudopsError, match=r"^disk: the host stopped answering after 1048576 of 3145728 bytes "
                                            r"\(EOFError\)$"):
        export.stream(sftp, "/r", export.CHUNK * 3, io.BytesIO(), _Bar())
    assert sftp.channel.timeout == export.STALL


def test_a_full_filesystem_is_said_in_one_line():
    message = str(export._write_error("/mnt/x.qcow2", OSError(errno.ENOSPC, "No space left on device")))
    assert message == "cannot write /mnt/x.qcow2: the filesystem is full (the partial file was removed)"


# ---------------------------------------------------------------- import

def _export(tmp_path, **changes):
    disk = tmp_path / "e.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    data = {"format": export.FORMAT, "version": export.VERSION, "memory": 96, "vcpus": 1, "firmware": "bios",
            "networks": ["cloudops"], "image": {"id": "ab" * 32, "name": "tiny", "boot": None},
            "disk": {"file": disk.name, "format": "qcow2", "virtual_size": 16 << 20, "size": disk.stat().st_size,
                     "sha256": hashlib.sha256(disk.read_bytes()).hexdigest()}}
    data.update(changes)
    (tmp_path / "e.qcow2.json").write_text(json.dumps(data))
    return disk, data


def test_an_intact_export_passes(tmp_path):
    disk, _ = _export(tmp_path)
    vmimport.verify(disk, vmimport.read_description(disk))


def test_a_truncated_export_is_refused(tmp_path):
    disk, data = _export(tmp_path)
    disk.write_bytes(disk.read_bytes()[:-100])
    with pytest.raises(CloudopsError, match="a truncated or altered export, not importing it"):
        vmimport.verify(disk, data)


def test_an_altered_export_is_refused(tmp_path):
    disk, data = _export(tmp_path)
    content = bytearray(disk.read_bytes())
    content[-1] ^= 1
    disk.write_bytes(bytes(content))
    with pytest.raises(CloudopsError, match="sha256 is .* an altered export"):
        vmimport.verify(disk, data)


def test_an_overlay_is_not_an_export(tmp_path):
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    disk = tmp_path / "e.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(disk)], check=True)
    data = {"disk": {"size": disk.stat().st_size, "sha256": hashlib.sha256(disk.read_bytes()).hexdigest()}}
    with pytest.raises(CloudopsError, match="not a standalone qcow2"):
        vmimport.verify(disk, data)


def test_descriptions_that_are_missing_or_foreign_are_refused(tmp_path):
    disk, _ = _export(tmp_path)
    (tmp_path / "e.qcow2.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CloudopsError, match="not a cloudops export description"):
        vmimport.read_description(disk)
    (tmp_path / "e.qcow2.json").write_text("{not json")
    with pytest.raises(CloudopsError, match="not a cloudops export description"):
        vmimport.read_description(disk)
    (tmp_path / "e.qcow2.json").unlink()
    with pytest.raises(CloudopsError, match=r"e\.qcow2\.json is missing"):
        vmimport.read_description(disk)
    with pytest.raises(CloudopsError, match="no such file"):
        vmimport.read_description(tmp_path / "none.qcow2")
    _export(tmp_path, disk={"size": 1})
    with pytest.raises(CloudopsError, match="lacks disk.sha256, disk.virtual_size"):
        vmimport.read_description(disk)


def test_a_direct_boot_image_must_be_in_the_catalog(tmp_path):
    _, data = _export(tmp_path, image={"id": "cd" * 32, "name": "tiny", "boot": {"cmdline": "x"}})
    with pytest.raises(CloudopsError, match="boots the kernel of image tiny .* image.add it first"):
        vmimport.image_for(data)


def test_a_bootloader_image_is_not_needed(tmp_path):
    _, data = _export(tmp_path)
    image = vmimport.image_for(data)
    assert isinstance(image, images.Image) and image.id == "ab" * 32 and not image.direct_boot


def test_an_imported_disk_takes_a_seed_only():
    spec = vms.VMSpec(name="imp1", image="x", customize="guestfs", disk_file="/tmp/e.qcow2")
    with pytest.raises(CloudopsError, match="customized by its seed only"):
        vms.validate(spec)


def test_a_full_filesystem_mid_copy_leaves_no_partial_file(tmp_path, monkeypatch):
    def fill_up(_sftp, _remote, _size, out, _bar):
        out.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "stream", fill_up)
    tmp = tmp_path / ".tmp-x.qcow2"
    with pytest.raises(CloudopsError, match=r"cannot write .*x\.qcow2: the filesystem is full"):
        export.fetch_to(None, "/r", 10, tmp, _Bar(), tmp_path / "x.qcow2")
    assert list(tmp_path.iterdir()) == []


def _qemu_io(disk, command) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(disk)], capture_output=True, text=True)


def test_the_convert_of_a_snapshot_is_flat_and_holds_the_snapshots_data(tmp_path):
    """qemu-img itself runs the command: the copy of snapshot s1 has the data s1 saw, through the backing file."""
    base, disk = tmp_path / "base.qcow2", tmp_path / "vm1.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    assert _qemu_io(base, "write -P 0x41 0 64k").returncode == 0  # in the image only
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(disk)], check=True)
    assert _qemu_io(disk, "write -P 0x42 1M 64k").returncode == 0
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(disk)], check=True)
    assert _qemu_io(disk, "write -P 0x43 1M 64k").returncode == 0  # after the snapshot
    for snap, at_1m in (("s1", "0x42"), (None, "0x43")):
        out = tmp_path / f"out-{snap}.qcow2"
        subprocess.run(["bash", "-c", export.convert_command(str(disk), str(out), snap)], check=True)
        info = export.parse_qemu_img_info(subprocess.run(["qemu-img", "info", "--output=json", str(out)],
                                                         capture_output=True, text=True, check=True).stdout)
        assert info["format"] == "qcow2" and info["backing"] is None
        for check in ("read -P 0x41 0 64k", f"read -P {at_1m} 1M 64k"):
            read = _qemu_io(out, check)
            assert read.returncode == 0 and "Pattern verification failed" not in read.stdout, (snap, check)
    missing = subprocess.run(["bash", "-c", export.convert_command(str(disk), str(tmp_path / "x.qcow2"), "nope")],
                             capture_output=True, text=True)
    assert missing.returncode != 0


def test_a_running_vms_snapshot_is_read_with_shared_locks_and_names_are_quoted():
    command = export.convert_command("/d/vm 1.qcow2", "/d/out.qcow2", "s1", running=True)
    assert command == "qemu-img convert -U -l snapshot.name=s1 -O qcow2 '/d/vm 1.qcow2' /d/out.qcow2"
    assert " -U " not in export.convert_command("/d/a.qcow2", "/d/b.qcow2", "s1")
