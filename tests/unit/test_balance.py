"""cloudops.migration.balance: the rebalance planner, its exhaustive reference and evacuation."""

import random
from collections import Counter, defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudops.errors import CloudopsError
from cloudops.migration.balance import (
    VM,
    Cluster,
    Host,
    Move,
    Objective,
    apply_moves,
    evacuation_plan,
    greedy_baseline,
    host_loads,
    imbalance,
    next_move,
    plan,
)

GiB = 1024


def host(name, memory_mb=64 * GiB, vcpus=16, **kw):
    kw.setdefault("reserved_memory_mb", 0)
    return Host(name, memory_mb, vcpus, **kw)


def vm(name, on, memory_mb=4 * GiB, vcpus=2, cpu_load=1.0, **kw):
    return VM(name, on, memory_mb, vcpus, cpu_load, **kw)


def lopsided(n_hot=8, **hot_kw):
    """hv1 carries eight VMs, hv2 one, hv3 none."""
    vms = [vm(f"vm{i}", "hv1", **hot_kw) for i in range(n_hot)] + [vm("lone", "hv2")]
    return Cluster([host("hv1"), host("hv2"), host("hv3")], vms)


def moved(p):
    return [(m.vm, m.source, m.target) for m in p.moves]


# -- the planner on hand-made clusters ---------------------------------------------------


def test_an_unbalanced_cluster_gets_moves_that_reduce_imbalance():
    cluster = lopsided()
    p = plan(cluster)
    assert p.moves
    assert all(m.source == "hv1" for m in p.moves)
    assert p.after.objective < p.before.objective
    assert p.after.cv < p.before.cv
    assert p.after.cv <= 0.05 or p.stopped == "no move clears the margin"
    after = host_loads(apply_moves(cluster, p.moves))
    assert max(after.values()) < host_loads(cluster)["hv1"]
    assert [m.wave for m in p.moves] == list(range(len(p.moves)))  # one at a time


def test_the_plan_report_matches_the_cluster_after_the_moves():
    cluster = lopsided()
    p = plan(cluster, target_cv=0.0)
    assert p.after == pytest.approx(imbalance(apply_moves(cluster, p.moves)))
    assert p.before == imbalance(cluster)
    assert sum(m.improvement for m in p.moves) == pytest.approx(p.before.objective - p.after.objective)


def test_a_balanced_cluster_gets_no_moves():
    even = [vm(f"vm{h}{i}", f"hv{h}") for h in (1, 2, 3) for i in range(3)]
    p = plan(Cluster([host("hv1"), host("hv2"), host("hv3")], even), target_cv=0.0)
    assert p.moves == () and p.stopped.startswith("CV 0.0000")
    # 4, 3, 3 VMs: any move only shifts the extra VM elsewhere, and costs a migration
    nearly = Cluster([host("hv1"), host("hv2"), host("hv3")], even + [vm("extra", "hv1")])
    p = plan(nearly, target_cv=0.0)
    assert p.moves == ()
    assert p.stopped == "no move clears the margin"
    assert p.after == p.before


def test_planning_stops_at_the_target_cv():
    cluster = lopsided()
    assert plan(cluster, target_cv=10.0).moves == ()
    assert "at or below the target 10" in plan(cluster, target_cv=10.0).stopped
    assert len(plan(cluster, target_cv=0.3).moves) < len(plan(cluster, target_cv=0.0).moves)


def test_margin_is_respected():
    cluster = lopsided()
    everything = plan(cluster, target_cv=0.0)
    margin = sorted(m.net for m in everything.moves)[len(everything.moves) // 2]
    picky = plan(cluster, target_cv=0.0, margin=margin)
    assert picky.moves and all(m.net >= margin for m in picky.moves)
    assert len(picky.moves) < len(everything.moves)
    none = plan(cluster, target_cv=0.0, margin=10.0)
    assert none.moves == () and none.stopped == "no move clears the margin"


def test_max_moves_and_next_move():
    cluster = lopsided()
    p = plan(cluster, max_moves=2)
    assert len(p.moves) == 2 and p.stopped == "max_moves reached"
    assert next_move(cluster) == p.moves[0]
    assert next_move(Cluster([host("hv1")], [vm("a", "hv1")])) is None


def test_maintenance_hosts_are_never_targets_nor_sources():
    cluster = Cluster(
        [host("hv1"), host("hv2"), host("hv3", maintenance=True)],
        [vm(f"vm{i}", "hv1") for i in range(8)] + [vm(f"old{i}", "hv3") for i in range(8)],
    )
    p = plan(cluster, target_cv=0.0)
    assert p.moves
    assert all(m.target == "hv2" and m.source == "hv1" for m in p.moves)
    assert "hv3" not in host_loads(cluster)


def test_anti_affinity_is_respected():
    vms = [vm(f"vm{i}", "hv1") for i in range(6)] + [
        vm("db1", "hv1", anti_affinity_group="db"),
        vm("db2", "hv2", anti_affinity_group="db"),
        vm("db3", "hv3", anti_affinity_group="db"),
    ]
    cluster = Cluster([host("hv1"), host("hv2"), host("hv3"), host("hv4")], vms)
    p = plan(cluster, target_cv=0.0)
    after = apply_moves(cluster, p.moves)
    per_host = Counter(v.host for v in after.vms if v.anti_affinity_group == "db")
    assert max(per_host.values()) == 1
    assert all(m.target == "hv4" for m in p.moves if m.vm.startswith("db"))


def test_pinned_vms_never_move():
    vms = [vm(f"vm{i}", "hv1", pinned=i != 3) for i in range(8)]
    p = plan(Cluster([host("hv1"), host("hv2")], vms), target_cv=0.0)
    assert moved(p) == [("vm3", "hv1", "hv2")]


def test_memory_heavy_vms_cost_more():
    # CPU-only load: "light" and "heavy" take the same load off hv1; heavy copies 16x the memory
    fill = [vm(f"fill{i}", "hv1", memory_mb=GiB, cpu_load=1.0) for i in range(6)]
    light = vm("light", "hv1", memory_mb=GiB, cpu_load=4.0, vcpus=4)
    heavy = vm("heavy", "hv1", memory_mb=16 * GiB, cpu_load=4.0, vcpus=4)
    hosts = [host("hv1"), host("hv2")]
    cpu_only = Objective(memory_weight=0.0, cpu_weight=1.0)
    assert plan(Cluster(hosts, fill + [light, heavy]), objective=cpu_only, max_moves=1).moves[0].vm == "light"
    moved_light = plan(Cluster(hosts, fill + [light]), objective=cpu_only, max_moves=1).moves[0]
    moved_heavy = plan(Cluster(hosts, fill + [heavy]), objective=cpu_only, max_moves=1).moves[0]
    assert (moved_light.vm, moved_heavy.vm) == ("light", "heavy")
    assert moved_heavy.improvement == pytest.approx(moved_light.improvement)
    assert moved_heavy.cost == pytest.approx(16 * moved_light.cost)
    assert moved_heavy.net < moved_light.net


def test_capacity_and_ratios_are_never_exceeded():
    hosts = [
        host("hv1"),
        host("hv2", memory_mb=16 * GiB, reserved_memory_mb=4 * GiB),  # room for 12 GiB
        host("hv3", vcpus=2, cpu_ratio=2.0),  # room for 4 vCPUs
    ]
    vms = [vm(f"vm{i}", "hv1", memory_mb=4 * GiB, vcpus=2) for i in range(12)]
    cluster = Cluster(hosts, vms)
    p = plan(cluster, target_cv=0.0)
    after = apply_moves(cluster, p.moves)
    assert sum(v.memory_mb for v in after.vms_on("hv2")) <= 12 * GiB
    assert sum(v.vcpus for v in after.vms_on("hv3")) <= 4
    assert p.moves


def test_required_tags_limit_the_targets():
    vms = [vm(f"vm{i}", "hv1", required_tags={"gpu"}) for i in range(8)]
    cluster = Cluster([host("hv1", tags={"gpu"}), host("hv2"), host("hv3", tags={"gpu", "ssd"})], vms)
    p = plan(cluster, target_cv=0.0)
    assert p.moves and {m.target for m in p.moves} == {"hv3"}


def test_hosts_of_different_sizes_are_compared_by_utilisation():
    # hv1 (64 GiB) and hv2 (128 GiB, twice the threads) are both half full: balanced.
    vms = [vm(f"a{i}", "hv1") for i in range(8)] + [vm(f"b{i}", "hv2") for i in range(16)]
    cluster = Cluster([host("hv1"), host("hv2", memory_mb=128 * GiB, vcpus=32)], vms)
    assert imbalance(cluster).cv == pytest.approx(0.0, abs=1e-9)
    assert plan(cluster, target_cv=0.0).moves == ()


def random_cluster(seed, n_hosts=8, n_vms=80):
    rnd = random.Random(seed)
    hosts = [host(f"hv{i}", memory_mb=rnd.choice([32, 64, 96]) * GiB, vcpus=rnd.choice([8, 16, 24]),
                  maintenance=rnd.random() < 0.1) for i in range(n_hosts)]
    weights = [rnd.random() ** 3 for _ in hosts]
    vms, used = [], Counter()
    for j in range(n_vms):
        h = rnd.choices(hosts, weights)[0]
        mem = rnd.choice([1, 2, 4, 8]) * GiB
        if used[h.name] + mem <= h.memory_limit_mb:
            used[h.name] += mem
            vms.append(vm(f"vm{j:03d}", h.name, mem, 1, rnd.random(), pinned=rnd.random() < 0.05))
    return Cluster(hosts, vms)


@pytest.mark.parametrize("seed", range(4))
def test_the_planner_makes_the_exhaustive_baselines_moves(seed):
    cluster = random_cluster(seed)
    for target in (0.0, 0.05):
        p, g = plan(cluster, target_cv=target), greedy_baseline(cluster, target_cv=target)
        assert moved(p) == moved(g)
        assert p.after == g.after
        assert p.evaluations < g.evaluations


# -- input checks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hosts, vms, message",
    [
        ([host("a"), host("a")], [], "duplicate host names: a"),
        ([host("a")], [vm("x", "a"), vm("x", "a")], "duplicate VM names: x"),
        ([host("a")], [vm("x", "b")], "VM x: unknown host 'b'"),
        ([host("a", memory_mb=0)], [], "host a: memory_mb and vcpus must be positive"),
        ([host("a")], [vm("x", "a", cpu_load=-1)], "VM x: memory_mb, vcpus and cpu_load must be >= 0"),
    ],
)
def test_bad_clusters_are_refused(hosts, vms, message):
    with pytest.raises(CloudopsError, match=f"^{message}$"):
        Cluster(hosts, vms)


def test_bad_objectives_are_refused():
    with pytest.raises(CloudopsError, match="load weights"):
        Objective(memory_weight=0, cpu_weight=0)
    with pytest.raises(CloudopsError, match="must be >= 0"):
        Objective(migration_cost=-1)


def test_apply_moves_checks_each_move():
    cluster = lopsided()
    with pytest.raises(CloudopsError, match="move of vm0 from hv2, but it runs on hv1"):
        apply_moves(cluster, [Move("vm0", "hv2", "hv3", 1)])
    with pytest.raises(CloudopsError, match="move of unknown VM 'nope'"):
        apply_moves(cluster, [Move("nope", "hv1", "hv3", 1)])
    with pytest.raises(CloudopsError, match="move of vm0 to unknown host 'hv9'"):
        apply_moves(cluster, [Move("vm0", "hv1", "hv9", 1)])


def test_fewer_than_two_active_hosts():
    p = plan(Cluster([host("a"), host("b", maintenance=True)], [vm("x", "a")]))
    assert p.moves == () and p.stopped == "fewer than two active hosts"


# -- evacuation --------------------------------------------------------------------------


def test_evacuation_empties_the_host_biggest_first():
    vms = [vm("small", "hv1", 2 * GiB), vm("big", "hv1", 16 * GiB), vm("mid", "hv1", 8 * GiB),
           vm("other", "hv2")]
    cluster = Cluster([host("hv1", maintenance=True), host("hv2"), host("hv3"), host("hv4", maintenance=True)], vms)
    moves = evacuation_plan(cluster, "hv1")
    assert [m.vm for m in moves] == ["big", "mid", "small"]
    assert {m.target for m in moves} <= {"hv2", "hv3"}
    assert all(m.source == "hv1" for m in moves)
    assert not apply_moves(cluster, moves).vms_on("hv1")


def test_evacuation_waves():
    cluster = Cluster([host("hv1"), host("hv2"), host("hv3")], [vm(f"v{i}", "hv1") for i in range(5)])
    assert [m.wave for m in evacuation_plan(cluster, "hv1", max_parallel_per_source=2)] == [0, 0, 1, 1, 2]
    with pytest.raises(CloudopsError, match="at least 1"):
        evacuation_plan(cluster, "hv1", max_parallel_per_source=0)


def test_evacuation_respects_capacity_and_anti_affinity():
    vms = [vm(f"db{i}", "hv1", 4 * GiB, anti_affinity_group="db") for i in range(2)]
    vms += [vm("db9", "hv2", anti_affinity_group="db")] + [vm(f"w{i}", "hv1", 4 * GiB) for i in range(4)]
    hosts = [host("hv1"), host("hv2"), host("hv3", memory_mb=12 * GiB), host("hv4", memory_mb=12 * GiB)]
    cluster = Cluster(hosts, vms)
    moves = evacuation_plan(cluster, "hv1")
    after = apply_moves(cluster, moves)
    for h in hosts:
        groups = [v.anti_affinity_group for v in after.vms_on(h.name) if v.anti_affinity_group]
        assert len(groups) == len(set(groups))
        assert sum(v.memory_mb for v in after.vms_on(h.name)) <= h.memory_limit_mb
    assert {m.target for m in moves if m.vm.startswith("db")} == {"hv3", "hv4"}


def test_evacuation_names_the_vm_that_fits_nowhere():
    vms = [vm("huge", "hv1", 48 * GiB), vm("tiny", "hv1", GiB), vm("fat", "hv1", 40 * GiB)]
    cluster = Cluster([host("hv1"), host("hv2", memory_mb=32 * GiB), host("hv3", maintenance=True)], vms)
    with pytest.raises(CloudopsError) as err:
        evacuation_plan(cluster, "hv1")
    message = str(err.value)
    assert message.startswith("cannot evacuate hv1: no host can take 'huge' (49152 MiB, 2 vCPUs): ")
    assert "hv2: needs 49152 MiB, 32768 MiB uncommitted of 32768 MiB" in message
    assert "hv3: in maintenance" in message
    assert message.endswith("(and 1 more: fat)")
    assert "\n" not in message


def test_evacuation_refuses_pinned_vms_unless_asked():
    cluster = Cluster([host("hv1"), host("hv2")], [vm("p", "hv1", pinned=True), vm("q", "hv1")])
    with pytest.raises(CloudopsError, match="cannot evacuate hv1: pinned VM p"):
        evacuation_plan(cluster, "hv1")
    assert [m.vm for m in evacuation_plan(cluster, "hv1", include_pinned=True)] == ["p", "q"]


def test_evacuation_of_an_unknown_host():
    with pytest.raises(CloudopsError, match="unknown host 'hv9'"):
        evacuation_plan(lopsided(), "hv9")


# -- properties over random clusters -----------------------------------------------------


@st.composite
def clusters(draw):
    hosts = []
    for i in range(draw(st.integers(2, 6))):
        hosts.append(Host(
            f"h{i}",
            memory_mb=draw(st.sampled_from([4, 8, 16])) * GiB,
            vcpus=draw(st.sampled_from([2, 4, 8])),
            maintenance=draw(st.integers(0, 5)) == 0,
            tags=draw(st.sampled_from([frozenset(), frozenset({"ssd"})])),
            cpu_ratio=draw(st.sampled_from([1.0, 2.0, 4.0])),
            ram_ratio=draw(st.sampled_from([1.0, 1.5])),
            reserved_memory_mb=draw(st.sampled_from([0, 512])),
        ))
    mem, cpus, groups = Counter(), Counter(), defaultdict(set)
    vms = []
    for j in range(draw(st.integers(0, 24))):
        h = hosts[draw(st.integers(0, len(hosts) - 1))]
        size = draw(st.sampled_from([512, 1024, 2048, 4096]))
        vcpus = draw(st.integers(1, 4))
        group = draw(st.sampled_from([None, None, None, "a", "b"]))
        if mem[h.name] + size > h.memory_limit_mb or cpus[h.name] + vcpus > h.vcpus_limit:
            continue
        if group in groups[h.name]:
            continue
        mem[h.name] += size
        cpus[h.name] += vcpus
        if group:
            groups[h.name].add(group)
        vms.append(VM(
            f"v{j:02d}", h.name, size, vcpus,
            cpu_load=draw(st.integers(0, 10)) * vcpus / 10,
            anti_affinity_group=group,
            pinned=draw(st.integers(0, 9)) == 0,
            required_tags=draw(st.sampled_from([frozenset(), frozenset(), frozenset({"ssd"})])),
        ))
    return Cluster(hosts, vms)


def check_valid(cluster):
    for h in cluster.hosts:
        on = cluster.vms_on(h.name)
        assert sum(v.memory_mb for v in on) <= h.memory_limit_mb, h.name
        assert sum(v.vcpus for v in on) <= h.vcpus_limit, h.name
        groups = [v.anti_affinity_group for v in on if v.anti_affinity_group]
        assert len(groups) == len(set(groups)), h.name


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster=clusters(), target_cv=st.sampled_from([0.0, 0.05]), alpha=st.sampled_from([0.0, 0.1, 1.0]))
def test_plans_never_overcommit_and_never_worsen(cluster, target_cv, alpha):
    objective = Objective(max_load_penalty=alpha)
    p = plan(cluster, target_cv=target_cv, objective=objective)
    hosts = {h.name: h for h in cluster.hosts}
    current = cluster
    for m in p.moves:
        now = {v.name: v for v in current.vms}[m.vm]
        assert m.source == now.host != m.target
        assert not now.pinned
        assert not hosts[m.source].maintenance and not hosts[m.target].maintenance
        assert now.required_tags <= hosts[m.target].tags
        assert m.net > 0
        current = apply_moves(current, [m])
        check_valid(current)
    before = imbalance(cluster, objective).objective
    assert imbalance(current, objective).objective <= before + 1e-12
    assert p.after.objective <= p.before.objective + 1e-12
    assert moved(p) == moved(greedy_baseline(cluster, target_cv=target_cv, objective=objective))
