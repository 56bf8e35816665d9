"""Deploy: bad input is one clear line before any host is touched; managed blocks, facts and host-key checks."""

import pytest

from cloudops import cloudkeys, hostfiles, inventory
from cloudops.errors import CloudopsError
from cloudops.hosts import deploy
from cloudops.inventory import Host

KEY_A = "AAAAC3NzaC1lZDI1NTE5AAAAIGx1Z0lAfL0Yo0Ws1pVmLU0tWMxBj2eZ6dQ2cW9T3d0a"
KEY_B = "AAAAC3NzaC1lZDI1NTE5AAAAIPq1nB9J3m0uA1t2a5n1Y8c2Uu8H0pO6u5Tq2C1cZ4aB"


def host(**vars_):
    return Host(name="hv1", address="10.0.0.11", vars=vars_)


def test_defaults_are_valid():
    settings = deploy.settings_for(host())
    assert settings.pool_path == "/var/lib/cloudops" and settings.networks[0].name == "cloudops"


@pytest.mark.parametrize("vars_, message", [
    ({"pool_path": "relative/pool"}, "hv1: pool_path must be an absolute path"),
    ({"pool_path": 42}, "hv1: pool_path must be an absolute path"),
    ({"networks": [{"name": "a", "cidr": "10.1.0.0/33"}]}, "hv1: networks[0]: network a"),
    ({"networks": [{"name": "a", "cidr": "not-a-cidr"}]}, "hv1: networks[0]: network a"),
    ({"networks": [{"name": "a", "cidr": "10.1.0.0/24"}, {"name": "b", "cidr": "10.1.0.0/24"}]},
     "hv1: networks: DHCP ranges of a (10.1.0.0/24) and b (10.1.0.0/24) overlap"),
    ({"packages": "libvirt-clients"}, "hv1: packages must be a list"),
    ({"libvirtd_keepalive_interval": "5"}, "hv1: libvirtd_keepalive_interval must be an integer"),
    ({"libvirtd_log_level": 9}, "hv1: libvirtd_log_level must be an integer in 1..4"),
    ({"libvirtd_restart": "a\nb"}, "hv1: libvirtd_restart must be a one-line shell command"),
    ({"metrics": {"carbon": "10.0.0.1:70000", "prefix": "c"}}, "hv1: metrics.carbon port must be in 1..65535"),
    ({"cloud_name": "x; rm -rf /"}, "hv1: cloud_name must be a short text"),
])
def test_wrong_variables_are_one_clear_line(vars_, message):
    with pytest.raises(CloudopsError) as exc:
        deploy.plan([host(**vars_)], [])
    assert str(exc.value).startswith(message), str(exc.value)
    assert "\n" not in str(exc.value)


def test_template_with_a_missing_variable_fails_the_plan(tmp_path):
    (tmp_path / "motd.j2").write_text("{{ host }} in {{ datacenter }}\n")
    with pytest.raises(CloudopsError, match=r"hv1: template .*motd.j2: 'datacenter' is undefined"):
        deploy.plan([host(deploy_templates=str(tmp_path))], [])


def test_an_override_template_that_is_complete_is_used(tmp_path):
    (tmp_path / "motd.j2").write_text("welcome to {{ host }}\n")
    settings = deploy.plan([host(deploy_templates=str(tmp_path))], [])["hv1"]
    assert deploy.banner(host(), settings) == "welcome to hv1\n"


def test_port_out_of_range_and_unknown_host_fail_in_the_inventory(tmp_path):
    path = tmp_path / "inv.yaml"
    path.write_text("hosts:\n  hv1: {address: 10.0.0.11, port: 70000}\n")
    with pytest.raises(CloudopsError, match=r"hosts.hv1.port: must be an integer in 1..65535"):
        inventory.load(path)
    path.write_text("hosts:\n  hv1: {address: 10.0.0.11}\n")
    with pytest.raises(CloudopsError, match="unknown host 'hv9'"):
        inventory.load(path).select(hosts="hv9")


def test_libvirtd_conf_keeps_the_host_uuid():
    settings = deploy.settings_for(host())
    text = deploy.libvirtd_conf(host(), settings, "2f92a6ed-d12b-5285-be88-02544587ac14")
    assert deploy.UUID_RE.search(text).group(1) == "2f92a6ed-d12b-5285-be88-02544587ac14"
    assert "keepalive_interval = 5" in text and "log_outputs" in text


def test_managed_block_is_replaced_in_place_and_idempotent():
    text = "keep me\n"
    once = hostfiles.with_block(text, "peers", ["a", "b"])
    assert once == "keep me\n# BEGIN cloudops peers\na\nb\n# END cloudops peers\n"
    assert hostfiles.with_block(once, "peers", ["a", "b"]) == once
    assert hostfiles.with_block(once, "peers", ["c"]).count("# BEGIN") == 1
    assert hostfiles.block_body(hostfiles.with_block(once, "peers", ["c"]), "peers") == ["c"]
    assert hostfiles.with_block(None, "x", ["1"], top=True).startswith("# BEGIN cloudops x\n1\n")
    top = hostfiles.with_block("Host other\n", "peers", ["p"], top=True)
    assert top.splitlines()[0] == "# BEGIN cloudops peers" and top.endswith("Host other\n")


def test_read_script_round_trip():
    text = "file\t/etc/motd\t644\taGVsbG8K\nmissing\t/root/.ssh/config\n"
    files = hostfiles.parse_files(text)
    assert files["/etc/motd"].content == "hello\n" and files["/etc/motd"].mode == "644"
    assert not files["/root/.ssh/config"].exists


def test_parse_facts():
    out = "home\t/root\ninit\tnone\npkg\tqemu-utils\tii \npkg\tcron\tun \n"
    home, init, installed = deploy.parse_facts(out, ["qemu-utils", "cron", "absent"])
    assert (home, init) == ("/root", "none")
    assert installed == {"qemu-utils": True, "cron": False, "absent": False}


def test_restart_command_detected_or_configured():
    settings = deploy.settings_for(host())
    assert deploy.restart_command(settings, "systemd") == "systemctl restart libvirtd"
    assert deploy.restart_command(settings, "service") == "service libvirtd restart"
    with pytest.raises(CloudopsError, match="libvirtd_restart"):
        deploy.restart_command(settings, "none")
    assert deploy.restart_command(deploy.settings_for(host(libvirtd_restart="rc-service libvirtd restart")),
                                  "none") == "rc-service libvirtd restart"


@pytest.fixture
def trusted(tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(f"hv1,10.0.0.11 ssh-ed25519 {KEY_A}\n")
    return Host(name="hv1", address="10.0.0.11", vars={"known_hosts": str(known)})


def test_scanned_host_key_is_kept_only_when_the_trusted_file_confirms_it(trusted):
    keys = cloudkeys.verify(trusted, [("ssh-ed25519", KEY_A), ("ssh-rsa", "AAAAB3Nza")])
    assert keys.lines == [f"hv1,10.0.0.11 ssh-ed25519 {KEY_A}"]
    assert "unverified ssh-rsa" in keys.note


def test_a_different_host_key_is_refused(trusted):
    with pytest.raises(CloudopsError, match="hv1: ssh-ed25519 host key differs"):
        cloudkeys.verify(trusted, [("ssh-ed25519", KEY_B)])


def test_a_host_without_a_trusted_key_is_refused(tmp_path):
    (tmp_path / "empty").write_text("")
    stranger = Host(name="hv9", address="10.0.0.19", vars={"known_hosts": str(tmp_path / "empty")})
    with pytest.raises(CloudopsError, match="hv9: no trusted host key"):
        cloudkeys.verify(stranger, [("ssh-ed25519", KEY_A)])


def test_a_host_that_does_not_answer_keeps_its_trusted_keys(trusted):
    keys = cloudkeys.verify(trusted, None)
    assert keys.lines == [f"hv1,10.0.0.11 ssh-ed25519 {KEY_A}"] and "not answering" in keys.note


def test_parse_keyscan_skips_comments():
    text = f"# 10.0.0.11:22 SSH-2.0-OpenSSH\n10.0.0.11 ssh-ed25519 {KEY_A}\n\n"
    assert cloudkeys.parse_keyscan(text) == [("ssh-ed25519", KEY_A)]
