"""Issue 10 hygiene on a real lab: foreign domains are left alone, passwords never show, files are private,
one writer for the metrics cron file, and a host given up at --timeout stops working.

Oracles are outside cloudops: virsh, ls, stat, pgrep on the hosts, /proc of this machine.
VM names start with "hy-" so they never meet another test's.
"""

import os
import secrets
import shlex
import threading
import time
from pathlib import Path

import pytest

from cloudops.compute import vms
from cloudops.imaging import store as images
from cloudops.ssh import connect
from tests.conftest import deploy_var, invoke

FOREIGN = "hy-foreign"
FOREIGN_XML = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64'>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>
<target dev='vda' bus='virtio'/></disk></devices></domain>"""


def sh(host, command, warn=False):
    with connect(host) as hv:
        return hv.run(command, hide=True, warn=warn, in_stream=False)


def stderr_lines(proc):
    return [line for line in proc.stderr.strip().splitlines() if line.strip()]


# ---------------------------------------------------------------- 1. foreign domains

@pytest.fixture
def foreign_domain(lab, lab_inventory):
    host = lab_inventory.hosts["hv1"]
    disk = f"/var/lib/libvirt/images/{FOREIGN}.qcow2"
    xml = FOREIGN_XML.format(name=FOREIGN, disk=disk)
    sh(host, f"mkdir -p /var/lib/libvirt/images && qemu-img create -q -f qcow2 {disk} 16M && "
             f"printf %s {shlex.quote(xml)} > /tmp/{FOREIGN}.xml && virsh -q -c qemu:///system define /tmp/{FOREIGN}.xml")
    yield host, disk
    sh(host, f"virsh -q -c qemu:///system undefine {FOREIGN}; rm -f {disk} /tmp/{FOREIGN}.xml", warn=True)


def still_there(host, disk):
    domain = sh(host, f"virsh -c qemu:///system dominfo {FOREIGN}", warn=True).exited == 0
    disk_present = sh(host, f"ls {disk}", warn=True).exited == 0
    return domain, disk_present


def test_vm_delete_and_cloud_down_refuse_a_domain_cloudops_did_not_make(lab, foreign_domain, tmp_path):
    host, disk = foreign_domain
    proc = invoke("vm.delete", FOREIGN, "--inventory", str(lab.inventory_path))
    assert proc.returncode != 0
    lines = stderr_lines(proc)
    assert len(lines) == 1 and "not made by cloudops" in lines[0], proc.stderr
    assert still_there(host, disk) == (True, True)

    stack_file = tmp_path / "stack.yaml"
    stack_file.write_text(f"vms:\n  - {{name: {FOREIGN}, image: tiny}}\n")
    proc = invoke("cloud.down", str(stack_file), "--inventory", str(lab.inventory_path))
    assert proc.returncode != 0
    lines = stderr_lines(proc)
    assert len(lines) == 1 and "not made by cloudops" in lines[0], proc.stderr
    assert still_there(host, disk) == (True, True)

    proc = invoke("vm.delete", FOREIGN, "--force", "--inventory", str(lab.inventory_path))
    assert proc.returncode == 0, proc.stderr
    assert still_there(host, disk) == (False, True), "--force undefines; the disk cloudops did not make stays"


# ---------------------------------------------------------------- 2. passwords

class ProcessWatch:
    """Samples every process's argv (and the environment of ``watched``'s descendants) on this machine;
    lab hosts share its PID namespace, so QEMU, libvirtd's children and sshd's sessions are seen too."""

    def __init__(self, secrets_):
        self.secrets = [s.encode() for s in secrets_]
        self.root_pid = None
        self.root_argv = None
        self.hits = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _descendant(self, pid):
        try:
            while pid > 1:
                if pid == self.root_pid:
                    return True
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return False

    def _loop(self):
        while not self._stop.is_set():
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                pid = int(entry.name)
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes()
                    # /proc/PID/environ is the environment a program was *started* with: cloudops's own
                    # (and a fork of it that never execs, like libguestfs's recovery process) still shows
                    # it after os.environ dropped the variable. Programs it starts must not have it.
                    env = Path(f"/proc/{pid}/environ").read_bytes() \
                        if self.root_pid and pid != self.root_pid and argv != self.root_argv \
                        and self._descendant(pid) else b""
                except OSError:
                    continue
                for s in self.secrets:
                    if s in argv:
                        self.hits.append(("argv", pid, argv.replace(b"\0", b" ")[:200]))
                    if s in env:
                        self.hits.append(("environ", pid, argv.replace(b"\0", b" ")[:200]))
            self.samples += 1
            time.sleep(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


def start_cli(lab, args, env):
    import subprocess
    import sys

    cmd = [str(Path(sys.executable).parent / "invoke"), "vm.start", *args, "--inventory", str(lab.inventory_path)]
    return subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


@pytest.mark.parametrize("way, name, host", [("seed", "hy-pws", "hv1"), ("guestfs", "hy-pwg", "hv2")])
def test_password_never_in_argv_or_child_environment_and_files_are_private(lab, lab_inventory, tiny_image,
                                                                           tmp_path, way, name, host):
    password, canary = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    pw_file = tmp_path / "pw"
    fd = os.open(pw_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    with ProcessWatch([password, canary]) as watch:
        proc = start_cli(lab, [f"--name={name}", "--image=tiny", "--memory=96", f"--host={host}",
                               f"--customize={way}", f"--password-file={pw_file}", "--timeout=240"],
                         env={"CLOUDOPS_ROOT_PASSWORD": canary})
        deadline = time.monotonic() + 10
        while b"vm.start" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)  # until the child has exec'd invoke
        watch.root_argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        watch.root_pid = proc.pid
        try:
            out, err = proc.communicate(timeout=400)
        finally:
            if proc.poll() is None:
                proc.kill()
    try:
        assert proc.returncode == 0, err
        assert watch.samples > 10
        assert watch.hits == [], watch.hits[:3]
        h = lab_inventory.hosts[host]
        disks = f"{images.pool_path(h)}/disks"
        private = [f"{disks}/{name}-seed.iso"] if way == "seed" else [f"{disks}/{name}.qcow2"]
        for path in private:
            mode = sh(h, f"stat -c %a {shlex.quote(path)}").stdout.strip()
            assert int(mode, 8) & 0o077 == 0, f"{path} is {mode}"
        leftovers = sh(h, f"ls -a {disks}").stdout.split()
        assert not [n for n in leftovers if ".partial-" in n]
    finally:
        vms.delete_vm(name, lab_inventory)


# ---------------------------------------------------------------- 5. a host given up at --timeout stops

def test_fleet_run_timeout_stops_the_remote_command(lab, lab_inventory):
    host = lab_inventory.hosts["hv1"]
    late = f"/tmp/hy-late-{secrets.token_hex(4)}"
    sleep = "sleep 30.4321"  # a duration no other process on this shared machine sleeps
    started = time.monotonic()
    proc = invoke("fleet.run", f"{sleep}; touch {late}", "--timeout", "3", "--hosts", "hv1",
                  "--inventory", str(lab.inventory_path))
    assert proc.returncode != 0
    assert "timed out after 3s; stopped" in proc.stdout, proc.stdout + proc.stderr
    assert time.monotonic() - started < 20
    assert sh(host, f"pgrep -f {shlex.quote(sleep)}", warn=True).exited == 1, "the remote sleep still runs"
    time.sleep(max(0.0, 35 - (time.monotonic() - started)))
    assert sh(host, f"test -e {late}", warn=True).exited == 1, "the host was changed after it was reported failed"
    assert sh(host, f"pgrep -f {shlex.quote(sleep)}", warn=True).exited == 1


# ---------------------------------------------------------------- 4. one writer for the metrics cron file

def test_deploy_and_install_cron_agree_on_the_metrics_cron_file(lab, lab_inventory, tmp_path):
    import json

    import yaml

    from cloudops.metrics import cron as metrics_cron

    data = yaml.safe_load(lab.inventory_path.read_text())
    data.setdefault("vars", {})["metrics"] = {"carbon": "127.0.0.1:2004", "prefix": "hylab"}
    inv = tmp_path / "inventory.yaml"
    inv.write_text(yaml.safe_dump(data))
    env = {"CLOUDOPS_VAR": str(deploy_var(lab, tmp_path / "var"))}
    host = lab_inventory.hosts["hv3"]
    sh(host, f"rm -f {metrics_cron.CRON_PATH}", warn=True)
    try:
        proc = invoke("deploy", "--json", "--hosts", "hv3", "--inventory", str(inv), env=env)
        assert proc.returncode == 0, proc.stderr
        steps = {s["name"]: s for s in json.loads(proc.stdout)["hosts"][0]["value"]}
        assert steps["metrics-cron"]["changed"]
        written = sh(host, f"cat {metrics_cron.CRON_PATH}").stdout
        proc = invoke("metrics.install-cron", "--json", "--hosts", "hv3", "--inventory", str(inv), env=env)
        assert proc.returncode == 0, proc.stderr
        [result] = json.loads(proc.stdout)["hosts"]
        assert result["status"] == "ok" and "already up to date" in result["value"], result
        assert sh(host, f"cat {metrics_cron.CRON_PATH}").stdout == written
        proc = invoke("deploy", "--json", "--hosts", "hv3", "--inventory", str(inv), env=env)
        assert proc.returncode == 0, proc.stderr
        steps = {s["name"]: s for s in json.loads(proc.stdout)["hosts"][0]["value"]}
        assert not steps["metrics-cron"]["changed"], steps["metrics-cron"]
    finally:
        sh(host, f"rm -f {metrics_cron.CRON_PATH}", warn=True)
