"""Graphs of host and VM load for the report, asked of graphite-web's render API and embedded as
``data:`` URIs, so the page works offline. When graphite-web does not answer, every graph is
marked unavailable with the reason, and the page is written all the same.
"""

import base64
from dataclasses import dataclass

from cloudops.errors import CloudopsError
from cloudops.metrics import graphite_web

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Graph:
    title: str
    target: str
    data_uri: str | None = None  # the PNG, base64; None when unavailable
    unavailable: str = ""  # why not


def wanted(prefix: str) -> list[Graph]:
    """The report's graphs: host CPU, host memory available, VM CPU, VMs running per host."""
    node = len(prefix.split(".")) + 1  # the host's or VM's node in <prefix>.hv.<host>.…
    return [
        Graph("Host CPU (%)", f"aliasByNode({prefix}.hv.*.cpu.util_percent,{node})"),
        Graph("Host memory available (bytes)", f"aliasByNode({prefix}.hv.*.memory.available_bytes,{node})"),
        Graph("VM CPU (%)", f"aliasByNode({prefix}.vm.*.cpu.util_percent,{node})"),
        Graph("VMs running per host", f"aliasByNode({prefix}.hv.*.vms.running,{node})"),
    ]


def fetch(port: int, prefix: str, since: str = "-6h", timeout: float = 20.0) -> tuple[list[Graph], str]:
    """The graphs, and a warning ('' when all came): one render call each; the first failure to reach
    graphite-web marks the rest unavailable too instead of waiting for each."""
    graphs, warning = wanted(prefix), ""
    for graph in graphs:
        if warning:
            graph.unavailable = warning
            continue
        try:
            body = graphite_web.render_api(port, [graph.target], "png", timeout=timeout, width=720, height=260,
                                           title=graph.title, hideLegend="false", lineMode="connected",
                                           **{"from": since})
        except CloudopsError as exc:
            warning = graph.unavailable = f"graphs unavailable: {exc}"
            continue
        if not body.startswith(PNG_SIGNATURE):
            graph.unavailable = "graphite-web answered with something that is not a PNG"
            continue
        graph.data_uri = "data:image/png;base64," + base64.b64encode(body).decode()
    return graphs, warning


def unavailable(prefix: str, why: str) -> list[Graph]:
    """The graphs, all marked unavailable (``--no-graphs``)."""
    graphs = wanted(prefix)
    for graph in graphs:
        graph.unavailable = why
    return graphs
