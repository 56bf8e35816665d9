"""Unit tests need no lab, no QEMU and no libguestfs: any attempt to reach one fails the test."""

import os
import subprocess

import pytest

FORBIDDEN_PROGRAMS = ("qemu-system-", "guestfish", "virt-customize", "libguestfs-test-tool", "virsh", "ip")


class Forbidden(AssertionError):
    pass


def _refuse(what):
    def refuse(*_args, **_kwargs):
        raise Forbidden(f"a unit test tried to use {what}: that belongs in tests/integration or tests/lab")

    return refuse


def _only_test_driver(real, name):
    """libvirt's in-process test driver (test:///default) is fine; a real libvirtd is not."""

    def open_(uri=None, *args, **kwargs):
        if isinstance(uri, str) and uri.startswith("test://"):
            return real(uri, *args, **kwargs)
        raise Forbidden(f"a unit test tried to open libvirt {uri!r} ({name}): that belongs in tests/lab")

    return open_


@pytest.fixture(autouse=True)
def _own_state_store(tmp_path_factory):
    """Each unit test gets an empty state store of its own (never the checkout's var/cloud.sqlite)."""
    from cloudops import state
    from cloudops.state.sqlite import SqliteStore

    store = SqliteStore(tmp_path_factory.mktemp("state") / "state.sqlite")
    state.use(store)
    yield store
    state.use(None)
    store.close()


@pytest.fixture(autouse=True)
def _no_qemu_libguestfs_or_lab(monkeypatch):
    try:
        import guestfs
    except ImportError:
        pass
    else:
        monkeypatch.setattr(guestfs, "GuestFS", _refuse("libguestfs (guestfs.GuestFS)"))
    try:
        import libvirt
    except ImportError:
        pass
    else:
        for name in ("open", "openAuth", "openReadOnly"):
            monkeypatch.setattr(libvirt, name, _only_test_driver(getattr(libvirt, name), name))
        from cloudops import virt

        # the hosts of unit tests run no containers (their libvirt is the test driver, faked per test):
        # a test of containers' logic sets its own
        monkeypatch.setattr(virt, "container_connection", lambda host: None)
    real_init = subprocess.Popen.__init__

    def guarded_init(self, args, *a, **kw):
        argv = [args] if isinstance(args, (str, bytes)) else list(args)
        program = os.path.basename(str(argv[0]).split()[0]) if argv else ""
        if any(program.startswith(p) if p.endswith("-") else program == p for p in FORBIDDEN_PROGRAMS):
            raise Forbidden(f"a unit test tried to run {program}: that belongs in tests/integration or tests/lab")
        real_init(self, args, *a, **kw)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_init)
