"""cloudops.compute.scheduler: filters, weighers, tie-breaks and the one-line failure."""

import random

import pytest

from cloudops.compute.scheduler import (
    HostState,
    PlacementRequest,
    check,
    claim,
    place,
    rank,
)
from cloudops.errors import CloudopsError


def host(name, total=8192, free=None, committed=0, vcpus=8, vcpus_committed=0, **kw):
    kw.setdefault("reserved_host_memory_mb", 0)
    return HostState(name, total, free, committed, vcpus, vcpus_committed, **kw)


WEB = PlacementRequest(memory_mb=512, vcpus=1, name="web1")


def test_spreads_to_the_host_with_most_free_memory():
    hosts = [host("hv1", committed=6000), host("hv2", committed=1000), host("hv3", committed=3000)]
    assert place(WEB, hosts).name == "hv2"


def test_ties_go_to_the_first_host_by_name_whatever_the_input_order():
    hosts = [host(f"hv{i}") for i in range(6)]
    for seed in range(5):
        random.Random(seed).shuffle(hosts)
        assert place(WEB, hosts).name == "hv0"


@pytest.mark.parametrize(
    "state, request_, reason",
    [
        (host("h", maintenance=True), WEB, "in maintenance"),
        (host("h"), PlacementRequest(512, 1, exclude_hosts=("h",)), "excluded"),
        (host("h", tags={"ssd"}), PlacementRequest(512, 1, required_tags=("gpu", "ssd", "10g")),
         "lacks tags 10g, gpu"),
        (host("h", tags={"ssd"}), PlacementRequest(512, 1, required_tags=("gpu",)), "lacks tag gpu"),
        (host("h", anti_affinity_groups={"db"}), PlacementRequest(512, 1, anti_affinity_group="db"),
         "already runs a VM of anti-affinity group 'db'"),
        (host("h", free=300), WEB, "needs 512 MiB, 300 MiB free"),
        (host("h", free=600, reserved_host_memory_mb=256), WEB,
         "needs 512 MiB, 344 MiB free above the 256 MiB reserve"),
        (host("h", committed=7800), WEB, "needs 512 MiB, 392 MiB uncommitted of 8192 MiB"),
        (host("h", vcpus=2, vcpus_committed=8), WEB, "needs 1 vCPU, 0 of 8 left (2 x 4)"),
        (host("h", vcpus=2, vcpus_committed=7, cpu_allocation_ratio=4.0), PlacementRequest(512, 2),
         "needs 2 vCPUs, 1 of 8 left (2 x 4)"),
    ],
)
def test_each_filter_gives_its_reason(state, request_, reason):
    assert check(request_, state) == reason


@pytest.mark.parametrize(
    "state",
    [
        host("h", free=512, tags={"ssd"}),  # exactly enough free memory
        host("h", committed=8192 - 512, tags={"ssd"}),  # exactly enough uncommitted memory
        host("h", vcpus=2, vcpus_committed=7, tags={"ssd"}),  # the last vCPU of 2 x 4.0
        host("h", free=None, committed=0, tags={"ssd"}),  # free memory unknown: not checked
        host("h", tags={"ssd", "gpu"}, anti_affinity_groups={"web"}),  # other group, more tags
    ],
)
def test_hosts_at_the_limit_pass(state):
    assert check(PlacementRequest(512, 1, anti_affinity_group="db", required_tags=("ssd",)), state) is None


def test_allocation_ratios_and_reserve_set_the_limits():
    h = host("h", total=4096, vcpus=4, cpu_allocation_ratio=2.0, ram_allocation_ratio=1.5,
             reserved_host_memory_mb=256)
    assert h.memory_limit_mb == 4096 * 3 // 2 - 256
    assert h.vcpus_limit == 8
    assert check(PlacementRequest(5888, 8), h) is None
    assert check(PlacementRequest(5889, 1), h).startswith("needs 5889 MiB")
    assert check(PlacementRequest(1, 9), h).startswith("needs 9 vCPUs")


def test_failure_is_one_line_with_a_reason_per_host():
    hosts = [host("hv2", free=300), host("hv1", maintenance=True)]
    with pytest.raises(CloudopsError) as err:
        place(WEB, hosts)
    assert str(err.value) == (
        "no host can take 'web1' (512 MiB, 1 vCPU): hv1: in maintenance; hv2: needs 512 MiB, 300 MiB free"
    )


def test_failure_without_hosts():
    with pytest.raises(CloudopsError, match=r"^no host can take the VM \(1024 MiB, 2 vCPUs\): no hosts known$"):
        place(PlacementRequest(1024, 2), [])


def test_rank_lists_candidates_best_first_and_refused_hosts_with_reasons():
    hosts = [host("a", committed=4000), host("b", maintenance=True), host("c"), host("d", committed=2000)]
    ranking = rank(WEB, hosts)
    assert [c.host.name for c in ranking.candidates] == ["c", "d", "a"]
    assert ranking.rejected == (("b", "in maintenance"),)
    for c in ranking.candidates:
        assert c.score == pytest.approx(sum(c.weights.values()))
    assert ranking.candidates[0].weights["ram"] == pytest.approx(1.0)
    assert ranking.candidates[-1].weights["ram"] == 0.0


def test_weigher_values_are_normalised_and_equal_values_count_zero():
    hosts = [host("a", vcpus_committed=4), host("b", vcpus_committed=4)]
    for c in rank(WEB, hosts).candidates:
        assert c.weights == {"ram": 0.0, "vms": 0.0, "cpu": 0.0}


def test_multipliers_change_the_choice():
    hosts = [
        host("roomy", committed=0, vm_count=20, vcpus_committed=30),
        host("quiet", committed=6000, vm_count=1, vcpus_committed=2),
    ]
    assert place(WEB, hosts).name == "quiet"  # fewer VMs and less CPU outweigh RAM
    assert place(WEB, hosts, {"ram": 5.0}).name == "roomy"
    assert place(WEB, hosts, {"ram": -1.0, "vms": 0, "cpu": 0}).name == "quiet"  # stacking


def test_unknown_weigher_is_a_user_error():
    with pytest.raises(CloudopsError, match="unknown weigher 'disk'; known: ram, vms, cpu"):
        rank(WEB, [host("a")], {"disk": 1.0})


def test_ram_weigher_uses_the_tighter_of_uncommitted_and_free():
    hosts = [host("a", committed=0, free=1000), host("b", committed=2000, free=5000)]
    assert place(WEB, hosts, {"vms": 0, "cpu": 0}).name == "b"


def test_claim_counts_the_placed_vm():
    h = host("a", free=4096, committed=1024, vcpus_committed=1, vm_count=1)
    after = claim(h, PlacementRequest(512, 2, anti_affinity_group="db"))
    assert (after.memory_free_mb, after.memory_committed_mb, after.vcpus_committed, after.vm_count) == (3584, 1536, 3, 2)
    assert after.anti_affinity_groups == {"db"}
    assert check(PlacementRequest(512, 1, anti_affinity_group="db"), after) is not None


def test_placing_a_group_in_a_row_spreads_it():
    hosts = {h.name: h for h in (host("a"), host("b"), host("c"))}
    chosen = []
    for i in range(3):
        request = PlacementRequest(1024, 1, name=f"db{i}", anti_affinity_group="db")
        target = place(request, hosts.values())
        hosts[target.name] = claim(target, request)
        chosen.append(target.name)
    assert sorted(chosen) == ["a", "b", "c"]
    with pytest.raises(CloudopsError, match="already runs a VM of anti-affinity group 'db'"):
        place(PlacementRequest(1024, 1, name="db3", anti_affinity_group="db"), hosts.values())


def test_tags_and_groups_accept_any_iterable():
    h = HostState("a", 1024, tags=["ssd"], anti_affinity_groups=("x",))
    assert h.tags == frozenset({"ssd"}) and h.anti_affinity_groups == frozenset({"x"})
    assert PlacementRequest(1, 1, required_tags=["ssd"]).required_tags == ("ssd",)
