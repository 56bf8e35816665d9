"""The tiny image end to end: build (once per session), boot under QEMU/TCG with a NoCloud seed,
customize offline with libguestfs and boot without a seed, bad input.

Every QEMU started here runs with user-mode networking (local to the QEMU process,
SSH forwarded on 127.0.0.1 only) and is killed by pid in the fixture teardown.
Timings are written to var/test-timings/image.json and printed at the end of the session.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from cloudops import passwords, paths
from cloudops.errors import CloudopsError

pytestmark = pytest.mark.slow

QEMU = shutil.which("qemu-system-x86_64")
BOOT_TIMEOUT = 180
# The serial log holds firmware output and terminal escapes too: search, do not anchor.
HOSTKEY_RE = re.compile(r"cloudops-tiny: hostkey (ssh-ed25519) ([A-Za-z0-9+/=]+)")
CLOUD_INIT_HOSTKEY_RE = re.compile(r"BEGIN SSH HOST KEY KEYS-----.*?^(ssh-ed25519) ([A-Za-z0-9+/=]+)", re.S | re.M)
SSH_OPTS = ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10",
            "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR"]  # fmt: skip


def _have_guestfs():
    try:
        import guestfs  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


if not (QEMU and shutil.which("qemu-img") and shutil.which("ssh") and _have_guestfs()):
    pytest.skip("needs qemu-system-x86_64, qemu-img, ssh and python3-guestfs", allow_module_level=True)


@pytest.fixture(scope="session")
def timings():
    data = {}
    yield data
    out = paths.var_dir() / "test-timings" / "image.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print("\nimage timings (s):", json.dumps(data, sort_keys=True))


@pytest.fixture(scope="session")
def tiny_image(timings):
    """The tiny image, built once per session (CLOUDOPS_TEST_REBUILD=1 forces a fresh build)."""
    from cloudops.imaging.build import build_image

    started = time.monotonic()
    path = build_image("tiny", force=os.environ.get("CLOUDOPS_TEST_REBUILD") == "1")
    timings["build_or_cache_s"] = round(time.monotonic() - started, 1)
    return path


@pytest.fixture(scope="session")
def ssh_key(tmp_path_factory):
    d = tmp_path_factory.mktemp("sshkey")
    key = d / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cloudops-test", "-f", str(key)],
                   check=True)  # fmt: skip
    return key


def overlay(base: Path, path: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(path)],
                   check=True)  # fmt: skip
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Guest:
    """One QEMU/TCG process: start, wait for the ready line, SSH in with a pinned host key, stop."""

    def __init__(self, workdir: Path, disk: Path, key: Path, seed: Path | None = None, memory=128,
                 ready="cloudops-tiny: ready"):  # fmt: skip
        self.dir, self.disk, self.key, self.seed = workdir, disk, key, seed
        self.memory, self.ready = memory, ready
        self.log = workdir / "serial.log"
        self.monitor = workdir / "monitor.sock"
        self.proc = None
        self.port = None
        self.started = None

    def start(self):
        self.port = free_port()
        cmd = [QEMU, "-accel", "tcg", "-m", str(self.memory), "-nographic", "-no-reboot",
               "-drive", f"file={self.disk},if=virtio",
               "-nic", f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{self.port}-:22",
               "-serial", f"file:{self.log}",
               "-monitor", f"unix:{self.monitor},server=on,wait=off"]  # fmt: skip
        if self.seed:
            cmd += ["-cdrom", str(self.seed)]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=open(self.dir / "qemu.out", "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        return self

    def serial(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self, timeout=BOOT_TIMEOUT) -> float:
        """Seconds from QEMU start until SSH answers a command; fails with the serial log."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"QEMU exited ({self.proc.returncode}): {(self.dir / 'qemu.out').read_text()}"
                            f"\nserial:\n{self.serial()}")  # fmt: skip
            if self.ready in self.serial():
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"no ready line within {timeout} s; serial:\n{self.serial()}")
        hostkey = HOSTKEY_RE.search(self.serial()) or CLOUD_INIT_HOSTKEY_RE.search(self.serial())
        assert hostkey, self.serial()
        (self.dir / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {hostkey.group(1)} {hostkey.group(2)}\n")
        while time.monotonic() < deadline:
            if self.ssh("true", check=False).returncode == 0:
                return time.monotonic() - self.started
            time.sleep(0.2)
        pytest.fail(f"SSH did not answer within {timeout} s; serial:\n{self.serial()}")

    def ssh(self, command: str, check=True) -> subprocess.CompletedProcess:
        cmd = ["ssh", *SSH_OPTS, "-o", f"UserKnownHostsFile={self.dir / 'known_hosts'}", "-i", str(self.key),
               "-p", str(self.port), "root@127.0.0.1", command]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            pytest.fail(f"ssh {command!r} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def power_button(self):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.monitor))
            s.sendall(b"system_powerdown\n")
            time.sleep(0.5)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def guests():
    """Factory of Guest objects; every QEMU started is killed by pid at teardown."""
    started = []

    def make(*args, **kwargs):
        guest = Guest(*args, **kwargs)
        started.append(guest)
        return guest

    yield make
    for guest in started:
        guest.kill()


def shadow_hash(guest: Guest) -> str:
    line = [ln for ln in guest.ssh("cat /etc/shadow").stdout.splitlines() if ln.startswith("root:")][0]
    return line.split(":")[1]


# --- build ----------------------------------------------------------------------------


def test_build_is_cached_and_clean(tiny_image):
    from cloudops.imaging.build import build_image

    started = time.monotonic()
    assert build_image("tiny") == tiny_image
    assert time.monotonic() - started < 5, "a cached build must return at once"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "--force-share", str(tiny_image)],
                                     capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert info["format"] == "qcow2"
    assert tiny_image.name.startswith("tiny-") and tiny_image.parent.name == "build"
    leftovers = [p.name for p in tiny_image.parent.iterdir() if ".tmp-" in p.name or p.name.startswith(".stage-")]
    assert not leftovers


def test_unknown_recipe_is_one_line_error():
    from cloudops.imaging.build import build_image

    with pytest.raises(CloudopsError, match="no recipe 'nope'"):
        build_image("nope")


# --- boot with a NoCloud seed --------------------------------------------------------------


def test_boot_with_seed(tiny_image, ssh_key, guests, tmp_path, timings):
    from cloudops.compute.seed import make_seed

    password = "correct horse battery"
    seed = make_seed(tmp_path / "seed.iso", "seeded-vm", [ssh_key.with_suffix(".pub").read_text()],
                     passwords.hash_password(password))  # fmt: skip
    base_before = tiny_image.stat().st_mtime_ns
    guest = guests(tmp_path, overlay(tiny_image, tmp_path / "disk.qcow2"), ssh_key, seed).start()
    timings["boot_to_ssh_seed_s"] = round(guest.wait_ready(), 1)
    timings["guest_uptime_at_ready_s"] = float(guest.serial().split("uptime=")[1].split()[0])

    assert guest.ssh("hostname").stdout.strip() == "seeded-vm"
    assert passwords.verify(password, shadow_hash(guest))
    assert not passwords.verify("wrong", shadow_hash(guest))
    uptime = float(guest.ssh("cat /proc/uptime").stdout.split()[0])
    assert 0 < uptime < BOOT_TIMEOUT
    assert "cloudops-tiny: seed applied from /dev/sr0" in guest.serial()
    assert password not in guest.serial()

    # The power button (what libvirt's virDomainShutdown presses) powers the guest off.
    guest.power_button()
    guest.proc.wait(timeout=60)
    assert "cloudops-tiny: shutting down" in guest.serial()
    assert tiny_image.stat().st_mtime_ns == base_before, "the base image must stay untouched"


# --- offline customization, then boot without a seed ---------------------------------------


def test_customize_two_disks_then_boot_without_seed(tiny_image, ssh_key, guests, tmp_path, timings):
    from cloudops.imaging.customize import customize_image

    password = "tr0ub4dor&3"
    disks = [overlay(tiny_image, tmp_path / f"disk{i}.qcow2") for i in (1, 2)]
    args = dict(root_password=password, ssh_keys=[ssh_key.with_suffix(".pub").read_text()], hostname="custom-vm",
                files={"/etc/motd": "managed by cloudops\n"})  # fmt: skip
    started = time.monotonic()
    report = customize_image(disks, **args)
    timings["customize_2_disks_one_launch_s"] = round(time.monotonic() - started, 1)
    for disk in disks:
        changed = report[str(disk)]["changed"]
        assert "hostname custom-vm" in changed and "root password" in changed and "/etc/motd" in changed
        assert "/root/.ssh/authorized_keys: 1 key(s) added" in changed

    # The same call again has nothing to do.
    again = customize_image(disks, **args)
    assert all(not result["changed"] for result in again.values()), again

    vms = []
    for n, disk in enumerate(disks, 1):
        workdir = tmp_path / f"vm{n}"
        workdir.mkdir()
        vms.append(guests(workdir, disk, ssh_key).start())  # no seed attached
    for n, vm in enumerate(vms, 1):
        timings[f"boot_to_ssh_customized_{n}_s"] = round(vm.wait_ready(), 1)
        assert vm.ssh("hostname").stdout.strip() == "custom-vm"
        assert passwords.verify(password, shadow_hash(vm))
        assert vm.ssh("cat /etc/motd").stdout == "managed by cloudops\n"
        modes = vm.ssh("stat -c '%a %U' /root/.ssh /root/.ssh/authorized_keys").stdout.split("\n")
        assert modes[:2] == ["700 root", "600 root"]
        assert "seed applied" not in vm.serial()


def test_customize_refuses_batch_when_one_disk_has_no_os(tiny_image, tmp_path):
    from cloudops.imaging.customize import customize_image

    good = overlay(tiny_image, tmp_path / "good.qcow2")
    blank = tmp_path / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(blank), "64M"], check=True)
    with pytest.raises(CloudopsError, match="blank.qcow2: no operating system or root filesystem found"):
        customize_image([good, blank], hostname="never-written")
    # Nothing was written to the good disk: its content still equals the base image.
    assert subprocess.run(["qemu-img", "compare", "-q", str(good), str(tiny_image)]).returncode == 0


# --- the debian recipe (debootstrap): opt-in ---------------------------------------------------


@pytest.mark.skipif(os.environ.get("CLOUDOPS_TEST_DEBIAN") != "1",
                    reason="set CLOUDOPS_TEST_DEBIAN=1: needs root, a Debian mirror and ~15 min")  # fmt: skip
def test_debian_image_boots_with_seed(ssh_key, guests, tmp_path, timings):
    from cloudops.compute.seed import make_seed
    from cloudops.imaging.build import build_image

    started = time.monotonic()
    image = build_image("debian")
    timings["debian_build_or_cache_s"] = round(time.monotonic() - started, 1)
    password = "debian-pass"
    seed = make_seed(tmp_path / "seed.iso", "deb-vm", [ssh_key.with_suffix(".pub").read_text()],
                     passwords.hash_password(password))  # fmt: skip
    guest = guests(tmp_path, overlay(image, tmp_path / "disk.qcow2"), ssh_key, seed, memory=512,
                   ready="-----END SSH HOST KEY KEYS-----").start()  # fmt: skip
    timings["debian_boot_to_ssh_s"] = round(guest.wait_ready(timeout=900), 1)
    assert guest.ssh("hostname").stdout.strip() == "deb-vm"
    assert passwords.verify(password, shadow_hash(guest))
