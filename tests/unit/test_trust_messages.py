"""Host-key trust of libvirt and SSH connections: the one-line errors, the migration URI, authorized_keys."""

import paramiko
import pytest

from cloudops import cloudkeys, ssh, virt
from cloudops.errors import CloudopsError
from cloudops.inventory import Host
from cloudops.migration import migrate

HV2 = Host("hv2", "10.0.0.2", key="/ops/id", vars={"known_hosts": "/ops/known_hosts"})

# what libvirt reports from OpenSSH (ssh's stderr is part of the error)
SSH_CHANGED = ("Cannot recv data: @@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n"
               "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n"
               "Host key for 10.0.0.2 has changed and you have requested strict checking.\n"
               "Host key verification failed.: Connection reset by peer")
SSH_UNKNOWN = ("Cannot recv data: No ED25519 host key is known for 10.0.0.2 and you have requested strict checking.\n"
               "Host key verification failed.: Connection reset by peer")


def test_a_changed_host_key_is_one_line_naming_the_host_and_the_mismatch():
    message = virt.open_error(HV2, HV2.libvirt_uri, SSH_CHANGED)
    assert len(message.splitlines()) == 1
    assert message.startswith("hv2: SSH host key of 10.0.0.2 does not match the trusted known_hosts /ops/known_hosts")


def test_an_unknown_host_key_is_one_line_and_never_accepted():
    message = virt.open_error(HV2, HV2.libvirt_uri, SSH_UNKNOWN)
    assert message.startswith("hv2: SSH host key of 10.0.0.2 is not in the trusted known_hosts /ops/known_hosts")
    assert "never accepts" in message


def test_other_failures_keep_the_last_line_of_libvirt():
    message = virt.open_error(HV2, HV2.libvirt_uri, "Cannot recv data\nConnection refused")
    assert message == f"hv2: cannot reach libvirtd at {HV2.libvirt_uri}: Connection refused"


def test_paramiko_bad_host_key_is_described_as_a_mismatch():
    good, bad = paramiko.RSAKey.generate(1024), paramiko.RSAKey.generate(1024)
    text = ssh.describe(paramiko.BadHostKeyException("10.0.0.2", bad, good))
    assert text.startswith("SSH host key of 10.0.0.2 does not match the trusted known_hosts")


# ---------------------------------------------------------------- migration: the hosts' own key and trust

def test_the_migration_uri_uses_the_hosts_own_key_and_known_hosts_never_the_operators():
    uri = migrate.migration_uri(HV2)
    assert uri == "qemu+ssh://root@10.0.0.2:22/system?keyfile=/root/.ssh/cloudops_migration&no_tty=1"
    assert "/ops/" not in uri and "command=" not in uri  # the source's own ssh, key and known_hosts


def test_the_migration_uri_honours_migration_home_and_an_explicit_migration_uri():
    dest = Host("hv2", "fd00::2", port=2222, vars={"migration_home": "/srv/a b/"})
    assert migrate.migration_uri(dest) == ("qemu+ssh://root@[fd00::2]:2222/system?"
                                           "keyfile=/srv/a%20b/.ssh/cloudops_migration&no_tty=1")
    explicit = Host("hv2", "10.0.0.2", vars={"migration_uri": "qemu+tls://hv2/system"})
    assert migrate.migration_uri(explicit) == "qemu+tls://hv2/system"


PUBLIC = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBxyz cloudops-migration@cloud"


def test_the_migration_key_is_authorized_for_libvirts_helper_from_the_clouds_hosts_only():
    peers = [Host("hv1", "10.0.0.1"), Host("hv2", "10.0.0.2", vars={"migration_address": "192.168.9.2"})]
    line = cloudkeys.authorized_migration_key(PUBLIC, cloudkeys.migration_sources(peers))
    assert line == ('restrict,from="10.0.0.1,10.0.0.2,192.168.9.2",command="virt-ssh-helper qemu:///system" '
                    + PUBLIC)


@pytest.mark.parametrize("sources", [[], ['10.0.0.1",command="sh'], ["10.0.0.1 10.0.0.2"], ["a,b"]])
def test_an_address_that_would_widen_the_restriction_is_refused(sources):
    with pytest.raises(CloudopsError, match="cannot authorize the migration key"):
        cloudkeys.authorized_migration_key(PUBLIC, sources)


def test_a_public_key_that_is_not_one_line_is_refused():
    with pytest.raises(CloudopsError, match="not one 'type base64"):
        cloudkeys.authorized_migration_key(PUBLIC + '\nssh-ed25519 AAAA other', ["10.0.0.1"])


def test_only_a_transport_that_died_is_opened_again_never_a_refused_host_key():
    from cloudops import virt

    assert virt._transient("Cannot write data: Broken pipe")
    assert virt._transient("End of file while reading data: : Input/output error")
    assert not virt._transient("Cannot recv data: Host key verification failed.: Connection reset by peer")
    assert not virt._transient("authentication failed: Permission denied (publickey)")
    assert not virt._transient("unable to connect to server: No route to host")
