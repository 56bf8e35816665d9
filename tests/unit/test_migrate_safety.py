"""Pure logic of the migration safety rule: when cloudops may undo, what it says, which copy survives.

The lab proves the behaviour for real (tests/lab/test_migration_faults.py); these
cases pin the decisions themselves, with the hosts' answers given as data.
"""

import pytest

from cloudops.errors import CloudopsError
from cloudops.inventory import Host
from cloudops.migration import journal, migrate, outcome, recover


@pytest.fixture(autouse=True)
def own_var(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDOPS_VAR", str(tmp_path))


def copy(host, state, **kw):
    return outcome.Copy(host=host, state=state, reason=0, persistent=True, **kw)


def where(copies=(), unreachable=None):
    return outcome.Where("web1", {c.host: c for c in copies}, dict(unreachable or {}))


SRC, DST = Host("hv1", "10.0.0.1"), Host("hv2", "10.0.0.2")


def test_journal_records_until_the_outcome_is_settled():
    journal.begin("web1", "hv1", "hv2", live=True, shared=False, disks=["/d/web1.qcow2"])
    journal.update("web1", prepared_files=["/d/web1.qcow2"], postcopy=True)
    record = journal.read("web1")
    assert (record["source"], record["target"], record["postcopy"]) == ("hv1", "hv2", True)
    assert [r["name"] for r in journal.unfinished()] == ["web1"]
    journal.end("web1")
    assert journal.read("web1") is None and journal.unfinished() == []


def test_where_describes_every_host_in_one_line():
    w = where([copy("hv1", outcome.PAUSED, postcopy_failed=True), copy("hv2", outcome.RUNNING)],
              {"hv3": "cannot reach libvirtd"})
    assert w.describe() == ("web1 is paused (post-copy failed) on hv1, runs on hv2; "
                            "hv3 does not answer (cannot reach libvirtd)")
    assert w.running() == ["hv2"] and not w.known


@pytest.fixture
def answers(monkeypatch):
    """What outcome.where will say after the fault; records whether the destination was undone."""
    state = {"where": None, "undone": False}
    monkeypatch.setattr(outcome, "where", lambda name, hosts, timeout=20: state["where"])
    monkeypatch.setattr(migrate, "_undo", lambda *a: state.__setitem__("undone", True))
    monkeypatch.setattr(migrate, "SETTLE_SECONDS", 0)

    class Conn:
        def __enter__(self):
            return object()

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(migrate.virt, "open_host", lambda host: Conn())
    journal.begin("web1", "hv1", "hv2", live=True, shared=False, disks=[])
    journal.update("web1", phase="migrating")
    return state


def fault(exc, job=None, prepared=None):
    with pytest.raises(CloudopsError) as info:
        migrate._after_fault(exc, "web1", SRC, DST, prepared or migrate._Prepared(files=["/d/x"]),
                             job or migrate._Job(), True, migrate.Policy(timeout=15), lambda m: None)
    return info.value


def test_a_certain_failure_is_undone_and_says_the_vm_keeps_running(answers):
    answers["where"] = where([copy("hv1", outcome.RUNNING)])
    err = fault(migrate._Aborted("timeout"))
    assert answers["undone"] and journal.read("web1") is None
    assert str(err) == "migration of web1 to hv2 did not complete within 15s: aborted, web1 keeps running on hv1"


def test_ctrl_c_is_exit_130(answers):
    answers["where"] = where([copy("hv1", outcome.RUNNING)])
    assert fault(KeyboardInterrupt()).exit_code == 130


@pytest.mark.parametrize("after, why", [
    (where([copy("hv1", outcome.RUNNING)], {"hv2": "cannot reach libvirtd"}), "destination does not answer"),
    (where([copy("hv1", outcome.PAUSED)]), "source paused, not running"),
    (where([copy("hv1", outcome.RUNNING), copy("hv2", outcome.PAUSED, migrating=True)]), "an incoming copy"),
    (where([], {"hv1": "x", "hv2": "y"}), "nobody answers"),
])
def test_an_uncertain_outcome_removes_nothing_and_names_recover(answers, after, why):
    answers["where"] = after
    err = fault(RuntimeError("connection lost"))
    assert not answers["undone"], why
    assert "nothing was removed: run `invoke vm.migrate web1 --recover`" in str(err)
    assert journal.read("web1")["phase"] == "unknown"


def test_after_post_copy_started_nothing_is_removed_even_if_it_looks_certain(answers):
    answers["where"] = where([copy("hv1", outcome.RUNNING)])
    err = fault(RuntimeError("lost"), job=migrate._Job(postcopy=True))
    assert not answers["undone"] and "--recover" in str(err)


def test_arrived_but_source_not_cleaned_says_where_it_runs(answers):
    answers["where"] = where([copy("hv2", outcome.RUNNING)])
    err = fault(RuntimeError("source cleanup failed"))
    assert not answers["undone"]
    assert str(err).startswith("web1 runs on hv2, but the migration failed") and "--recover" in str(err)


@pytest.mark.parametrize("copies, record, survivor", [
    ([copy("hv1", outcome.RUNNING), copy("hv2", outcome.SHUTOFF)], {}, "hv1"),
    ([copy("hv1", outcome.SHUTOFF), copy("hv2", outcome.RUNNING)], {}, "hv2"),
    ([copy("hv1", outcome.PAUSED), copy("hv2", outcome.SHUTOFF)], {}, "hv1"),
    ([copy("hv1", outcome.SHUTOFF)], {}, "hv1"),
    ([copy("hv1", outcome.SHUTOFF), copy("hv2", outcome.SHUTOFF)],
     {"phase": "cleaning the source", "target": "hv2"}, "hv2"),
])
def test_the_survivor_is_the_one_copy_that_runs(copies, record, survivor):
    assert recover._survivor("web1", where(copies), record) == survivor


@pytest.mark.parametrize("copies, message", [
    ([copy("hv1", outcome.RUNNING), copy("hv2", outcome.RUNNING)], "runs on hv1 and hv2"),
    ([copy("hv1", outcome.SHUTOFF), copy("hv2", outcome.SHUTOFF)], "cannot tell which copy"),
])
def test_an_ambiguous_outcome_is_refused(copies, message):
    with pytest.raises(CloudopsError, match=message):
        recover._survivor("web1", where(copies), {})


def test_configuration_applies_where_a_flag_is_not_given():
    config = {"bandwidth_mib": 4, "postcopy_after": 0, "downtime_max_ms": 1, "auto_converge": False}
    policy = migrate.policy_from(config, timeout=None, postcopy_after=None, auto_converge=None,
                                 downtime_max_ms=None, bandwidth_mib=None)
    assert (policy.bandwidth_mib, policy.postcopy_after, policy.downtime_max_ms, policy.auto_converge) == \
        (4, None, 1, False)
    assert migrate.policy_from(config, bandwidth_mib=8).bandwidth_mib == 8  # a given flag wins


class _Inventory:
    hosts = {"hv1": SRC, "hv2": DST}


class _Dom:
    def __init__(self, host):
        self.host, self.aborted = host, []

    def abortJobFlags(self, flags):
        self.aborted.append(flags)


def _watch(monkeypatch, answers):
    """A post-copy watch whose QEMU answers come from ``answers`` (host -> list of query-migrate replies)."""
    import contextlib

    doms = {h: _Dom(h) for h in answers}

    class _Conn:
        def __init__(self, host):
            self.host = host

        def lookupByName(self, name):
            return doms[self.host]

    @contextlib.contextmanager
    def open_host(host):
        yield _Conn(host.name)

    monkeypatch.setattr(recover.virt, "open_host", open_host)
    monkeypatch.setattr(recover, "_qemu_migration", lambda dom: answers[dom.host].pop(0))
    record = {"source": "hv1", "target": "hv2"}
    return recover._PostcopyWatch("web1", record, _Inventory(), lambda m: None), doms


BOTH = where([copy("hv1", "paused", postcopy=True), copy("hv2", "running", postcopy=True)])


def test_a_post_copy_qemu_finished_is_completed_only_once_the_target_has_it_all(monkeypatch):
    watch, _ = _watch(monkeypatch, {"hv1": [{"status": "completed"}, {"status": "completed"}],
                                    "hv2": [{"status": "postcopy-active"}, {"status": "completed"}]})
    assert watch.look(BOTH) == "running"  # the source sent all, the target is still taking it in
    assert watch.look(BOTH) == "completed"


def test_a_post_copy_that_moves_nothing_is_paused_to_be_resumed(monkeypatch):
    stuck = {"status": "postcopy-active", "ram": {"transferred": 5 << 20, "remaining": 3 << 20}}
    watch, doms = _watch(monkeypatch, {"hv1": [dict(stuck), dict(stuck), dict(stuck)], "hv2": []})
    assert watch.look(BOTH) == "running"
    assert watch.look(BOTH) == "running" and doms["hv1"].aborted == []  # not moving, but not for long yet
    watch._moved_at -= recover.STALL_AFTER + 1
    assert watch.look(BOTH) == "stalled"
    assert doms["hv1"].aborted == [recover.libvirt.VIR_DOMAIN_ABORT_JOB_POSTCOPY]
    assert watch.describe() == " (QEMU on hv1: postcopy-active, 3 MiB of RAM left)"


def test_a_post_copy_that_moves_is_left_alone(monkeypatch):
    replies = [{"status": "postcopy-active", "ram": {"transferred": n << 20, "remaining": 1}} for n in (1, 2)]
    watch, doms = _watch(monkeypatch, {"hv1": replies, "hv2": []})
    assert watch.look(BOTH) == "running"
    watch._moved_at -= recover.STALL_AFTER + 1
    assert watch.look(BOTH) == "running" and doms["hv1"].aborted == []
