"""The report's HTML: rendered from ``templates/report/cloud.html.j2`` (autoescaped), written atomically.

Plain HTML and CSS: bars are widths, the imbalance over time is an inline SVG polyline drawn
here, graphs are embedded PNGs; no script, nothing fetched when the page is opened.
"""

import time
from pathlib import Path

from cloudops import atomicfile
from cloudops.errors import CloudopsError
from cloudops.templating import render

CHART_WIDTH, CHART_HEIGHT = 640, 140


def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


def imbalance_chart(points: list[dict]) -> dict | None:
    """The series as an SVG polyline (x: time, y: objective from 0 to the largest), or None with
    fewer than two points."""
    if len(points) < 2:
        return None
    t0, t1 = points[0]["time"], points[-1]["time"]
    top = max(p.get("objective", 0.0) for p in points) or 1.0
    span = (t1 - t0) or 1.0
    pad = 6

    def xy(p):
        x = pad + (p["time"] - t0) / span * (CHART_WIDTH - 2 * pad)
        y = CHART_HEIGHT - pad - p.get("objective", 0.0) / top * (CHART_HEIGHT - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    return {"width": CHART_WIDTH, "height": CHART_HEIGHT, "points": " ".join(xy(p) for p in points),
            "top": top, "start": when(t0), "end": when(t1)}


def render_page(facts, graphs: list, history: list[dict], graphite_url: str) -> str:
    return render("report/cloud.html.j2", facts=facts, graphs=graphs, history=history[-10:],
                  chart=imbalance_chart(history), graphite_url=graphite_url, when=when,
                  vm_count=sum(len(h.vms) for h in facts.hosts))


def write(path, html: str) -> Path:
    """Write the page atomically (the umask's mode, as any file); a missing directory is one clear error."""
    path = Path(path)
    if not path.parent.is_dir():
        raise CloudopsError(f"cannot write the report to {path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise CloudopsError(f"cannot write the report to {path}: it is a directory")
    return atomicfile.write(path, html)
