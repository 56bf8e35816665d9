"""`make test-unit` selects only tests/unit; a lab test that cannot run in CI fails instead of skipping."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _top_conftest():
    spec = importlib.util.spec_from_file_location("cloudops_top_conftest", ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unit_selection_holds_no_lab_or_integration_test():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-m", "not lab and not integration", "tests"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    ids = [line for line in out.splitlines() if "::" in line]
    assert ids, out
    assert all(i.startswith("tests/unit/") for i in ids), [i for i in ids if not i.startswith("tests/unit/")][:5]
    integration = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                  "-m", "integration", "tests"], cwd=ROOT, capture_output=True, text=True,
                                 timeout=120).stdout
    assert any(line.startswith("tests/integration/") for line in integration.splitlines())


@pytest.mark.parametrize("variable", ["CI", "CLOUDOPS_CI"])
def test_not_root_fails_in_ci(monkeypatch, variable):
    conftest = _top_conftest()
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("CLOUDOPS_CI", raising=False)
    monkeypatch.setenv(variable, "1")
    monkeypatch.setattr(conftest.os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.fail.Exception, match="needs root"):
        conftest.require_root()


def test_not_root_skips_outside_ci(monkeypatch):
    conftest = _top_conftest()
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("CLOUDOPS_CI", raising=False)
    monkeypatch.setattr(conftest.os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception):
        conftest.require_root()


def test_no_two_test_modules_share_a_basename():
    """tests/ has no __init__.py per folder: pytest refuses a second module of the same name (it stops CI)."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
