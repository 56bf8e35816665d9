"""Where cloudops keeps this control machine's state: the order of the choices."""

from cloudops import paths


def test_state_dir_env_wins_over_the_older_name(monkeypatch, tmp_path):
    monkeypatch.setenv("CLOUDOPS_VAR", str(tmp_path / "old"))
    monkeypatch.setenv("CLOUDOPS_STATE_DIR", str(tmp_path / "new"))
    assert paths.var_dir() == tmp_path / "new"


def test_a_checkout_keeps_its_var(monkeypatch):
    monkeypatch.delenv("CLOUDOPS_VAR", raising=False)
    monkeypatch.delenv("CLOUDOPS_STATE_DIR", raising=False)
    assert paths.in_checkout() and paths.var_dir() == (paths.ROOT / "var").resolve()


def test_installed_root_uses_var_lib_and_others_xdg(monkeypatch, tmp_path):
    monkeypatch.setattr(paths, "ROOT", tmp_path)  # no pyproject.toml there: an installed cloudops
    monkeypatch.setattr(paths.os, "geteuid", lambda: 0)
    assert paths.default_state_dir() == paths.Path("/var/lib/cloudops")
    monkeypatch.setattr(paths.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert paths.default_state_dir() == tmp_path / "xdg" / "cloudops"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.default_state_dir() == tmp_path / "home" / ".local" / "state" / "cloudops"
