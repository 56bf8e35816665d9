"""A guest that cannot boot ends vm.start's wait early, with its console's last lines, and leaves nothing.

Faults made for real: an image whose /sbin/init is not a program (the kernel panics when the
initramfs hands over to it), and a domain destroyed with virsh while vm.start waits for it.
A start terminated with SIGTERM (as `timeout` and cron stop a command) is undone the same way.
The oracle is the lab hosts' own libvirt and pool directories (tests.lab.test_vms.leftovers).
"""

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cloudops.ssh import connect
from tests.conftest import ROOT, invoke
from tests.lab.test_vms import leftovers


def _built_tiny() -> Path:
    from cloudops.imaging import build

    return build.build_image("tiny")  # cached: the path of the session's build


@pytest.fixture(scope="module")
def panic_image(lab, tiny_image, tmp_path_factory):
    """The tiny image with a text file as /sbin/init: a real kernel panic at the hand-over to the root."""
    work = tmp_path_factory.mktemp("panic")
    disk = work / "t-panic.qcow2"
    shutil.copy(tiny_image.local_path, disk)
    boot = Path(str(_built_tiny()) + ".boot")
    shutil.copytree(boot, disk.with_name(disk.name + ".boot"))  # its kernel, initrd and cmdline: direct boot
    not_a_program = work / "init"
    not_a_program.write_text("this is not a program\n")
    proc = invoke("image.customize", "--disk", str(disk), "--file", f"/sbin/init:{not_a_program}")
    assert proc.returncode == 0, proc.stderr
    proc = invoke("image.add", str(disk), "--name", "t-panic", "--replace")
    assert proc.returncode == 0, proc.stderr
    yield "t-panic"
    invoke("image.rm", "t-panic", "--inventory", str(lab.inventory_path))


def test_a_kernel_panic_ends_the_wait_with_the_console_and_nothing_is_left(lab, lab_inventory, panic_image):
    name = "t-panic1"
    proc = invoke("vm.start", "--name", name, "--image", panic_image, "--memory", "96", "--host", "hv1",
                  "--timeout", "900", "--inventory", str(lab.inventory_path))
    assert proc.returncode != 0
    assert "timed out" not in proc.stderr, proc.stderr  # it did not wait out the 900 s
    error = proc.stderr[proc.stderr.index("cloudops: "):]
    assert error.startswith(f"cloudops: {name} will not boot to SSH (kernel panic: Kernel panic - not syncing"), error
    assert "the console's last lines:\n  | " in error
    assert "Traceback" not in proc.stderr
    assert leftovers(lab_inventory, name) == []


def domains(host) -> list[str]:
    with connect(host) as hv:
        out = hv.run("virsh -c qemu:///system list --name", hide=True, in_stream=False).stdout
    return out.split()


def start_until_it_waits(lab, name):
    """A real `invoke vm.start` process, returned once it waits for the guest (its disk and domain made)."""
    cmd = [str(Path(sys.executable).parent / "invoke"), "vm.start", "--name", name, "--memory", "96", "--host",
           "hv1", "--timeout", "900", "--inventory", str(lab.inventory_path)]
    starting = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said = []
    for line in starting.stderr:
        said.append(line)
        if line.startswith("… waiting for an IP address"):
            break
    return starting, said


@pytest.mark.parametrize("fault", ["virsh destroy", "SIGTERM"])
def test_a_start_whose_domain_is_destroyed_or_that_is_terminated_ends_and_leaves_nothing(lab, lab_inventory,
                                                                                         tiny_image, fault):
    name = "t-gone" if fault == "virsh destroy" else "t-term"
    hv1 = lab_inventory.hosts["hv1"]
    starting, said = start_until_it_waits(lab, name)
    try:
        assert name in domains(hv1), "".join(said)
        if fault == "virsh destroy":
            with connect(hv1) as hv:
                hv.run(f"virsh -c qemu:///system destroy {name}", hide=True, in_stream=False)
        else:
            starting.send_signal(signal.SIGTERM)  # what `timeout` and cron send
        _out, rest = starting.communicate(timeout=600)
    finally:
        if starting.poll() is None:
            starting.kill()
    err = "".join(said) + rest
    if fault == "virsh destroy":
        assert starting.returncode == 1
        assert f"cloudops: {name} stopped while booting" in err, err
    else:
        assert starting.returncode == 130, err
        assert err.rstrip().endswith("cloudops: interrupted"), err
    assert "timed out" not in err and "Traceback" not in err
    assert leftovers(lab_inventory, name) == []
