"""Benchmark the rebalance planner, and compare it with the exhaustive greedy baseline.

    .venv/bin/python bench/planner.py            # table
    .venv/bin/python bench/planner.py --json     # machine-readable
    .venv/bin/python bench/planner.py --baseline ../main   # and another checkout's planner, side by side

On synthetic clusters built from a fixed seed:

* speed: ``balance.plan`` alone, median of --runs runs, wall clock and CPU time (the
  machine is shared: CPU time is the steadier number), for each --case: 1000 hosts /
  20,000 VMs with the default target CV (0.05) and with 0 (balance until no move pays),
  target <= 2 s, and 5000 hosts / 100,000 VMs with the default, target <= 10 s. With
  --baseline, the planner of that checkout is timed on the same clusters, its runs
  interleaved with this one's (so both share the machine's noise), and its moves
  compared; the load average is recorded before and after;
* quality: ``plan`` and ``greedy_baseline`` (O(VMs x hosts) per move) side by side on
  clusters small enough for the baseline: objective after, moves, time, and whether
  the two made the very same moves.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloudops.migration import balance  # noqa: E402

HOST_CLASSES = (  # (memory MiB, threads): three hardware generations, 4 GiB per thread
    (262144, 64),
    (393216, 96),
    (524288, 128),
)
VM_SIZES = (  # (memory MiB, vCPUs, weight)
    (1024, 1, 20),
    (2048, 1, 25),
    (4096, 2, 25),
    (8192, 4, 15),
    (16384, 8, 10),
    (32768, 16, 5),
)


def synthetic_cluster(n_hosts: int, n_vms: int, seed: int = 42) -> balance.Cluster:
    """An unevenly filled cluster that is within capacity: a few hot hosts, 5% new empty
    ones, 1% in maintenance, 10% of VMs in anti-affinity groups of three, 2% pinned."""
    rnd = random.Random(seed)
    hosts = []
    for i in range(n_hosts):
        mem, threads = HOST_CLASSES[i % len(HOST_CLASSES)]
        hosts.append(balance.Host(
            name=f"hv{i:04d}",
            memory_mb=mem,
            vcpus=threads,
            maintenance=rnd.random() < 0.01,
            tags=frozenset({"ssd"}) if rnd.random() < 0.7 else frozenset(),
        ))
    preference = [0.0 if rnd.random() < 0.05 else rnd.paretovariate(2.0) for _ in hosts]
    sizes = [(m, c) for m, c, _ in VM_SIZES]
    weights = [w for _, _, w in VM_SIZES]
    mem_used, vcpu_used = [0] * n_hosts, [0] * n_hosts
    groups: list[set[str]] = [set() for _ in hosts]
    vms = []
    for j in range(n_vms):
        mem, vcpus = rnd.choices(sizes, weights)[0]
        group = f"g{j // 3:05d}" if rnd.random() < 0.1 else None
        for _attempt in range(50):
            h = rnd.choices(range(n_hosts), preference)[0] if rnd.random() < 0.8 else rnd.randrange(n_hosts)
            host = hosts[h]
            if (mem_used[h] + mem <= host.memory_limit_mb and vcpu_used[h] + vcpus <= host.vcpus_limit
                    and (group is None or group not in groups[h])):
                break
        else:
            continue  # full: fewer VMs than asked
        mem_used[h] += mem
        vcpu_used[h] += vcpus
        if group:
            groups[h].add(group)
        load = round(vcpus * rnd.betavariate(1.2, 3.0), 3)
        vms.append(balance.VM(f"vm{j:05d}", host.name, mem, vcpus, load, group, pinned=rnd.random() < 0.02))
    return balance.Cluster(tuple(hosts), tuple(vms))


def load_baseline(root: str):
    """``balance`` of another checkout (e.g. main), importable beside this one: its
    balance_search stands in for ours while its balance module is executed."""
    import importlib.util

    root_path = Path(root).resolve() / "cloudops" / "migration"
    saved = sys.modules.get("cloudops.migration.balance_search")
    try:
        spec = importlib.util.spec_from_file_location("baseline_balance_search", root_path / "balance_search.py")
        search = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(search)
        sys.modules["cloudops.migration.balance_search"] = search
        spec = importlib.util.spec_from_file_location("baseline_balance", root_path / "balance.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["baseline_balance"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.modules["cloudops.migration.balance_search"] = saved
    return module


def timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def speed_summary(result: balance.Plan, walls: list[float], cpus: list[float], target_cv: float) -> dict:
    return {
        "target_cv": target_cv,
        "runs": len(walls),
        "wall_s": [round(t, 3) for t in walls],
        "cpu_s": [round(t, 3) for t in cpus],
        "median_wall_s": round(statistics.median(walls), 3),
        "median_cpu_s": round(statistics.median(cpus), 3),
        "moves": len(result.moves),
        "memory_moved_gib": round(result.memory_moved_mb / 1024),
        "evaluations": result.evaluations,
        "before": vars(result.before),
        "after": vars(result.after),
        "stopped": result.stopped,
    }


def parse_case(spec: str) -> tuple[int, int, float, float]:
    """HOSTSxVMS@TARGET_CV:LIMIT_S, e.g. 1000x20000@0:2"""
    size, _, rest = spec.partition("@")
    target, _, limit = rest.partition(":")
    h, v = map(int, size.lower().split("x"))
    return h, v, float(target or balance.DEFAULT_TARGET_CV), float(limit or "inf")


def speed(cases: list[tuple[int, int, float, float]], runs: int, seed: int,
          baseline=None) -> tuple[dict, list[dict]]:
    """Time every case --runs times, round by round (and this planner, then the
    baseline's, within a round), so that slow spells of the machine hit all alike."""
    clusters = {}
    for h, v, _, _ in cases:
        if (h, v) not in clusters:
            clusters[h, v] = synthetic_cluster(h, v, seed)
    planners = [("plan", balance.plan)] + ([("baseline", baseline.plan)] if baseline else [])
    times = {(i, name): ([], [], None) for i in range(len(cases)) for name, _ in planners}
    load_before = os.getloadavg()
    for _ in range(runs):
        for i, (h, v, target, _) in enumerate(cases):
            for name, fn in planners:
                result, wall, cpu = timed(fn, clusters[h, v], target_cv=target)
                walls, cpus, _ = times[i, name]
                walls.append(wall)
                cpus.append(cpu)
                times[i, name] = (walls, cpus, result)
    load_after = os.getloadavg()
    rows = []
    for i, (h, v, target, limit) in enumerate(cases):
        walls, cpus, result = times[i, "plan"]
        row = {"hosts": h, "vms": len(clusters[h, v].vms), "limit_s": limit,
               **speed_summary(result, walls, cpus, target)}
        row["met"] = row["median_wall_s"] <= limit
        if baseline:
            b_walls, b_cpus, b_result = times[i, "baseline"]
            row["baseline"] = speed_summary(b_result, b_walls, b_cpus, target)
            row["same_moves_as_baseline"] = (
                [(m.vm, m.target) for m in result.moves] == [(m.vm, m.target) for m in b_result.moves])
        rows.append(row)
    return {"load_before": load_before, "load_after": load_after}, rows


def compare(n_hosts: int, n_vms: int, seed: int, target_cv: float) -> dict:
    cluster = synthetic_cluster(n_hosts, n_vms, seed)
    planned, plan_wall, plan_cpu = timed(balance.plan, cluster, target_cv=target_cv)
    greedy, greedy_wall, greedy_cpu = timed(balance.greedy_baseline, cluster, target_cv=target_cv)

    def summary(p: balance.Plan, wall: float, cpu: float) -> dict:
        return {"objective": p.after.objective, "cv": p.after.cv, "max_load": p.after.max_load,
                "moves": len(p.moves), "memory_moved_mb": p.memory_moved_mb, "wall_s": wall,
                "cpu_s": cpu, "evaluations": p.evaluations}

    return {
        "hosts": n_hosts, "vms": len(cluster.vms), "seed": seed, "target_cv": target_cv,
        "before": planned.before.objective,
        "plan": summary(planned, plan_wall, plan_cpu),
        "greedy": summary(greedy, greedy_wall, greedy_cpu),
        "same_moves": [(m.vm, m.target) for m in planned.moves] == [(m.vm, m.target) for m in greedy.moves],
        "no_worse": planned.after.objective <= greedy.after.objective + 1e-12
        and len(planned.moves) <= len(greedy.moves),
        "cpu_ratio": greedy_cpu / plan_cpu if plan_cpu > 0 else None,
    }


def print_report(report: dict) -> None:
    load = report["load"]
    print("load average (1, 5, 15 min) before the timed runs "
          f"{' '.join(f'{x:.2f}' for x in load['load_before'])}, after "
          f"{' '.join(f'{x:.2f}' for x in load['load_after'])}")
    for sp in report["speed"]:
        print(f"plan at {sp['hosts']} hosts / {sp['vms']} VMs, target CV {sp['target_cv']:g}: "
              f"median {sp['median_wall_s']:.3f} s wall, {sp['median_cpu_s']:.3f} s CPU "
              f"(wall {sp['wall_s']}) -- target <= {sp['limit_s']:g} s: {'met' if sp['met'] else 'NOT met'}")
        print(f"    {sp['moves']} moves ({sp['memory_moved_gib']} GiB), {sp['evaluations']} candidates scored; "
              f"objective {sp['before']['objective']:.4f} -> {sp['after']['objective']:.4f}, "
              f"CV {sp['before']['cv']:.4f} -> {sp['after']['cv']:.4f}, max load "
              f"{sp['before']['max_load']:.3f} -> {sp['after']['max_load']:.3f}; {sp['stopped']}")
        if "baseline" in sp:
            b = sp["baseline"]
            print(f"    baseline: median {b['median_wall_s']:.3f} s wall, {b['median_cpu_s']:.3f} s CPU "
                  f"(wall {b['wall_s']}), {b['moves']} moves; same moves: "
                  f"{'yes' if sp['same_moves_as_baseline'] else 'NO'}")
    print(f"next_move: {report['next_move_s']:.3f} s wall")
    rows = report["compare"]
    if not rows:
        return
    print()
    print(f"{'cluster':>12} {'seed':>4} {'tcv':>4} {'before':>7} | {'plan obj':>8} {'moves':>5} {'cpu s':>6} |"
          f" {'greedy obj':>10} {'moves':>5} {'cpu s':>6} | {'same':>4} {'ratio':>6}")
    for r in rows:
        p, g = r["plan"], r["greedy"]
        print(f"{r['hosts']:>5}x{r['vms']:<6} {r['seed']:>4} {r['target_cv']:>4g} {r['before']:7.4f} |"
              f" {p['objective']:8.4f} {p['moves']:5d} {p['cpu_s']:6.2f} | {g['objective']:10.4f}"
              f" {g['moves']:5d} {g['cpu_s']:6.2f} | {'yes' if r['same_moves'] else 'no':>4} {r['cpu_ratio']:5.0f}x")
    ratios = [r["cpu_ratio"] for r in rows]
    print(f"same moves as greedy: {sum(r['same_moves'] for r in rows)}/{len(rows)}; no worse (objective and "
          f"moves): {sum(r['no_worse'] for r in rows)}/{len(rows)}; greedy/plan CPU time: median "
          f"{statistics.median(ratios):.0f}x, min {min(ratios):.0f}x, max {max(ratios):.0f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", metavar="HOSTSxVMS@TARGET_CV:LIMIT_S",
                    help="a timed case (repeatable); default 1000x20000@0.05:2, 1000x20000@0:2, "
                         "5000x100000@0.05:10")
    ap.add_argument("--baseline", metavar="DIR", help="a checkout whose planner is timed beside this one")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--compare", default="20x400,50x1000",
                    help="HOSTSxVMS clusters for plan vs greedy, comma-separated ('' to skip)")
    ap.add_argument("--compare-seeds", type=int, default=2, help="seeds per comparison cluster")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    cases = [parse_case(c) for c in (args.case or ["1000x20000@0.05:2", "1000x20000@0:2", "5000x100000@0.05:10"])]
    baseline = load_baseline(args.baseline) if args.baseline else None
    load, rows = speed(cases, args.runs, args.seed, baseline)
    report = {"seed": args.seed, "baseline": args.baseline, "load": load, "speed": rows}
    first = synthetic_cluster(cases[0][0], cases[0][1], args.seed)
    report["next_move_s"] = round(timed(balance.next_move, first)[1], 3)
    report["compare"] = [
        compare(h, v, seed, target)
        for spec in filter(None, args.compare.split(","))
        for h, v in [map(int, spec.lower().split("x"))]
        for seed in range(args.seed, args.seed + args.compare_seeds)
        for target in (balance.DEFAULT_TARGET_CV, 0.0)
    ]
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
