"""Host evacuation and cloud rebalancing on a real lab: every move is a real live migration.

Maintenance state is kept in a temporary file per test, apart from the developer's and other runs'.
"""

import pytest

from cloudops.compute import vms
from cloudops.hosts import maintenance
from cloudops.migration import evacuate, rebalance
from tests.lab.test_migration import _answers, holders, start


@pytest.fixture(autouse=True)
def own_maintenance(no_maintenance):
    """No host of the test lab starts (or stays) in maintenance."""


@pytest.fixture
def started(lab_inventory):
    names = []

    def make(name, host):
        start(lab_inventory, name, host)
        names.append(name)

    yield make
    for name in names:
        vms.delete_vm(name, lab_inventory)


def on(lab_inventory, host) -> list[str]:
    return sorted(vm.name for vm in vms.list_on_host(lab_inventory.hosts[host]))


def test_evacuate_a_host_running_two_vms(lab, lab_inventory, tiny_image, started):
    for name in ("t-ev1", "t-ev2"):
        started(name, "hv1")

    plan = evacuate.evacuate("hv1", lab_inventory, dry_run=True)
    assert sorted(m.vm for m in plan.moves) == ["t-ev1", "t-ev2"]
    assert all(m.status == "planned" and m.target in ("hv2", "hv3") for m in plan.moves)
    assert on(lab_inventory, "hv1") == ["t-ev1", "t-ev2"] and maintenance.hosts_in_maintenance() == set()

    report = evacuate.evacuate("hv1", lab_inventory)
    assert report.maintenance_changed and "hv1" in maintenance.hosts_in_maintenance()
    assert [m.status for m in report.moves] == ["moved", "moved"], report.lines()
    assert on(lab_inventory, "hv1") == []
    for m in report.moves:
        assert holders(lab_inventory, m.vm) == {m.target: True}
        assert _answers(lab_inventory, m.vm)
    # the scheduler spreads them: equal VMs on two empty hosts
    assert sorted(m.target for m in report.moves) == ["hv2", "hv3"]
    # a second run has nothing left to move
    again = evacuate.evacuate("hv1", lab_inventory)
    assert again.moves == [] and not again.maintenance_changed


def test_rebalance_an_unbalanced_lab(lab, lab_inventory, tiny_image, started):
    for name in ("t-rb1", "t-rb2", "t-rb3"):
        started(name, "hv1")
    assert on(lab_inventory, "hv2") == []

    dry = rebalance.rebalance(lab_inventory, cpu_interval=0.5)
    assert dry.moves and dry.after["objective"] < dry.before["objective"]
    assert all(m["source"] == "hv1" for m in dry.moves)
    assert len(on(lab_inventory, "hv1")) == 3  # a dry run moves nothing

    report = rebalance.rebalance(lab_inventory, apply=True, cpu_interval=0.5, max_moves=4)
    assert report.failed is None
    assert report.moves and all(m["status"] == "moved" for m in report.moves)
    assert report.after["objective"] < report.before["objective"]
    assert report.after["cv"] < report.before["cv"]
    assert len(on(lab_inventory, "hv1")) < 3 and on(lab_inventory, "hv2") != []
    for name in ("t-rb1", "t-rb2", "t-rb3"):
        assert _answers(lab_inventory, name)
