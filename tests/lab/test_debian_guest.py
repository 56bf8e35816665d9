"""The Debian recipe's guest (real cloud-init, qemu-guest-agent) through vm.start to SSH, both ways of customization.

The image is built once per session by the real CLI (debootstrap from Debian's archive; cached by
recipe hash). Two boots at 512 MiB under TCG, one per way:
- seed: a key, a root password, a hostname, --disk-size 4G and the user's own --user-data
  (a write_files and a runcmd), all applied by cloud-init from the NoCloud seed ISO;
- guestfs: the same identity written by libguestfs, the network brought up by cloud-init from the
  seed files cloudops puts on the disk (/var/lib/cloud/seed/nocloud).
Oracles outside cloudops: the guest's own /etc/shadow, hostname, df, files and systemd; on the
host, virsh domifaddr through the guest agent.
"""

import json
import shlex
import types

import pytest

from cloudops import passwords
from cloudops.ssh import connect
from tests.conftest import invoke
from tests.lab.test_vms import leftovers, ssh_vm

PASSWORD = "debian guest horse staple"
USER_DATA = """#cloud-config
write_files:
  - path: /etc/cloudops-test/written
    content: "from write_files\\n"
runcmd:
  - [sh, -c, "echo from-runcmd > /var/tmp/ran"]
"""


@pytest.fixture(scope="module")
def debian_image(lab):
    proc = invoke("image.build", "--recipe", "debian", "--add", "--json", timeout=3600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["id"]


@pytest.mark.parametrize("way, host", [("seed", "hv1"), ("guestfs", "hv2")])
def test_debian_guest_reaches_ssh_with_key_password_and_hostname(lab, lab_inventory, debian_image, user_key,
                                                                  tmp_path, way, host):
    name = f"t-deb-{way}"
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    options = ["--disk-size", "4G"]
    if way == "seed":
        user_data = tmp_path / "user-data.yaml"
        user_data.write_text(USER_DATA)
        options += ["--user-data", str(user_data)]
    proc = invoke("vm.start", "--name", name, "--image", "debian", "--memory", "512", "--host", host,
                  "--ssh-key", f"{user_key}.pub", "--password-file", str(password_file), "--hostname", f"{name}-box",
                  "--customize", way, "--timeout", "900", "--json", *options, "--inventory", str(lab.inventory_path),
                  timeout=1200)
    try:
        assert proc.returncode == 0, proc.stderr
        vm = types.SimpleNamespace(**json.loads(proc.stdout))
        assert vm.host == host
        out = ssh_vm(lab_inventory, vm, user_key, "hostname; grep '^root:' /etc/shadow; df -k / | tail -n 1; "
                     "systemctl is-active qemu-guest-agent; cloud-init status --wait >/dev/null; "
                     "cat /etc/cloudops-test/written /var/tmp/ran 2>/dev/null; true")
        lines = out.splitlines()
        assert lines[0] == f"{name}-box"
        assert passwords.verify(PASSWORD, lines[1].split(":")[1])
        root_kib = int(lines[2].split()[1])
        assert root_kib * 1024 > 3.5 * (1 << 30), lines[2]  # the 3G image's root grown to the 4G disk
        assert lines[3] == "active"
        if way == "seed":
            assert lines[4:6] == ["from write_files", "from-runcmd"]
        with connect(lab_inventory.hosts[host]) as hv:
            agent = hv.run(f"virsh -c qemu:///system domifaddr {shlex.quote(name)} --source agent",
                           hide=True, in_stream=False).stdout
        assert f"{vm.ip}/" in agent, agent
    finally:
        invoke("vm.delete", name, "--inventory", str(lab.inventory_path))
    assert leftovers(lab_inventory, name) == []
