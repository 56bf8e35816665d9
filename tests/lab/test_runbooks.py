"""Every runbook in docs/runbooks runs as written on the lab: its ```sh blocks, in order, as one bash script."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cloudops import fleet
from tests.conftest import ROOT, own_inventory, own_lab

RUNBOOKS = ROOT / "docs" / "runbooks"
BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)

# runbooks deploy, rotate keys and replace hosts: their own lab, not the session's
lab = own_lab("r")
lab_inventory = own_inventory()


def commands(runbook: Path) -> str:
    return "\n".join(BLOCK.findall(runbook.read_text()))


def test_every_runbook_has_commands():
    books = sorted(p for p in RUNBOOKS.glob("*.md") if p.name != "README.md")
    assert {p.stem for p in books} >= {"add-a-hypervisor", "replace-a-failed-host", "rotate-the-migration-key",
                                       "roll-out-an-image"}
    for book in books:
        assert "invoke " in commands(book), book


@pytest.fixture(scope="module")
def env(lab, tmp_path_factory):
    """The runbooks' variables for the lab."""
    var = tmp_path_factory.mktemp("runbook-var")
    bin_dir = tmp_path_factory.mktemp("bin")
    venv_bin = Path(sys.executable).parent
    image = tmp_path_factory.mktemp("image") / "runbook.img"
    subprocess.run(["truncate", "-s", "8M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    return {**os.environ, "PATH": f"{bin_dir}:{venv_bin}:{os.environ['PATH']}", "CLOUDOPS_VAR": str(var),
            "CLOUDOPS_INVENTORY": str(lab.inventory_path), "HOST": "hv3",
            "PEER_ADDRESS": next(h.address for h in lab.hosts if h.name == "hv1"),
            "IMAGE_FILE": str(image), "IMAGE_NAME": "runbook"}


def run_book(name: str, env: dict) -> subprocess.CompletedProcess:
    script = "set -euo pipefail\n" + commands(RUNBOOKS / f"{name}.md")
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def sh(host, command) -> str:
    result = fleet.run_command([host], command, timeout=60)
    assert result.exit_code == 0, result.to_dict()
    return result[host.name].value.stdout


def make_fresh(host) -> None:
    """hv3 as a new machine: no network, no pool, none of the cloud's keys, a stock banner."""
    sh(host, "virsh -q -c qemu:///system net-destroy cloudops; virsh -q -c qemu:///system net-undefine cloudops; "
             "virsh -q -c qemu:///system pool-destroy cloudops; virsh -q -c qemu:///system pool-undefine cloudops; "
             "rm -f ~/.ssh/cloudops_migration ~/.ssh/cloudops_migration.pub ~/.ssh/known_hosts; "
             "echo Debian > /etc/motd; true")


@pytest.mark.parametrize("name", ["add-a-hypervisor", "replace-a-failed-host", "rotate-the-migration-key",
                                  "roll-out-an-image"])
def test_runbook_runs_as_written(name, env, lab_inventory):
    if name in ("add-a-hypervisor", "replace-a-failed-host"):
        make_fresh(lab_inventory.hosts["hv3"])
    proc = run_book(name, env)
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if name == "add-a-hypervisor":
        assert "hv3: out of maintenance" in proc.stdout
    if name == "rotate-the-migration-key":
        keys = sorted(p.name for p in (Path(env["CLOUDOPS_VAR"]) / "cloud").glob("migration_key*"))
        assert len(keys) == 4, keys  # the new pair and the old one kept aside
        public = (Path(env["CLOUDOPS_VAR"]) / "cloud" / "migration_key.pub").read_text().split()[1]
        authorized = sh(lab_inventory.hosts["hv2"], "cat ~/.ssh/authorized_keys")
        assert public in authorized and authorized.count("cloudops-migration@") == 1
