"""Tasks for the local Graphite (carbon-cache on 127.0.0.1): graphite.up, graphite.down, graphite.status."""

from pathlib import Path

from invoke import task

from cloudops.metrics import graphite
from cloudops.tasks._cli import emit_json, user_errors

_HELP = {
    "directory": "Graphite directory: config, whisper files, log (default var/graphite)",
    "line_port": "plaintext listener port (default 2003)",
    "pickle_port": "pickle listener port (default 2004)",
    "query_port": "cache query port (default 7002)",
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


@task(help=_HELP)
@user_errors
def up(c, directory=None, line_port=None, pickle_port=None, query_port=None):
    """Start carbon-cache on 127.0.0.1 (no change if it already runs)."""
    handle = graphite.start(_directory(c, directory), _ports(c, line_port, pickle_port, query_port))
    emit_json({"changed": handle.started, **handle.as_dict()})


@task(help={"directory": _HELP["directory"]})
@user_errors
def down(c, directory=None):
    """Stop carbon-cache by its pid (no change if it is not running)."""
    stopped = graphite.stop(_directory(c, directory))
    emit_json({"changed": stopped, "running": False})


@task(help={"directory": _HELP["directory"]})
@user_errors
def status(c, directory=None):
    """Show whether carbon-cache runs, its pid, ports and storage."""
    emit_json(graphite.status(_directory(c, directory)))
