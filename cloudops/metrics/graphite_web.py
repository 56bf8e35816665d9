"""Graphite's own web UI and render API (Debian's graphite-web under gunicorn) over the local carbon's whisper files.

It lives in the carbon directory (``var/graphite``) beside carbon-cache::

    conf/cloudops_graphite_web.py     graphite-web's settings, rendered (0600: SECRET_KEY)
    storage/graphite.db               Django's sqlite database (made once by ``migrate``)
    log/graphite-web.log              gunicorn's own output; log/webapp/ graphite-web's
    graphite-web.json                 pid and port of the running instance

gunicorn runs in the foreground of its own session, so its pid is known at once and ``stop``
works by that pid from any process, as for carbon-cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from cloudops import atomicfile, processes
from cloudops.errors import CloudopsError
from cloudops.metrics import graphite
from cloudops.templating import render

STATE_FILE = "graphite-web.json"
SETTINGS_MODULE = "cloudops_graphite_web"
DEFAULT_PORT = 8080
STATIC_ROOT = Path("/usr/share/graphite-web/static")  # Debian's graphite-web
WORKERS = 2  # a PNG render is CPU work: one per core of a small control machine


def url(port: int) -> str:
    return f"http://{graphite.LISTEN}:{port}"


def log_file(directory: Path) -> Path:
    return Path(directory) / "log" / "graphite-web.log"


def conf_dir(directory: Path) -> Path:
    return Path(directory) / "conf"


def write_settings(directory: Path, query_port: int) -> Path:
    """Render graphite-web's settings for this directory (a fresh SECRET_KEY each time), mode 0600."""
    directory = Path(directory)
    storage = directory / "storage"
    text = render("graphite/graphite_web_settings.py.j2", secret_key=secrets.token_urlsafe(48),
                  listen=graphite.LISTEN, storage_dir=storage, whisper_dir=graphite.whisper_dir(directory),
                  index_file=storage / "index", log_dir=directory / "log" / "webapp", static_root=STATIC_ROOT,
                  carbonlink=f"{graphite.LISTEN}:{query_port}", database=storage / "graphite.db")
    path = conf_dir(directory) / f"{SETTINGS_MODULE}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomicfile.write(path, text, mode=0o600)
    return path


def start(directory: Path | None = None, port: int = DEFAULT_PORT, query_port: int = graphite.Ports().query,
          timeout: float = 60.0) -> tuple[dict, bool]:
    """Start graphite-web on 127.0.0.1:``port`` and wait until its render API answers.

    Returns (status, started); started is False when this directory's graphite-web already ran
    on that port. Another port is refused: stop it first."""
    directory = Path(directory or graphite.default_dir()).resolve()
    running = _running(directory)
    if running is not None:
        if running["port"] != port:
            raise CloudopsError(f"graphite-web in {directory} already runs with pid {running['pid']} on port "
                                f"{running['port']}; stop it first")
        return status(directory), False
    _check_installed()
    graphite.check_port_free(port)
    write_settings(directory, query_port)
    (directory / "log" / "webapp").mkdir(parents=True, exist_ok=True)
    graphite.whisper_dir(directory).mkdir(parents=True, exist_ok=True)
    if not (directory / "storage" / "graphite.db").exists():
        _migrate(directory)
    with open(log_file(directory), "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"{graphite.LISTEN}:{port}", "--workers", str(WORKERS),
             "--timeout", "60", "--pythonpath", str(conf_dir(directory)), "--chdir", str(directory),
             "graphite.wsgi:application"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=_environment(directory),
            start_new_session=True)
    try:
        _wait_answering(process, directory, port, timeout)
    except BaseException:
        processes.terminate(process.pid, process, timeout=5.0)
        raise
    atomicfile.write(directory / STATE_FILE, json.dumps({"pid": process.pid, "port": port}) + "\n")
    return status(directory), True


def stop(directory: Path | None = None, timeout: float = 10.0) -> bool:
    """Stop graphite-web by its pid (SIGTERM, then SIGKILL). False if it was not running."""
    directory = Path(directory or graphite.default_dir()).resolve()
    running = _running(directory)
    if running is not None:
        processes.terminate(running["pid"], None, timeout)
    (directory / STATE_FILE).unlink(missing_ok=True)
    return running is not None


def status(directory: Path | None = None) -> dict:
    """Whether this directory's graphite-web runs, its pid, port and URL."""
    directory = Path(directory or graphite.default_dir()).resolve()
    running = _running(directory)
    if running is None:
        return {"running": False}
    return {"running": True, "pid": running["pid"], "port": running["port"], "url": url(running["port"])}


def render_api(port: int, targets: list[str], fmt: str, timeout: float = 30.0, **params) -> bytes:
    """One call of the render API (``/render?target=...&format=...``): the body, or CloudopsError."""
    query = urllib.parse.urlencode([*(("target", t) for t in targets), ("format", fmt), *params.items()])
    try:
        with urllib.request.urlopen(f"{url(port)}/render?{query}", timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CloudopsError(f"graphite-web at {url(port)}: {reason}") from None


# -- internals ---------------------------------------------------------------------------


def _environment(directory: Path) -> dict:
    """The settings graphite-web reads; the secret stays in the 0600 file, never in the environment."""
    return dict(os.environ, DJANGO_SETTINGS_MODULE="graphite.settings", GRAPHITE_SETTINGS_MODULE=SETTINGS_MODULE,
                PYTHONPATH=os.pathsep.join([str(conf_dir(directory)), *filter(None, [os.environ.get("PYTHONPATH")])]))


def _check_installed() -> None:
    """graphite-web and gunicorn come from Debian's packages (the virtualenv sees the system's site packages)."""
    for module, package in (("graphite", "graphite-web"), ("gunicorn", "gunicorn")):
        if importlib.util.find_spec(module) is None:
            raise CloudopsError(f"graphite-web: Python module {module} not found; install Debian's {package} "
                                "(make setup does)")


def _migrate(directory: Path) -> None:
    """Make graphite-web's sqlite database (its tables; cloudops stores nothing in it)."""
    proc = subprocess.run([sys.executable, "-m", "django", "migrate", "--run-syncdb", "--verbosity", "0"], check=False,
                          capture_output=True, text=True, cwd=directory, env=_environment(directory), timeout=120)
    if proc.returncode:
        last = next((line for line in reversed(proc.stderr.splitlines()) if line.strip()), "no output")
        raise CloudopsError(f"graphite-web: making its database failed: {last.strip()}")


def _wait_answering(process: subprocess.Popen, directory: Path, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise CloudopsError(f"graphite-web: gunicorn exited with code {process.returncode} while starting: "
                                f"{processes.last_line(log_file(directory))}")
        try:
            render_api(port, ["cloudops.cloudops.none"], "json", timeout=5.0)
            return
        except CloudopsError:
            if time.monotonic() > deadline:
                raise CloudopsError(f"graphite-web (pid {process.pid}) did not answer on port {port} within "
                                    f"{timeout:.0f}s; see {log_file(directory)}") from None
            time.sleep(0.2)


def _running(directory: Path) -> dict | None:
    try:
        data = json.loads((directory / STATE_FILE).read_text())
        running = {"pid": int(data["pid"]), "port": int(data["port"])}
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        raise CloudopsError(f"graphite-web: {directory / STATE_FILE} is unreadable; remove it") from None
    return running if _is_ours(running["pid"], directory) else None


def _is_ours(pid: int, directory: Path) -> bool:
    """True if ``pid`` is a live gunicorn serving graphite-web with this directory's settings."""
    if not processes.alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return b"graphite.wsgi:application" in cmdline and str(conf_dir(directory)).encode() in cmdline
