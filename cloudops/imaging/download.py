"""Downloading over http(s): streamed into a private partial file that a later run resumes with a Range request.

A download of ``url`` goes to ``<directory>/<sha256 of url>`` (mode 0600, under flock so two runs
cannot write it at once), with what the server said about it (ETag, Last-Modified, length) beside it
in ``<sha256 of url>.json``. An interrupted download (connection dropped, timeout, Ctrl-C) keeps that
file; the next download of the same URL asks for the rest (``Range: bytes=N-``, with ``If-Range``
carrying the validator when the server gave one) and appends on 206, starts again from zero on 200.
Without a validator a partial file is resumed only when the caller will verify a checksum.
TLS certificates are always verified; every connect and read has a timeout.
"""

import contextlib
import errno
import fcntl
import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from cloudops import __version__
from cloudops.errors import CloudopsError
from cloudops.progress import bar_for, no_progress

SCHEMES = ("http", "https")
CHUNK = 1 << 20
TEXT_LIMIT = 4 << 20  # a checksum list larger than this is not one
CONTENT_RANGE = re.compile(r"^bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)$")


def is_url(text: str) -> bool:
    """Whether ``text`` is meant as a URL (``scheme://...``) rather than a local path."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(text)))


def check_url(url: str) -> str:
    """``url`` when it is an http(s) URL with a host; one clear line otherwise."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES:
        raise CloudopsError(f"{url}: URL scheme {parts.scheme!r} is not supported (use http or https)")
    if not parts.hostname:
        raise CloudopsError(f"{url}: the URL has no host")
    return url


def basename(url: str) -> str:
    """The file name a URL ends with (percent-decoded), the name looked up in a checksum list."""
    name = unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
    if not name:
        raise CloudopsError(f"{url}: the URL names no file")
    return name


def _opener():
    context = ssl.create_default_context()  # verifies certificates and host names
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=context)).open


def _request(url, headers=None):
    return urllib.request.Request(url, headers={"User-Agent": f"cloudops/{__version__}", **(headers or {})})


def _reason(exc) -> str:
    """Why a request failed, in a few words: 'connection refused', 'timed out after 30 s', ..."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {exc.verify_message or exc}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or exc})"
    if isinstance(exc, socket.gaierror):
        return f"host not found ({exc.strerror})"
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH,
                                                   errno.ENETUNREACH, errno.EPIPE):
        return os.strerror(exc.errno).lower()
    if isinstance(exc, http.client.IncompleteRead):
        return "connection closed before the end"
    return str(getattr(exc, "reason", None) or exc) or type(exc).__name__


def fetch_text(url: str, timeout: float = 30, opener=None) -> str:
    """A small text file (a checksum list) over http(s); one line when it cannot be had."""
    check_url(url)
    try:
        with (opener or _opener())(_request(url), timeout=timeout) as resp:
            data = resp.read(TEXT_LIMIT + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise CloudopsError(f"cannot download {url}: {_reason(exc)}") from None
    if len(data) > TEXT_LIMIT:
        raise CloudopsError(f"{url} is larger than {TEXT_LIMIT >> 20} MiB: not a checksum list")
    return data.decode("utf-8", errors="replace")


# ---------------------------------------------------------------- the partial file and its validators

@dataclass
class Partial:
    """The partial download of one URL: its data file and what the server said about it."""

    url: str
    path: Path

    @classmethod
    def of(cls, url: str, directory: Path) -> "Partial":
        return cls(url, Path(directory) / hashlib.sha256(url.encode()).hexdigest())

    @property
    def meta_path(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def meta(self) -> dict:
        try:
            data = json.loads(self.meta_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) and data.get("url") == self.url else {}

    def save_meta(self, headers, total) -> None:
        data = {"url": self.url, "etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified"),
                "total": total}
        fd = os.open(self.meta_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)


def validator(meta: dict) -> str | None:
    """What If-Range may carry: a strong ETag, else Last-Modified (a weak ETag cannot be used)."""
    etag = meta.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return meta.get("last_modified")


def resume_headers(size: int, meta: dict, verified: bool) -> dict:
    """The headers asking for the rest of a partial file of ``size`` bytes; {} to start from zero.

    Without a validator the server cannot tell us that the file changed, so that is only done when
    a checksum will be verified (``verified``) and catches a mix of two versions.
    """
    if size <= 0:
        return {}
    check = validator(meta)
    if check:
        return {"Range": f"bytes={size}-", "If-Range": check}
    return {"Range": f"bytes={size}-"} if verified else {}


def plan(status: int, headers, offset: int) -> tuple[str, int | None]:
    """What a response means for a partial file of ``offset`` bytes: (action, total length or None).

    ``append`` (206 from ``offset``), ``restart`` (200: the whole file again), ``complete`` (416 and the
    partial file already has every byte), ``retry`` (416 otherwise: discard and ask for it all).
    """
    content_range = CONTENT_RANGE.match((headers.get("Content-Range") or "").strip())
    if status == 206:
        if not content_range or content_range[1] is None or int(content_range[1]) != offset:
            raise CloudopsError(f"the server answered a range request with {headers.get('Content-Range')!r}, "
                                f"not the bytes from {offset}")
        total = content_range[3]
        return "append", int(total) if total != "*" else None
    if status == 200:
        length = headers.get("Content-Length")
        return "restart", int(length) if length and length.isdigit() else None
    if status == 416:
        total = content_range[3] if content_range else None
        if offset and total and total != "*" and int(total) == offset:
            return "complete", offset
        return "retry", None
    raise CloudopsError(f"unexpected HTTP status {status}")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# ---------------------------------------------------------------- the download

@contextlib.contextmanager
def _locked_file(path: Path):
    """The partial file opened for writing (0600, created if missing) under an exclusive flock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    f = os.fdopen(fd, "r+b")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CloudopsError(f"another cloudops is downloading {path.name} into {path.parent}; "
                                "wait for it to finish") from None
        yield f
    finally:
        f.close()


def download(partial: Partial, *, verified: bool, timeout: float = 30, progress=no_progress,
             opener=None) -> Path:
    """Fetch ``partial.url`` into ``partial.path``, resuming what an earlier run left; returns the path.

    Interrupted (connection lost, timeout, Ctrl-C): the partial file is kept for the next run, and the
    error (one line) says so. Refused by the server: one line; a 404 or 410 also discards what an earlier
    run left of this URL (it is gone), and an empty partial file is never left behind. ``progress`` gets
    the download's bar (bytes and rate; see ``cloudops.progress``) and the note when it is interrupted.
    """
    check_url(partial.url)
    opener = opener or _opener()
    partial.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _locked_file(partial.path) as out:
        try:
            return _fetch(partial, out, verified, timeout, progress, opener)
        except BaseException:
            _forget_if_empty(partial, out)
            raise


def _fetch(partial: Partial, out, verified: bool, timeout: float, progress, opener) -> Path:
    url = partial.url
    for _attempt in range(2):  # a second time only after a 416 that did not mean "complete"
        offset = out.seek(0, os.SEEK_END)
        headers = resume_headers(offset, partial.meta(), verified)
        if offset and not headers:
            offset = _truncate(out)
        try:
            resp = opener(_request(url, headers), timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code != 416:
                exc.close()
                if exc.code in (404, 410):  # gone: what we have of it is of no use any more
                    _truncate(out)
                raise CloudopsError(f"cannot download {url}: {_reason(exc)}") from None
            resp = exc
        except (OSError, http.client.HTTPException) as exc:
            raise CloudopsError(f"cannot download {url}: {_reason(exc)}") from None
        with resp:
            action, total = plan(resp.status, resp.headers, offset)
            if action == "retry":
                _truncate(out)
                partial.meta_path.unlink(missing_ok=True)
                continue
            if action == "complete":
                return partial.path
            if action == "restart":
                offset = _truncate(out)
            partial.save_meta(resp.headers, total)
            _stream(resp, out, offset, total, partial, progress)
            return partial.path
    raise CloudopsError(f"cannot download {url}: the server refuses every range, even the whole file")


def _truncate(out) -> int:
    out.seek(0)
    out.truncate()
    return 0


def _forget_if_empty(partial: Partial, out) -> None:
    if out.seek(0, os.SEEK_END) == 0:
        partial.discard()


def _stream(resp, out, offset: int, total: int | None, partial: Partial, progress) -> None:
    done = offset
    bar = bar_for(progress, basename(partial.url), total, done=offset, verb=("downloading", "downloaded")).start()
    try:
        while block := resp.read(CHUNK):
            out.write(block)
            done += len(block)
            bar.update(done)
        out.flush()
        os.fsync(out.fileno())
    except (OSError, http.client.HTTPException) as exc:
        out.flush()
        bar.stop()
        raise _interrupted(partial, done, total, _reason(exc)) from None
    except KeyboardInterrupt:
        out.flush()
        bar.stop()
        progress(f"interrupted: {_mib(done)} of {partial.url} kept in {partial.path}; the same image.add resumes it")
        raise
    except BaseException:
        bar.stop()
        raise
    if total is not None and done < total:
        bar.stop()
        raise _interrupted(partial, done, total, "connection closed before the end")
    if total is not None and done > total:
        bar.stop()
        partial.discard()
        raise CloudopsError(f"cannot download {partial.url}: the server sent {done} bytes, more than the {total} "
                            "it announced")
    bar.finish()


def _interrupted(partial: Partial, done: int, total: int | None, why: str) -> CloudopsError:
    of = f" of {_mib(total)}" if total else ""
    return CloudopsError(f"download of {partial.url} interrupted at {_mib(done)}{of} ({why}); "
                         "run the same image.add again to resume it")
