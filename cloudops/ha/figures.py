"""Failover figures for Graphite: how long detection, fencing and each restart took.

``<prefix>.host.<host>.failover.{detect_s,fence_s,restarted,down,failed}`` per failover and
``<prefix>.vm.<vm>.failover.restart_s`` per restarted VM. Shipped like a migration's figures
(``cloudops.metrics.cycle.record_migration``): carbon now, or the spool when carbon does not take
them, so the next ``metrics.ship`` cycle sends them; monitoring never fails a failover.
"""

import time

from cloudops.metrics import naming
from cloudops.metrics.carbon import CarbonClient, CarbonUnreachable
from cloudops.metrics.cycle import default_spool_dir
from cloudops.metrics.spool import Spool


def datapoints(report, prefix: str = "cloudops", timestamp: float | None = None) -> list:
    """The figures of one failover report (``cloudops.ha.failover.Report``)."""
    naming.validate_prefix(prefix)
    ts = int(time.time() if timestamp is None else timestamp)

    def host(field, value):
        return (naming.path(prefix, "host", report.host, "failover", field), (ts, float(value)))

    points = []
    if report.detect_seconds is not None:
        points.append(host("detect_s", report.detect_seconds))
    if report.fence:
        points.append(host("fence_s", report.fence["seconds"]))
    counts = {"restarted": 0, "down": 0, "failed": 0}
    for step in report.steps:
        if step.action == "restarted":
            counts["restarted"] += 1
            points.append((naming.vm_path(prefix, step.vm, "failover", "restart_s"), (ts, float(step.seconds or 0))))
        elif step.action == "down":
            counts["down"] += 1
        elif step.action in ("failed", "no host"):
            counts["failed"] += 1
    points += [host(name, value) for name, value in counts.items()]
    return points


def ship(report, carbon: str | None = None, prefix: str = "cloudops", spool: Spool | None = None) -> dict:
    """Send the report's figures; what carbon does not take waits in the spool. Never raises for carbon."""
    points = datapoints(report, prefix)
    spool = spool if spool is not None else Spool(default_spool_dir())
    sent, error = 0, "not configured; spooled for the next cycle"
    if carbon:
        client = CarbonClient(carbon, attempts=2)
        try:
            sent, error = client.send(points), "ok"
        except CarbonUnreachable as exc:
            sent, error = exc.sent, str(exc)
        finally:
            client.close()
    rest = points[sent:]
    dropped = spool.append(rest)
    return {"datapoints": len(points), "sent": sent, "spooled": len(rest), "dropped": dropped, "carbon": error}
