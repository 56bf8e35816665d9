"""NoCloud seed: the ISO (label, files, mode), cloud-init's view of user-data, and the tiny image's parser."""

import shutil
import stat
import subprocess

import pytest
import yaml

from cloudops import passwords
from cloudops.compute import seed
from cloudops.compute.guestconfig import normalize_ssh_keys, validate_hostname
from cloudops.errors import CloudopsError
from tests.unit.tiny_guest import guest_root, seed_apply

KEY1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN4pNdNv8QP28E7WAe+OW2ENjWJFUtNXuZ8PpdQpHb3w alice@example"
KEY2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKS3m0xYd0AzLk2rgGLPSjsALpq4yyEyV5JXpDo8bKk1 bob's key #2"
HASH = passwords.hash_password("s3cret")

needs_iso_tools = pytest.mark.skipif(
    not (shutil.which("genisoimage") and shutil.which("isoinfo")), reason="genisoimage/isoinfo missing"
)
needs_busybox = pytest.mark.skipif(not shutil.which("busybox"), reason="busybox missing")


def iso_file(iso, name):
    return subprocess.run(["isoinfo", "-R", "-i", str(iso), "-x", f"/{name}"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip


@needs_iso_tools
def test_make_seed_iso(tmp_path):
    path = seed.make_seed(tmp_path / "seed.iso", "web-1", [KEY1], HASH)
    assert path == tmp_path / "seed.iso"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    info = subprocess.run(["isoinfo", "-d", "-i", str(path)], capture_output=True, text=True, check=True).stdout
    assert "Volume id: cidata" in info
    assert "Rock Ridge" in info and "Joliet" in info
    meta = yaml.safe_load(iso_file(path, "meta-data"))
    assert meta["local-hostname"] == "web-1" and meta["instance-id"].startswith("iid-web-1-")
    user_text = iso_file(path, "user-data")
    assert user_text.startswith("#cloud-config\n")
    # no network-config given: none in the seed, so cloud-init falls back to DHCP on the first NIC (a name
    # pattern such as all-en: {match: {name: "e*"}} became an interface "all-en" under Debian's ifupdown)
    assert iso_file(path, "network-config") == ""
    assert list(tmp_path.iterdir()) == [path], "no staging leftovers"


def test_user_data_is_what_cloud_init_expects():
    files = seed.seed_files("web-1", [KEY1, KEY2, KEY1], HASH)
    data = yaml.safe_load(files["user-data"])
    assert data["hostname"] == "web-1"
    assert data["ssh_authorized_keys"] == [KEY1, KEY2], "deduplicated, order kept"
    assert data["disable_root"] is False
    root = [u for u in data["users"] if isinstance(u, dict) and u["name"] == "root"][0]
    assert root["hashed_passwd"] == HASH and root["lock_passwd"] is False
    assert data["users"][0] == "default"
    assert data["chpasswd"]["users"] == [{"name": "root", "password": HASH, "type": "hash"}]


def test_no_password_section_without_hash():
    data = yaml.safe_load(seed.seed_files("web-1", [KEY1])["user-data"])
    assert "users" not in data and "chpasswd" not in data


def test_instance_id_follows_content():
    a = yaml.safe_load(seed.seed_files("a", [KEY1])["meta-data"])["instance-id"]
    b = yaml.safe_load(seed.seed_files("a", [KEY2])["meta-data"])["instance-id"]
    assert a != b
    assert a == yaml.safe_load(seed.seed_files("a", [KEY1])["meta-data"])["instance-id"]


def test_custom_network_config():
    config = {"version": 2, "ethernets": {"eth0": {"addresses": ["10.0.0.5/24"]}}}
    assert yaml.safe_load(seed.seed_files("a", network_config=config)["network-config"]) == config
    with pytest.raises(CloudopsError, match="network-config"):
        seed.seed_files("a", network_config={"ethernets": {}})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hostname": "bad_name"}, "bad hostname"),
        ({"hostname": "-lead"}, "bad hostname"),
        ({"hostname": "a" * 64}, "bad hostname"),
        ({"hostname": "ok", "ssh_keys": ["not a key"]}, "bad SSH public key"),
        ({"hostname": "ok", "ssh_keys": ["ssh-ed25519 !!!notbase64"]}, "not valid base64"),
        ({"hostname": "ok", "ssh_keys": ['ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN4pNdNv8QP28E7WAe+OW2ENjWJFUtNXuZ8PpdQpHb3w a"b']},
         "comment"),
        ({"hostname": "ok", "password_hash": "plaintext"}, "not a crypt hash"),
    ],
)
def test_bad_values_refused(tmp_path, kwargs, message):
    with pytest.raises(CloudopsError, match=message):
        seed.make_seed(tmp_path / "s.iso", **kwargs)
    assert not (tmp_path / "s.iso").exists()


@pytest.mark.parametrize("name", ["a", "web-01", "a.b.example", "x" * 63])
def test_good_hostnames(name):
    assert validate_hostname(name) == name


def test_rsa_key_with_wrong_type_refused():
    blob = KEY1.split()[1]
    with pytest.raises(CloudopsError, match="not 'ssh-rsa'"):
        normalize_ssh_keys([f"ssh-rsa {blob}"])


@needs_busybox
def test_tiny_guest_parser_applies_seed(tmp_path):
    root = guest_root(tmp_path)
    files = seed.seed_files("vm-7", [KEY1, KEY2], HASH)
    proc = seed_apply(tmp_path, files, root)
    assert proc.returncode == 0, proc.stderr
    assert (root / "etc/hostname").read_text() == "vm-7\n"
    assert "127.0.1.1 vm-7" in (root / "etc/hosts").read_text()
    keys = (root / "root/.ssh/authorized_keys").read_text().splitlines()
    assert keys == [KEY1, KEY2]
    assert stat.S_IMODE((root / "root/.ssh/authorized_keys").stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "root/.ssh").stat().st_mode) == 0o700
    shadow = (root / "etc/shadow").read_text().splitlines()
    assert shadow[0].split(":")[1] == HASH
    assert passwords.verify("s3cret", shadow[0].split(":")[1])
    assert shadow[1].startswith("nobody:*:")
    # Applying again (every boot with the seed attached) changes nothing.
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert seed_apply(tmp_path, files, root).returncode == 0
    assert before == {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@needs_busybox
def test_tiny_guest_parser_meta_data_hostname_only(tmp_path):
    root = guest_root(tmp_path)
    proc = seed_apply(tmp_path, {"meta-data": "instance-id: x\nlocal-hostname: from-meta\n"}, root)
    assert proc.returncode == 0, proc.stderr
    assert (root / "etc/hostname").read_text() == "from-meta\n"
    assert not (root / "root/.ssh").exists()
    assert (root / "etc/shadow").read_text().startswith("root:*:")


@needs_busybox
def test_tiny_guest_parser_refuses_bad_values(tmp_path):
    root = guest_root(tmp_path)
    user_data = '#cloud-config\nhostname: "bad;name"\nusers:\n  - name: root\n    hashed_passwd: "plain text"\n'
    proc = seed_apply(tmp_path, {"user-data": user_data, "meta-data": ""}, root)
    assert proc.returncode == 1
    assert (root / "etc/hostname").read_text() == "tiny\n"
    assert (root / "etc/shadow").read_text().startswith("root:*:")


def test_a_vm_seed_names_its_nic_by_mac_so_every_cloud_init_renderer_can_bring_it_up():
    config = seed.dhcp_config(["52:54:00:aa:bb:cc"])
    net = yaml.safe_load(seed.seed_files("web", network_config=config)["network-config"])
    assert net == {"version": 2, "ethernets": {"eth0": {"match": {"macaddress": "52:54:00:aa:bb:cc"},
                                                        "set-name": "eth0", "dhcp4": True}}}


@needs_busybox
def test_tiny_guest_parser_takes_only_roots_hash(tmp_path):
    other = passwords.hash_password("not root's")
    user_data = ("#cloud-config\nusers:\n- name: alice\n  hashed_passwd: " + other + "\n  ssh_authorized_keys:\n"
                 "  - name: root\n    hashed_passwd: " + other + "\n- default\n- name: \"root\"\n"
                 "  lock_passwd: false\n  hashed_passwd: \"" + HASH + "\"\nruncmd:\n- [true]\n")
    root = guest_root(tmp_path)
    assert seed_apply(tmp_path, {"user-data": user_data}, root).returncode == 0
    assert (root / "etc/shadow").read_text().splitlines()[0].split(":")[1] == HASH
    root2 = guest_root(tmp_path / "2")
    no_root = "#cloud-config\nusers:\n  - name: alice\n    hashed_passwd: \"" + other + "\"\n"
    assert seed_apply(tmp_path, {"user-data": no_root}, root2).returncode == 0
    assert (root2 / "etc/shadow").read_text().startswith("root:*:")


def test_the_seed_carries_the_host_key_cloudops_made_for_cloud_init():
    from cryptography.hazmat.primitives import serialization

    from cloudops.compute import guest

    private, (ktype, kdata) = guest.make_host_key()
    assert ktype == "ssh-ed25519"
    config = yaml.safe_load(seed.user_data_text("web1", [KEY1], host_key=private))
    assert config["ssh_keys"]["ed25519_private"] == private.strip() + "\n"  # what cloud-init writes, whole
    assert config["ssh_keys"]["ed25519_public"].split() == [ktype, kdata]
    # cloud-init makes no other key type when ssh_keys is given; "ssh_genkeytypes: []" would be refused by
    # its schema ("Invalid cloud-config provided" on the console), so it is not written
    assert "ssh_genkeytypes" not in config
    loaded = serialization.load_ssh_private_key(config["ssh_keys"]["ed25519_private"].encode(), password=None)
    assert loaded.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                            serialization.PublicFormat.OpenSSH).decode().split() == [ktype, kdata]
    assert "ssh_keys" not in yaml.safe_load(seed.user_data_text("web1", [KEY1]))


def test_the_users_own_ssh_keys_win_over_the_host_key_cloudops_made():
    from cloudops.compute import guest, userdata

    private, _ = guest.make_host_key()
    notes = []
    theirs = userdata.UserData(path="mine.yaml", kind="cloud-config", config={"ssh_keys": {"rsa_private": "x", "rsa_public": "ssh-rsa AAAA"}},
                               )
    config = yaml.safe_load(seed.user_data_text("web1", [KEY1], user_data=theirs, progress=notes.append,
                                                host_key=private))
    assert config["ssh_keys"] == {"rsa_private": "x", "rsa_public": "ssh-rsa AAAA"} and "ssh_genkeytypes" not in config
    assert any("cloudops reads them on its console" in n for n in notes)


def test_a_host_key_that_is_not_ed25519_openssh_is_refused():
    with pytest.raises(CloudopsError, match="not an OpenSSH private key"):
        seed.user_data_text("web1", [KEY1], host_key="-----BEGIN NONSENSE-----\nabc\n-----END NONSENSE-----\n")
