"""The root task namespace: one collection per noun (`invoke lab.up`, `invoke host.facts`, ...)."""

import faulthandler
import signal

from invoke import Collection, task

from cloudops import passwords as _passwords
from cloudops.tasks import cloud, fleet, graphite, host, image, lab, metrics, net, state, vm
from cloudops.tasks import deploy as deploy_module  # the module; `deploy` is its root-level task
from cloudops.tasks._cli import user_errors

# `kill -USR1 <pid>` prints where every thread of a cloudops command is, for one that seems stuck.
faulthandler.register(signal.SIGUSR1, all_threads=True)

# A root password in the environment is taken out of it at once: no child process of cloudops inherits it.
_passwords.take_from_environment()

ns = Collection()
for module in (lab, fleet, host, image, net, vm, cloud, graphite, metrics, state):
    ns.add_collection(Collection.from_module(module))
ns.add_task(deploy_module.deploy)

# Defaults live here; override them in invoke.yaml / fabric.yaml, ~/.invoke.yaml or INVOKE_* variables.
ns.configure({
    "inventory": None,
    "state_dir": None,  # this control machine's files (cloudops/paths.py); None: the default
    # The cloud's shared state (cloudops/state): sqlite in the state directory, or etcd for a team:
    # {backend: etcd, endpoints: [https://10.0.0.1:2379, ...], ca: ..., cert: ..., key: ...}
    "state": {"backend": "sqlite"},
    "lab": {"prefix": "co"},
    "fleet": {"workers": 16, "timeout": 60},
    "vm": {"image": "tiny", "memory": 128, "vcpus": 1, "customize": "seed", "timeout": 180, "flavors": {},
           "firmware": "bios"},
    "image": {"recipe": "tiny", "download_timeout": 30},  # image.add URL: seconds to connect, or between data
    "deploy": {"timeout": 600},
    "migrate": {},  # Policy overrides: downtime_max_ms, postcopy_after, timeout, ... (cloudops/migrate.py)
    "graphite": {"directory": None, "line_port": 2003, "pickle_port": 2004, "query_port": 7002, "web_port": 8080},
    "metrics": {"carbon": "127.0.0.1:2004", "prefix": "cloudops", "protocol": "pickle", "interval": 60,
                "cron_minutes": 1, "spool_max_bytes": 64 << 20},
})


@task(help={"hosts": "lab hosts for the demo"})
@user_errors
def demo(c, hosts=2):
    """The main job on the local lab: hosts, their facts, an image, a VM with a password and a key, a command in it."""
    import secrets
    import subprocess

    from cloudops import paths
    from cloudops.compute import vms
    from cloudops.errors import NotFound
    from cloudops.lab import hosts as lab_lib

    def step(title, command):
        print(f"\n== {title}\n$ {command}", flush=True)
        c.run(command, pty=False)

    if not lab_lib.status(c.lab.prefix)["up"]:
        step("a lab of hypervisor hosts", f"invoke lab.up --hosts {int(hosts)}")
    step("facts of every host", "invoke host.facts")
    step("the tiny image (built once, cached by recipe hash)", "invoke image.build --add")
    demo_dir = paths.var_dir() / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    key, password_file = demo_dir / "id_ed25519", demo_dir / "root-password"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    if not password_file.exists():
        _passwords.write_private(password_file, secrets.token_urlsafe(12) + "\n")
    try:
        host = vms.locate("demo1", [h for h in _lab_hosts(c)])
        print(f"\n== demo1 already runs on {host.name}")
    except NotFound:
        step("a VM with a root password (from a 0600 file) and an SSH key",
             f"invoke vm.start --name demo1 --password-file {password_file} --ssh-key {key}.pub")
    step("a command in the VM, through its hypervisor", "invoke vm.run demo1 'uname -a'")
    hosts_ = _lab_hosts(c)
    here = vms.locate("demo1", hosts_).name
    there = next(h.name for h in hosts_ if h.name != here)
    step(f"live migration {here} -> {there} (progress on stderr; a background loop shows the VM keeps running)",
         f"invoke vm.run demo1 'sleep 600 > /dev/null 2>&1 &' && invoke vm.migrate demo1 --to {there}")
    step("same address, SSH answers, the process started before still runs, uptime kept growing",
         "invoke vm.list && invoke vm.run demo1 'pidof sleep && cat /proc/uptime'")
    step("a local Graphite (carbon-cache, and graphite-web on http://127.0.0.1:8080)", "invoke graphite.up")
    step("two shipping cycles (rates need a previous sample)",
         "invoke metrics.ship --once --json && sleep 3 && invoke metrics.ship --once --json")
    _print_cpu_series(c, "demo1")
    step("the cloud report: hosts, VMs, the migration and graphs on one HTML page", "invoke cloud.report")
    print(f"\nThe lab stays up for you: `invoke vm.list`, `invoke vm.ssh demo1`, `ssh hv1`; "
          f"root's password is in {password_file}. `invoke vm.delete demo1` and `invoke lab.down` end it.")


def _print_cpu_series(c, vm):
    import time

    from cloudops.metrics import graphite

    path = f"{c.metrics.prefix}.vm.{vm}.cpu.util_percent"
    storage = graphite.whisper_dir(c.graphite.directory or graphite.default_dir())
    shipped_after = time.time() - 90
    deadline = time.monotonic() + 30  # carbon writes its cache to whisper asynchronously
    while True:
        points = graphite.read_series(storage, path, time.time() - 3600, time.time() + 60)
        if any(ts >= shipped_after for ts, _ in points) or time.monotonic() > deadline:
            break
        time.sleep(1)
    print(f"\n== {path} from whisper")
    for ts, value in points:
        print(f"{time.strftime('%H:%M:%S', time.localtime(ts))}  {value:6.2f} %")
    if not points:
        print("(no datapoint yet)")


def _lab_hosts(c):
    from cloudops import inventory

    return list(inventory.load(inventory.default_path(None, c.config.get("inventory"))).hosts.values())


ns.add_task(demo)
