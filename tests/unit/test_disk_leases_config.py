"""Disk leases: the files deploy and lab.up write (lockd plugin on, lockspace on the shared path), checked as text."""

import pytest

from cloudops.errors import CloudopsError
from cloudops.hosts import deploy, leases
from cloudops.inventory import Host


def conf_values(text: str) -> dict:
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def test_the_lockspace_is_on_the_shared_path_and_every_writable_disk_needs_a_lease():
    values = conf_values(leases.lockd_conf("/srv/shared/"))
    assert values == {"auto_disk_leases": "1", "require_lease_for_disks": "1",
                      "file_lockspace_dir": '"/srv/shared/.leases"'}


def test_qemu_conf_gets_the_lock_manager_once_and_keeps_the_rest():
    original = 'user = "root"\n#lock_manager = "lockd"\n'
    once = leases.qemu_conf(original)
    assert conf_values(once) == {"user": '"root"', "lock_manager": '"lockd"'}
    assert leases.qemu_conf(once) == once  # a second deploy changes nothing
    assert once.startswith(original)


def test_virtlockd_is_started_by_the_init_system_or_the_inventory():
    assert leases.virtlockd_start_command("none", "virtlockd -d") == "virtlockd -d"
    assert "virtlockd.socket" in leases.virtlockd_start_command("systemd", None)
    assert leases.virtlockd_start_command("service", None) == "service virtlockd start"
    assert leases.virtlockd_start_command("none", None) is None


def test_deploy_knows_the_leases_step_after_libvirtd_and_its_variables():
    assert deploy.STEPS.index("leases") == deploy.STEPS.index("libvirtd") + 1
    settings = deploy.settings_for(Host("hv1", "10.0.0.1", vars={"shared_path": "/srv/shared/"}))
    assert settings.shared_path == "/srv/shared" and settings.virtlockd_start is None
    assert deploy.settings_for(Host("hv1", "10.0.0.1")).shared_path is None  # no leases without shared storage


@pytest.mark.parametrize("vars_, message", [
    ({"shared_path": "srv/shared"}, "hv1: shared_path must be an absolute path"),
    ({"shared_path": "/srv/my shared"}, "hv1: shared_path must be an absolute path"),
    ({"virtlockd_start": "a\nb"}, "hv1: virtlockd_start must be a one-line shell command"),
])
def test_wrong_lease_variables_are_one_clear_line(vars_, message):
    with pytest.raises(CloudopsError, match=message):
        deploy.settings_for(Host("hv1", "10.0.0.1", vars=vars_))
