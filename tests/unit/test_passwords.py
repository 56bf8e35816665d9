"""SHA-512 crypt hashes: format, random salt, verification."""

import pytest

from cloudops import passwords
from cloudops.errors import CloudopsError


def test_hash_is_sha512_crypt_with_random_salt():
    first = passwords.hash_password("correct horse")
    second = passwords.hash_password("correct horse")
    assert first.startswith("$6$") and second.startswith("$6$")
    salt = first.split("$")[2]
    assert len(salt) == 16
    assert first != second, "two hashes of one password must differ (random salt)"
    assert "correct horse" not in first
    assert passwords.is_hash(first)


def test_verify():
    hashed = passwords.hash_password("s3cret!")
    assert passwords.verify("s3cret!", hashed)
    assert not passwords.verify("s3cret", hashed)
    assert not passwords.verify("", hashed)
    assert not passwords.verify("s3cret!", "s3cret!"), "a plaintext is not a hash"
    assert not passwords.verify("s3cret!", "*")


def test_verify_known_vector():
    # From the glibc SHA-crypt specification (rounds=5000 default, salt "saltstring").
    known = "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1"
    assert passwords.verify("Hello world!", known)


@pytest.mark.parametrize("bad", ["", "two\nlines", "nul\0"])
def test_bad_passwords_refused(bad):
    with pytest.raises(CloudopsError):
        passwords.hash_password(bad)


@pytest.mark.parametrize("value", ["plain text", "root:x", "$6$salt$has space", "$6$a$b\n", ""])
def test_is_hash_rejects_non_hashes(value):
    assert not passwords.is_hash(value)
