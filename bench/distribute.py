"""Image distribution benchmark (issue 15): one image to many hosts on shaped links, three ways side by side.

On a full lab of its own (prefix "cdib", ``--hosts`` hosts, every link and the control machine's uplink
shaped to ``--link-rate`` by lab.up), the Debian image (built by the recipe, cached) is copied to every host
by ``store.distribute`` each way, interleaved round by round:

* sequential: from the control machine, one host after the other;
* parallel: from the control machine to every host at once (they share its uplink);
* tree: peer to peer, every holder serving the next host (cloudops.imaging.distribution).

Between two runs the image is removed from the hosts (outside the timing). Each way's median is set
against its floor, the time the links alone need: sequential and parallel both push N copies through
the control machine's uplink, N x S / R; the tree needs S x log2(N + 1) / R (the copies double each
round; without pipelining a copy, whole rounds: ceil(log2(N + 1)) x S / R). The load average is
recorded before and after.

    .venv/bin/python bench/distribute.py [--hosts 8] [--link-rate 300mbit] [--rounds 3] [--json]
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloudops import fleet, inventory  # noqa: E402
from cloudops.imaging import build as imagebuild  # noqa: E402
from cloudops.imaging import store as images  # noqa: E402
from cloudops.lab import hosts as lab  # noqa: E402
from cloudops.lab import links  # noqa: E402

PREFIX = "cdib"
WAYS = ("sequential", "parallel", "tree")
TARGET = 1.5  # the tree within 1.5x of its floor


def remove_everywhere(image, hosts) -> None:
    result = fleet.run(hosts, lambda h: _remove(image, h), timeout=120)
    if result.failed:
        raise SystemExit(f"removing the image failed: {result.failed[0].host}: {result.failed[0].error}")


def _remove(image, host):
    from cloudops.ssh import connect
    import shlex

    directory = f"{images.pool_path(host)}/images"
    with connect(host) as conn:
        conn.run(f"rm -f {' '.join(shlex.quote(directory + '/' + r) for r, _s in image.files().values())} "
                 f"{shlex.quote(directory)}/.*partial*", hide=True, in_stream=False)


def sizes_on_hosts(image, hosts) -> dict:
    """The image file's size on each host (after a run; the receivers checked the sha256 already)."""
    from cloudops.ssh import connect
    import shlex

    def one(host):
        with connect(host) as conn:
            return int(conn.run(f"stat -c %s {shlex.quote(image.remote_path(host))}", hide=True,
                                in_stream=False).stdout)

    return {r.host: r.value for r in fleet.run(hosts, one, timeout=60)}


def run_way(image, hosts, way) -> dict:
    copies = []

    def progress(message):
        if message.startswith("copied "):
            copies.append(message)
            print(f"  {way}: {message}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    result = images.distribute(image, hosts, progress=progress, way=way)
    seconds = time.perf_counter() - t0
    failed = [f"{r.host}: {r.error}" for r in result.failed]
    sizes = sizes_on_hosts(image, hosts) if not failed else {}
    complete = not failed and all(size == image.size for size in sizes.values())
    return {"seconds": seconds, "complete": complete, "failed": failed, "copies": copies,
            "sources": {r.host: r.value for r in result}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--link-rate", default="300mbit", help="every link and the control uplink (lab.up --link-rate)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each way (interleaved)")
    ap.add_argument("--recipe", default="debian", help="image recipe (cached build)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    args = ap.parse_args()

    image, _ = images.add_image(imagebuild.build_image(args.recipe), name=f"bench-{args.recipe}", replace=True)
    load_before = os.getloadavg()
    the_lab = lab.up(args.hosts, prefix=PREFIX, link_rate=args.link_rate)
    inv = inventory.load(the_lab.inventory_path)
    hosts = [inv.hosts[h.name] for h in the_lab.hosts]
    runs = {way: [] for way in WAYS}
    try:
        for n in range(args.rounds):
            for way in (WAYS if n % 2 == 0 else tuple(reversed(WAYS))):
                remove_everywhere(image, hosts)
                run = run_way(image, hosts, way)
                runs[way].append(run)
                print(f"round {n + 1} {way:<10} {run['seconds']:.1f} s complete={run['complete']} "
                      f"{'; '.join(run['failed'])}", file=sys.stderr, flush=True)
        remove_everywhere(image, hosts)
    finally:
        if not args.keep:
            lab.down(PREFIX)
    load_after = os.getloadavg()

    rate = links.parse_rate(args.link_rate) / 8  # bytes per second
    one = image.size / rate
    floors = {"sequential": args.hosts * one, "parallel": args.hosts * one, "tree": math.log2(args.hosts + 1) * one}
    summary = {}
    for way, r in runs.items():
        times = [x["seconds"] for x in r if x["complete"]]
        med = statistics.median(times) if times else None
        summary[way] = {"runs": len(r), "complete": len(times), "median_s": med, "min_s": min(times, default=None),
                        "max_s": max(times, default=None), "floor_s": floors[way],
                        "ratio_to_floor": med / floors[way] if med else None}
    tree = summary["tree"]
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()}, {os.cpu_count()} cores, shared",
           "link": links.describe(the_lab.link), "hosts": args.hosts, "image": image.name,
           "image_bytes": image.size, "one_copy_floor_s": one,
           "tree_rounds_unpipelined": math.ceil(math.log2(args.hosts + 1)),
           "load_before": load_before, "load_after": load_after, "summary": summary,
           "target": f"tree within {TARGET}x of its floor",
           "target_met": bool(tree["ratio_to_floor"] and tree["ratio_to_floor"] <= TARGET),
           "fastest": min((w for w in WAYS if summary[w]["median_s"]), key=lambda w: summary[w]["median_s"],
                          default=None),
           "runs": runs}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['date']} {out['machine']}; link: {out['link']}; {args.hosts} hosts; "
              f"image {image.size / 2**20:.0f} MiB; one copy at the link rate {one:.1f} s")
        for way, s in summary.items():
            print(f"{way:<11} median {_f(s['median_s'])} s (min {_f(s['min_s'])}, max {_f(s['max_s'])}, "
                  f"{s['complete']}/{s['runs']} complete)  floor {s['floor_s']:.1f} s  ratio {_f(s['ratio_to_floor'])}")
        print(f"target {out['target']}: {'met' if out['target_met'] else 'NOT met'}; fastest: {out['fastest']}; "
              f"load {load_before[0]:.2f} -> {load_after[0]:.2f}")
    return 0


def _f(x):
    return "n/a" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    sys.exit(main())
