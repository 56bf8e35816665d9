"""Concurrent starts on one host: a busy pool is waited out, a failed undo step is named, a libvirt error is one line."""

import libvirt
import pytest

from cloudops import storage


class Pool:
    def __init__(self, failures):
        self.failures = list(failures)
        self.calls = 0

    def refresh(self, flags):
        self.calls += 1
        if self.failures:
            raise libvirt.libvirtError(self.failures.pop(0))


def test_a_busy_pool_is_refreshed_once_the_other_build_ends(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    pool = Pool(["internal error: pool 'cloudops' has asynchronous jobs running."] * 3)
    storage.refresh_pool(pool)
    assert pool.calls == 4


def test_another_error_is_raised_without_retrying():
    pool = Pool(["cannot open directory '/x': Permission denied"])
    with pytest.raises(libvirt.libvirtError, match="Permission denied"):
        storage.refresh_pool(pool)
    assert pool.calls == 1


def test_a_pool_busy_past_the_deadline_is_an_error(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    pool = Pool(["internal error: pool 'cloudops' has asynchronous jobs running."] * 1000)
    with pytest.raises(libvirt.libvirtError, match="asynchronous jobs"):
        storage.refresh_pool(pool, wait=0)
    assert pool.calls <= 2  # gave up instead of waiting out all 1000


def test_deleting_a_volume_from_a_broken_pool_is_an_error_not_nothing_to_delete():
    class Broken(Pool):
        def storageVolLookupByName(self, name):
            raise AssertionError("looked up after a failed refresh")

    with pytest.raises(libvirt.libvirtError):
        storage.delete_volume(Broken(["storage pool 'cloudops' is not active"]), "x.qcow2")


def test_a_failed_undo_step_is_named_and_the_others_still_run():
    from cloudops.compute.vms import _Undo

    ran = []

    def delete_volume(pool, name):
        raise libvirt.libvirtError("internal error: pool 'cloudops' has asynchronous jobs running.")

    def release(net, name):
        ran.append(name)

    undo = _Undo()
    undo.push(release, object(), "web1")
    undo.push(delete_volume, object(), "web1.qcow2")
    assert undo.run() == ["delete_volume web1.qcow2: internal error: pool 'cloudops' has asynchronous jobs running."]
    assert ran == ["web1"]


def test_a_libvirt_error_reaching_a_task_is_one_line_and_exit_1(monkeypatch):
    from invoke import Exit

    from cloudops.tasks._cli import user_errors

    monkeypatch.delenv("CLOUDOPS_TRACEBACK", raising=False)

    @user_errors
    def task():
        raise libvirt.libvirtError("Domain not found: no domain with matching name 'x'")

    with pytest.raises(Exit) as caught:
        task()
    assert caught.value.code == 1
    assert caught.value.message.startswith("cloudops: libvirt: Domain not found")
    assert "\n" not in caught.value.message


def test_sigterm_does_what_ctrl_c_does(monkeypatch):
    import signal

    from cloudops.tasks import _cli

    monkeypatch.setattr(signal, "getsignal", lambda s: signal.default_int_handler)
    with pytest.raises(KeyboardInterrupt):
        _cli.terminate_as_interrupt(signal.SIGTERM, None)
    pressed = []
    monkeypatch.setattr(signal, "getsignal", lambda s: lambda signum, frame: pressed.append(signum))
    _cli.terminate_as_interrupt(signal.SIGTERM, None)  # a migration job counts it instead
    assert pressed == [signal.SIGINT]



def test_a_pool_another_start_defined_but_did_not_build_yet_is_built_and_started(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)

    class Defined:
        """Defined by another vm.start that has not made its directory yet."""

        def __init__(self):
            self.built = self.active = False
            self.calls = []

        def isActive(self):
            return self.active

        def create(self, flags):
            self.calls.append("create")
            if not self.built:
                raise libvirt.libvirtError("cannot open directory '/var/lib/cloudops/disks': No such file or directory")
            self.active = True

        def build(self, flags):
            self.calls.append("build")
            self.built = True

    pool = Defined()
    storage._start_pool(pool)
    assert pool.active and pool.calls == ["create", "build", "create"]


def test_a_pool_that_never_starts_is_an_error_after_the_wait(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)

    class Broken:
        def isActive(self):
            return False

        def create(self, flags):
            raise libvirt.libvirtError("cannot open directory '/x': Permission denied")

        def build(self, flags):
            raise libvirt.libvirtError("cannot create directory '/x': Permission denied")

    with pytest.raises(libvirt.libvirtError, match="Permission denied"):
        storage._start_pool(Broken(), wait=0)
