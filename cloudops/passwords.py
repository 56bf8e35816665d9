"""SHA-512 crypt ($6$) password hashes for guest /etc/shadow; the plaintext never leaves this process.

The stdlib ``crypt`` module (deprecated, gone in Python 3.13) and the ctypes
fallback both call the system's libcrypt, the same code that checks the password
inside the guest.
"""

import ctypes
import ctypes.util
import getpass
import hmac
import os
import re
import secrets
import sys
import warnings
from functools import lru_cache

from cloudops.errors import CloudopsError

_SALT_CHARS = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# What may stand in the password field of /etc/shadow: a crypt hash, nothing that
# could break the colon-separated line or a YAML scalar.
HASH_RE = re.compile(r"\$(1|5|6|y|gy|7|2[abxy])\$[A-Za-z0-9./$=]+")
PASSWORD_ENV = "CLOUDOPS_ROOT_PASSWORD"
_taken: list[str | None] = []  # the one value taken out of the environment (a list: "taken yet?" and the value)


@lru_cache(maxsize=None)
def _crypt_function():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # noqa: PLC0415 - optional, removed in Python 3.13

        return crypt.crypt
    except ImportError:
        pass
    name = ctypes.util.find_library("crypt") or "libcrypt.so.1"
    lib = ctypes.CDLL(name)
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]

    def _crypt(word: str, salt: str) -> str | None:
        result = lib.crypt(word.encode(), salt.encode())
        return result.decode() if result else None

    return _crypt


def _crypt(plain: str, salt: str) -> str | None:
    return _crypt_function()(plain, salt)


def hash_password(plain: str) -> str:
    """Return a SHA-512 crypt hash (``$6$<16-char random salt>$...``) of ``plain``."""
    if not isinstance(plain, str) or not plain:
        raise CloudopsError("password is empty")
    if "\n" in plain or "\0" in plain:
        raise CloudopsError("password contains a newline or NUL character")
    salt = "".join(secrets.choice(_SALT_CHARS) for _ in range(16))
    result = _crypt(plain, f"$6${salt}$")
    if not result or not result.startswith("$6$"):
        raise CloudopsError("this system's libcrypt cannot make SHA-512 password hashes")
    return result


def verify(plain: str, hashed: str) -> bool:
    """True if ``plain`` matches the crypt hash ``hashed`` (any scheme libcrypt knows)."""
    if not plain or not is_hash(hashed):
        return False
    result = _crypt(plain, hashed)
    return bool(result) and hmac.compare_digest(result, hashed)


def is_hash(value: str) -> bool:
    """True if ``value`` looks like a crypt hash fit for a shadow file (not a plaintext)."""
    return isinstance(value, str) and bool(HASH_RE.fullmatch(value))


# ---------------------------------------------------------------- where a root password may come from

def refuse_command_line(file_option: str = "--password-file") -> CloudopsError:
    """The one-line error for a password given as a command-line argument (anyone can read it in ps)."""
    return CloudopsError(f"--password is refused: a password on the command line is visible to every user in ps "
                         f"and in shell history; use {file_option} FILE (mode 0600) or --password-stdin")


def take_from_environment() -> str | None:
    """``$CLOUDOPS_ROOT_PASSWORD``, removed from ``os.environ`` at the first call so no child process
    (ssh, qemu-img, genisoimage, a task's subcommands) inherits it; later calls return the same value."""
    if not _taken:
        _taken.append(os.environ.pop(PASSWORD_ENV, None) or None)
    return _taken[0]


def read_root_password(file=None, stdin: bool = False, command_line=None, *,
                       file_option: str = "--password-file") -> str | None:
    """The root password from ``file`` (first line), stdin (prompted on a terminal) or the environment.

    A command-line value is refused. The environment variable is always taken out of
    ``os.environ``, even when another source is used."""
    from_env = take_from_environment()
    if command_line:
        raise refuse_command_line(file_option)
    if file and stdin:
        raise CloudopsError(f"give only one of {file_option} and --password-stdin")
    if file:
        try:
            with open(os.path.expanduser(str(file))) as f:
                return f.readline().rstrip("\r\n")
        except OSError as exc:
            raise CloudopsError(f"cannot read password file {file}: {exc.strerror}") from None
    if stdin:
        if sys.stdin.isatty():
            return getpass.getpass("root password: ")
        return sys.stdin.readline().rstrip("\r\n")
    return from_env


def write_private(path, text: str) -> None:
    """Create ``path`` holding ``text``, mode 0600 from its creation (O_EXCL: never an existing file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
