"""The user's own user-data (``vm.start --user-data FILE``): read, checked, merged with what cloudops sets.

The file's first line says what it is, as cloud-init reads it:

- ``#cloud-config``: a YAML mapping, merged into cloudops's cloud-config as one document.
- ``#!`` (a script), ``#include``, ``#include-once``, ``#cloud-boothook``, ``#part-handler``: one
  part of a MIME multipart user-data, after cloudops's cloud-config part.
- a MIME multipart document (``Content-Type: multipart/...`` or ``MIME-Version:`` first): its
  ``text/cloud-config`` parts are merged, in order, into cloudops's cloud-config (cloud-init
  would let a later cloud-config part *replace* cloudops's keys, ``ssh_authorized_keys`` and
  ``users`` included, and cloudops would lose its access); every other part is kept as it is,
  after cloudops's cloud-config part.

Anything else (``#cloud-config-archive``, ``## template: jinja``, gzip, a part of an unknown
content type ...) is refused. So are a file that is missing, unreadable, not UTF-8, larger than
``MAX_BYTES``, a ``#cloud-config`` that is not valid YAML (the line is named) or not a mapping,
and values of the keys below of the wrong shape. All of it before anything is made.

The merge rule (``merge``), cloudops's cloud-config + the user's:

- cloudops's values win: ``hostname`` (``--hostname``, else the VM name), ``preserve_hostname``
  and ``disable_root`` (cloudops logs in as root); the user's ``fqdn`` and
  ``prefer_fqdn_over_hostname`` are dropped (they would rename the host: give ``--hostname``).
  With a root password, ``ssh_pwauth``, root's entry in ``users`` and ``chpasswd`` are
  cloudops's too (the user's ``chpasswd`` entries for other users are kept).
- ``ssh_authorized_keys``: the union, cloudops's keys (``--ssh-key`` and the cloud's trusted
  keys) first.
- ``users``: the user's list plus cloudops's root entry; without a ``users`` of the user's,
  ``default`` and root as cloudops writes them alone.
- every other key (``runcmd``, ``write_files``, ``packages``, ``bootcmd`` ...) is the user's.

A key of the user's that cloudops overrides or drops gives a note (the key's name, never its
value: user-data can hold secrets, so its content is never logged).
"""

import email
import email.policy
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from pathlib import Path

import yaml

from cloudops.compute.guestconfig import normalize_ssh_keys
from cloudops.errors import CloudopsError

MAX_BYTES = 1 << 20  # 1 MiB: far more than any cloud-config; NoCloud itself has no limit

# First line -> the MIME type cloud-init gives it (cloudinit/handlers: type_from_starts_with).
PART_TYPES = {
    "#!": "text/x-shellscript",
    "#include": "text/x-include-url",
    "#include-once": "text/x-include-once-url",
    "#cloud-boothook": "text/cloud-boothook",
    "#part-handler": "text/part-handler",
}
KINDS = {"text/x-shellscript": "script", "text/x-include-url": "include", "text/x-include-once-url": "include",
         "text/cloud-boothook": "boothook", "text/part-handler": "part-handler"}
CLOUD_CONFIG = "text/cloud-config"
KNOWN_PART_TYPES = {CLOUD_CONFIG, *PART_TYPES.values(), "text/x-shellscript-per-boot",
                    "text/x-shellscript-per-instance", "text/x-shellscript-per-once"}
OWNED = ("hostname", "preserve_hostname", "disable_root")  # always cloudops's
DROPPED = ("fqdn", "prefer_fqdn_over_hostname")  # would change the host name cloudops sets
POLICY = email.policy.default.clone(linesep="\n")  # LF only: the tiny image's parser reads it line by line


@dataclass(repr=False)
class UserData:
    """The user's user-data: its cloud-config (merged from all its cloud-config parts) and its other parts."""

    path: str
    kind: str  # "cloud-config", "script", "include", "boothook", "part-handler", "multipart"
    config: dict = field(default_factory=dict)
    parts: list = field(default_factory=list)  # email.message.Message, kept as the user wrote them

    def __repr__(self) -> str:  # never the content
        return f"UserData({self.path!r}, {self.kind}, {len(self.config)} keys, {len(self.parts)} parts)"

    def describe(self) -> str:
        """One line about it, no content: what ``--dry-run`` and notes say."""
        if not self.parts:
            return f"user-data {self.path} (cloud-config, {len(self.config)} keys, merged)"
        extra = f", its cloud-config ({len(self.config)} keys) merged" if self.config else ""
        return (f"user-data {self.path} (MIME multipart: cloudops's cloud-config, then "
                f"{len(self.parts)} part{'s' if len(self.parts) != 1 else ''} of the user's{extra})")


# ---------------------------------------------------------------- reading and checking

def load(path) -> UserData:
    """The user-data file at ``path``, checked; one clear CloudopsError for anything wrong."""
    shown = str(path)
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise CloudopsError(f"user-data {shown} is not a regular file")
        if size > MAX_BYTES:
            raise CloudopsError(f"user-data {shown} is {size} bytes, more than the limit of {MAX_BYTES} (1 MiB)")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CloudopsError(f"user-data file {shown} does not exist") from None
    except OSError as exc:
        raise CloudopsError(f"cannot read user-data file {shown}: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:  # grew since stat
        raise CloudopsError(f"user-data {shown} is more than the limit of {MAX_BYTES} bytes (1 MiB)")
    if raw[:2] == b"\x1f\x8b":
        raise CloudopsError(f"user-data {shown} is gzip-compressed: give it uncompressed")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CloudopsError(f"user-data {shown} is not UTF-8 text (byte {exc.start})") from None
    return parse(text.removeprefix("\ufeff"), shown)


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].rstrip("\r").rstrip()


def parse(text: str, where: str = "user-data") -> UserData:
    """``text`` as cloud-init would take it, checked (see the module docstring)."""
    if not text.strip():
        raise CloudopsError(f"user-data {where} is empty")
    head = first_line(text)
    if head == "#cloud-config":
        return UserData(where, "cloud-config", config=_cloud_config(text, where))
    if _is_mime(text):
        return _multipart(text, where)
    ctype = part_type(head)
    if ctype is None:
        raise CloudopsError(f"user-data {where}: unknown content type (first line {head[:40]!r}); expected "
                            f"#cloud-config, {', '.join(PART_TYPES)} or a MIME multipart document")
    part = EmailMessage(policy=POLICY)
    part.set_content(text, subtype=ctype.split("/", 1)[1], charset="utf-8", cte="8bit")
    return UserData(where, KINDS[ctype], parts=[part])


def part_type(head: str) -> str | None:
    """The MIME type of a part whose first line is ``head``; None when cloudops does not know it."""
    if head.startswith("#!"):
        return PART_TYPES["#!"]
    word = head.split()[0] if head.split() else ""
    return PART_TYPES.get(word.lower())


def _is_mime(text: str) -> bool:
    head = first_line(text).lower()
    return head.startswith(("content-type:", "mime-version:"))


def _cloud_config(text: str, where: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CloudopsError(f"user-data {where}{line}: not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CloudopsError(f"user-data {where}: a #cloud-config must be a YAML mapping, "
                            f"not a {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise CloudopsError(f"user-data {where}: top-level keys must be strings, got {bad[0]!r}")
    _check_shapes(data, where)
    return data


def _check_shapes(config: dict, where: str) -> None:
    """The keys cloudops merges must have the shapes cloud-init documents."""
    keys = config.get("ssh_authorized_keys")
    if keys is not None:
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise CloudopsError(f"user-data {where}: ssh_authorized_keys must be a list of public key lines")
        try:
            normalize_ssh_keys(keys)
        except CloudopsError as exc:
            raise CloudopsError(f"user-data {where}: ssh_authorized_keys: {exc}") from None
    users = config.get("users")
    if users is not None:
        if not isinstance(users, list):
            raise CloudopsError(f"user-data {where}: users must be a list (of names, 'default', or mappings with 'name')")
        for i, user in enumerate(users):
            if not (isinstance(user, str) or (isinstance(user, dict) and isinstance(user.get("name"), str))):
                raise CloudopsError(f"user-data {where}: users[{i}] must be a name or a mapping with 'name'")
    chpasswd = config.get("chpasswd")
    if chpasswd is not None and not isinstance(chpasswd, dict):
        raise CloudopsError(f"user-data {where}: chpasswd must be a mapping")
    if isinstance(chpasswd, dict) and not isinstance(chpasswd.get("users", []), list):
        raise CloudopsError(f"user-data {where}: chpasswd.users must be a list")


def _multipart(text: str, where: str) -> UserData:
    msg = email.message_from_string(text, policy=POLICY)
    if not msg.is_multipart():
        raise CloudopsError(f"user-data {where}: a MIME document must be multipart (Content-Type: multipart/mixed)")
    config, parts = {}, []
    for i, part in enumerate(p for p in msg.walk() if not p.is_multipart()):
        ctype = part.get_content_type()
        body = _part_text(part, where, i)
        if ctype in ("text/plain", "application/octet-stream"):  # cloud-init guesses these from the first line
            ctype = CLOUD_CONFIG if first_line(body) == "#cloud-config" else part_type(first_line(body))
            if ctype is None:
                raise CloudopsError(f"user-data {where}: MIME part {i + 1} is {part.get_content_type()} and its "
                                    "first line is no known type")
        if ctype == CLOUD_CONFIG:
            config = merge_user_configs(config, _cloud_config(body, f"{where} (MIME part {i + 1})"))
        elif ctype in KNOWN_PART_TYPES:
            parts.append(part)
        else:
            raise CloudopsError(f"user-data {where}: MIME part {i + 1} has an unknown content type {ctype!r} "
                                f"(known: {', '.join(sorted(KNOWN_PART_TYPES))})")
    if not config and not parts:
        raise CloudopsError(f"user-data {where}: the MIME document has no parts")
    return UserData(where, "multipart", config=config, parts=parts)


def _part_text(part: Message, where: str, i: int) -> str:
    data = part.get_payload(decode=True) or b""
    try:
        return data.decode(part.get_content_charset() or "utf-8")
    except (UnicodeDecodeError, LookupError):
        raise CloudopsError(f"user-data {where}: MIME part {i + 1} is not text in its charset") from None


def merge_user_configs(first: dict, later: dict) -> dict:
    """Two cloud-config parts of the user's as one: lists of a key appended, other keys of the later part win."""
    merged = dict(first)
    for key, value in later.items():
        if isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = merged[key] + value
        else:
            merged[key] = value
    return merged


# ---------------------------------------------------------------- merging with cloudops's

@dataclass
class Merged:
    """The user's cloud-config after the merge rule: what the seed's template renders."""

    ssh_keys: list[str]  # the union, cloudops's first
    users: list | None  # the user's entries (root's dropped when cloudops sets root's password); None: not given
    chpasswd_users: list  # the user's chpasswd entries for other users (only with a root password)
    rest: dict  # every other key of the user's, as they wrote it
    notes: list[str]  # what cloudops overrode or dropped, by key name


def merge(user: dict, hostname: str, ssh_keys, password_hash) -> Merged:
    """Apply the merge rule (module docstring) to the user's cloud-config ``user``."""
    rest, notes = dict(user), []
    for key in OWNED:
        if key in rest and not _same(key, rest.pop(key), hostname):
            notes.append(f"user-data sets {key}: cloudops's value is kept"
                         + (" (use --hostname)" if key == "hostname" else ""))
    for key in DROPPED:
        if key in rest:
            rest.pop(key)
            notes.append(f"user-data sets {key}: dropped, cloudops sets the host name (use --hostname)")
    keys = normalize_ssh_keys([*ssh_keys, *(rest.pop("ssh_authorized_keys", None) or [])])
    users = rest.pop("users", None)
    chpasswd_users = []
    if password_hash:
        if "ssh_pwauth" in rest and rest.pop("ssh_pwauth") is not True:
            notes.append("user-data sets ssh_pwauth: cloudops's value (true, a root password is given) is kept")
        if users is not None and any(_is_root(u) for u in users):
            users = [u for u in users if not _is_root(u)]
            notes.append("user-data has a root entry in users: cloudops's (with the root password) replaces it")
        chpasswd = rest.pop("chpasswd", None)
        if chpasswd:
            chpasswd_users = [u for u in chpasswd.get("users") or [] if not _is_root(u)]
            if set(chpasswd) - {"users"} or len(chpasswd_users) != len(chpasswd.get("users") or []):
                notes.append("user-data sets chpasswd: cloudops's expire and root entry are kept, "
                             "the entries for other users are added")
    return Merged(ssh_keys=keys, users=users, chpasswd_users=chpasswd_users, rest=rest, notes=notes)


def _same(key, value, hostname) -> bool:
    return value == {"hostname": hostname, "preserve_hostname": False, "disable_root": False}[key]


def _is_root(user) -> bool:
    return user == "root" or (isinstance(user, dict) and user.get("name") == "root")


class _Dumper(yaml.SafeDumper):
    """safe_dump, with multi-line strings (a write_files content, a script) as literal blocks."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                               style="|" if "\n" in s else None))


def dump(data, indent: int = 0) -> str:
    """YAML block style, keys in the user's order, no line folding (a folded key would break the tiny parser)."""
    text = yaml.dump(data, Dumper=_Dumper, default_flow_style=False, sort_keys=False, allow_unicode=True,
                     width=1 << 30)
    pad = " " * indent
    return "\n".join(pad + line if line else line for line in text.rstrip("\n").split("\n"))


# ---------------------------------------------------------------- multipart

def multipart(cloud_config: str, parts) -> str:
    """A multipart/mixed user-data: cloudops's cloud-config first, then the user's parts as they are.

    Every part cloudops writes is 8bit (never base64 or quoted-printable), so its lines stay
    plain text inside the MIME document and the tiny image's line-based parser finds them."""
    outer = EmailMessage(policy=POLICY)
    outer["MIME-Version"] = "1.0"  # cloud-init takes user-data for MIME when it sees this header
    outer.make_mixed()
    first = EmailMessage(policy=POLICY)
    first.set_content(cloud_config, subtype="cloud-config", charset="utf-8", cte="8bit")
    first.add_header("Content-Disposition", "attachment", filename="cloudops.cfg")
    outer.attach(first)
    for part in parts:
        outer.attach(part)
    return outer.as_bytes(policy=POLICY).decode("utf-8", "surrogateescape")
