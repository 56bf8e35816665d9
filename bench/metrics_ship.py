"""Shipping throughput to a local carbon-cache: pickle frames vs plaintext lines, side by side.

Usage: .venv/bin/python bench/metrics_ship.py [--datapoints 200000] [--series 1000] [--repeats 5]

Starts its own carbon-cache on free loopback ports in a temporary directory, then runs
the modes interleaved (pickle, plaintext, pickle, ...) so that noise from the shared
machine hits all of them alike. A run is timed end to end: from the first byte sent
until carbon has *received* everything, known by a sentinel datapoint sent last on the
same connection showing up in carbon's cache (cache-query port) or in whisper. Carbon
handles one connection's data in order, so the sentinel arriving means all did.

On a shared machine the wall-clock figure moves with the load of others; the CPU time
carbon itself spent per datapoint (from /proc/<pid>/stat, all its threads, including
the writer's whisper updates) and the client's CPU per datapoint hardly do.

Modes:
  pickle           CarbonClient(protocol="pickle"): frames of 500 datapoints
  plaintext        CarbonClient(protocol="plaintext"): 500 lines per write
  plaintext-lines  one write per line, as a naive line-by-line client does
"""

from __future__ import annotations

import argparse
import os
import pickle
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloudops.metrics import graphite  # noqa: E402
from cloudops.metrics.carbon import CarbonClient, encode_plaintext  # noqa: E402

TARGET = 100_000  # datapoints per second through the pickle path
PREFIX = "test.bench"


def datapoints(count: int, series: int, first_ts: int) -> list:
    per_series = -(-count // series)
    return [
        (f"{PREFIX}.s{i % series:05d}", (first_ts + i // series, float(i)))
        for i in range(min(count, series * per_series))
    ]


class CacheProbe:
    """Asks carbon's cache-query port whether a metric has datapoints (carbon's own protocol)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)

    def has(self, metric: str) -> bool:
        request = pickle.dumps({"type": "cache-query", "metric": metric}, protocol=2)
        self.sock.sendall(struct.pack("!L", len(request)) + request)
        (length,) = struct.unpack("!L", self._read(4))
        return bool(pickle.loads(self._read(length)).get("datapoints"))

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("cache query connection closed")
            data += chunk
        return data

    def close(self):
        self.sock.close()


def send_lines_one_by_one(address: tuple[str, int], points: list) -> None:
    with socket.create_connection(address, timeout=30) as sock:
        for point in points:
            sock.sendall(encode_plaintext([point]))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(mode: str, handle: graphite.Handle, probe: CacheProbe, points: list, sentinel: str, sentinel_ts: int) -> dict:
    """Seconds until carbon received everything, until the client's send returned, and CPU used by each."""
    marker = [(sentinel, (sentinel_ts, 1.0))]
    carbon_cpu = cpu_seconds(handle.pid)
    client_cpu = time.process_time()
    start = time.perf_counter()
    if mode == "plaintext-lines":
        send_lines_one_by_one(("127.0.0.1", handle.ports.line), points + marker)
    else:
        address = handle.pickle_address if mode == "pickle" else handle.line_address
        with CarbonClient(address, protocol="pickle" if mode == "pickle" else "plaintext", send_timeout=60) as client:
            client.send(points)
            client.send(marker)
    sent = time.perf_counter()
    client_cpu = time.process_time() - client_cpu
    deadline = sent + 120
    while not (probe.has(sentinel) or graphite.read_series(handle.whisper_dir, sentinel, sentinel_ts, sentinel_ts)):
        if time.perf_counter() > deadline:
            raise SystemExit(f"{mode}: carbon did not receive the sentinel within 120 s")
        time.sleep(0.002)
    return {
        "received": time.perf_counter() - start,
        "client_done": sent - start,
        "client_cpu": client_cpu,
        "carbon_cpu": cpu_seconds(handle.pid) - carbon_cpu,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datapoints", type=int, default=200_000)
    parser.add_argument("--series", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", default="pickle,plaintext,plaintext-lines")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if args.datapoints <= 0 or args.series <= 0 or args.repeats <= 0:
        parser.error("--datapoints, --series and --repeats must be > 0")
    per_run = -(-args.datapoints // args.series)
    if per_run * args.repeats * len(modes) > 6000:
        parser.error("too many timestamps per series for the 2 h retention of test.*: use more --series")

    with tempfile.TemporaryDirectory(prefix="cloudops-bench-") as tmp:
        handle = graphite.start(Path(tmp), graphite.Ports(*graphite.free_loopback_ports(3)))
        probe = CacheProbe(handle.ports.query)
        try:
            base = int(time.time()) - 7000
            # warm-up: carbon creates the whisper files once, outside the timed runs
            run("pickle", handle, probe, datapoints(args.series, args.series, base - 1), f"{PREFIX}.sentinel.warm", base - 1)
            time.sleep(2)
            results = {mode: [] for mode in modes}
            slot = 0
            for repeat in range(args.repeats):
                for mode in modes:
                    first_ts = base + slot * per_run
                    points = datapoints(args.datapoints, args.series, first_ts)
                    timing = run(mode, handle, probe, points, f"{PREFIX}.sentinel.{mode}", first_ts)
                    rates = {key: len(points) / max(seconds, 1e-9) for key, seconds in timing.items()}
                    results[mode].append(rates)
                    print(f"  run {repeat + 1} {mode:16s} {rates['received']:>10,.0f} dp/s received"
                          f" | carbon CPU {1e6 / rates['carbon_cpu']:5.2f} us/dp"
                          f" | client CPU {1e6 / rates['client_cpu']:5.2f} us/dp", flush=True)
                    slot += 1
                    time.sleep(1)  # let carbon's writer drain its cache between runs
        finally:
            probe.close()
            graphite.stop(handle)

    print(f"\n{args.datapoints:,} datapoints over {args.series} series, {args.repeats} runs per mode, medians:")
    print(f"  {'mode':16s} {'end to end':>12s} {'carbon CPU':>12s} {'client CPU':>12s}   (carbon-CPU-bound rate)")
    median = {mode: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for mode, runs in results.items()}
    for mode in modes:
        m = median[mode]
        print(f"  {mode:16s} {m['received']:>8,.0f} dp/s {1e6 / m['carbon_cpu']:>7.2f} us/dp"
              f" {1e6 / m['client_cpu']:>7.2f} us/dp   ({m['carbon_cpu']:,.0f} dp/s per carbon CPU second)")
    if "pickle" in median:
        pickle_rates = median["pickle"]
        for mode in modes:
            if mode != "pickle":
                other = median[mode]
                # a cost ratio is the inverse of the rate ratio: pickle cost / other cost = other rate / pickle rate
                print(f"  pickle vs {mode}: end-to-end throughput x{pickle_rates['received'] / other['received']:.2f};"
                      f" carbon CPU per datapoint x{other['carbon_cpu'] / pickle_rates['carbon_cpu']:.2f};"
                      f" client CPU per datapoint x{other['client_cpu'] / pickle_rates['client_cpu']:.2f}")
        verdict = "meets" if median["pickle"]["received"] >= TARGET else "MISSES"
        print(f"  pickle end to end {verdict} the target of {TARGET:,} dp/s (load average now {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
