"""Checksum lists as distributions publish them, the algorithm guessed from the digest's length, checking a file."""

import hashlib

import pytest

from cloudops.errors import CloudopsError
from cloudops.imaging import checksums as sums

A256, B512 = "a" * 64, "b" * 128

DEBIAN = f"""{B512}  debian-12-genericcloud-amd64.qcow2
{"c" * 128}  debian-12-genericcloud-amd64.raw
"""
BINARY_MODE = f"{A256} *image.qcow2\n"
FEDORA = f"""-----BEGIN PGP SIGNED MESSAGE-----
Hash: SHA256

# Fedora-Cloud-Base-Generic-41-1.4.x86_64.qcow2: 469041152 bytes
SHA256 (Fedora-Cloud-Base-Generic-41-1.4.x86_64.qcow2) = {A256.upper()}
-----BEGIN PGP SIGNATURE-----
iQIzBAEBCAAdFiEE
-----END PGP SIGNATURE-----
"""


def test_gnu_text_and_binary_mode_lines():
    assert sums.parse(DEBIAN) == {"debian-12-genericcloud-amd64.qcow2": B512,
                                  "debian-12-genericcloud-amd64.raw": "c" * 128}
    assert sums.parse(BINARY_MODE) == {"image.qcow2": A256}
    assert sums.parse(f"{A256}  ./sub dir/x.img\n") == {"sub dir/x.img": A256}


def test_bsd_lines_inside_a_clearsigned_file():
    assert sums.parse(FEDORA) == {"Fedora-Cloud-Base-Generic-41-1.4.x86_64.qcow2": A256}
    assert sums.parse(f"SHA512 (x.qcow2) = {B512}\n") == {"x.qcow2": B512}


@pytest.mark.parametrize(("length", "algorithm"), [(64, "sha256"), (96, "sha384"), (128, "sha512")])
def test_algorithm_from_length(length, algorithm):
    assert sums.algorithm_for("0" * length) == algorithm


@pytest.mark.parametrize(("digest", "message"), [
    ("0" * 32, "md5 is not accepted"), ("0" * 40, "sha1 is not accepted"), ("0" * 63, "63 hex digits"),
    ("z" * 64, "not a hex digest"), ("", "not a hex digest"),
])
def test_other_lengths_are_refused(digest, message):
    with pytest.raises(CloudopsError, match=message):
        sums.algorithm_for(digest)


def test_lookup_by_the_urls_file_name():
    found = sums.lookup(DEBIAN, "debian-12-genericcloud-amd64.qcow2", "https://x/SHA512SUMS")
    assert found == sums.Expected("sha512", B512, "https://x/SHA512SUMS")
    assert sums.lookup(f"{A256}  images/x.qcow2\n", "x.qcow2", "S").hexdigest == A256  # unique base name


def test_lookup_of_a_file_the_list_does_not_name():
    with pytest.raises(CloudopsError, match=r"SUMS has no checksum for 'other.qcow2' \(2 other file\(s\) listed\)"):
        sums.lookup(DEBIAN, "other.qcow2", "SUMS")
    with pytest.raises(CloudopsError, match="holds no checksum lines"):
        sums.lookup("<html>not found</html>", "x.qcow2", "SUMS")
    ambiguous = f"{A256}  a/x.qcow2\n{'d' * 64}  b/x.qcow2\n"
    with pytest.raises(CloudopsError, match="no checksum for 'x.qcow2'"):
        sums.lookup(ambiguous, "x.qcow2", "SUMS")


def test_options_must_have_their_algorithms_length():
    assert sums.expectations(sha256=A256.upper()) == [sums.Expected("sha256", A256, "--sha256")]
    with pytest.raises(CloudopsError, match="--sha256 .*128 hex digits is not a sha256"):
        sums.expectations(sha256=B512)
    with pytest.raises(CloudopsError, match="--sha512 has 3 hex digits"):
        sums.expectations(sha512="abc")


def test_verify_checks_every_expectation(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"disk")
    good256 = sums.Expected("sha256", hashlib.sha256(b"disk").hexdigest(), "--sha256")
    good512 = sums.Expected("sha512", hashlib.sha512(b"disk").hexdigest(), "SUMS")
    sums.verify(f, [good256, good512], "x")
    sums.verify(f, [], "x")
    with pytest.raises(CloudopsError, match="checksum mismatch for http://h/x: sha512 is .*, SUMS says bbbb"):
        sums.verify(f, [good256, sums.Expected("sha512", B512, "SUMS")], "http://h/x")
