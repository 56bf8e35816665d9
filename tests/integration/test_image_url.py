"""`invoke image.add URL` through the real CLI against a real HTTP server on 127.0.0.1.

The server (``RangeHandler``) serves a real qcow2 made by qemu-img, a file that is no disk image,
and their SHA512SUMS; it honours ``Range: bytes=N-`` with ``If-Range`` (ETag), logs every request's
headers, and can be told to cut the connection after N bytes of a file. Each test has its own
state directory (``CLOUDOPS_STATE_DIR``), so its image store and sqlite catalog are its own. The
oracles are outside cloudops: ``qemu-img info`` of the stored file, hashlib over the bytes, the
server's request log, and the store's directory listing.
"""

import hashlib
import json
import shutil
import socket
import subprocess
import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import invoke

if not shutil.which("qemu-img") or not shutil.which("qemu-io"):
    pytest.skip("needs qemu-img and qemu-io (qemu-utils)", allow_module_level=True)


class RangeHandler(BaseHTTPRequestHandler):
    """GET and HEAD of the files in ``server.root``, with single ranges ``bytes=N-`` and If-Range."""

    def log_message(self, *args):  # quiet: the test reads server.requests instead
        pass

    def do_GET(self):
        self.server.requests.append({"path": self.path, "headers": dict(self.headers)})
        path = self.server.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404, "Not Found")
            return
        data = path.read_bytes()
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        start = 0
        wanted = self.headers.get("Range", "")
        if_range = self.headers.get("If-Range")
        if wanted.startswith("bytes=") and wanted.endswith("-") and (if_range is None or if_range == etag):
            start = int(wanted[len("bytes="):-1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", formatdate(path.stat().st_mtime, usegmt=True))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = self.server.cut.pop(self.path, None)
        if cut is not None:  # send part of it, then drop the connection as a failing network would
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    image = root / "small.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    # ~3 MiB of data clusters, so a download takes several reads and can be cut in the middle
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 3M", str(image)], check=True,
                   capture_output=True)
    (root / "notdisk.qcow2").write_bytes(b"this is a web page, not a disk\n" * 4096)
    (root / "other.qcow2").write_bytes(image.read_bytes())
    sums = {p.name: hashlib.sha512(p.read_bytes()).hexdigest() for p in root.iterdir()}
    (root / "SHA512SUMS").write_text("".join(f"{h}  {n}\n" for n, h in sorted(sums.items())))
    (root / "BAD-SHA512SUMS").write_text(f"{'0' * 128}  small.qcow2\n{sums['notdisk.qcow2']} *notdisk.qcow2\n")
    (root / "sub").mkdir()
    (root / "sub" / "SHA512SUMS").write_text(f"SHA512 (other.qcow2) = {sums['other.qcow2']}\n")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.root, httpd.requests, httpd.cut = root, [], {}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def state_dir(tmp_path):
    return tmp_path / "state"


def cli(state_dir, *args):
    # no_proxy: a proxy configured in the environment must not be asked for 127.0.0.1
    return invoke(*args, env={"CLOUDOPS_STATE_DIR": str(state_dir), "no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"},
                  timeout=300)


def store_files(state_dir) -> list[str]:
    """Every file under the image store (the partial directory included), relative names."""
    store = state_dir / "images" / "store"
    return sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()) if store.exists() else []


def catalog(state_dir) -> list[dict]:
    listed = cli(state_dir, "image.list", "--local", "--json")
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def error_line(proc) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cloudops: ")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_good_checksum_is_stored_and_listed(server, state_dir):
    source = server.root / "small.qcow2"
    proc = cli(state_dir, "image.add", f"{server.url}/small.qcow2", "--checksums", f"{server.url}/SHA512SUMS",
               "--json")
    assert proc.returncode == 0, proc.stderr
    added = json.loads(proc.stdout)
    assert added["id"] == sha256_of(source) and added["name"] == "small" and added["changed"] is True
    assert "downloading small.qcow2" in proc.stderr
    stored = state_dir / "images" / "store" / f"{added['id']}.qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(stored)], check=True,
                                     capture_output=True, text=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 16 << 20
    assert stored.read_bytes() == source.read_bytes()
    assert stored.stat().st_mode & 0o777 == 0o644
    assert store_files(state_dir) == [stored.name]  # no partial or temporary file left
    [row] = catalog(state_dir)
    assert row["name"] == "small" and row["full_id"] == added["id"] and row["format"] == "qcow2"
    again = cli(state_dir, "image.add", f"{server.url}/small.qcow2", "--sha256", added["id"])
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr


def test_bsd_checksum_list_and_sha512_option(server, state_dir):
    source = server.root / "other.qcow2"
    proc = cli(state_dir, "image.add", f"{server.url}/other.qcow2", "--checksums", f"{server.url}/sub/SHA512SUMS",
               "--sha512", hashlib.sha512(source.read_bytes()).hexdigest(), "--name", "other", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["id"] == sha256_of(source)


def test_bad_checksum_is_refused_and_nothing_stored(server, state_dir):
    proc = cli(state_dir, "image.add", f"{server.url}/small.qcow2", "--checksums", f"{server.url}/BAD-SHA512SUMS")
    line = error_line(proc)
    assert line.startswith("cloudops: checksum mismatch for http://127.0.0.1") and "BAD-SHA512SUMS" in line, line
    assert store_files(state_dir) == []
    assert catalog(state_dir) == []


@pytest.mark.parametrize(("args", "expected"), [
    (["{url}/missing.qcow2"], "cloudops: cannot download {url}/missing.qcow2: HTTP 404"),
    (["http://127.0.0.1:{closed}/small.qcow2"], "connection refused"),
    (["{url}/notdisk.qcow2", "--checksums", "{url}/SHA512SUMS"], "is not a disk image"),
    (["{url}/small.qcow2", "--checksums", "{url}/sub/SHA512SUMS"], "has no checksum for 'small.qcow2'"),
    (["{url}/small.qcow2", "--checksums", "{url}/NO-SUCH-SUMS"], "cannot download {url}/NO-SUCH-SUMS: HTTP 404"),
    (["ftp://127.0.0.1/small.qcow2"], "URL scheme 'ftp' is not supported"),
    (["{url}/small.qcow2", "--sha512", "abc"], "--sha512 has 3 hex digits"),
])
def test_bad_input_is_one_line_and_nothing_stored(server, state_dir, args, expected):
    with socket.socket() as s:  # a port nobody listens on: bound, never listening, closed at the end
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
        fill = {"url": server.url, "closed": closed}
        line = error_line(cli(state_dir, "image.add", *(a.format(**fill) for a in args)))
    assert expected.format(**fill) in line, line
    assert store_files(state_dir) == []
    assert catalog(state_dir) == []


def test_interrupted_download_resumes_with_range(server, state_dir):
    source = server.root / "small.qcow2"
    url = f"{server.url}/small.qcow2"
    cut = 1_500_000
    server.cut["/small.qcow2"] = cut
    first = cli(state_dir, "image.add", url, "--checksums", f"{server.url}/SHA512SUMS")
    line = error_line(first)
    assert "interrupted" in line and "run the same image.add again to resume" in line, line
    partial = state_dir / "images" / "store" / ".partial" / hashlib.sha256(url.encode()).hexdigest()
    assert partial.stat().st_size == cut
    assert partial.stat().st_mode & 0o777 == 0o600
    assert source.read_bytes().startswith(partial.read_bytes())
    assert catalog(state_dir) == []

    del server.requests[:]
    second = cli(state_dir, "image.add", url, "--checksums", f"{server.url}/SHA512SUMS", "--json")
    assert second.returncode == 0, second.stderr
    [image_request] = [r for r in server.requests if r["path"] == "/small.qcow2"]
    assert image_request["headers"].get("Range") == f"bytes={cut}-"
    assert image_request["headers"].get("If-Range", "").startswith('"')  # the ETag of the first answer
    added = json.loads(second.stdout)
    stored = state_dir / "images" / "store" / f"{added['id']}.qcow2"
    assert sha256_of(stored) == sha256_of(source) == added["id"]
    assert store_files(state_dir) == [stored.name]
