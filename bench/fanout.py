"""Fan-out benchmark: one command on N bare lab hosts (16 by default), three ways, side by side in one run.

1. cloudops ``fleet.run_command`` (bounded thread pool of Fabric connections, one per host);
2. a sequential loop of Fabric connections (the naive script);
3. ansible-core ad-hoc ``ansible all -m command -a CMD -f N`` against the same hosts.

Every way opens fresh SSH connections each repetition and verifies host keys. ``--link-rate`` and
``--link-delay`` shape every host's link (``lab.up``; a delay needs netem in the kernel). The hosts
share this machine's cores with the client, so each way's CPU time (all processes, from /proc/stat)
is recorded beside its wall time: ``cpu_seconds / cores`` is the shortest time that work could take
here (the 2-core ceiling). Prints per-way medians and the ratios; ``--json`` for machines.

    .venv/bin/python bench/fanout.py [--hosts 16] [--repeat 5] [--link-rate 1gbit] [--json]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloudops import fleet, inventory
from cloudops.lab import hosts as lab  # noqa: E402
from cloudops.lab import links  # noqa: E402
from cloudops.ssh import connect  # noqa: E402

PREFIX = "cob"
COMMAND = "uname -n"


def via_fleet(hosts):
    result = fleet.run_command(hosts, COMMAND, workers=len(hosts), timeout=60)
    assert result.exit_code == 0, result.to_dict()


def via_sequential(hosts):
    for host in hosts:
        with connect(host) as conn:
            assert conn.run(COMMAND, hide=True, in_stream=False).ok


def ansible_inventory(hosts, path: Path):
    lines = ["[bench]"]
    for h in hosts:
        lines.append(f"{h.name} ansible_host={h.address} ansible_user={h.user} "
                     f"ansible_ssh_private_key_file={h.key}")
    path.write_text("\n".join(lines) + "\n")


def via_ansible(hosts, inv_path: Path, known_hosts: str):
    env = {**os.environ, "ANSIBLE_HOST_KEY_CHECKING": "True", "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3",
           "ANSIBLE_SSH_ARGS": f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes "
                               "-o ControlMaster=no -o IdentitiesOnly=yes",
           "ANSIBLE_LOCALHOST_WARNING": "False", "ANSIBLE_DEPRECATION_WARNINGS": "False"}
    ansible = str(Path(sys.executable).parent / "ansible")
    proc = subprocess.run([ansible, "all", "-i", str(inv_path), "-m", "command", "-a", COMMAND,
                           "-f", str(len(hosts))], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def busy_seconds() -> float:
    """CPU time this machine has spent not idle, all cores, all processes (/proc/stat, in seconds)."""
    fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def timed(func, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole machine) of one run of ``func``."""
    cpu0, t0 = busy_seconds(), time.perf_counter()
    func(*args)
    return time.perf_counter() - t0, busy_seconds() - cpu0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--link-rate", help="shape every host's link, e.g. 1gbit (tc tbf)")
    parser.add_argument("--link-delay", help="add this delay each way per link, e.g. 0.125ms (needs netem)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    lab.down(PREFIX)
    load_before = os.getloadavg()
    the_lab = lab.up(args.hosts, bare=True, prefix=PREFIX, link_rate=args.link_rate, link_delay=args.link_delay)
    try:
        inv = inventory.load(the_lab.inventory_path)
        hosts = list(inv.hosts.values())
        with tempfile.TemporaryDirectory() as tmp:
            inv_path = Path(tmp) / "hosts.ini"
            ansible_inventory(hosts, inv_path)
            known = hosts[0].vars["known_hosts"]
            ways = {"fleet.run": lambda: via_fleet(hosts),
                    "sequential fabric": lambda: via_sequential(hosts),
                    "ansible -f N": lambda: via_ansible(hosts, inv_path, known)}
            for way in ways.values():  # warm-up: imports, first connections
                way()
            samples = {name: [] for name in ways}
            cpu = {name: [] for name in ways}
            for _ in range(args.repeat):  # interleaved, so machine noise hits every way alike
                for name, way in ways.items():
                    wall, used = timed(way)
                    samples[name].append(wall)
                    cpu[name].append(used)
    finally:
        lab.down(PREFIX)
    load_after = os.getloadavg()

    medians = {name: statistics.median(s) for name, s in samples.items()}
    cores = os.cpu_count()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()} {cores} cpu {platform.machine()}",
        "hosts": args.hosts, "repeat": args.repeat, "command": COMMAND, "link": links.describe(the_lab.link),
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "median_seconds": {k: round(v, 3) for k, v in medians.items()},
        "samples_seconds": {k: [round(v, 3) for v in s] for k, s in samples.items()},
        "median_cpu_seconds": {k: round(statistics.median(v), 2) for k, v in cpu.items()},
        # the shortest wall time the CPU work of a way allows on this machine's cores
        "cpu_ceiling_seconds": {k: round(statistics.median(v) / cores, 2) for k, v in cpu.items()},
        "sequential_over_fleet": round(medians["sequential fabric"] / medians["fleet.run"], 2),
        "ansible_over_fleet": round(medians["ansible -f N"] / medians["fleet.run"], 2),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"fan-out of `{COMMAND}` on {args.hosts} bare lab hosts ({report['link']}), median of {args.repeat}:")
    for name, m in medians.items():
        print(f"  {name:<18} {m:7.3f} s   ({m / medians['fleet.run']:.2f}x fleet.run)   "
              f"CPU {report['median_cpu_seconds'][name]:.1f} s = {report['cpu_ceiling_seconds'][name]:.2f} s "
              f"on {cores} cores")
    print(f"fleet.run is {report['sequential_over_fleet']}x faster than sequential, "
          f"{report['ansible_over_fleet']}x faster than ansible")


if __name__ == "__main__":
    main()
