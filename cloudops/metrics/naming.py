"""Graphite paths for cloudops metrics: one place decides how every series is named.

    <prefix>.vm.<vm>.<group>.<device>.<field>   per-device VM figures (disk, net, vcpu)
    <prefix>.vm.<vm>.<group>.<field>            VM-wide figures (cpu, memory, state)
    <prefix>.vm.<vm>.host.<host>                1 while the VM runs on that host
    <prefix>.hv.<host>.<group>.<field>          hypervisor figures
    <prefix>.cloudops.metrics.<field>           the shipper's own figures

VM paths never contain the host, so a VM's series continue across a live migration;
where it ran is its own series (``host.<host>``).
"""

from __future__ import annotations

import re

from cloudops.errors import CloudopsError

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_PREFIX = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")


def sanitize(component) -> str:
    """One path component: anything but letters, digits, ``_`` and ``-`` becomes ``_``.

    Dots would split the component into levels, spaces and slashes break the plaintext
    protocol and the whisper file layout. An empty component becomes ``_``.
    """
    text = _UNSAFE.sub("_", str(component))
    return text or "_"


def validate_prefix(prefix: str) -> str:
    """A prefix is dot-separated components of letters, digits, ``_`` and ``-``; else CloudopsError."""
    if not isinstance(prefix, str) or not _PREFIX.match(prefix):
        raise CloudopsError(
            f"metric prefix {prefix!r} is invalid: use dot-separated words of letters, digits, '_' and '-'"
        )
    return prefix


def path(prefix: str, *components) -> str:
    """Join a (valid) prefix with sanitized components."""
    return ".".join([prefix, *(sanitize(c) for c in components)])


def vm_path(prefix: str, vm: str, group: str, *rest) -> str:
    """``<prefix>.vm.<vm>.<group>[.<device>].<field>``."""
    return path(prefix, "vm", vm, group, *rest)


def placement_path(prefix: str, vm: str, host: str) -> str:
    """``<prefix>.vm.<vm>.host.<host>``: sent with value 1 each cycle the VM is active there."""
    return path(prefix, "vm", vm, "host", host)


def hv_path(prefix: str, host: str, *rest) -> str:
    """``<prefix>.hv.<host>.<group>...<field>``."""
    return path(prefix, "hv", host, *rest)


def self_path(prefix: str, field: str) -> str:
    """``<prefix>.cloudops.metrics.<field>``: the shipper's own figures."""
    return path(prefix, "cloudops", "metrics", field)
