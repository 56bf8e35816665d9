"""Provisioning benchmark: `invoke vm.start` to SSH-ready against a naive pipeline and against the guest's own clock.

Side by side in one run, on a 1-host lab of its own (prefix "bp1"), for the tiny image
(96 MiB guest) and the Debian cloud image (512 MiB guest), rounds alternating A B A B:

* cloudops: the real CLI, ``invoke vm.start --name N --image I --memory M --host hv1
  --password-file F --ssh-key K --json``, the whole process timed (interpreter start to
  exit). Right after it returns, one SSH session into the guest (through the hypervisor,
  host key verified) reads ``/proc/uptime`` and the guest's record of when its SSH server
  began listening. Then ``invoke vm.delete``.
* naive: what an operator scripts by hand, one bash script run over SSH on the
  hypervisor: a full copy of the image (``cp``, no backing file), ``virt-customize``
  (``--hostname``, ``--ssh-inject root:file:``, ``--root-password file:`` from a 0600 file
  of random bytes made on the host), ``virsh define`` of a minimal domain (BIOS boot from
  the disk, one virtio disk and NIC on the same libvirt network) + ``virsh start``, then
  polling every 0.5 s for a DHCP lease (``virsh domifaddr --source lease``) and for an SSH
  banner on port 22. The whole SSH command is timed; the domain and files are removed after.
  Without a datasource the Debian image needs by hand what cloud-init would do (NAIVE_EXTRA):
  cloud-init disabled, SSH host keys made, a DHCP network file.

The floor is the guest's uptime (CLOCK_BOOTTIME, which starts in early kernel init) when its
SSH server began listening: the tiny image prints it on its console ("ready ... uptime=") once
dropbear listens; for Debian it is the monotonic timestamp of sshd's first "Server listening"
journal line. What happens before the guest kernel's clock starts (QEMU start-up, SeaBIOS,
the bootloader, kernel decompression) is therefore not in the floor but in the overhead,
which is the vm.start wall time minus the floor. The overhead is split with the host time
at which the guest's clock read 0 (the uptime read over SSH, minus its round trip's midpoint):
the CLI's own start and exit (wall minus vm.start's total), vm.start's steps until the domain
started (``timings``), domain start to guest clock 0, and sshd listening to vm.start's return.

    .venv/bin/python bench/provision.py [--images tiny,debian] [--rounds tiny=3,debian=2] [--json]
"""

import argparse
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloudops import inventory
from cloudops.compute import guest
from cloudops.imaging import build as imagebuild
from cloudops.imaging import store as images
from cloudops.lab import hosts as lab
from cloudops.ssh import connect

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "bp1"
IMAGES = {"tiny": {"memory": 96, "rounds": 3}, "debian": {"memory": 512, "rounds": 2}}
TINY_READY = re.compile(r"cloudops-tiny: ready .*uptime=([0-9.]+)")
SSHD_LISTENING = re.compile(r"^\[\s*([0-9.]+)\].*Server listening", re.MULTILINE)
FLOOR_CMD = {  # the guest's own record of when its SSH server began listening (seconds of uptime)
    "debian": "journalctl -b -o short-monotonic --no-pager -t sshd | grep -m1 'Server listening' || true",
}
UNITS_CMD = ("systemctl show -p Id -p InactiveExitTimestampMonotonic -p ActiveEnterTimestampMonotonic "
             "cloud-init-local.service cloud-init.service ssh.service cloud-config.service cloud-final.service")
TEST_RUN = "pytest -ra"  # how the CI / test runs of this machine show in ps


def invoke(*args, check=True) -> tuple[float, subprocess.CompletedProcess]:
    """Run the real CLI (this checkout's invoke, this venv); returns its wall time and result."""
    cmd = [str(Path(sys.executable).with_name("invoke")), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if check and done.returncode:
        raise RuntimeError(f"{' '.join(cmd[1:3])} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return wall, done


def wait_for_quiet(log: list) -> None:
    """No timed run while a test run is going on this shared machine: wait for it to end (recorded)."""
    t0, seen = time.monotonic(), None
    while True:
        out = subprocess.run(["pgrep", "-f", TEST_RUN], capture_output=True, text=True, check=False).stdout.split()
        out = [p for p in out if int(p) != os.getpid()]
        if not out:
            break
        seen = seen or out
        time.sleep(10)
    if seen:
        log.append({"waited_s": round(time.monotonic() - t0, 1), "pids": seen, "at": time.strftime("%H:%M:%S")})
        print(f"  waited {time.monotonic() - t0:.0f} s for a test run ({' '.join(seen)}) to end", file=sys.stderr)


def run_cloudops(inv_path, host, image, memory, name, pw_file, key_pub) -> dict:
    wall, done = invoke("vm.start", "--name", name, "--image", image, "--memory", str(memory), "--host", host.name,
                        "--password-file", str(pw_file), "--ssh-key", str(key_pub), "--json",
                        "--inventory", str(inv_path))
    t_return = time.perf_counter()
    vm = json.loads(done.stdout)
    try:
        with connect(host) as hv, guest.connect_vm(hv, vm["ip"]) as conn:
            conn.open()
            t_a = time.perf_counter()
            uptime = float(conn.run("cat /proc/uptime", hide=True, in_stream=False).stdout.split()[0])
            t_b = time.perf_counter()
            if image in FLOOR_CMD:
                floor = float(SSHD_LISTENING.search(conn.run(FLOOR_CMD[image], hide=True, in_stream=False).stdout)[1])
                units = conn.run(UNITS_CMD, hide=True, in_stream=False).stdout
            else:
                floor, units = float(TINY_READY.search(guest.read_console(hv, name))[1]), ""
    finally:
        invoke("vm.delete", name, "--inventory", str(inv_path))
    t_mid = (t_a + t_b) / 2
    t_zero = t_mid - uptime - (t_return - wall)  # guest clock 0, seconds after the CLI was launched
    timings = vm.get("timings", {})
    cli = wall - timings.get("total", 0)
    return {
        "wall": wall, "floor": floor, "overhead": wall - floor,
        "uptime_at_return": uptime - (t_mid - t_return),  # the guest's uptime when vm.start returned
        "uptime_read_rtt": t_b - t_a,
        "split": {
            "cli_start_and_exit": cli,
            "vm_start_until_domain_started": timings.get("started"),
            "domain_started_to_guest_clock_0": t_zero - cli - timings.get("started", 0),
            "sshd_listening_to_return": wall - t_zero - floor,
        },
        "timings": timings,
        "guest_units_s": _units(units),
    }


def _units(text: str) -> dict:
    """`systemctl show` of several units (blank-line separated blocks) -> {unit: {property: seconds of uptime}}."""
    out = {}
    for block in text.strip().split("\n\n"):
        props = dict(line.partition("=")[::2] for line in block.splitlines())
        out[props.pop("Id", "?")] = {k.replace("TimestampMonotonic", ""): round(int(v) / 1e6, 2)
                                     for k, v in props.items() if v.isdigit()}
    return out if text.strip() else {}


NAIVE = r"""set -eu
name={name}; dir={pool}/naive; image={image_path}
mkdir -p "$dir"; umask 077
cp "$image" "$dir/$name.qcow2"
head -c 18 /dev/urandom | base64 > "$dir/$name.pw"
printf '%s\n' {key} > "$dir/$name.pub"
LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg virt-customize -q -a "$dir/$name.qcow2" \
  --hostname "$name" --ssh-inject "root:file:$dir/$name.pub" --root-password "file:$dir/$name.pw" {extra}
cat > "$dir/$name.xml" <<EOF
<domain type='qemu'>
  <name>$name</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file='$dir/$name.qcow2'/><target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'><source network='{network}'/><model type='virtio'/></interface>
    <serial type='pty'/><console type='pty'/>
  </devices>
</domain>
EOF
virsh -q -c qemu:///system define "$dir/$name.xml" >/dev/null
virsh -q -c qemu:///system start "$name" >/dev/null
ip=; deadline=$((SECONDS + {timeout}))
while [ -z "$ip" ]; do
  [ "$SECONDS" -lt "$deadline" ] || {{ echo "no DHCP lease after {timeout} s" >&2; exit 1; }}
  sleep 0.5
  ip=$(virsh -q -c qemu:///system domifaddr "$name" --source lease | awk '{{split($4, a, "/"); if (a[1]) {{print a[1]; exit}}}}')
done
until timeout 2 bash -c "exec 3<>/dev/tcp/$ip/22; head -c 4 <&3" 2>/dev/null | grep -q SSH-; do
  [ "$SECONDS" -lt "$deadline" ] || {{ echo "no SSH banner from $ip after {timeout} s" >&2; exit 1; }}
  sleep 0.5
done
echo "$ip"
"""

NAIVE_TIMEOUT = 600  # seconds from the start of the script for a lease and an SSH banner
NAIVE_EXTRA = {
    # A cloud image without a datasource: cloud-init off (nothing to apply); SSH host keys made (cloud-init
    # makes them otherwise: the image ships none, and its ssh.service runs `sshd -t` before its drop-in's
    # `ssh-keygen -A`); a DHCP NIC by hand (cloud-init writes it otherwise).
    "debian": ("--touch", "/etc/cloud/cloud-init.disabled", "--run-command", "ssh-keygen -A",
               "--write", "/etc/systemd/network/80-dhcp.network:[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n",
               "--run-command", "systemctl enable systemd-networkd"),
}
NAIVE_CLEANUP = ("virsh -q -c qemu:///system destroy {name} >/dev/null 2>&1; "
                 "virsh -q -c qemu:///system undefine {name} >/dev/null 2>&1; "
                 "rm -f {pool}/naive/{name}.qcow2 {pool}/naive/{name}.pw {pool}/naive/{name}.pub {pool}/naive/{name}.xml")


def run_naive(host, image, memory, name, key_pub: str) -> dict:
    pool = images.pool_path(host)
    script = NAIVE.format(name=name, pool=pool, image_path=image.remote_path(host), key=shlex.quote(key_pub),
                          memory=memory, network="cloudops", timeout=NAIVE_TIMEOUT,
                          extra=" ".join(shlex.quote(a) for a in NAIVE_EXTRA.get(image.name, ())))
    with connect(host) as hv:
        try:
            t0 = time.perf_counter()
            done = hv.run(f"bash -c {shlex.quote(script)}", hide=True, warn=True, in_stream=False)
            wall = time.perf_counter() - t0
            if not done.ok:
                raise RuntimeError(f"naive pipeline failed: {done.stderr.strip()[-800:]}")
        finally:
            hv.run(NAIVE_CLEANUP.format(name=name, pool=pool), hide=True, warn=True, in_stream=False)
    lines = done.stdout.strip().splitlines()  # virt-customize's warnings come first (e.g. no hostname on busybox)
    return {"wall": wall, "ip": lines[-1], "warnings": lines[:-1]}


def stats(values) -> dict:
    values = [v for v in values if v is not None]
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2)}


def summarize(name, fast, naive) -> dict:
    wall, nwall = stats(r["wall"] for r in fast), stats(r["wall"] for r in naive)
    split = {k: round(statistics.median(r["split"][k] for r in fast), 2) for k in fast[0]["split"]}
    return {
        "image": name, "rounds": len(fast), "vm_start_s": wall, "naive_s": nwall,
        "ratio_cloudops_over_naive": round(wall["median"] / nwall["median"], 3),
        "floor_s": stats(r["floor"] for r in fast),
        "uptime_at_return_s": stats(r["uptime_at_return"] for r in fast),
        "overhead_over_floor_s": stats(r["overhead"] for r in fast),
        "overhead_split_median_s": split,
        "target_met": statistics.median(r["overhead"] for r in fast) <= 1.0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="tiny,debian", help="comma-separated: tiny, debian")
    ap.add_argument("--rounds", default="", help="per image, e.g. tiny=3,debian=2 (default: those)")
    ap.add_argument("--json", action="store_true", help="print only the JSON summary")
    ap.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    args = ap.parse_args()
    # Ctrl-C and SIGTERM take the lab down (the finally below), also when started in the background
    # by a shell that ignores SIGINT
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    chosen = [i for i in args.images.split(",") if i]
    rounds = {k: IMAGES[k]["rounds"] for k in chosen} | {
        k: int(v) for k, v in (p.split("=") for p in args.rounds.split(",") if p)}

    load_start = os.getloadavg()
    built = {name: images.add_image(imagebuild.build_image(name), name=name, replace=True)[0] for name in chosen}
    waits, samples = [], {name: {"cloudops": [], "naive": []} for name in chosen}
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    the_lab = lab.up(1, prefix=PREFIX)
    try:
        inv_path = the_lab.inventory_path
        host = inventory.load(inv_path).hosts["hv1"]
        with tempfile.TemporaryDirectory(prefix="cloudops-bench-") as tmp:
            key = Path(tmp) / "id"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
            key_pub = Path(f"{key}.pub")
            pw_file = Path(tmp) / "pw"
            pw_file.touch(mode=0o600)
            pw_file.write_text(os.urandom(12).hex() + "\n")
            # warm-up, not timed: the images copied to the host, its network and pool made, caches filled
            for name in chosen:
                with connect(host) as hv:
                    images.ensure_on_host(built[name], host, hv)
            run_cloudops(inv_path, host, "tiny", IMAGES["tiny"]["memory"], "bp-warm", pw_file, key_pub)
            for name in chosen:
                memory = IMAGES[name]["memory"]
                for n in range(1, rounds[name] + 1):  # interleaved A B A B: machine noise hits both alike
                    wait_for_quiet(waits)
                    fast = run_cloudops(inv_path, host, name, memory, f"bp-{name}-c{n}", pw_file, key_pub)
                    samples[name]["cloudops"].append(fast)
                    print(f"{name} cloudops #{n}: {json.dumps(fast)}", file=sys.stderr)
                    wait_for_quiet(waits)
                    slow = run_naive(host, built[name], memory, f"bp-{name}-n{n}", key_pub.read_text().strip())
                    samples[name]["naive"].append(slow)
                    print(f"{name} naive    #{n}: {json.dumps(slow)}", file=sys.stderr)
    finally:
        if not args.keep:
            lab.down(PREFIX)

    report = {
        "date": started, "machine": f"{platform.node()} {os.cpu_count()} cpu {platform.machine()}, QEMU TCG",
        "load_average_at_start": [round(x, 2) for x in load_start],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "waited_for_test_runs": waits,
        "images": {name: summarize(name, s["cloudops"], s["naive"]) for name, s in samples.items()},
        "samples": samples,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'image':<7} {'vm.start':>9} {'naive':>8} {'ratio':>6} {'floor':>7} {'overhead':>9}  "
          f"(medians, s; min-max in JSON)")
    for name, s in report["images"].items():
        print(f"{name:<7} {s['vm_start_s']['median']:9.2f} {s['naive_s']['median']:8.2f} "
              f"{s['ratio_cloudops_over_naive']:6.3f} {s['floor_s']['median']:7.2f} "
              f"{s['overhead_over_floor_s']['median']:9.2f}  target <= 1 s: {'met' if s['target_met'] else 'NOT met'}")
        print(f"        overhead split: {json.dumps(s['overhead_split_median_s'])}")
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
