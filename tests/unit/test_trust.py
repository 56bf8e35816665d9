"""Host-key trust of libvirt and SSH connections: the one-line errors, the migration URI, authorized_keys."""

import paramiko

from cloudops import ssh, virt
from cloudops.inventory import Host

HV2 = Host("hv2", "10.0.0.2", key="/ops/id", vars={"known_hosts": "/ops/known_hosts"})

LIBSSH2_CHANGED = ("authentication failed: !!! SSH HOST KEY VERIFICATION FAILED !!!: Identity of host '10.0.0.2:22' "
                   "differs from stored identity. Please verify the new host key 'AAAA' to avoid possible man in "
                   "the middle attack. The key is stored in '/ops/known_hosts'.")
LIBSSH2_UNKNOWN = "SSH transport error: No user interaction callback provided: Can't verify the session host key"


def test_a_changed_host_key_is_one_line_naming_the_host_and_the_mismatch():
    message = virt.open_error(HV2, HV2.libvirt_uri, LIBSSH2_CHANGED)
    assert len(message.splitlines()) == 1
    assert message.startswith("hv2: SSH host key of 10.0.0.2 does not match the trusted known_hosts /ops/known_hosts")


def test_an_unknown_host_key_is_one_line_and_never_accepted():
    message = virt.open_error(HV2, HV2.libvirt_uri, LIBSSH2_UNKNOWN)
    assert message.startswith("hv2: SSH host key of 10.0.0.2 is not in the trusted known_hosts /ops/known_hosts")
    assert "never accepts" in message


def test_other_failures_keep_the_last_line_of_libvirt():
    message = virt.open_error(HV2, HV2.libvirt_uri, "Cannot recv data\nConnection refused")
    assert message == f"hv2: cannot reach libvirtd at {HV2.libvirt_uri}: Connection refused"


def test_paramiko_bad_host_key_is_described_as_a_mismatch():
    good, bad = paramiko.RSAKey.generate(1024), paramiko.RSAKey.generate(1024)
    text = ssh.describe(paramiko.BadHostKeyException("10.0.0.2", bad, good))
    assert text.startswith("SSH host key of 10.0.0.2 does not match the trusted known_hosts")
