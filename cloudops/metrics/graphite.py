"""A local Graphite (carbon-cache + whisper files) on 127.0.0.1 for tests and the demo.

Everything lives under one directory (default ``var/graphite``)::

    conf/carbon.conf, conf/storage-schemas.conf   rendered from templates/graphite/
    storage/whisper/...                            the series, one .wsp file each
    log/carbon-cache.log                           carbon's own output
    graphite.json                                  pid and ports of the running instance

carbon-cache runs in the foreground of its own session (``--nodaemon``), so its pid is
known at once and ``stop`` works by that pid from any process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import whisper

from cloudops import atomicfile, paths, processes
from cloudops.errors import CloudopsError
from cloudops.templating import render

LISTEN = "127.0.0.1"
STATE_FILE = "graphite.json"


@dataclass(frozen=True)
class Ports:
    """The three carbon-cache listeners; defaults are carbon's standard ports."""

    line: int = 2003
    pickle: int = 2004
    query: int = 7002

    def __post_init__(self):
        values = (self.line, self.pickle, self.query)
        for port in values:
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise CloudopsError(f"graphite: port {port!r} is not in 1..65535")
        if len(set(values)) != 3:
            raise CloudopsError(f"graphite: line, pickle and query ports must differ, got {values}")


@dataclass(frozen=True)
class Schema:
    """One storage-schemas.conf section: first matching pattern wins, at file creation."""

    name: str
    pattern: str
    retentions: str


# 1-second slots for the test prefix: cycles shipped in quick succession with explicit,
# distinct timestamps never collapse into one slot (whisper keeps the last write per slot).
DEFAULT_SCHEMAS = (
    Schema("carbon", r"^carbon\.", "60s:1d"),
    Schema("cloudops_test", r"^test\.", "1s:2h"),
    Schema("cloudops", r"^cloudops\.", "60s:30d,10m:1y"),
    Schema("default", ".*", "60s:7d"),
)


@dataclass
class Handle:
    """A running carbon-cache: its pid, ports and files. ``started`` is False when it was already up."""

    pid: int
    directory: Path
    ports: Ports
    started: bool = True
    process: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    @property
    def whisper_dir(self) -> Path:
        return whisper_dir(self.directory)

    @property
    def pickle_address(self) -> str:
        return f"{LISTEN}:{self.ports.pickle}"

    @property
    def line_address(self) -> str:
        return f"{LISTEN}:{self.ports.line}"

    def as_dict(self) -> dict:
        return {
            "pid": self.pid,
            "directory": str(self.directory),
            "ports": asdict(self.ports),
            "pickle": self.pickle_address,
            "line": self.line_address,
            "whisper_dir": str(self.whisper_dir),
        }


def default_dir() -> Path:
    return paths.var_dir() / "graphite"


def whisper_dir(directory: Path) -> Path:
    return Path(directory) / "storage" / "whisper"


def log_file(directory: Path) -> Path:
    return Path(directory) / "log" / "carbon-cache.log"


def write_config(
    directory: Path,
    ports: Ports,
    schemas=DEFAULT_SCHEMAS,
    max_creates_per_minute: int = 100_000,
    max_updates_per_second: int = 100_000,
) -> Path:
    """Render carbon.conf and storage-schemas.conf into ``<directory>/conf``; return carbon.conf."""
    directory = Path(directory)
    conf_dir = directory / "conf"
    conf_dir.mkdir(parents=True, exist_ok=True)
    carbon_conf = render(
        "graphite/carbon.conf.j2",
        listen=LISTEN,
        ports=ports,
        storage_dir=directory / "storage",
        whisper_dir=whisper_dir(directory),
        log_dir=directory / "log",
        pid_dir=directory,
        max_creates_per_minute=max_creates_per_minute,
        max_updates_per_second=max_updates_per_second,
    )
    (conf_dir / "carbon.conf").write_text(carbon_conf)
    (conf_dir / "storage-schemas.conf").write_text(render("graphite/storage-schemas.conf.j2", schemas=schemas))
    return conf_dir / "carbon.conf"


def start(
    directory: Path | None = None,
    ports: Ports | None = None,
    timeout: float = 30.0,
    schemas=DEFAULT_SCHEMAS,
) -> Handle:
    """Start carbon-cache and wait until its listeners accept; return its Handle.

    If this directory's carbon is already running with the same ports, return that one
    with ``started=False``; with other ports, refuse.
    """
    directory = Path(directory or default_dir()).resolve()
    ports = ports or Ports()
    current = _running_handle(directory)
    if current is not None:
        if current.ports != ports:
            raise CloudopsError(
                f"graphite in {directory} already runs with pid {current.pid} on other ports "
                f"{asdict(current.ports)}; stop it first"
            )
        current.started = False
        return current
    for port in (ports.line, ports.pickle, ports.query):
        check_port_free(port)

    config = write_config(directory, ports, schemas)
    whisper_dir(directory).mkdir(parents=True, exist_ok=True)
    log = log_file(directory)
    log.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_pidfile(directory)
    carbon_cache = Path(sys.executable).parent / "carbon-cache.py"
    if not carbon_cache.exists():
        raise CloudopsError(f"graphite: {carbon_cache} not found; install carbon (GRAPHITE_NO_PREFIX=1 pip install carbon)")
    env = dict(os.environ, GRAPHITE_ROOT=str(directory))
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, str(carbon_cache), f"--config={config}", "--nodaemon", "start"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=directory, env=env, start_new_session=True,
        )
    handle = Handle(pid=process.pid, directory=directory, ports=ports, process=process)
    try:
        _wait_listening(handle, timeout)
    except BaseException:
        processes.terminate(handle.pid, process, timeout=5.0)
        raise
    _write_state(handle)
    return handle


def stop(target: Handle | Path | None = None, timeout: float = 10.0) -> bool:
    """Stop carbon-cache by pid (SIGTERM, then SIGKILL after ``timeout``). False if it was not running.

    ``target`` is a Handle from ``start`` or a graphite directory (default var/graphite).
    """
    if isinstance(target, Handle):
        handle = target
    else:
        handle = _running_handle(Path(target or default_dir()).resolve())
        if handle is None:
            return False
    was_running = _is_carbon(handle.pid, handle.directory)
    if was_running:
        processes.terminate(handle.pid, handle.process, timeout)
    elif handle.process is not None:
        handle.process.poll()
    (handle.directory / STATE_FILE).unlink(missing_ok=True)
    return was_running


def status(directory: Path | None = None) -> dict:
    """Whether this directory's carbon-cache runs, its pid and ports, and which ports accept."""
    directory = Path(directory or default_dir()).resolve()
    handle = _running_handle(directory)
    if handle is None:
        return {"running": False, "directory": str(directory)}
    report = {"running": True, **handle.as_dict()}
    report["accepting"] = {name: _accepts(port) for name, port in asdict(handle.ports).items()}
    return report


def read_series(storage: Path, metric_path: str, from_time: float, until_time: float) -> list[tuple[int, float]]:
    """The datapoints of one series with from_time <= timestamp <= until_time, gaps left out.

    ``storage`` is the whisper root (``Handle.whisper_dir``). A series that does not exist
    (yet), or is being created this moment, reads as an empty list. (whisper.fetch itself
    excludes ``from``: hence the -1.)
    """
    wsp = Path(storage, *metric_path.split(".")).with_suffix(".wsp")
    if not wsp.exists():
        return []
    try:
        result = whisper.fetch(str(wsp), int(from_time) - 1, int(until_time))
    except whisper.CorruptWhisperFile:
        if wsp.stat().st_size < whisper.metadataSize + whisper.archiveInfoSize:
            return []  # carbon is creating the file right now: header not written yet
        raise CloudopsError(f"whisper file {wsp} is corrupt") from None
    if result is None:
        return []
    (start_ts, _end, step), values = result
    points = ((start_ts + i * step, v) for i, v in enumerate(values) if v is not None)
    return [(ts, v) for ts, v in points if from_time <= ts <= until_time]


def free_loopback_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free on 127.0.0.1 a moment ago (for tests and benches)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LISTEN, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# -- internals ---------------------------------------------------------------------------


def _write_state(handle: Handle) -> None:
    atomicfile.write(handle.directory / STATE_FILE, json.dumps({"pid": handle.pid, "ports": asdict(handle.ports)}) + "\n")


def _running_handle(directory: Path) -> Handle | None:
    try:
        data = json.loads((directory / STATE_FILE).read_text())
        handle = Handle(pid=int(data["pid"]), directory=directory, ports=Ports(**data["ports"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, CloudopsError):
        raise CloudopsError(f"graphite: {directory / STATE_FILE} is unreadable; remove it") from None
    return handle if _is_carbon(handle.pid, directory) else None


def _is_carbon(pid: int, directory: Path) -> bool:
    """True if ``pid`` is a live (not zombie) carbon-cache using this directory's config."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
        return False
    expected = f"--config={directory / 'conf' / 'carbon.conf'}".encode()
    return any(arg.endswith(b"carbon-cache.py") for arg in cmdline) and expected in cmdline


def check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as carbon (Twisted) binds: connections in TIME_WAIT do not make the port busy
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LISTEN, port))
        except OSError as exc:
            raise CloudopsError(f"graphite: port {port} on {LISTEN} is in use ({exc.strerror})") from None


def _accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((LISTEN, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait_listening(handle: Handle, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = [handle.ports.pickle, handle.ports.line, handle.ports.query]
    while pending:
        if handle.process.poll() is not None:
            raise CloudopsError(
                f"graphite: carbon-cache exited with code {handle.process.returncode} while starting: "
                f"{processes.last_line(log_file(handle.directory))}"
            )
        if _accepts(pending[0]):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise CloudopsError(
                f"graphite: carbon-cache (pid {handle.pid}) did not accept on port {pending[0]} "
                f"within {timeout:.0f}s; see {log_file(handle.directory)}"
            )
        time.sleep(0.05)


def _remove_stale_pidfile(directory: Path) -> None:
    """carbon refuses to start over a pidfile whose pid lives, even if that pid is now another process."""
    pidfile = directory / "carbon-cache-a.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        pidfile.unlink(missing_ok=True)
        return
    if not _is_carbon(pid, directory):
        pidfile.unlink(missing_ok=True)

