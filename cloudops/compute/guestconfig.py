"""Validation of what goes into a guest's identity: hostname, SSH public keys, guest file paths.

Shared by the NoCloud seed (seed.py), offline customization (customize.py) and the
tasks, so that a bad value is refused with one clear line before any work starts.
"""

import base64
import binascii
import re
import struct
from pathlib import Path, PurePosixPath

from cloudops.errors import CloudopsError

_LABEL_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
# The comment may hold anything printable except what the guest's busybox parser
# of the seed and YAML double-quoted strings would have to unescape.
_COMMENT_RE = re.compile(r'^[^\x00-\x1f\x7f"\\]*$')


def validate_hostname(name: str) -> str:
    """Return ``name`` if it is a valid RFC 1123 host name (dot-separated labels), else raise."""
    if not isinstance(name, str) or not name:
        raise CloudopsError("hostname is empty")
    if len(name) > 253:
        raise CloudopsError(f"hostname {name[:40]!r}... is longer than 253 characters")
    for label in name.split("."):
        if not _LABEL_RE.fullmatch(label):
            raise CloudopsError(
                f"bad hostname {name!r}: each label must be 1-63 letters, digits or '-', "
                "not starting or ending with '-'"
            )
    return name


def parse_ssh_key(line: str) -> str:
    """Validate one authorized_keys line ``TYPE BASE64 [COMMENT]``; return it normalized."""
    text = line.strip() if isinstance(line, str) else ""
    shown = text[:40] + ("..." if len(text) > 40 else "")
    parts = text.split(None, 2)
    if len(parts) < 2 or parts[0] not in KEY_TYPES:
        raise CloudopsError(
            f"bad SSH public key line {shown!r}: expected 'TYPE BASE64 [COMMENT]' "
            f"with TYPE one of {', '.join(KEY_TYPES[:3])}, ... (no options)"
        )
    keytype, blob = parts[0], parts[1]
    try:
        raw = base64.b64decode(blob, validate=True)
        (length,) = struct.unpack(">I", raw[:4])
        inner_type = raw[4 : 4 + length].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError, ValueError):
        raise CloudopsError(f"bad SSH public key line {shown!r}: the key data is not valid base64") from None
    if inner_type != keytype:
        raise CloudopsError(f"bad SSH public key line {shown!r}: key data is {inner_type!r}, not {keytype!r}")
    comment = parts[2].strip() if len(parts) > 2 else ""
    if not _COMMENT_RE.fullmatch(comment):
        raise CloudopsError(f"bad SSH public key line {shown!r}: comment has control characters, '\"' or '\\'")
    return f"{keytype} {blob} {comment}".rstrip()


def key_identity(line: str) -> tuple[str, str]:
    """(type, base64) of a key line: two lines with the same identity are the same key."""
    parts = line.split()
    return (parts[0], parts[1]) if len(parts) >= 2 else (line.strip(), "")


def normalize_ssh_keys(keys) -> list[str]:
    """Validate key lines, drop duplicates (same type and key data), keep order."""
    if isinstance(keys, str):
        keys = [keys]
    seen, result = set(), []
    for key in keys or ():
        line = parse_ssh_key(key)
        ident = key_identity(line)
        if ident not in seen:
            seen.add(ident)
            result.append(line)
    return result


def read_ssh_key_files(paths) -> list[str]:
    """Key lines from local ``.pub`` (or authorized_keys-style) files, comments and blanks skipped."""
    lines = []
    for path in paths:
        path = Path(path).expanduser()
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise CloudopsError(f"SSH public key file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CloudopsError(f"cannot read SSH public key file {path}: {exc}") from None
        found = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if not found:
            raise CloudopsError(f"SSH public key file {path} holds no key")
        if any("PRIVATE KEY" in ln for ln in found):
            raise CloudopsError(f"{path} is a private key; give the .pub file")
        lines.extend(found)
    return normalize_ssh_keys(lines)


def validate_guest_path(path: str) -> str:
    """An absolute, normalized guest path without '..' components."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise CloudopsError(f"guest path {path!r} must be absolute")
    pure = PurePosixPath(path)
    if ".." in pure.parts or "\0" in path or "\n" in path:
        raise CloudopsError(f"guest path {path!r} must not contain '..', NUL or newline")
    if str(pure) == "/":
        raise CloudopsError("guest path '/' is a directory, not a file")
    return str(pure)
