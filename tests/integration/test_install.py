"""An installed cloudops: `pip install <checkout>` (not editable) into a fresh virtualenv outside the
repository gives a `cloudops` command that works from any directory, templates included."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    base = tmp_path_factory.mktemp("installed")
    source = base / "checkout"  # a copy: building in the checkout itself would leave build/ there
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "var", "build", "*.egg-info",
                                                                 "__pycache__", "lab.yaml"))
    venv = base / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True)
    proc = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(source)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return venv


def run(venv, *args, cwd):
    # no checkout on the path, and no state directory of the test session's (an xdist worker sets its own)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "CLOUDOPS_VAR", "CLOUDOPS_STATE_DIR")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, env=env, timeout=120)


def test_the_cloudops_command_works_from_any_directory(installed, tmp_path):
    proc = run(installed, "cloudops", "--list", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for task in ("vm.start", "vm.migrate", "image.add", "deploy", "lab.up"):
        assert task in proc.stdout
    assert run(installed, "cloudops", "--version", cwd=tmp_path).stdout.startswith("cloudops")
    bad = run(installed, "cloudops", "vm.info", "x;id", cwd=tmp_path)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1


def test_templates_and_recipes_come_from_the_installed_package(installed, tmp_path):
    code = ("import cloudops, sys; from cloudops import paths, sshcommand; from cloudops.imaging import build; "
            "print(cloudops.__file__); print(paths.TEMPLATES); print(sshcommand.render('/k/h').splitlines()[0])")
    proc = run(installed, str(installed / "bin" / "python"), "-c", code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    module, templates, first = proc.stdout.splitlines()
    assert str(installed / "lib") in module and str(ROOT) not in module
    assert templates.startswith(str(installed)) and first == "#!/bin/sh"
    assert os.path.isfile(os.path.join(templates, "libvirt", "domain.xml.j2"))
    assert sys.version_info >= (3, 11)


def test_an_installed_cloudops_keeps_its_state_in_the_state_directory(installed, tmp_path):
    """Not beside site-packages: $CLOUDOPS_STATE_DIR, else $XDG_STATE_HOME/cloudops (root: /var/lib/cloudops)."""
    code = "from cloudops import paths; print(paths.in_checkout()); print(paths.var_dir())"
    python = str(installed / "bin" / "python")
    env_dir = tmp_path / "state"
    out = run(installed, "env", f"CLOUDOPS_STATE_DIR={env_dir}", python, "-c", code, cwd=tmp_path).stdout.split()
    assert out == ["False", str(env_dir)]
    out = run(installed, python, "-c", code, cwd=tmp_path).stdout.split()
    assert out[0] == "False" and out[1] == ("/var/lib/cloudops" if os.geteuid() == 0 else out[1])
    assert not out[1].startswith(str(installed))
    proc = run(installed, "env", f"CLOUDOPS_STATE_DIR={env_dir}", "cloudops", "lab.status", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
