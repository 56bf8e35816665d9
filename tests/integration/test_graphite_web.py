"""`invoke graphite.up/status/down` with graphite-web: a real gunicorn and carbon-cache on free loopback ports.

(The render API against shipped lab data is in tests/lab/test_metrics_lab.py.)
"""

import json
import os
import socket
import stat

import pytest

from cloudops import processes
from cloudops.metrics import graphite
from tests.conftest import invoke


def ports_args(directory):
    line, pickle, query, web = graphite.free_loopback_ports(4)
    return ["--directory", str(directory), "--line-port", str(line), "--pickle-port", str(pickle),
            "--query-port", str(query)], web


@pytest.fixture
def where(tmp_path):
    args, web = ports_args(tmp_path / "graphite")
    yield args, web
    invoke("graphite.down", "--directory", str(tmp_path / "graphite"))


def test_up_starts_both_once_status_shows_the_url_down_stops_both(where):
    args, web = where
    first = invoke("graphite.up", *args, "--web-port", str(web))
    assert first.returncode == 0, first.stderr
    started = json.loads(first.stdout)
    assert started["changed"] is True and started["web"]["url"] == f"http://127.0.0.1:{web}"
    pids = [started["pid"], started["web"]["pid"]]
    assert all(processes.alive(pid) for pid in pids)
    settings = os.path.join(args[1], "conf", "cloudops_graphite_web.py")
    assert stat.S_IMODE(os.stat(settings).st_mode) == 0o600  # it holds graphite-web's SECRET_KEY
    # the secret is in that file only: not on gunicorn's command line nor in its environment
    secret = next(line.split("=", 1)[1].strip().strip('"') for line in open(settings) if line.startswith("SECRET_KEY"))
    with open(f"/proc/{started['web']['pid']}/cmdline", "rb") as cmdline, \
            open(f"/proc/{started['web']['pid']}/environ", "rb") as environ:
        assert secret.encode() not in cmdline.read() + environ.read()
    with socket.create_connection(("127.0.0.1", web), timeout=5) as conn:  # the UI's own page
        conn.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        status_line = conn.recv(64).split(b"\r\n")[0]
    assert status_line.split()[1:2] == [b"200"], status_line

    again = invoke("graphite.up", *args, "--web-port", str(web))
    assert again.returncode == 0 and json.loads(again.stdout)["changed"] is False
    shown = json.loads(invoke("graphite.status", "--directory", args[1]).stdout)
    assert shown["running"] and shown["web"] == started["web"]

    down = invoke("graphite.down", "--directory", args[1])
    assert down.returncode == 0 and json.loads(down.stdout)["changed"] is True
    assert not any(processes.alive(pid) for pid in pids)
    assert json.loads(invoke("graphite.down", "--directory", args[1]).stdout)["changed"] is False


def test_a_busy_web_port_is_one_line_and_leaves_no_carbon_running(where):
    args, _web = where
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = invoke("graphite.up", *args, "--web-port", str(port))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"cloudops: graphite: port {port} on 127.0.0.1 is in use (Address already in use)"]
    shown = json.loads(invoke("graphite.status", "--directory", args[1]).stdout)
    assert shown["running"] is False and shown["web"] == {"running": False}


def test_no_web_starts_carbon_alone(where):
    args, _web = where
    proc = invoke("graphite.up", *args, "--no-web")
    assert proc.returncode == 0, proc.stderr
    assert "web" not in json.loads(proc.stdout)
    shown = json.loads(invoke("graphite.status", "--directory", args[1]).stdout)
    assert shown["running"] is True and shown["web"] == {"running": False}
