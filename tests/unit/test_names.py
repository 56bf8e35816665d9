"""VM names reach virsh and shells on the hosts: every task refuses a bad one in one line, before any host is asked."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cloudops.compute import vms
from cloudops.errors import CloudopsError

ROOT = Path(__file__).resolve().parents[2]
BAD = ["x;id", "a b", "$(id)", "../etc", "A", "`id`", "x\nid", "-rf", ""]


@pytest.mark.parametrize("name", BAD)
def test_validate_name_refuses_shell_metacharacters(name):
    with pytest.raises(CloudopsError, match="invalid VM name"):
        vms.validate_name(name)


def test_find_refuses_before_asking_any_host():
    class Untouchable:
        name = "hv1"

        def __getattr__(self, attr):
            raise AssertionError("a host was used for a bad name")

    with pytest.raises(CloudopsError, match="invalid VM name"):
        vms.find("x;id", [Untouchable()])
    with pytest.raises(CloudopsError, match="invalid VM name"):
        vms.locate("$(id)", [Untouchable()])


TASKS = [["vm.console"], ["vm.console", "--log"], ["vm.info"], ["vm.delete"], ["vm.stop"], ["vm.ssh"],
         ["vm.run", "--command=id"], ["vm.migrate", "--to=hv2"], ["vm.start"]]


@pytest.mark.parametrize("task", TASKS, ids=lambda t: " ".join(t))
def test_cli_refuses_bad_name_in_one_line(task, tmp_path):
    marker = tmp_path / "pwned"
    name = f"x;touch {marker}"
    env = {**os.environ, "CLOUDOPS_INVENTORY": str(tmp_path / "no-such-inventory.yaml")}
    proc = subprocess.run([str(Path(sys.executable).parent / "invoke"), task[0], f"--name={name}", *task[1:]],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid VM name" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
