"""Fan-out benchmark: one command on 16 bare lab hosts, three ways, side by side in one run.

1. cloudops ``fleet.run_command`` (bounded thread pool of Fabric connections);
2. a sequential loop of Fabric connections (the naive script);
3. ansible-core ad-hoc ``ansible all -m command -a CMD -f 16`` against the same hosts.

Every way opens fresh SSH connections each repetition and verifies host keys.
Prints per-way medians and the ratios; ``--json`` for machines.

    .venv/bin/python bench/fanout.py [--hosts 16] [--repeat 5] [--json]
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


def timed(func, *args) -> float:
    t0 = time.perf_counter()
    func(*args)
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    lab.down(PREFIX)
    the_lab = lab.up(args.hosts, bare=True, prefix=PREFIX)
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
            for _ in range(args.repeat):  # interleaved, so machine noise hits every way alike
                for name, way in ways.items():
                    samples[name].append(timed(way))
    finally:
        lab.down(PREFIX)

    medians = {name: statistics.median(s) for name, s in samples.items()}
    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cpu {platform.machine()}",
        "hosts": args.hosts, "repeat": args.repeat, "command": COMMAND,
        "median_seconds": {k: round(v, 3) for k, v in medians.items()},
        "sequential_over_fleet": round(medians["sequential fabric"] / medians["fleet.run"], 2),
        "ansible_over_fleet": round(medians["ansible -f N"] / medians["fleet.run"], 2),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"fan-out of `{COMMAND}` on {args.hosts} bare lab hosts, median of {args.repeat}:")
    for name, m in medians.items():
        print(f"  {name:<18} {m:7.3f} s   ({m / medians['fleet.run']:.2f}x fleet.run)")
    print(f"fleet.run is {report['sequential_over_fleet']}x faster than sequential, "
          f"{report['ansible_over_fleet']}x faster than ansible")


if __name__ == "__main__":
    main()
