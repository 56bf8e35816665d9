"""The metrics cron job on a hypervisor host: render it, compare, install over SSH only when it differs.

Each hypervisor ships itself: its ``/etc/cron.d/cloudops-metrics`` runs the host's own
``/opt/cloudops/venv/bin/cloudops metrics.ship --once --json --local`` (installed by
``deploy`` and ``metrics.install-cron``: cloudops.hosts.toolkit) under ``flock -n`` every
minute, with its state, spool, lock and log under the host's own cloudops directory
(``pool_path``, default /var/lib/cloudops): never shared with another host.

    changed, message = ensure_cron(conn, host_entry(host, "graphite:2004", "cloudops"))

``conn`` is anything with Fabric's ``run``/``put`` (a Connection to the host); the
deploy step and ``metrics.install-cron`` both call ``ensure_cron`` with the connection they hold.
"""

from __future__ import annotations

import io
import posixpath
import secrets
import shlex
from pathlib import Path

from cloudops.errors import CloudopsError
from cloudops.hosts.toolkit import COMMAND
from cloudops.metrics.cycle import cron_entry

CRON_PATH = "/etc/cron.d/cloudops-metrics"
DEFAULT_HOST_VAR = "/var/lib/cloudops"


def host_var(host) -> str:
    """Where a host's metrics job keeps its files: ``metrics_var``, else the host's ``pool_path``."""
    host_vars = getattr(host, "vars", None) or {}
    return str(host_vars.get("metrics_var") or host_vars.get("pool_path") or DEFAULT_HOST_VAR)


def host_entry(host, carbon: str, prefix: str, interval_minutes: int = 1, program: str = COMMAND) -> str:
    """The cron file for ``host``: its own cloudops collects only itself (``--local``), its files under ``host_var``.

    The one renderer of ``/etc/cron.d/cloudops-metrics``: ``deploy`` and ``metrics.install-cron``
    both call it (through ``host_settings`` for the values), so running both never flips the file."""
    return cron_entry(carbon, prefix, interval_minutes=interval_minutes, program=program, var=Path(host_var(host)),
                      local=True)


def host_settings(host, carbon=None, prefix=None, interval_minutes=None, defaults=None) -> tuple[str, str, int]:
    """(carbon, prefix, interval_minutes) of ``host``'s metrics job: each value as given, else from the host's
    inventory variable ``metrics`` (what ``deploy`` installs), else from ``defaults`` (the ``metrics``
    configuration: ``carbon``, ``prefix``, ``cron_minutes``)."""
    host_vars = getattr(host, "vars", None) or {}
    configured = host_vars.get("metrics") if isinstance(host_vars.get("metrics"), dict) else {}
    defaults = defaults or {}

    def pick(value, key, default_key, fallback=None):
        for candidate in (value, configured.get(key), defaults.get(default_key), fallback):
            if candidate is not None:
                return candidate
        raise CloudopsError(f"{getattr(host, 'name', host)}: no metrics {key}: give it, or set the inventory "
                            f"variable metrics.{key} or the configuration metrics.{default_key}")

    minutes = pick(interval_minutes, "interval_minutes", "cron_minutes", 1)
    try:
        minutes = int(minutes)
    except (TypeError, ValueError):
        raise CloudopsError(f"metrics interval must be a whole number of minutes, got {minutes!r}") from None
    return str(pick(carbon, "carbon", "carbon")), str(pick(prefix, "prefix", "prefix")), minutes


def ensure_cron(conn, content: str, path: str = CRON_PATH, program: str = COMMAND, check: bool = False) -> tuple[bool, str]:
    """Make ``path`` on the host hold exactly ``content``; return (changed, what happened).

    Nothing is written when the file already matches. A new file is uploaded under a
    dotted temporary name (cron ignores names with dots), made 0644 and renamed over the
    old one, so cron never reads half a file. Refused when the command the entry runs
    (``program``, the host's cloudops) or ``flock``/``timeout`` are missing on the host: the job
    would fail every minute, silently. ``check`` only says what would change (then a missing
    ``program`` is not an error: the same run would install it first).
    """
    probe = conn.run(
        f"test -x {shlex.quote(program)} || echo missing-cloudops; "
        "command -v flock >/dev/null || echo missing-flock; command -v timeout >/dev/null || echo missing-timeout; "
        f"cat {shlex.quote(path)} 2>/dev/null && echo '#cloudops-present'",
        warn=True, hide=True, in_stream=False,
    ).stdout
    missing = [w.split("-", 1)[1] for w in probe.splitlines() if w.startswith("missing-")]
    if check and "cloudops" in missing:
        missing.remove("cloudops")
    if missing:
        raise CloudopsError(
            f"cannot install {path}: {', '.join(missing)} not found on the host "
            f"(the entry runs {program}); `deploy` with the inventory variable metrics installs it"
        )
    present = probe.endswith("#cloudops-present\n")
    current = probe[: -len("#cloudops-present\n")] if present else None
    if current == content:
        return False, f"{path} already up to date"
    action = "updated" if present else "installed"
    if check:
        return True, f"{path} would be {action}"
    directory = posixpath.dirname(path)
    tmp = f"{directory}/.{posixpath.basename(path)}.{secrets.token_hex(4)}"
    conn.run(f"mkdir -p {shlex.quote(directory)}", hide=True, in_stream=False)
    try:
        conn.put(io.BytesIO(content.encode()), tmp)
        conn.run(f"chmod 0644 {shlex.quote(tmp)} && mv -f {shlex.quote(tmp)} {shlex.quote(path)}", hide=True, in_stream=False)
    finally:
        conn.run(f"rm -f {shlex.quote(tmp)}", warn=True, hide=True, in_stream=False)
    return True, f"{path} {action}"


def remove_cron(conn, path: str = CRON_PATH, check: bool = False) -> tuple[bool, str]:
    """Remove the metrics cron job if it is there; (changed, message)."""
    present = conn.run(f"test -e {shlex.quote(path)}", warn=True, hide=True, in_stream=False).ok
    if not present:
        return False, f"{path} not installed"
    if check:
        return True, f"{path} would be removed"
    conn.run(f"rm -f {shlex.quote(path)}", hide=True, in_stream=False)
    return True, f"{path} removed"
