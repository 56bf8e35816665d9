"""Daemons cloudops starts on this machine (carbon-cache, graphite-web): alive or not, and ended by their pid."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie or a dead process is not alive)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def terminate(pid: int, process: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM (the daemon flushes and exits), then SIGKILL after ``timeout``; reap it if it is our child."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        if wait_gone(pid, process, wait):
            break
    if process is not None:
        process.poll()


def wait_gone(pid: int, process: subprocess.Popen | None, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to end; True when it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None:
            if process.poll() is not None:
                return True
        elif not alive(pid):
            return True
        time.sleep(0.05)
    return False


def last_line(path: Path) -> str:
    """The last non-blank line of a daemon's log, for a one-line error."""
    try:
        lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        return "(no log)"
    return lines[-1].strip() if lines else "(empty log)"
