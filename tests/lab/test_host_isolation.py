"""A lab host is not the control machine: it cannot see the checkout, and its metrics cron job still delivers.

The oracles are outside cloudops: OpenSSH with the lab's ssh_config to look from inside a host,
whisper-fetch on the whisper files of a carbon-cache that runs in the host's own network
namespace (its loopback: the cron entry ships to 127.0.0.1 as it would to a Graphite next door).
"""

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cloudops import paths
from cloudops.hosts import toolkit
from cloudops.lab import hosts as lab_lib
from cloudops.metrics import cron as metrics_cron
from cloudops.metrics import graphite
from tests.conftest import ROOT, TEST_PREFIX, deploy_var, invoke

PREFIX = f"test.{TEST_PREFIX}.iso"
HOST = "hv3"  # the session lab's host that test_hygiene also deploys metrics on


def ssh(lab, name, command, check=True):
    """``command`` on lab host ``name`` through the openssh client and the lab's own ssh_config."""
    proc = subprocess.run(["ssh", "-n", "-F", str(lab.ssh_config_path), lab.host(name).address, command],
                          capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, f"{command}: rc={proc.returncode} {proc.stdout}{proc.stderr}"
    return proc


def test_a_lab_host_cannot_see_the_checkout_its_venv_or_the_state_directory(lab):
    hidden = [ROOT / "pyproject.toml", ROOT / "cloudops" / "__init__.py", Path(sys.executable),
              paths.var_dir() / "lab" / TEST_PREFIX / "inventory.yaml", Path(lab.dir) / "id_ed25519"]
    for path in hidden:
        assert Path(path).exists(), path  # here, on the control machine
        assert ssh(lab, "hv1", f"test -e {shlex.quote(str(path))}", check=False).returncode == 1, f"hv1 sees {path}"
    # what a host legitimately has: its own pool, its libvirtd, the lab's shared storage at a neutral path
    out = ssh(lab, "hv1", f"test -d {lab_lib.POOL_PATH} && test -d {lab_lib.SHARED_PATH} && "
                          "virsh -c qemu:///system uri").stdout
    assert out.strip() == "qemu:///system"


@pytest.fixture
def carbon_in_host(lab, tmp_path):
    """carbon-cache on the host's loopback (its network namespace; its files on this machine)."""
    directory, ports = tmp_path / "graphite", graphite.Ports()
    config = graphite.write_config(directory, ports)
    graphite.whisper_dir(directory).mkdir(parents=True)
    log = graphite.log_file(directory)
    log.parent.mkdir(parents=True)
    with open(log, "ab") as out:
        carbon = subprocess.Popen(
            ["ip", "netns", "exec", lab.host(HOST).namespace, sys.executable,
             str(Path(sys.executable).parent / "carbon-cache.py"), f"--config={config}", "--nodaemon", "start"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=directory, start_new_session=True,
            env={**os.environ, "GRAPHITE_ROOT": str(directory)})
    try:
        listening = f"exec 3<>/dev/tcp/127.0.0.1/{ports.pickle}"
        end = time.monotonic() + 60
        while ssh(lab, HOST, f"bash -c {shlex.quote(listening)} 2>/dev/null", check=False).returncode != 0:
            assert carbon.poll() is None and time.monotonic() < end, log.read_text()[-2000:]
            time.sleep(0.5)
        yield f"127.0.0.1:{ports.pickle}", graphite.whisper_dir(directory)
    finally:
        carbon.terminate()
        try:
            carbon.wait(10)
        except subprocess.TimeoutExpired:
            carbon.kill()
            carbon.wait()


def whisper_values(storage: Path, series: str, first: int, last: int) -> list[float]:
    """The non-empty values of ``series`` between ``first`` and ``last``, read by whisper-fetch."""
    path = storage.joinpath(*series.split(".")).with_suffix(".wsp")
    if not path.exists():
        return []
    proc = subprocess.run([str(Path(sys.executable).parent / "whisper-fetch.py"), "--json", f"--from={first}",
                           f"--until={last}", str(path)], capture_output=True, text=True, check=True)
    return [v for v in json.loads(proc.stdout)["values"] if v is not None]


def test_deployed_metrics_cron_entry_runs_and_delivers_on_a_host_that_cannot_see_the_checkout(
        lab, lab_inventory, carbon_in_host, tmp_path):
    address, storage = carbon_in_host
    data = yaml.safe_load(lab.inventory_path.read_text())
    data["vars"]["metrics"] = {"carbon": address, "prefix": PREFIX}
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(yaml.safe_dump(data))
    env = {"CLOUDOPS_VAR": str(deploy_var(lab, tmp_path / "var"))}
    try:
        proc = invoke("deploy", "--json", "--hosts", HOST, "--inventory", str(inventory), env=env)
        assert proc.returncode == 0, proc.stderr
        steps = {s["name"]: s for s in json.loads(proc.stdout)["hosts"][0]["value"]}
        assert steps["metrics-cron"]["changed"], steps
        stamp = ssh(lab, HOST, f"cat {toolkit.STAMP_FILE}").stdout.strip()
        assert stamp == toolkit.release().stamp
        again = invoke("deploy", "--json", "--hosts", HOST, "--inventory", str(inventory), env=env)
        steps = {s["name"]: s for s in json.loads(again.stdout)["hosts"][0]["value"]}
        assert not steps["cloudops-venv"]["changed"] and "already up to date" in steps["cloudops-venv"]["message"]
        assert not steps["metrics-cron"]["changed"]

        # what cron runs, with cron's environment (the variables of the cron file, nothing else)
        text = ssh(lab, HOST, f"cat {metrics_cron.CRON_PATH}").stdout
        variables = dict(ln.split("=", 1) for ln in text.splitlines() if ln and not ln.startswith("#")
                         and "=" in ln.split()[0])
        command = next(ln for ln in text.splitlines() if ln.startswith("* ")).split(None, 6)[6]
        assert toolkit.COMMAND in command and str(ROOT) not in command
        var = variables["CLOUDOPS_VAR"]
        ssh(lab, HOST, f"rm -rf {shlex.quote(var)}/metrics")
        started = int(time.time())
        ran = ssh(lab, HOST, "env -i " + " ".join(f"{k}={shlex.quote(v)}" for k, v in variables.items())
                  + f" sh -c {shlex.quote(command)}", check=False)
        log = ssh(lab, HOST, f"cat {shlex.quote(var)}/metrics/ship.log", check=False).stdout
        assert ran.returncode == 0, ran.stdout + ran.stderr + log
        summary = json.loads(next(ln for ln in log.splitlines() if ln.startswith("{")))
        assert list(summary["hosts"]) == [HOST] and summary["hosts"][HOST]["ok"], summary
        assert summary["sent"] > 0 and summary["spooled"] == 0, summary

        series = f"{PREFIX}.hv.{HOST}.vms.defined"
        end = time.monotonic() + 90  # carbon writes its cache to whisper on its own schedule
        while not whisper_values(storage, series, started - 5, int(time.time()) + 5) and time.monotonic() < end:
            time.sleep(1.0)
        assert whisper_values(storage, series, started - 5, int(time.time()) + 5), f"{series} never reached whisper"
    finally:
        ssh(lab, HOST, f"rm -f {metrics_cron.CRON_PATH}", check=False)
