"""Tasks for the local Graphite (carbon-cache and graphite-web on 127.0.0.1): graphite.up, graphite.down, graphite.status."""

from pathlib import Path

from invoke import task

from cloudops.metrics import graphite, graphite_web
from cloudops.tasks._cli import emit_json, user_errors

_HELP = {
    "directory": "Graphite directory: config, whisper files, log (default var/graphite)",
    "line_port": "plaintext listener port (default 2003)",
    "pickle_port": "pickle listener port (default 2004)",
    "query_port": "cache query port (default 7002)",
    "web_port": "graphite-web's port: its UI and render API (default 8080)",
    "web": "also start graphite-web (default; --no-web: carbon-cache only)",
}


def _config(c, name, value):
    """The argument, else ``graphite.<name>`` from the Invoke configuration, else None."""
    if value is not None:
        return value
    return (c.config.get("graphite") or {}).get(name)


def _directory(c, directory):
    value = _config(c, "directory", directory)
    return Path(value) if value else None  # None: the library default, var/graphite


def _ports(c, line_port, pickle_port, query_port) -> graphite.Ports:
    defaults = graphite.Ports()
    return graphite.Ports(
        line=int(_config(c, "line_port", line_port) or defaults.line),
        pickle=int(_config(c, "pickle_port", pickle_port) or defaults.pickle),
        query=int(_config(c, "query_port", query_port) or defaults.query),
    )


def _web_port(c, web_port) -> int:
    return int(_config(c, "web_port", web_port) or graphite_web.DEFAULT_PORT)


@task(help=_HELP)
@user_errors
def up(c, directory=None, line_port=None, pickle_port=None, query_port=None, web_port=None, web=True):
    """Start carbon-cache and graphite-web on 127.0.0.1 (no change for what already runs)."""
    ports = _ports(c, line_port, pickle_port, query_port)
    handle = graphite.start(_directory(c, directory), ports)
    report = {"changed": handle.started, **handle.as_dict()}
    if web:
        try:
            report["web"], started = graphite_web.start(handle.directory, _web_port(c, web_port), ports.query)
        except BaseException:
            if handle.started:  # nothing half-made: the carbon this call started goes too
                graphite.stop(handle)
            raise
        report["changed"] = report["changed"] or started
    emit_json(report)


@task(help={"directory": _HELP["directory"]})
@user_errors
def down(c, directory=None):
    """Stop graphite-web and carbon-cache by their pids (no change if they are not running)."""
    web_stopped = graphite_web.stop(_directory(c, directory))
    stopped = graphite.stop(_directory(c, directory))
    emit_json({"changed": stopped or web_stopped, "running": False})


@task(help={"directory": _HELP["directory"]})
@user_errors
def status(c, directory=None):
    """Show whether carbon-cache and graphite-web run: pids, ports, storage and the web UI's URL."""
    emit_json({**graphite.status(_directory(c, directory)), "web": graphite_web.status(_directory(c, directory))})
