"""vm.export / vm.import on a real lab, through the CLI.

Oracles are outside cloudops: ``qemu-img info``/``check`` of the export, ``sha256sum``, ``virsh`` on
every host, the pool directory, files inside the guests. One tiny VM (96 MiB) on hv1 is exported
while it runs; its export is imported once, on hv2. VM names start with "ex-".
"""

import hashlib
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cloudops.compute import guest, vms
from cloudops.ssh import connect
from tests.conftest import ROOT, cli, ok_json, one_line_error, refuse_control_tcp, run_in_vm

NAME = "ex-src"
COPY = "ex-copy"
POOL = "/var/lib/cloudops/disks"


def on_host(host, command) -> str:
    with connect(host) as hv:
        return hv.run(command, hide=True, in_stream=False).stdout


def in_guest(lab_inventory, name, command) -> str:
    return run_in_vm(lab_inventory, name, command)


def domstate(host, name) -> str:
    return on_host(host, f"virsh -c qemu:///system domstate {name}").strip()


@pytest.fixture(scope="module")
def vm(lab, lab_inventory, tiny_image):
    started = vms.start_vm(vms.VMSpec(name=NAME, image="tiny", memory=96, host="hv1", timeout=240), lab_inventory)
    guest.wait_until(lambda: in_guest(lab_inventory, NAME, "echo up") == "up", 120, f"a shell on {NAME}")
    in_guest(lab_inventory, NAME, "echo written-before-export > /root/marker && sync")
    yield started
    vms.delete_vm(NAME, lab_inventory)


@pytest.fixture(scope="module")
def exported(lab, vm, tmp_path_factory):
    """The VM's export, taken while it runs and has an internal snapshot (which the export leaves out)."""
    assert cli(lab, "vm.snapshot", NAME, "--create", "before").returncode == 0
    path = tmp_path_factory.mktemp("export") / "ex-src.qcow2"
    result = ok_json(cli(lab, "vm.export", NAME, str(path), "--json"))
    return path, result


def test_export_of_a_running_vm_is_flat_clean_and_checksummed(lab, lab_inventory, exported):
    path, result = exported
    assert result["changed"] is True and result["file"] == str(path)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["format"] == "qcow2" and "backing-filename" not in info and "full-backing-filename" not in info
    assert subprocess.run(["qemu-img", "check", str(path)], capture_output=True).returncode == 0
    desc = json.loads((path.parent / (path.name + ".json")).read_text())
    assert desc["disk"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert desc["disk"]["virtual_size"] == info["virtual-size"] and desc["state"] == "running"
    assert desc["memory"] == 96 and desc["networks"] == ["cloudops"] and desc["image"]["name"] == "tiny"
    assert desc["not_exported"]["snapshots"] == ["before"] and "snapshots not exported: before" in " ".join(
        result["notes"])
    assert subprocess.run(["qemu-img", "snapshot", "-l", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip() == ""  # the VM's internal snapshot is not in the export
    hv1 = lab_inventory.hosts["hv1"]
    assert sorted(on_host(hv1, f"ls -A {POOL}").split()) == sorted([f"{NAME}-seed.iso", f"{NAME}.qcow2"])  # host copy removed
    assert domstate(hv1, NAME) == "running"
    assert in_guest(lab_inventory, NAME, "cat /root/marker") == "written-before-export"


def test_import_on_another_host_keeps_the_guests_files(lab, lab_inventory, vm, exported):
    path, _ = exported
    made = ok_json(cli(lab, "vm.import", str(path), "--name", COPY, "--host", "hv2", "--json"))
    try:
        hv2 = lab_inventory.hosts["hv2"]
        assert made["host"] == "hv2" and made["ip"] != vm.ip and made["mac"] != vm.mac
        assert domstate(hv2, COPY) == "running"
        disk = f"{POOL}/{COPY}.qcow2"
        assert disk in on_host(hv2, f"virsh -c qemu:///system domblklist {COPY}")
        info = json.loads(on_host(hv2, f"qemu-img info -U --output=json {shlex.quote(disk)}"))
        assert "backing-filename" not in info and on_host(hv2, f"stat -c %a {shlex.quote(disk)}").strip() == "600"
        assert in_guest(lab_inventory, COPY, "cat /root/marker") == "written-before-export"
        assert in_guest(lab_inventory, COPY, "cat /etc/hostname") == COPY
        assert in_guest(lab_inventory, NAME, "cat /etc/hostname") == NAME  # the source still runs and answers
    finally:
        vms.delete_vm(COPY, lab_inventory)


def test_a_truncated_export_is_refused_and_nothing_is_made(lab, lab_inventory, exported, tmp_path):
    path, _ = exported
    bad = tmp_path / "cut.qcow2"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    shutil.copy(path.parent / (path.name + ".json"), tmp_path / "cut.qcow2.json")
    one_line_error(cli(lab, "vm.import", str(bad), "--name", "ex-cut"), "a truncated or altered export")
    for host in lab_inventory.hypervisors():
        assert "ex-cut" not in on_host(host, "virsh -c qemu:///system list --all --name").split()
        assert "ex-cut" not in on_host(host, f"ls -A {POOL} 2>/dev/null; virsh -c qemu:///system net-dumpxml cloudops"
                                             " 2>/dev/null || true")


def test_export_to_an_existing_file_needs_force(lab, lab_inventory, vm, tmp_path):
    target = tmp_path / "taken.qcow2"
    target.write_bytes(b"keep me")
    one_line_error(cli(lab, "vm.export", NAME, str(target)), "exists: not overwriting it")
    one_line_error(cli(lab, "vm.export", "ex-nobody", str(tmp_path / "n.qcow2")), "unknown VM 'ex-nobody'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.qcow2"]
    assert target.read_bytes() == b"keep me" and not (tmp_path / "taken.qcow2.json").exists()
    ok_json(cli(lab, "vm.export", NAME, str(target), "--force", "--json"))
    desc = json.loads((tmp_path / "taken.qcow2.json").read_text())
    assert desc["disk"]["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()


def test_export_to_a_full_filesystem_leaves_nothing_and_the_vm_runs(lab, lab_inventory, vm, tmp_path):
    """A 4 MiB tmpfs, mounted in a private mount namespace of the export's own (gone when it ends)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    export = " ".join(shlex.quote(a) for a in cli_args(lab, "vm.export", NAME, f"{mnt}/x.qcow2"))
    script = (f"mount -t tmpfs -o size=4m tmpfs {shlex.quote(str(mnt))} && {{ {export}; echo rc=$?; "
              f"echo listing:; ls -A {shlex.quote(str(mnt))}; }}")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    out = proc.stdout
    assert "rc=0" not in out and "rc=" in out, (out, proc.stderr)
    assert out.split("listing:")[1].split() == [], out  # no partial file, no description
    assert "not enough space" in proc.stderr or "filesystem is full" in proc.stderr, proc.stderr
    hv1 = lab_inventory.hosts["hv1"]
    assert sorted(on_host(hv1, f"ls -A {POOL}").split()) == sorted([f"{NAME}-seed.iso", f"{NAME}.qcow2"])
    assert domstate(hv1, NAME) == "running"
    assert in_guest(lab_inventory, NAME, "cat /root/marker") == "written-before-export"


def test_a_host_lost_in_the_middle_of_an_export_leaves_no_file_and_the_vm_runs(lab, lab_inventory, vm, tmp_path):
    """hv1 stops answering this machine just as its copy starts streaming: one line, no local file, the VM
    untouched; the copy the host could not be told to remove goes with the next export."""
    from cloudops.compute import export
    from cloudops.errors import CloudopsError

    cut = []

    def progress(message):
        if message.startswith("copying") and not cut:
            refuse_control_tcp(lab, "hv1", True)
            cut.append(message)

    target = tmp_path / "lost.qcow2"
    try:
        with pytest.raises(CloudopsError) as info:
            export.export_vm(NAME, target, lab_inventory.hypervisors(), progress=progress)
    finally:
        refuse_control_tcp(lab, "hv1", False)
    assert cut, "the copy never started"
    error = str(info.value)
    assert "\n" not in error and "the host stopped answering" in error and f"next vm.export of {NAME}" in error, error
    assert list(tmp_path.iterdir()) == []  # no partial file, no description, no temporary
    hv1 = lab_inventory.hosts["hv1"]
    left = [f for f in on_host(hv1, f"ls -A {POOL}").split() if f.startswith(f"{NAME}.export-")]
    assert len(left) == 1, left  # what the error said is there
    assert domstate(hv1, NAME) == "running"
    assert in_guest(lab_inventory, NAME, "cat /root/marker") == "written-before-export"
    again = cli(lab, "vm.export", NAME, str(tmp_path / "again.qcow2"))
    assert again.returncode == 0 and "an earlier export" in again.stderr, again.stderr
    assert [f for f in on_host(hv1, f"ls -A {POOL}").split() if f.startswith(f"{NAME}.export-")] == []


def cli_args(lab, *args) -> list:
    """The command line ``cli`` runs (see tests.conftest.invoke), for a shell of the test's own."""
    return ["env", f"PYTHONPATH={ROOT}", str(Path(sys.executable).parent / "invoke"), *args,
            "--inventory", str(lab.inventory_path)]


HOST_KEY = "dropbearkey -y -f /etc/dropbear/dropbear_ed25519_host_key | grep '^ssh-ed25519' | cut -d' ' -f2"
TWIN = "ex-twin"


SNAP_TWIN = "ex-snaptwin"


def test_a_clone_of_a_snapshot_of_a_running_vm_has_the_snapshots_files(lab, lab_inventory, vm):
    in_guest(lab_inventory, NAME, "echo at-snapshot > /root/cloned && sync")
    assert cli(lab, "vm.snapshot", NAME, "--create", "forclone").returncode == 0
    in_guest(lab_inventory, NAME, "echo after-snapshot > /root/cloned && sync")
    one_line_error(cli(lab, "vm.clone", NAME, SNAP_TWIN, "--snapshot", "nosuch"), "has no snapshot named 'nosuch'")
    one_line_error(cli(lab, "vm.clone", NAME, SNAP_TWIN, "--snapshot", "1bad"), "invalid snapshot name")
    for host in lab_inventory.hypervisors():
        assert SNAP_TWIN not in on_host(host, "virsh -c qemu:///system list --all --name").split()
    made = ok_json(cli(lab, "vm.clone", NAME, SNAP_TWIN, "--snapshot", "forclone", "--host", "hv2", "--json"))
    try:
        hv1, hv2 = lab_inventory.hosts["hv1"], lab_inventory.hosts["hv2"]
        assert domstate(hv1, NAME) == "running" and domstate(hv2, SNAP_TWIN) == "running"
        assert made["host"] == "hv2" and made["ip"] != vm.ip
        assert in_guest(lab_inventory, SNAP_TWIN, "cat /root/cloned") == "at-snapshot"
        assert in_guest(lab_inventory, NAME, "cat /root/cloned") == "after-snapshot"
        assert in_guest(lab_inventory, SNAP_TWIN, "cat /etc/hostname") == SNAP_TWIN
        disk = on_host(hv2, f"virsh -c qemu:///system domblklist {SNAP_TWIN} | awk '$1==\"vda\" {{print $2}}'").strip()
        info = json.loads(on_host(hv2, f"qemu-img info -U --output=json {shlex.quote(disk)}"))
        assert "backing-filename" not in info  # the import's own disk: flat
        assert "forclone" in on_host(hv1, f"virsh -c qemu:///system snapshot-list {NAME} --name").split()
    finally:
        vms.delete_vm(SNAP_TWIN, lab_inventory)


def test_a_clone_runs_beside_its_source_with_an_identity_of_its_own(lab, lab_inventory, vm):
    source_key = in_guest(lab_inventory, NAME, HOST_KEY)
    one_line_error(cli(lab, "vm.clone", NAME, TWIN), "stop it first to clone it")
    for host in lab_inventory.hypervisors():
        assert TWIN not in on_host(host, "virsh -c qemu:///system list --all --name").split()
    assert cli(lab, "vm.stop", NAME).returncode == 0
    made = ok_json(cli(lab, "vm.clone", NAME, TWIN, "--host", "hv2", "--json"))
    try:
        ok_json(cli(lab, "vm.poweron", NAME, "--json"))
        hv1, hv2 = lab_inventory.hosts["hv1"], lab_inventory.hosts["hv2"]
        assert domstate(hv1, NAME) == "running" and domstate(hv2, TWIN) == "running"
        assert made["ip"] != vm.ip and made["mac"] != vm.mac
        assert in_guest(lab_inventory, NAME, "cat /etc/hostname") == NAME
        assert in_guest(lab_inventory, TWIN, "cat /etc/hostname") == TWIN
        twin_key = in_guest(lab_inventory, TWIN, HOST_KEY)
        assert twin_key and twin_key != source_key and in_guest(lab_inventory, NAME, HOST_KEY) == source_key
        assert in_guest(lab_inventory, TWIN, "cat /root/marker") == "written-before-export"
    finally:
        vms.delete_vm(TWIN, lab_inventory)
