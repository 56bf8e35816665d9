"""The host's own cloudops (cloudops.hosts.toolkit): repacked wheels, the stamp, install only on a difference."""

import zipfile
from types import SimpleNamespace

from cloudops.hosts import toolkit


def test_repacked_wheel_is_deterministic_and_complete(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = toolkit.repack("invoke", tmp_path / "a"), toolkit.repack("invoke", tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()  # same files, same bytes: no timestamps inside
    names = zipfile.ZipFile(first).namelist()
    assert "invoke/__init__.py" in names and any(n.endswith(".dist-info/RECORD") for n in names)
    assert not any("__pycache__" in n or n.startswith("..") or n.endswith("/INSTALLER") for n in names)


def test_release_names_version_and_digest_and_changes_with_nothing_built():
    one, two = toolkit.release(), toolkit.release()
    assert one == two and one.stamp == f"cloudops {one.version} {one.digest}" and len(one.digest) == 12


class Host:
    """Fabric's run on a host whose venv holds ``stamp``; records the commands."""

    def __init__(self, stamp=None):
        self.stamp, self.commands = stamp, []

    def run(self, command, **_kwargs):
        self.commands.append(command)
        return SimpleNamespace(stdout=(self.stamp or "") + "\n", exited=0)


def test_an_up_to_date_host_is_left_alone_and_check_changes_nothing(monkeypatch):
    wanted = toolkit.Release("0.1.0", "abcdef012345")
    monkeypatch.setattr(toolkit, "bundle", lambda _r: (_ for _ in ()).throw(AssertionError("nothing to build")))
    host = Host(wanted.stamp)
    assert toolkit.ensure_toolkit(host, wanted) == (False, "cloudops 0.1.0 (abcdef012345) in /opt/cloudops/venv "
                                                           "already up to date")
    old = Host("cloudops 0.1.0 000000000000")
    assert toolkit.ensure_toolkit(old, wanted, check=True) == (
        True, "cloudops 0.1.0 (abcdef012345) would be updated in /opt/cloudops/venv")
    assert toolkit.ensure_toolkit(Host(), wanted, check=True)[1].endswith("would be installed in /opt/cloudops/venv")
    assert len(old.commands) == 1  # only the stamp was read
