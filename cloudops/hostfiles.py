"""Files on a host over one Fabric connection: read many in one round trip, write only on a difference.

Facts first: ``read_files`` reads every file a deploy manages (content and mode) with
one command. Then ``ensure_file`` compares the wanted content with what was read and
writes (atomically: a 0600 file beside it, upload, chmod, rename) only when they differ. A
"managed block" is the part of a shared file (authorized_keys, known_hosts,
~/.ssh/config) between two marker lines that cloudops owns; the rest stays as it is.
"""

import base64
import io
import os
import posixpath
import secrets
import shlex
from dataclasses import dataclass

from cloudops.errors import CloudopsError


@dataclass(frozen=True)
class RemoteFile:
    """What a host said about one path: ``content`` is None when the file does not exist."""

    path: str
    content: str | None
    mode: str | None = None  # octal text, e.g. "644"

    @property
    def exists(self) -> bool:
        return self.content is not None


def read_script(paths: list[str]) -> str:
    """A shell script printing ``file<TAB>path<TAB>mode<TAB>base64`` or ``missing<TAB>path`` per path."""
    lines = []
    for path in paths:
        q = shlex.quote(path)
        lines.append(f"if [ -f {q} ]; then printf 'file\\t%s\\t%s\\t' {q} \"$(stat -c %a {q})\"; "
                     f"base64 -w0 < {q}; echo; else printf 'missing\\t%s\\n' {q}; fi")
    return "\n".join(lines) + "\n"


def parse_files(text: str) -> dict[str, RemoteFile]:
    files = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if parts[0] == "file" and len(parts) == 4:
            content = base64.b64decode(parts[3]).decode("utf-8", errors="replace")
            files[parts[1]] = RemoteFile(parts[1], content, parts[2])
        elif parts[0] == "missing" and len(parts) == 2:
            files[parts[1]] = RemoteFile(parts[1], None)
    return files


def read_files(conn, paths: list[str], timeout: float = 30) -> dict[str, RemoteFile]:
    result = conn.run(read_script(paths), hide=True, warn=False, timeout=timeout, in_stream=False)
    return parse_files(result.stdout)


def ensure_file(conn, current: RemoteFile, content: str, mode: str = "644", check: bool = False,
                dir_mode: str = "755") -> tuple[bool, str]:
    """Make ``current.path`` hold ``content`` with ``mode``; returns (changed, message). ``check`` writes nothing."""
    path = current.path
    if current.content == content:
        if current.mode == mode.lstrip("0"):
            return False, f"{path} up to date"
        if not check:
            conn.run(f"chmod {mode} {shlex.quote(path)}", hide=True, in_stream=False)
        return True, f"{path}: {'would set' if check else 'set'} mode {mode}"
    what = "would update" if current.exists else "would create"
    if check:
        return True, f"{path}: {what}"
    parent = posixpath.dirname(path)
    tmp = f"{path}.cloudops-tmp"
    conn.run(f"mkdir -p -m {dir_mode} {shlex.quote(parent)}", hide=True, in_stream=False)
    create_private(conn, tmp)  # 0600 before any content: a key or a hash is never readable, even for a moment
    conn.put(io.BytesIO(content.encode()), remote=tmp)
    conn.run(f"chmod {mode} {shlex.quote(tmp)} && mv -f {shlex.quote(tmp)} {shlex.quote(path)}",
             hide=True, in_stream=False)
    return True, f"{path}: {what.removeprefix('would ').replace('update', 'updated').replace('create', 'created')}"


def create_private(conn, path: str) -> None:
    """An empty ``path`` on the host, mode 0600 from its creation (``umask 077``; an old file is replaced)."""
    q = shlex.quote(path)
    conn.run(f"umask 077 && rm -f {q} && : > {q}", hide=True, in_stream=False)


def put_private(conn, local, path: str, callback=None) -> None:
    """Upload ``local`` (a path or a file object) to ``path`` on the host, 0600 from the first byte on.

    The content goes into a 0600 file made beforehand under a temporary name (SFTP keeps
    an existing file's mode; Fabric is told not to copy the local mode over it), which is
    then renamed over ``path``. ``callback(bytes done, total)``: progress of a local file."""
    tmp = f"{path}.partial-{secrets.token_hex(4)}"
    create_private(conn, tmp)
    try:
        if callback is not None and isinstance(local, (str, os.PathLike)):
            conn.sftp().put(os.fspath(local), tmp, callback=callback)  # keeps the 0600 file's mode
        else:
            conn.put(local, remote=tmp, preserve_mode=False)
        conn.run(f"mv -f {shlex.quote(tmp)} {shlex.quote(path)}", hide=True, in_stream=False)
    except BaseException:
        conn.run(f"rm -f {shlex.quote(tmp)}", warn=True, hide=True, in_stream=False)
        raise


# ---------------------------------------------------------------- managed blocks

def markers(name: str) -> tuple[str, str]:
    return f"# BEGIN cloudops {name}", f"# END cloudops {name}"


def with_block(text: str | None, name: str, body: list[str], top: bool = False) -> str:
    """``text`` with the block ``name`` holding exactly ``body`` (replaced in place, else added at the end or top)."""
    begin, end = markers(name)
    block = [begin, *body, end]
    lines = (text or "").splitlines()
    if begin in lines:
        start = lines.index(begin)
        try:
            stop = lines.index(end, start)
        except ValueError:
            raise CloudopsError(f"managed block {name!r} has a BEGIN line but no END line: fix the file by hand") from None
        lines[start:stop + 1] = block
    elif top:
        lines = block + lines
    else:
        lines = lines + block
    return "\n".join(lines) + "\n"


def block_body(text: str | None, name: str) -> list[str] | None:
    """The lines inside block ``name``, or None when the text has no such block."""
    begin, end = markers(name)
    lines = (text or "").splitlines()
    if begin not in lines or end not in lines[lines.index(begin):]:
        return None
    start = lines.index(begin)
    return lines[start + 1:lines.index(end, start)]
