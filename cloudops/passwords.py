"""SHA-512 crypt ($6$) password hashes for guest /etc/shadow; the plaintext never leaves this process.

The stdlib ``crypt`` module (deprecated, gone in Python 3.13) and the ctypes
fallback both call the system's libcrypt, the same code that checks the password
inside the guest.
"""

import ctypes
import ctypes.util
import hmac
import re
import secrets
import warnings
from functools import lru_cache

from .errors import CloudopsError

_SALT_CHARS = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# What may stand in the password field of /etc/shadow: a crypt hash, nothing that
# could break the colon-separated line or a YAML scalar.
HASH_RE = re.compile(r"\$(1|5|6|y|gy|7|2[abxy])\$[A-Za-z0-9./$=]+")


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
