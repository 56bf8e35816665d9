"""State store benchmark: 1000 IPAM allocations, and the state work of one vm.start, per backend.

Side by side in one run, on this machine:

* **1000 allocations** on one /22 network, one after the other, by the real ``ipam.allocate``:
  today's JSON file under flock (the baseline, ``bench/ipam_json_baseline.py``), the embedded
  SQLite store, and the lab's 3-member etcd over TLS (``cloudops.lab.etcd``, prefix "bst");
* **the state work of one vm.start**: the store calls ``start_vm`` makes, through the same
  library functions (maintenance read, catalog read, the trusted keys, the name lock taken and
  released, one allocation, the host keys written, known_hosts written), median of ``--repeat``
  rounds, for SQLite and for etcd (``vm.delete``'s release is done after the clock stops).
  Target: etcd adds at most 50 ms over SQLite.

    .venv/bin/python bench/state.py [--allocations 1000] [--repeat 30] [--json]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ipam_json_baseline  # noqa: E402

from cloudops import state  # noqa: E402
from cloudops.compute import guest, vms  # noqa: E402
from cloudops.hosts import maintenance  # noqa: E402
from cloudops.imaging import store as images  # noqa: E402
from cloudops.lab import etcd as lab_etcd  # noqa: E402
from cloudops.net import ipam  # noqa: E402
from cloudops.net.networks import NetworkSpec  # noqa: E402
from cloudops.state.etcd import EtcdStore  # noqa: E402
from cloudops.state.sqlite import SqliteStore  # noqa: E402

PREFIX = "bst"
NET = NetworkSpec(name="bench", cidr="10.96.0.0/21")


def allocations(n: int, allocate) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        allocate(f"vm{i}")
    return time.perf_counter() - t0


def vm_start_state_work(i: int) -> float:
    """The store calls of one vm.start and its delete, through the functions vm.start calls."""
    name = f"bench-{i}"
    t0 = time.perf_counter()
    maintenance.hosts_in_maintenance()
    images.list_images()
    guest.trusted_public_keys()
    with vms._name_lock(name):
        allocation = ipam.allocate(NET, name)
        guest.record_host_keys(name, allocation.ip, [("ssh-ed25519", "AAAA" + name)])
        guest.known_hosts()
    elapsed = time.perf_counter() - t0
    ipam.release(NET, name)  # what vm.delete does: not part of vm.start
    guest.forget_host_keys(name, allocation.ip)
    return elapsed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--allocations", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cloudops-bench-state-"))
    os.environ["CLOUDOPS_STATE_DIR"] = str(work / "state")
    print(f"… starting the lab's 3-member etcd (prefix {PREFIX})", file=sys.stderr)
    lab_etcd.up(PREFIX, 3)
    try:
        etcd = EtcdStore.from_settings(lab_etcd.settings(PREFIX))
        sqlite = SqliteStore(work / "cloud.sqlite")
        n = args.allocations
        print(f"… {n} allocations: JSON file under flock", file=sys.stderr)
        t_json = allocations(n, lambda vm: ipam_json_baseline.allocate(NET, vm, work / "json"))
        print(f"… {n} allocations: sqlite", file=sys.stderr)
        t_sqlite = allocations(n, lambda vm: ipam.allocate(NET, vm, store=sqlite))
        print(f"… {n} allocations: etcd", file=sys.stderr)
        t_etcd = allocations(n, lambda vm: ipam.allocate(NET, vm, store=etcd))

        rounds = {}
        for label, store in (("sqlite", SqliteStore(work / "start.sqlite")), ("etcd", etcd)):
            state.use(store)
            vm_start_state_work(-1)  # warm: the trusted key registered, connections open
            rounds[label] = [vm_start_state_work(i) for i in range(args.repeat)]
        calls = []
        real_call = etcd._call
        etcd._call = lambda what, *a, **kw: (calls.append(what), real_call(what, *a, **kw))[1]
        vm_start_state_work(args.repeat)
        etcd._call = real_call
        state.use(None)
    finally:
        lab_etcd.down(PREFIX)
    med = {k: statistics.median(v) * 1000 for k, v in rounds.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cores {platform.machine()}",
        "allocations": n,
        "allocate_s": {"json_flock": round(t_json, 3), "sqlite": round(t_sqlite, 3), "etcd": round(t_etcd, 3)},
        "per_allocation_ms": {"json_flock": round(t_json / n * 1000, 3), "sqlite": round(t_sqlite / n * 1000, 3),
                              "etcd": round(t_etcd / n * 1000, 3)},
        "ratio_sqlite_vs_json": round(t_json / t_sqlite, 2), "ratio_etcd_vs_json": round(t_json / t_etcd, 2),
        "vm_start_state_ms_median": {k: round(v, 2) for k, v in med.items()},
        "etcd_overhead_over_sqlite_ms": round(med["etcd"] - med["sqlite"], 2),
        "etcd_requests_per_vm_start": len(calls) - 4,  # minus the release and forget after the clock
        "etcd_ms_per_request": round(med["etcd"] / max(1, len(calls) - 4), 2),
        "target_etcd_overhead_ms": 50, "repeat": args.repeat,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
