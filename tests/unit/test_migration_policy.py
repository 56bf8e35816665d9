"""The live migration's convergence policy as plain logic: when post-copy starts (at an iteration, or once
pre-copy has stalled), the memory left at each iteration's start as estimated from polled samples, the
watcher that acts on both, and the policy read from configuration. The lab proves the migrations
themselves (tests/lab/test_migration.py, bench/migrate.py)."""

import libvirt
import pytest

from cloudops.errors import CloudopsError
from cloudops.migration import migrate

MiB = 1 << 20


@pytest.mark.parametrize("starts, iteration, wanted", [
    ({1: 512, 2: 241}, 2, False),  # the first pass left half: pre-copy is getting somewhere
    ({1: 512, 2: 241, 3: 254}, 3, True),  # the working set is dirtied again as fast as it is sent
    ({1: 512, 2: 241, 3: 220}, 3, True),  # 9% less: below the 10% a pass must gain
    ({1: 512, 2: 241, 3: 150}, 3, False),  # converging (auto-converge's throttle, or a lighter load)
    ({1: 512, 2: 500}, 2, True),  # everything dirtied again during the first pass
    ({1: 512, 2: 241, 3: 150}, 4, True),  # postcopy_after, whatever the progress
    ({1: 512}, 1, False),
    ({}, 3, False),  # nothing known of iteration 3's start: no stall claimed
])
def test_postcopy_starts_at_a_stall_or_at_postcopy_after(starts, iteration, wanted):
    assert migrate.Policy().wants_postcopy(iteration, {i: v * MiB for i, v in starts.items()}) is wanted


def test_postcopy_never_without_postcopy_after_and_stall_rule_can_be_off():
    stalled = {1: 512 * MiB, 2: 241 * MiB, 3: 254 * MiB}
    assert not migrate.Policy(postcopy_after=None).wants_postcopy(3, stalled)  # post-copy not allowed at all
    assert not migrate.Policy(postcopy_stall=None).wants_postcopy(3, stalled)
    assert migrate.Policy(postcopy_stall=None).wants_postcopy(4, stalled)


def test_iteration_starts_add_back_what_was_sent_before_the_first_sample():
    starts = migrate.IterationStarts()
    total = 512 * MiB
    # (iteration, processed, remaining) every half second, as jobStats gave them (MiB)
    for iteration, processed, remaining in [(0, 0, 0), (1, 40, 468), (1, 410, 46), (2, 480, 241), (2, 650, 68),
                                            (3, 712, 254), (3, 770, 196)]:
        starts.feed(iteration, processed * MiB, remaining * MiB, total)
    got = {i: v / MiB for i, v in starts.starts.items()}
    # iteration 2: 70 MiB sent between the samples, 46 of them the rest of iteration 1 -> 24 + 241;
    # iteration 3: 62 MiB sent, less than the 68 iteration 2 still had -> as sampled
    assert got == {1: 512, 2: 265, 3: 254}
    assert migrate.Policy().wants_postcopy(3, starts.starts)


def test_iteration_starts_from_a_watch_begun_mid_job():
    starts = migrate.IterationStarts()
    starts.feed(3, 700 * MiB, 200 * MiB, 512 * MiB)
    starts.feed(3, 760 * MiB, 140 * MiB, 512 * MiB)  # the same iteration again: its start is kept
    assert starts.starts == {3: 200 * MiB}


class FakeDom:
    """jobStats from a script of (iteration, processed MiB, remaining MiB), one per tick."""

    def __init__(self, script):
        self.script, self.calls, self.postcopy_at = list(script), [], None
        self.current = None

    def jobStats(self, flags=0):
        if self.script:
            self.current = self.script.pop(0)
        iteration, processed, remaining = self.current
        return {"type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED, "memory_iteration": iteration,
                "memory_processed": processed * MiB, "memory_remaining": remaining * MiB,
                "memory_total": 512 * MiB, "data_total": 512 * MiB, "data_remaining": remaining * MiB}

    def migrateSetMaxDowntime(self, ms, flags):
        self.calls.append(("downtime", ms))

    def migrateStartPostCopy(self, flags):
        self.postcopy_at = self.current[0]


@pytest.mark.parametrize("script, at", [
    ([(1, 40, 468), (1, 410, 46), (2, 480, 241), (2, 650, 68), (3, 712, 254), (3, 770, 196)], 3),
    ([(1, 40, 468), (2, 480, 241), (3, 712, 120), (3, 770, 60), (4, 800, 40)], 4),  # converging: at 4
])
def test_watch_switches_to_postcopy_at_the_stall(script, at):
    dom = FakeDom(script)
    watch = migrate._Watch(dom, migrate.Policy(), lambda p: None, 0.0, migrate._Job())
    for _ in script:
        watch.tick()
    assert dom.postcopy_at == at and watch.postcopy
    assert ("downtime", 50) in dom.calls


def test_postcopy_stall_from_configuration():
    assert migrate.policy_from({"postcopy_stall": "0.2"}).postcopy_stall == 0.2
    assert migrate.policy_from({"postcopy_stall": 0}).postcopy_stall is None
    for bad in ("lots", 1.5):
        with pytest.raises(CloudopsError, match="postcopy_stall must be a share from 0 to 1"):
            migrate.policy_from({"postcopy_stall": bad})
