"""The installed `cloudops` command runs the cloud from `/`: a lab, an image, a VM, a deploy check.

A wheel of this checkout in a fresh virtualenv (the fixture of tests/integration/test_install.py),
no PYTHONPATH, run with `/` as the working directory and a state directory of its own; the lab
it makes is its own (prefix <test prefix>w, one host), taken down at the end.
"""

import json

import pytest

from tests.conftest import TEST_PREFIX
from tests.integration.test_install import installed, run  # noqa: F401  (the fixture)

PREFIX = TEST_PREFIX + "w"


@pytest.fixture(scope="module")
def cli(installed, tmp_path_factory):  # noqa: F811
    state = tmp_path_factory.mktemp("installed-state")

    def cloudops(*args, timeout=600):
        import os
        import subprocess

        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "CLOUDOPS_VAR")}
        env.update(PATH=f"{installed / 'bin'}:{env.get('PATH', '')}", CLOUDOPS_STATE_DIR=str(state))
        return subprocess.run(["cloudops", *args], cwd="/", capture_output=True, text=True, env=env, timeout=timeout)

    cloudops.state = state
    yield cloudops
    cloudops("lab.down", "--prefix", PREFIX)


def test_the_installed_command_runs_a_lab_a_vm_and_a_deploy_from_root(cli, tiny_image):
    from tests.conftest import require_root

    require_root()
    up = cli("lab.up", "--prefix", PREFIX, "--hosts", "1", "--json")
    assert up.returncode == 0, up.stderr
    inventory = json.loads(up.stdout)["inventory"]
    assert inventory.startswith(str(cli.state)), inventory  # the lab lives in the state directory
    added = cli("image.add", str(tiny_image.local_path), "--name", "tiny", "--json")
    assert added.returncode == 0, added.stderr
    started = cli("vm.start", "--name", "t-inst", "--memory", "96", "--inventory", inventory, "--json")
    assert started.returncode == 0, started.stderr
    vm = json.loads(started.stdout)
    assert vm["host"] == "hv1" and vm["ip"]
    ran = cli("vm.run", "t-inst", "cat /proc/sys/kernel/hostname", "--inventory", inventory)
    assert ran.returncode == 0 and ran.stdout.strip().splitlines()[-1] == "t-inst", ran.stderr
    check = cli("-H", "hv1", "deploy", "--check", "--inventory", inventory)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "hv1" in check.stdout
    deleted = cli("vm.delete", "t-inst", "--inventory", inventory)
    assert deleted.returncode == 0, deleted.stderr
    assert (cli.state / "cloud.sqlite").is_file()  # the embedded store, in the state directory
