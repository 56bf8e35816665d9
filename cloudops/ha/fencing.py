"""Fencing: make sure a host that stopped answering is really off before its VMs start elsewhere.

The inventory's ``fence_command`` of a host (a host or group variable) is a list of argument
strings, run here without a shell, e.g.::

    fence_command: [ipmitool, -I, lanplus, -H, "{host}-bmc", -U, admin, -f, /etc/cloudops/ipmi.pw, power, off]

Placeholders ``{host}``, ``{address}``, ``{user}`` and ``{port}`` are the inventory host's; any
other, or a value that is not a list of strings, is refused in one line before anything runs.
Fencing succeeded when the command exits 0 within its timeout; anything else is a failure and no
VM of that host is restarted (a host that might still run its VMs must never see them twice).
"""

import string
import subprocess
import time
from dataclasses import asdict, dataclass

from cloudops.errors import CloudopsError

PLACEHOLDERS = ("host", "address", "user", "port")
DEFAULT_TIMEOUT = 60.0


@dataclass
class FenceResult:
    host: str
    ok: bool
    argv: list
    seconds: float
    exit_code: int | None = None
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def template_of(host) -> list[str] | None:
    """The host's fence_command, checked; None when the inventory gives it none."""
    value = (getattr(host, "vars", None) or {}).get("fence_command")
    if value is None:
        return None
    return validate(value, host.name)


def validate(value, host_name: str) -> list[str]:
    """``value`` as a fence_command: a non-empty list of strings whose placeholders are all known."""
    if not isinstance(value, list) or not value or not all(isinstance(a, str) and a for a in value):
        raise CloudopsError(f"fence_command of {host_name} must be a list of argument strings "
                            f"(e.g. [ipmitool, -H, \"{{address}}\", power, off]), got {value!r}")
    for arg in value:
        try:
            fields = list(string.Formatter().parse(arg))
        except ValueError as exc:
            raise CloudopsError(f"fence_command of {host_name}: argument {arg!r} is malformed ({exc}); "
                                "write a literal brace as {{ or }}") from None
        for _literal, name, spec, conversion in fields:
            if name is None:
                continue
            if name not in PLACEHOLDERS or spec or conversion:
                raise CloudopsError(f"fence_command of {host_name}: argument {arg!r} references unknown variable "
                                    f"{{{name}}}; known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
    return list(value)


def substitute(template: list[str], host) -> list[str]:
    """The argv to run for ``host``: every placeholder replaced by the host's value."""
    values = {"host": host.name, "address": host.address, "user": getattr(host, "user", "root"),
              "port": str(getattr(host, "port", 22))}
    return [arg.format(**values) for arg in template]


def fence(host, timeout: float = DEFAULT_TIMEOUT, run=subprocess.run) -> FenceResult:
    """Run the host's fence_command (``template_of``); the result says whether the host is fenced and why not."""
    template = template_of(host)
    if template is None:
        return FenceResult(host.name, False, [], 0.0, reason=f"no fence_command for {host.name} in the inventory")
    argv = substitute(template, host)
    t0 = time.monotonic()
    try:
        proc = run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return FenceResult(host.name, False, argv, round(time.monotonic() - t0, 3),
                           reason=f"fence_command did not finish within {timeout:g}s")
    except OSError as exc:
        return FenceResult(host.name, False, argv, round(time.monotonic() - t0, 3),
                           reason=f"fence_command could not run: {exc.strerror or exc}")
    seconds = round(time.monotonic() - t0, 3)
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout or "").strip().splitlines()
        tail = f": {said[-1]}" if said else ""
        return FenceResult(host.name, False, argv, seconds, proc.returncode,
                           reason=f"fence_command exited {proc.returncode}{tail}")
    return FenceResult(host.name, True, argv, seconds, 0)
