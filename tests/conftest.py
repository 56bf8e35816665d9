"""Shared fixtures: the test lab (prefix "cot", its own subnet) is brought up once per session."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Parallel test runs (several developers on one machine) each set their own prefix.
# Under `pytest -n N` (pytest-xdist, as `make test` runs) every worker is a session of its own: its lab
# prefix is the run's prefix plus the worker's number (cot0, cot1) and it has a state directory of its own
# (name locks, maintenance flags, the image store: nothing two workers could take from each other), all
# sharing one image build cache (builds lock it).
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
TEST_PREFIX = os.environ.get("CLOUDOPS_TEST_LAB", "cot") + WORKER.removeprefix("gw")
if WORKER and not os.environ.get("CLOUDOPS_VAR", "").endswith(f"/test-{WORKER}"):  # once per process
    _shared = Path(os.environ.get("CLOUDOPS_STATE_DIR") or os.environ.get("CLOUDOPS_VAR") or ROOT / "var")
    _own = _shared / f"test-{WORKER}"
    (_own / "images").mkdir(parents=True, exist_ok=True)
    (_shared / "images" / "build").mkdir(parents=True, exist_ok=True)
    if not (_own / "images" / "build").is_symlink():
        (_own / "images" / "build").symlink_to(_shared / "images" / "build")
    # the older name, which a test's own monkeypatch.setenv (of either name) still overrides
    os.environ.pop("CLOUDOPS_STATE_DIR", None)
    os.environ["CLOUDOPS_VAR"] = str(_own)

# Under xdist whole modules go to one worker each (--dist loadfile), in collection order (--no-loadscope-reorder:
# xdist would otherwise put the modules of most tests first): the longest
# lab modules first, so the run does not end waiting for one of them (each module's test time in the
# two-worker trial of 2026-12-04, 1011 s for migration faults down to 145 s for power).
LONGEST_FIRST = ["lab/test_migration_faults.py", "lab/test_migration.py", "lab/test_debian_guest.py",
                 "lab/test_export_import.py", "lab/test_snapshots.py", "lab/test_failover.py",
                 "lab/test_metrics_lab.py", "lab/test_containers.py", "lab/test_vms.py", "lab/test_team.py",
                 "integration/test_image.py", "lab/test_disks_resize.py", "lab/test_hygiene.py",
                 "lab/test_user_data.py", "lab/test_deploy.py", "lab/test_net_probe.py", "lab/test_power.py"]

# The `invoke` CLI the tests start puts only tasks/ on sys.path, so `import cloudops` would find whatever
# checkout the virtualenv was installed from (editable): make every child process use this checkout's library.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")


def _rank(item) -> int:
    path = str(item.fspath).replace(os.sep, "/")
    return next((i for i, name in enumerate(LONGEST_FIRST) if path.endswith("tests/" + name)), len(LONGEST_FIRST))


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(item.fspath).replace(os.sep, "/")
        if "tests/lab/" in path:
            item.add_marker(pytest.mark.lab)
        elif "tests/integration/" in path:
            item.add_marker(pytest.mark.integration)
    if WORKER or getattr(config.option, "numprocesses", None):
        items.sort(key=_rank)  # stable: each module's own order is kept


def in_ci() -> bool:
    """CI (CI=1 or CLOUDOPS_CI=1): a test that cannot run there fails instead of skipping."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("CI", "CLOUDOPS_CI"))


def require_root() -> None:
    """Skip a lab test when not root; in CI fail loudly instead (a skipped lab suite proves nothing)."""
    if os.geteuid() != 0:
        if in_ci():
            pytest.fail("the lab needs root, and CI (CI/CLOUDOPS_CI) is set: lab tests must run there", pytrace=False)
        pytest.skip("the lab needs root")


@pytest.fixture
def no_maintenance():
    """Every maintenance flag of the state store cleared before and after the test."""
    from cloudops.hosts import maintenance

    def clear():
        for host in maintenance.hosts_in_maintenance():
            maintenance.set_maintenance(host, False)

    clear()
    yield
    clear()


@pytest.fixture(scope="session")
def lab():
    """A 3-host lab of full hypervisor hosts (sshd + libvirtd), taken down at the end of the session."""
    from cloudops.lab import hosts as lab_lib

    require_root()
    the_lab = lab_lib.up(3, prefix=TEST_PREFIX)
    yield the_lab
    lab_lib.down(TEST_PREFIX)


def own_lab(suffix: str, hosts: int = 3):
    """A module's own lab (prefix TEST_PREFIX + suffix), for tests that restart daemons or redeploy hosts,
    so they never disturb the session's lab. Use as ``lab = own_lab("p")`` plus ``lab_inventory = own_inventory()``."""

    @pytest.fixture(scope="module")
    def fixture():
        from cloudops.lab import hosts as lab_lib

        require_root()
        the_lab = lab_lib.up(hosts, prefix=TEST_PREFIX + suffix)
        yield the_lab
        lab_lib.down(the_lab.prefix)

    return fixture


def own_inventory():
    @pytest.fixture(scope="module")
    def fixture(lab):
        from cloudops import inventory

        return inventory.load(lab.inventory_path)

    return fixture


def deploy_var(lab, var: Path) -> Path:
    """A CLOUDOPS_VAR for a `deploy` on a lab that other tests go on using: the lab's own migration and image
    keys stand as the cloud's, so the deployed host keeps the keys its peers authorize (a fresh state directory
    would make new ones and leave that host unable to migrate to the others, or copy images to them)."""
    import shutil

    cloud = var / "cloud"
    cloud.mkdir(parents=True, exist_ok=True)
    for name in ("migration_key", "migration_key.pub", "image_key", "image_key.pub"):
        shutil.copy2(Path(lab.dir) / name, cloud / name)
    return var


@pytest.fixture(scope="session")
def lab_inventory(lab):
    from cloudops import inventory

    return inventory.load(lab.inventory_path)


@pytest.fixture(scope="session")
def tiny_image():
    """The tiny image, built once per session (cached by recipe hash) and in the store as "tiny"."""
    from cloudops.imaging import build as imagebuild
    from cloudops.imaging import store as images

    image, _changed = images.add_image(imagebuild.build_image("tiny"), name="tiny", replace=True)
    return image


@pytest.fixture(scope="session")
def user_key(tmp_path_factory):
    """An SSH key pair of "the user" (not the cloud's own key)."""
    key = tmp_path_factory.mktemp("keys") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def invoke(*args, check=False, env=None, timeout=600):
    """Run the real `invoke` CLI from the repository root (this checkout's cloudops: PYTHONPATH above)."""
    cmd = [str(Path(sys.executable).parent / "invoke"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=check,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def cli(lab, *args, timeout=600):
    """The real CLI against a lab's inventory."""
    return invoke(*args, "--inventory", str(lab.inventory_path), timeout=timeout)


def ok_json(proc) -> dict:
    """The JSON a CLI run printed, once it is sure the run succeeded."""
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def one_line_error(proc, text):
    """The run failed with exactly one line (progress lines aside) that says ``text``, and no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("… ")]
    assert len(lines) == 1 and text in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def run_in_vm(lab_inventory, name, command) -> str:
    """``command``'s output in VM ``name``, wherever it runs, over SSH through its host (host key verified)."""
    from cloudops.compute import guest, vms
    from cloudops.ssh import connect

    host = vms.locate(name, lab_inventory.hypervisors())
    vm = next(v for v in vms.list_on_host(host) if v.name == name)
    with connect(host) as hv, guest.connect_vm(hv, vm.ip) as conn:
        return conn.run(command, hide=True, in_stream=False).stdout.strip()


def refuse_control_tcp(lab, host_name, refuse: bool) -> None:
    """Lab host ``host_name`` answers every TCP packet from this machine with a reset (the host "stops
    answering" at once, open connections break), or (``refuse`` False) lets them in again."""
    from cloudops.lab import hosts as lab_lib

    state = lab_lib.load(lab.prefix)
    subprocess.run(["ip", "netns", "exec", state.host(host_name).namespace, "iptables", "-I" if refuse else "-D",
                    "INPUT", "-s", state.gateway, "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"],
                   check=refuse, capture_output=True)
