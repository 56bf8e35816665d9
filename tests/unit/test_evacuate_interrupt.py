"""cloudops.migration.evacuate: Ctrl-C during a parallel evacuation tells every running migration to abort.

The migrations are stand-ins here (the real ones, aborted in libvirt on a lab, are in
tests/lab/test_migration_faults.py); what this proves is the main thread's part: SIGINT never
raises inside the wait on the workers, every migration sees the cancel, and the report says so.
"""

import os
import signal
import threading
import types

import pytest

from cloudops.errors import CloudopsError
from cloudops.migration import balance, evacuate


@pytest.fixture
def two_moves(monkeypatch):
    monkeypatch.setattr(evacuate.maintenance, "set_maintenance", lambda host, on: True)
    monkeypatch.setattr(evacuate.cluster, "model", lambda hosts, cpu_interval=0: None)
    monkeypatch.setattr(evacuate.balance, "evacuation_plan", lambda model, host, max_parallel_per_source: [
        balance.Move("a", "hv1", "hv2", 96, wave=0), balance.Move("b", "hv1", "hv2", 96, wave=0)])
    running = threading.Barrier(3)
    seen = []

    def migrate_vm(name, target, inventory, *, policy, cancel, progress, message):
        running.wait(timeout=10)  # both migrations run before the Ctrl-C comes
        assert cancel.wait(timeout=10), "the cancel never came"
        seen.append(name)
        raise CloudopsError(f"migration of {name} to {target} was interrupted: aborted", exit_code=130)

    monkeypatch.setattr(evacuate.migrate, "migrate_vm", migrate_vm)
    inventory = types.SimpleNamespace(hosts={"hv1": None, "hv2": None}, hypervisors=lambda: [])
    return inventory, running, seen


def test_ctrl_c_cancels_every_running_migration_and_raises_nothing(two_moves):
    inventory, running, seen = two_moves
    messages = []

    def press_ctrl_c():
        running.wait(timeout=10)
        for _ in range(3):  # pressed again and again: still no exception in the main thread
            os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c)
    presser.start()
    before = signal.getsignal(signal.SIGINT)
    report = evacuate.evacuate("hv1", inventory, parallel=2, message=messages.append)
    presser.join()
    assert report.interrupted
    assert sorted(seen) == ["a", "b"]
    assert [(m.vm, m.status) for m in report.moves] == [("a", "cancelled"), ("b", "cancelled")]
    assert messages.count("interrupted: aborting every running migration; each VM stays on its source") == 1
    assert signal.getsignal(signal.SIGINT) is before  # the CLI's own handling of Ctrl-C is back
