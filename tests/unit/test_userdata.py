"""--user-data: the merge rule, every refusal, the MIME multipart, what the ISO holds (isoinfo, email, yaml),
and the tiny image's real seed-apply script still applying hostname, keys and root's hash from it."""

import base64
import email
import email.policy
import gzip
import os
import shutil
import subprocess

import pytest
import yaml

from cloudops import passwords
from cloudops.compute import seed, userdata, vms
from cloudops.errors import CloudopsError
from tests.unit.tiny_guest import guest_root, seed_apply

KEY1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN4pNdNv8QP28E7WAe+OW2ENjWJFUtNXuZ8PpdQpHb3w cloudops@control"
KEY2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKS3m0xYd0AzLk2rgGLPSjsALpq4yyEyV5JXpDo8bKk1 user@laptop"
HASH = passwords.hash_password("root secret")
ALICE_HASH = passwords.hash_password("alice secret")

USER_CONFIG = f"""#cloud-config
hostname: not-this-one
fqdn: not.this.one
disable_root: true
ssh_authorized_keys:
  - {KEY2}
  - {KEY1}
users:
  - default
  - name: alice
    groups: [sudo]
    hashed_passwd: "{ALICE_HASH}"
    ssh_authorized_keys:
      - {KEY2}
  - name: root
    hashed_passwd: "{ALICE_HASH}"
chpasswd:
  expire: true
  users:
    - {{name: alice, password: "{ALICE_HASH}", type: hash}}
runcmd:
  - [sh, -c, "echo ran > /var/tmp/runcmd"]
write_files:
  - path: /etc/motd
    content: |
      hello from
        the user
packages: [htop]
"""
SCRIPT = "#!/bin/sh\necho 'a script of the user' > /var/tmp/script\n"

needs_busybox = pytest.mark.skipif(not shutil.which("busybox"), reason="busybox missing")
needs_iso_tools = pytest.mark.skipif(not (shutil.which("genisoimage") and shutil.which("isoinfo")),
                                     reason="genisoimage/isoinfo missing")


def write(tmp_path, text, name="ud"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def merged(text, password_hash=HASH, keys=(KEY1,), notes=None):
    ud = userdata.parse(text, "ud.yaml")
    return seed.user_data_text("web1", list(keys), password_hash, ud, (notes if notes is not None else []).append)


def user_entries(data, name):
    return [u for u in data["users"] if isinstance(u, dict) and u.get("name") == name]


# ---------------------------------------------------------------- the merge rule

def test_cloud_config_is_merged_into_one_document_with_cloudops_values_winning():
    notes = []
    text = merged(USER_CONFIG, notes=notes)
    assert text.startswith("#cloud-config\n") and "Content-Type" not in text
    data = yaml.safe_load(text)
    # cloudops's: hostname, root login, root's password
    assert data["hostname"] == "web1" and "fqdn" not in data
    assert data["disable_root"] is False and data["preserve_hostname"] is False and data["ssh_pwauth"] is True
    # keys: the union, cloudops's first, no duplicate
    assert data["ssh_authorized_keys"] == [KEY1, KEY2]
    # users: the user's list, root's entry cloudops's (the user's root entry replaced)
    assert data["users"][0] == "default"
    assert user_entries(data, "alice") == [{"name": "alice", "groups": ["sudo"], "hashed_passwd": ALICE_HASH,
                                            "ssh_authorized_keys": [KEY2]}]
    assert user_entries(data, "root") == [{"name": "root", "lock_passwd": False, "hashed_passwd": HASH}]
    assert data["chpasswd"] == {"expire": False, "users": [{"name": "root", "password": HASH, "type": "hash"},
                                                           {"name": "alice", "password": ALICE_HASH, "type": "hash"}]}
    # everything else is the user's, as written
    assert data["runcmd"] == [["sh", "-c", "echo ran > /var/tmp/runcmd"]]
    assert data["write_files"] == [{"path": "/etc/motd", "content": "hello from\n  the user\n"}]
    assert data["packages"] == ["htop"]
    # one note per overridden key, naming keys, never values
    joined = "\n".join(notes)
    for key in ("hostname", "fqdn", "disable_root", "users", "chpasswd"):
        assert f" {key}" in joined
    assert "not-this-one" not in joined and ALICE_HASH not in joined


def test_cloudops_keys_keep_their_one_value_a_line_form():
    text = merged(USER_CONFIG)
    lines = text.splitlines()
    assert 'hostname: "web1"' in lines
    assert f'  - "{KEY1}"' in lines and f'  - "{KEY2}"' in lines
    assert f'    hashed_passwd: "{HASH}"' in lines
    assert text.index("runcmd:") > text.index("chpasswd:"), "the user's keys come after cloudops's"


def test_without_a_root_password_the_users_entries_and_chpasswd_are_the_users():
    data = yaml.safe_load(merged(USER_CONFIG, password_hash=None))
    assert "ssh_pwauth" not in data
    assert user_entries(data, "root") == [{"name": "root", "hashed_passwd": ALICE_HASH}]  # theirs: cloudops sets none
    assert data["chpasswd"]["expire"] is True
    assert data["chpasswd"]["users"] == [{"name": "alice", "password": ALICE_HASH, "type": "hash"}]


def test_without_users_of_the_users_cloudops_writes_default_and_root():
    data = yaml.safe_load(merged("#cloud-config\nruncmd: [[touch, /x]]\n"))
    assert data["users"] == ["default", {"name": "root", "lock_passwd": False, "hashed_passwd": HASH}]
    assert data["runcmd"] == [["touch", "/x"]]
    assert "users" not in yaml.safe_load(merged("#cloud-config\nruncmd: [[touch, /x]]\n", password_hash=None))


def test_an_empty_users_list_stays_empty():
    assert yaml.safe_load(merged("#cloud-config\nusers: []\n", password_hash=None))["users"] == []
    assert yaml.safe_load(merged("#cloud-config\nusers: []\n"))["users"] == [
        {"name": "root", "lock_passwd": False, "hashed_passwd": HASH}]


def test_same_values_as_cloudops_give_no_note_and_an_empty_cloud_config_is_fine():
    notes = []
    merged("#cloud-config\nhostname: web1\ndisable_root: false\n", notes=notes)
    assert notes == []
    assert yaml.safe_load(merged("#cloud-config\n")) == yaml.safe_load(seed.user_data_text("web1", [KEY1], HASH))


def test_user_data_changes_the_instance_id():
    a = seed.seed_files("a", [KEY1])["meta-data"]
    b = seed.seed_files("a", [KEY1], user_data=userdata.parse("#cloud-config\nruncmd: [[touch, /x]]\n"))["meta-data"]
    assert a != b


# ---------------------------------------------------------------- multipart

def mime_parts(text):
    msg = email.message_from_string(text, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/mixed" and text.startswith("MIME-Version: 1.0\n")
    return [p for p in msg.walk() if not p.is_multipart()]


def test_a_script_makes_a_multipart_with_cloudops_cloud_config_first():
    text = merged(SCRIPT)
    first, second = mime_parts(text)
    assert first.get_content_type() == "text/cloud-config" and first["Content-Transfer-Encoding"] == "8bit"
    data = yaml.safe_load(first.get_content())
    assert data["hostname"] == "web1" and data["ssh_authorized_keys"] == [KEY1]
    assert user_entries(data, "root")[0]["hashed_passwd"] == HASH
    assert second.get_content_type() == "text/x-shellscript" and second.get_content() == SCRIPT
    assert f'  - "{KEY1}"\n' in text and f'hashed_passwd: "{HASH}"\n' in text, "plain lines, not encoded"
    assert "\r" not in text


@pytest.mark.parametrize("head, ctype", [("#include", "text/x-include-url"), ("#include-once", "text/x-include-once-url"),
                                         ("#cloud-boothook", "text/cloud-boothook"), ("#part-handler", "text/part-handler")])
def test_other_cloud_init_types_become_a_part_of_their_type(head, ctype):
    body = f"{head}\nhttps://example.org/x\n"
    first, second = mime_parts(merged(body))
    assert (first.get_content_type(), second.get_content_type(), second.get_content()) == (CC, ctype, body)


CC = "text/cloud-config"


def user_multipart():
    """A multipart as a user writes one: two cloud-config parts, a base64 script, a plain-text boothook."""
    script = base64.b64encode(SCRIPT.encode()).decode()
    return f"""Content-Type: multipart/mixed; boundary="XYZ"
MIME-Version: 1.0

--XYZ
Content-Type: text/cloud-config; charset="us-ascii"

#cloud-config
runcmd:
  - [touch, /var/tmp/one]
ssh_authorized_keys: ["{KEY2}"]
users: [default, {{name: bob}}]

--XYZ
Content-Type: text/x-shellscript; charset="us-ascii"
Content-Transfer-Encoding: base64

{script}
--XYZ
Content-Type: text/plain; charset="us-ascii"

#cloud-config
runcmd:
  - [touch, /var/tmp/two]
hostname: nope

--XYZ
Content-Type: text/plain

#cloud-boothook
echo early

--XYZ--
"""


def test_a_users_multipart_has_its_cloud_config_parts_merged_and_the_rest_kept():
    ud = userdata.parse(user_multipart(), "mp")
    assert ud.kind == "multipart" and len(ud.parts) == 2
    notes = []
    parts = mime_parts(seed.user_data_text("web1", [KEY1], HASH, ud, notes.append))
    assert [p.get_content_type() for p in parts] == [CC, "text/x-shellscript", "text/plain"]
    data = yaml.safe_load(parts[0].get_content())
    assert data["runcmd"] == [["touch", "/var/tmp/one"], ["touch", "/var/tmp/two"]]  # lists of parts appended
    assert data["hostname"] == "web1" and data["ssh_authorized_keys"] == [KEY1, KEY2]
    assert data["users"][:2] == ["default", {"name": "bob"}] and user_entries(data, "root")[0]["hashed_passwd"] == HASH
    assert parts[1]["Content-Transfer-Encoding"] == "base64" and parts[1].get_content() == SCRIPT  # as it was
    assert parts[2].get_content().startswith("#cloud-boothook\n")
    assert any("hostname" in n for n in notes)


def test_a_multipart_of_cloud_config_only_becomes_one_document():
    text = 'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n\n--b\nContent-Type: text/cloud-config\n\n' \
           "#cloud-config\npackages: [curl]\n--b--\n"
    out = merged(text)
    assert out.startswith("#cloud-config\n") and yaml.safe_load(out)["packages"] == ["curl"]


# ---------------------------------------------------------------- bad input: one clear line

@pytest.mark.parametrize("content, message", [
    ("#cloud-config\nruncmd: [oops\n", r"line \d+: not valid YAML"),
    ("#cloud-config\nfoo: bar\n  baz: 1\n", r"line 3: not valid YAML"),
    ("#cloud-config\n- a\n- b\n", "must be a YAML mapping, not a list"),
    ("#cloud-config\n1: x\n", "top-level keys must be strings"),
    ("#cloud-config\nssh_authorized_keys: not-a-list\n", "ssh_authorized_keys must be a list"),
    ("#cloud-config\nssh_authorized_keys: [garbage]\n", "ssh_authorized_keys: bad SSH public key"),
    ("#cloud-config\nusers: {alice: {}}\n", "users must be a list"),
    ("#cloud-config\nusers: [{groups: x}]\n", r"users\[0\] must be a name"),
    ("#cloud-config\nchpasswd: [x]\n", "chpasswd must be a mapping"),
    ("hostname: web\n", "unknown content type"),
    ("#cloud-config-archive\n- type: text/x-shellscript\n", "unknown content type"),
    ("## template: jinja\n#cloud-config\n", "unknown content type"),
    ("", "is empty"),
    ("\n\n", "is empty"),
    ("Content-Type: text/x-shellscript\n\n#!/bin/sh\n", "must be multipart"),
    ('MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n\n--b\nContent-Type: text/html\n\n<p>\n--b--\n',
     "MIME part 1 has an unknown content type 'text/html'"),
    ('MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n\n--b\nContent-Type: text/plain\n\nhello\n--b--\n',
     "MIME part 1 is text/plain and its first line is no known type"),
    (('MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n\n--b\nContent-Type: text/cloud-config\n\n'
      "#cloud-config\na: [\n--b--\n"), r"MIME part 1\) line \d+: not valid YAML"),
    (b"#cloud-config\nx: \xff\xfe\n", "not UTF-8"),
    (gzip.compress(b"#cloud-config\n", mtime=0), "gzip-compressed"),
    (b"#!/bin/sh\n" + b"#" * userdata.MAX_BYTES, "more than the limit"),
])
def test_bad_user_data_is_one_clear_line(tmp_path, content, message):
    with pytest.raises(CloudopsError, match=message) as err:
        userdata.load(write(tmp_path, content))
    assert "\n" not in str(err.value) and str(tmp_path / "ud") in str(err.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(CloudopsError, match=f"user-data file {tmp_path}/nope does not exist"):
        userdata.load(tmp_path / "nope")
    with pytest.raises(CloudopsError, match="is not a regular file"):
        userdata.load(tmp_path)
    if os.geteuid() != 0:  # root reads a 0000 file anyway
        path = write(tmp_path, "#cloud-config\n")
        path.chmod(0)
        with pytest.raises(CloudopsError, match="cannot read user-data file"):
            userdata.load(path)


def test_errors_and_repr_never_show_the_content(tmp_path):
    secret = "hunter2-secret-token"
    with pytest.raises(CloudopsError) as err:
        userdata.load(write(tmp_path, f"#cloud-config\nruncmd: [echo {secret}\n"))
    assert secret not in str(err.value)
    ud = userdata.load(write(tmp_path, f"#cloud-config\nruncmd: [[echo, {secret}]]\n"))
    assert secret not in repr(ud) and secret not in ud.describe()
    spec = vms.VMSpec(name="web1", image="tiny", user_data=ud)
    assert secret not in repr(spec)


def test_a_bom_and_crlf_line_endings_are_taken(tmp_path):
    ud = userdata.load(write(tmp_path, "\ufeff#cloud-config\r\npackages: [curl]\r\n".encode()))
    assert ud.config == {"packages": ["curl"]}


# ---------------------------------------------------------------- where it is checked: before anything is made

def test_validate_loads_it_and_refuses_it_with_guestfs(tmp_path):
    path = write(tmp_path, USER_CONFIG)
    spec = vms.validate(vms.VMSpec(name="web1", image="tiny", user_data=str(path)))
    assert isinstance(spec.user_data, userdata.UserData) and spec.user_data.config["packages"] == ["htop"]
    assert vms.validate(spec).user_data is spec.user_data  # validating again keeps it
    with pytest.raises(CloudopsError, match="--user-data needs --customize seed"):
        vms.validate(vms.VMSpec(name="web1", image="tiny", customize="guestfs", user_data=str(path)))
    with pytest.raises(CloudopsError, match="not valid YAML"):
        vms.validate(vms.VMSpec(name="web1", image="tiny", user_data=write(tmp_path, "#cloud-config\n[\n")))


def test_start_vm_refuses_bad_user_data_before_it_asks_any_host(tmp_path, monkeypatch):
    monkeypatch.setattr(vms.images, "resolve", lambda ref: pytest.fail("went on past validation"))
    with pytest.raises(CloudopsError, match="unknown content type"):
        vms.start_vm(vms.VMSpec(name="web1", image="tiny", user_data=write(tmp_path, "plain text\n")), inventory=None)


def test_a_stack_vm_takes_user_data_relative_to_the_stack_file(tmp_path):
    from cloudops.compute import stack

    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", SCRIPT, "boot.sh")
    path = tmp_path / "stack.yaml"
    path.write_text("vms:\n  - {name: web1, image: tiny, user_data: sub/boot.sh}\n  - {name: web2, image: tiny}\n")
    loaded = stack.load(path)
    assert loaded.vms[0].user_data.kind == "script" and loaded.vms[0].user_data.path == str(tmp_path / "sub/boot.sh")
    assert loaded.vms[1].user_data is None
    path.write_text("vms:\n  - {name: web1, image: tiny, user_data: nope.yaml}\n")
    with pytest.raises(CloudopsError, match=r"vms\[0\]: user-data file .*nope.yaml does not exist"):
        stack.load(path)


# ---------------------------------------------------------------- the ISO, read by tools outside cloudops

@needs_iso_tools
def test_the_seed_iso_holds_the_merged_multipart(tmp_path):
    ud = userdata.parse(SCRIPT, "boot.sh")
    iso = seed.make_seed(tmp_path / "seed.iso", "web1", [KEY1], HASH, user_data=ud)
    text = subprocess.run(["isoinfo", "-R", "-i", str(iso), "-x", "/user-data"], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    first, second = mime_parts(text)
    assert yaml.safe_load(first.get_content())["hostname"] == "web1"
    assert second.get_content() == SCRIPT
    iso = seed.make_seed(tmp_path / "seed.iso", "web1", [KEY1], HASH, user_data=userdata.parse(USER_CONFIG))
    text = subprocess.run(["isoinfo", "-R", "-i", str(iso), "-x", "/user-data"], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    assert yaml.safe_load(text)["write_files"][0]["path"] == "/etc/motd"


# ---------------------------------------------------------------- the tiny image's parser (the real script)

def applied(tmp_path, files):
    root = guest_root(tmp_path)
    proc = seed_apply(tmp_path, files, root)
    assert proc.returncode == 0, proc.stderr
    keys = root / "root/.ssh/authorized_keys"
    return {"hostname": (root / "etc/hostname").read_text().strip(),
            "keys": keys.read_text().splitlines() if keys.exists() else [],
            "root_hash": (root / "etc/shadow").read_text().splitlines()[0].split(":")[1]}


@needs_busybox
@pytest.mark.parametrize("content", [USER_CONFIG, SCRIPT, user_multipart()], ids=["cloud-config", "script", "multipart"])
def test_the_tiny_image_still_applies_hostname_keys_and_root_hash(tmp_path, content):
    files = seed.seed_files("web1", [KEY1], HASH, user_data=userdata.parse(content))
    got = applied(tmp_path, files)
    assert got["hostname"] == "web1"
    assert got["keys"][0] == KEY1 and set(got["keys"]) <= {KEY1, KEY2}
    assert got["root_hash"] == HASH and passwords.verify("root secret", got["root_hash"])


@needs_busybox
def test_the_tiny_image_never_takes_another_users_hash_for_root(tmp_path):
    text = f'#cloud-config\nusers:\n  - name: alice\n    hashed_passwd: "{ALICE_HASH}"\n'
    files = seed.seed_files("web1", [KEY1], None, user_data=userdata.parse(text))
    assert ALICE_HASH in files["user-data"]
    assert applied(tmp_path, files)["root_hash"] == "*"  # root's stays locked


@needs_busybox
def test_the_tiny_image_takes_a_root_hash_the_user_gave_when_cloudops_has_none(tmp_path):
    text = f"#cloud-config\nusers:\n  - name: alice\n    hashed_passwd: x\n  - name: root\n    hashed_passwd: {ALICE_HASH}\n"
    files = seed.seed_files("web1", [KEY1], None, user_data=userdata.parse(text))
    assert applied(tmp_path, files)["root_hash"] == ALICE_HASH
