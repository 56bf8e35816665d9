"""vm.start --user-data through the real CLI on the lab: the tiny guest still gets its hostname, keys and root's
hash from merged user-data (a cloud-config, a multipart), the seed ISO on the host holds the merge (read with
isoinfo, email and yaml), and bad user-data is one line with nothing made on any host (virsh on every host).

VM names start with "tu" so they never meet another test's. The Debian guest (runcmd, write_files seen by real
cloud-init) is not booted here.
"""

import base64
import email
import email.policy
import json
import shlex
import types

import pytest
import yaml

from cloudops import passwords
from cloudops.compute import vms
from cloudops.imaging import store as images
from cloudops.ssh import connect
from tests.conftest import invoke
from tests.lab.test_vms import leftovers, ssh_vm

PASSWORD = "user data battery staple"


def cloud_config(user_pub: str) -> str:
    return f"""#cloud-config
hostname: overridden-by-cloudops
ssh_authorized_keys:
  - {user_pub}
users:
  - name: alice
    hashed_passwd: "{passwords.hash_password('alice only')}"
runcmd:
  - [sh, -c, "echo from-user-data > /var/tmp/ran"]
"""


def multipart(user_pub: str) -> str:
    script = base64.b64encode(b"#!/bin/sh\necho from-a-script > /var/tmp/script\n").decode()
    return f"""MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="BOUNDARY"

--BOUNDARY
Content-Type: text/cloud-config

#cloud-config
ssh_authorized_keys: ["{user_pub}"]
write_files:
  - {{path: /etc/motd, content: "hello\\n"}}

--BOUNDARY
Content-Type: text/x-shellscript
Content-Transfer-Encoding: base64

{script}
--BOUNDARY--
"""


def seed_user_data(lab_inventory, host_name: str, name: str) -> str:
    host = lab_inventory.hosts[host_name]
    iso = f"{images.pool_path(host)}/disks/{name}-seed.iso"
    with connect(host) as hv:
        return hv.run(f"isoinfo -R -i {shlex.quote(iso)} -x /user-data", hide=True, in_stream=False).stdout


def domains_everywhere(lab_inventory) -> dict:
    """virsh list --all on every host: {host: [domain names]}."""
    found = {}
    for name, host in lab_inventory.hosts.items():
        with connect(host) as hv:
            out = hv.run("virsh -c qemu:///system list --all --name", hide=True, in_stream=False).stdout
        found[name] = sorted(n for n in out.split() if n)
    return found


@pytest.mark.parametrize("kind, host", [("cloud-config", "hv1"), ("multipart", "hv2")])
def test_vm_start_with_user_data_keeps_hostname_keys_and_password(lab, lab_inventory, tiny_image, user_key, tmp_path,
                                                                   kind, host):
    name = f"tu-{kind[:5]}"
    user_pub = (user_key.parent / f"{user_key.name}.pub").read_text().strip()
    ud = tmp_path / "user-data"
    ud.write_text(cloud_config(user_pub) if kind == "cloud-config" else multipart(user_pub))
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    # The user's key comes only from the user-data: reaching the VM with it proves the union of keys.
    proc = invoke("vm.start", "--name", name, "--host", host, "--inventory", str(lab.inventory_path),
                  "--user-data", str(ud), "--password-file", str(pw), "--hostname", f"{name}-box",
                  "--timeout", "300", "--json")
    try:
        assert proc.returncode == 0, proc.stderr
        assert "from-user-data" not in proc.stderr and "alice" not in proc.stderr  # content is never logged
        started = json.loads(proc.stdout)
        vm = types.SimpleNamespace(name=name, host=started["host"], ip=started["ip"])
        out = ssh_vm(lab_inventory, vm, user_key, "hostname; grep '^root:' /etc/shadow")
        hostname, shadow = out.split("\n", 1)
        assert hostname == f"{name}-box"
        root_hash = shadow.split(":")[1]
        assert passwords.verify(PASSWORD, root_hash), "root's hash is cloudops's, not the user-data's alice's"
        # the cloud's own key still works too (vm.run uses it)
        run = invoke("vm.run", name, "hostname", "--inventory", str(lab.inventory_path))
        assert run.returncode == 0 and run.stdout.strip() == f"{name}-box", run.stderr
        # what the seed ISO on the host holds, read by tools outside cloudops
        text = seed_user_data(lab_inventory, host, name)
        if kind == "cloud-config":
            assert "user-data sets hostname" in proc.stderr  # the note names the key, never its value
            assert "overridden-by-cloudops" not in proc.stderr
            data = yaml.safe_load(text)
            assert data["runcmd"] == [["sh", "-c", "echo from-user-data > /var/tmp/ran"]]
        else:
            msg = email.message_from_string(text, policy=email.policy.default)
            parts = [p for p in msg.walk() if not p.is_multipart()]
            assert [p.get_content_type() for p in parts] == ["text/cloud-config", "text/x-shellscript"]
            data = yaml.safe_load(parts[0].get_content())
            assert data["write_files"] == [{"path": "/etc/motd", "content": "hello\n"}]
            assert parts[1].get_content().startswith("#!/bin/sh\n")
        assert data["hostname"] == f"{name}-box" and user_pub in data["ssh_authorized_keys"]
        assert len(data["ssh_authorized_keys"]) >= 2, "cloudops's trusted keys are kept"
        with connect(lab_inventory.hosts[host]) as hv:
            mode = hv.run(f"stat -c %a {images.pool_path(lab_inventory.hosts[host])}/disks/{name}-seed.iso",
                          hide=True, in_stream=False).stdout.strip()
        assert mode == "600"
    finally:
        vms.delete_vm(name, lab_inventory)
    assert leftovers(lab_inventory, name) == []


@pytest.mark.parametrize("content, options, message", [
    ("#cloud-config\nruncmd: [echo\n", (), "not valid YAML"),
    ("#cloud-config\n- just\n- a list\n", (), "must be a YAML mapping"),
    ("just some text\n", (), "unknown content type"),
    ("#cloud-config\nruncmd: [[true]]\n", ("--customize", "guestfs"), "--user-data needs --customize seed"),
    (None, (), "does not exist"),
], ids=["not-yaml", "not-a-mapping", "unknown-type", "with-guestfs", "missing"])
def test_bad_user_data_is_one_line_and_nothing_is_made(lab, lab_inventory, tiny_image, tmp_path, content, options,
                                                        message):
    ud = tmp_path / "user-data"
    if content is not None:
        ud.write_text(content)
    before = domains_everywhere(lab_inventory)
    proc = invoke("vm.start", "--name", "tu-bad", "--inventory", str(lab.inventory_path), "--user-data", str(ud),
                  *options)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert domains_everywhere(lab_inventory) == before
    assert not any("tu-bad" in names for names in before.values())
    assert leftovers(lab_inventory, "tu-bad") == []
