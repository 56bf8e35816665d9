"""Downloads against a fake server: Range and If-Range, 206/200/416, interruptions keep the partial file, errors
are one line; the download's progress lines; image.add of a URL leaves nothing when refused."""

import email.message
import hashlib
import subprocess
import urllib.error

import pytest

from cloudops.errors import CloudopsError
from cloudops.imaging import download
from cloudops.imaging import store as images

URL = "https://images.example/debian.qcow2"
DATA = bytes(range(256)) * 40_000  # ~10 MiB: several reads of download.CHUNK


def _headers(**fields):
    msg = email.message.Message()
    for key, value in fields.items():
        msg[key.replace("_", "-")] = str(value)
    return msg


class Response:
    def __init__(self, status, headers, body, fail_after=None):
        self.status, self.code, self.headers = status, status, headers
        self.body, self.pos, self.fail_after = body, 0, fail_after
        self.fail_with = ConnectionResetError(104, "reset")

    def read(self, n):
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise self.fail_with
        end = self.pos + n if self.fail_after is None else min(self.pos + n, self.fail_after)
        block, self.pos = self.body[self.pos:end], end
        return block

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def close(self):
        pass


class FakeServer:
    """Serves ``data`` with a strong ETag, honours ``Range: bytes=N-`` when If-Range matches (or is absent)."""

    def __init__(self, data=DATA, etag='"v1"', ranges=True):
        self.data, self.etag, self.ranges = data, etag, ranges
        self.requests, self.fail_after, self.status = [], None, None

    def __call__(self, request, timeout):
        assert timeout == 30
        headers = dict(request.header_items())
        self.requests.append(headers)
        if self.status:
            raise urllib.error.HTTPError(request.full_url, self.status, "Not Found", _headers(), None)
        fail, self.fail_after = self.fail_after, None
        wanted, if_range = headers.get("Range"), headers.get("If-range")
        common = {"ETag": self.etag} if self.etag else {}
        if wanted and self.ranges and (if_range is None or if_range == self.etag):
            start = int(wanted.removeprefix("bytes=").rstrip("-"))
            if start >= len(self.data):
                raise urllib.error.HTTPError(request.full_url, 416, "Range Not Satisfiable",
                                             _headers(Content_Range=f"bytes */{len(self.data)}"), None)
            body = self.data[start:]
            return Response(206, _headers(Content_Range=f"bytes {start}-{len(self.data) - 1}/{len(self.data)}",
                                          Content_Length=len(body), **common), body, fail)
        return Response(200, _headers(Content_Length=len(self.data), **common), self.data, fail)


@pytest.fixture
def partial(tmp_path):
    return download.Partial.of(URL, tmp_path / ".partial")


def fetch(partial, server, verified=True):
    return download.download(partial, verified=verified, timeout=30, opener=server)


def test_a_fresh_download_is_private_and_complete(partial):
    server = FakeServer()
    path = fetch(partial, server)
    assert path == partial.path and path.name == hashlib.sha256(URL.encode()).hexdigest()
    assert path.read_bytes() == DATA and path.stat().st_mode & 0o777 == 0o600
    assert "Range" not in server.requests[0]
    assert partial.meta()["etag"] == '"v1"'


def test_an_interrupted_download_is_kept_and_resumed_with_range_and_if_range(partial):
    server = FakeServer()
    server.fail_after = 3 << 20
    with pytest.raises(CloudopsError, match=r"interrupted at 3.0 MiB of 9.8 MiB \(connection reset by peer\); "
                                            "run the same image.add again to resume it"):
        fetch(partial, server)
    assert partial.size() == 3 << 20
    fetch(partial, server)
    assert server.requests[1]["Range"] == f"bytes={3 << 20}-" and server.requests[1]["If-range"] == '"v1"'
    assert partial.path.read_bytes() == DATA


def test_a_connection_closed_early_is_an_interruption_too(partial):
    server = FakeServer()

    def short(request, timeout):
        resp = FakeServer.__call__(server, request, timeout)
        resp.body = resp.body[:1000]  # Content-Length says more
        return resp

    with pytest.raises(CloudopsError, match="interrupted at 0.0 MiB .*connection closed before the end"):
        fetch(partial, short)
    assert partial.size() == 1000


def test_a_changed_file_is_downloaded_again_from_zero(partial):
    server = FakeServer()
    server.fail_after = 1 << 20
    with pytest.raises(CloudopsError, match="interrupted"):
        fetch(partial, server)
    server.data, server.etag = DATA[::-1], '"v2"'  # If-Range no longer matches: the server answers 200
    fetch(partial, server)
    assert server.requests[1]["If-range"] == '"v1"'
    assert partial.path.read_bytes() == DATA[::-1] and partial.meta()["etag"] == '"v2"'


def test_a_server_without_ranges_restarts(partial):
    partial.path.parent.mkdir()
    partial.path.write_bytes(b"old junk")
    fetch(partial, FakeServer(ranges=False))
    assert partial.path.read_bytes() == DATA


def test_without_a_validator_a_partial_file_is_resumed_only_when_a_checksum_is_checked(partial):
    partial.path.parent.mkdir()
    partial.path.write_bytes(DATA[:5000])
    server = FakeServer(etag=None)
    fetch(partial, server, verified=False)
    assert "Range" not in server.requests[0] and partial.path.read_bytes() == DATA
    partial.path.write_bytes(DATA[:5000])
    fetch(partial, server, verified=True)
    assert server.requests[1]["Range"] == "bytes=5000-" and "If-range" not in server.requests[1]
    assert partial.path.read_bytes() == DATA


def test_a_complete_partial_file_is_not_downloaded_again(partial):
    partial.path.parent.mkdir()
    partial.path.write_bytes(DATA)
    server = FakeServer()
    partial.save_meta(_headers(ETag='"v1"'), len(DATA))
    assert fetch(partial, server).read_bytes() == DATA
    assert server.requests[0]["Range"] == f"bytes={len(DATA)}-"


def test_ctrl_c_keeps_the_partial_file(partial):
    server = FakeServer()
    server.fail_after = 2 << 20
    real = server.__call__

    def interrupted(request, timeout):
        resp = real(request, timeout)
        resp.fail_with = KeyboardInterrupt()
        return resp

    with pytest.raises(KeyboardInterrupt):
        fetch(partial, interrupted)
    assert partial.size() == 2 << 20


def test_404_is_one_line_and_discards_what_was_kept(partial):
    partial.path.parent.mkdir()
    partial.path.write_bytes(b"x" * 100)
    partial.save_meta(_headers(ETag='"v1"'), len(DATA))
    server = FakeServer()
    server.status = 404
    with pytest.raises(CloudopsError, match=f"^cannot download {URL}: HTTP 404 Not Found$"):
        fetch(partial, server)
    assert not partial.path.exists() and not partial.meta_path.exists()


@pytest.mark.parametrize(("error", "reason"), [
    (urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")), "connection refused"),
    (urllib.error.URLError(TimeoutError("timed out")), "timed out"),
])
def test_unreachable_leaves_no_file(partial, error, reason):
    def unreachable(request, timeout):
        raise error

    with pytest.raises(CloudopsError, match=f"^cannot download {URL}: {reason}$"):
        fetch(partial, unreachable)
    assert not partial.path.exists()


def test_a_206_for_other_bytes_is_refused():
    with pytest.raises(CloudopsError, match="not the bytes from 100"):
        download.plan(206, _headers(Content_Range="bytes 0-9/10"), 100)
    assert download.plan(206, _headers(Content_Range="bytes 100-199/200"), 100) == ("append", 200)
    assert download.plan(200, _headers(Content_Length=200), 100) == ("restart", 200)
    assert download.plan(416, _headers(Content_Range="bytes */200"), 200) == ("complete", 200)
    assert download.plan(416, _headers(Content_Range="bytes */150"), 200) == ("retry", None)


def test_if_range_takes_a_strong_etag_else_last_modified():
    modified = "Tue, 01 Oct 2024 10:00:00 GMT"
    assert download.resume_headers(10, {"etag": '"x"', "last_modified": modified}, False)["If-Range"] == '"x"'
    assert download.resume_headers(10, {"etag": 'W/"x"', "last_modified": modified}, False)["If-Range"] == modified
    assert download.resume_headers(0, {"etag": '"x"'}, True) == {}


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://h/x.qcow2", "URL scheme 'ftp' is not supported"), ("file:///etc/passwd", "scheme 'file'"),
    ("http:///x.qcow2", "has no host"),
])
def test_only_http_and_https(url, message):
    assert download.is_url(url)
    with pytest.raises(CloudopsError, match=message):
        download.check_url(url)


def test_basename_is_what_the_checksum_list_names():
    assert download.basename("https://h/a/debian%2012.qcow2?x=1") == "debian 12.qcow2"
    assert not download.is_url("/var/tmp/x.qcow2") and not download.is_url("c:x")


def test_a_download_reports_its_bar_through_progress(tmp_path):
    """A plain progress callback gets the download's start and final lines (cloudops.progress's Bar)."""
    lines = []
    server = FakeServer(data=b"x" * 3000)
    partial = download.Partial.of(URL, tmp_path)
    download.download(partial, verified=False, timeout=30, progress=lines.append, opener=server)
    assert lines[0] == "downloading debian.qcow2 (0.0 MiB)" and lines[-1].startswith("downloaded debian.qcow2: 0.0 MiB in ")


# ---------------------------------------------------------------- image.add URL, nothing left when refused

def qcow2_bytes(tmp_path) -> bytes:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "src.qcow2"), "4M"], check=True)
    return (tmp_path / "src.qcow2").read_bytes()


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDOPS_VAR", str(tmp_path / "var"))
    server = FakeServer(data=qcow2_bytes(tmp_path))
    monkeypatch.setattr(download, "_opener", lambda: server)
    return server


def leftovers():
    return sorted(p.name for p in images.store_dir().rglob("*") if p.is_file()) if images.store_dir().exists() else []


def test_add_from_url_verifies_then_moves_into_the_store(served):
    digest = hashlib.sha256(served.data).hexdigest()
    image, changed = images.add_from(URL, sha512=hashlib.sha512(served.data).hexdigest())
    assert changed and image.id == digest and image.name == "debian"
    assert leftovers() == [f"{digest}.qcow2"]
    again, changed = images.add_from(URL, sha256=digest)
    assert again.id == digest and not changed and len(served.requests) == 1  # no second download


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sha256": "0" * 64}, "checksum mismatch for https://images.example/debian.qcow2: sha256"),
    ({"sha512": "0" * 128}, "checksum mismatch"),
])
def test_add_from_url_with_a_wrong_checksum_stores_nothing(served, kwargs, message):
    with pytest.raises(CloudopsError, match=message):
        images.add_from(URL, **kwargs)
    assert leftovers() == [] and images.list_images() == []


def test_add_from_url_of_no_disk_image_stores_nothing(served):
    served.data = b"<html>" + b"x" * 100_000
    with pytest.raises(CloudopsError, match=f"^{URL} is not a disk image"):
        images.add_from(URL)
    assert leftovers() == [] and images.list_images() == []


def test_a_local_file_is_checked_against_a_checksum_list_too(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDOPS_VAR", str(tmp_path / "var"))
    (tmp_path / "disk.qcow2").write_bytes(qcow2_bytes(tmp_path))
    good = hashlib.sha512((tmp_path / "disk.qcow2").read_bytes()).hexdigest()
    (tmp_path / "SHA512SUMS").write_text(f"SHA512 (disk.qcow2) = {good}\n")
    (tmp_path / "BAD").write_text(f"{'1' * 128} *disk.qcow2\n")
    with pytest.raises(CloudopsError, match="checksum mismatch for .*disk.qcow2: sha512"):
        images.add_from(str(tmp_path / "disk.qcow2"), checksums=str(tmp_path / "BAD"))
    image, changed = images.add_from(str(tmp_path / "disk.qcow2"), checksums=str(tmp_path / "SHA512SUMS"))
    assert changed and image.name == "disk"
