"""Peers side by side (issue 15): cloudops vm.start against virt-lightning and kcli to SSH-ready, vm.list against kcli.

One run, one lab of its own (3 hosts), rounds interleaved (cloudops, vl, kcli, cloudops, ...):

* **provisioning**, the same Debian image (``image.build --recipe debian``: cloud-init, extlinux), 512 MiB,
  1 vCPU, a 3 GiB root disk, on the same lab host hv1, to SSH-ready = an SSH login as root with the key
  runs ``true``:

  - cloudops: ``invoke vm.start --name N --image debian --memory 512 --vcpus 1 --host hv1 --password-file F
    --ssh-key K --json`` (the whole CLI process; it waits for SSH with the host key it made), then one
    login through the hypervisor, host key verified (``guest.connect_vm``);
  - virt-lightning: ``vl start --name N --memory 512 --vcpus 1 --disk 3 debian12-cloudops``, run in hv1's
    network namespace (vl connects to the VM's address itself; its own wait is an SSH banner), then the
    bench's login poll;
  - kcli: ``kcli create vm -i debian12-cloudops.qcow2 -P memory=512 -P numcpus=1 -P disks=[3] N`` (it
    returns once the domain runs: its ``--wait`` waits for cloud-init's end with 5 s sleeps, a different
    goal), then the bench's poll: the DHCP lease, then the login.

  The bench's poll (every second, in hv1's network namespace: the VMs' networks are NAT networks inside
  it) is counted in the peer's time. Neither peer says what host key its guest will have, so that login
  trusts the key on first use, into a file of its own per VM. Each VM is deleted after its round by its own
  tool (``vm.delete``, ``vl stop``, ``kcli delete vm -y``), then checked with libvirt: no domain, no
  volume of that name in any pool.

* **listing**: ``invoke vm.list --json`` against ``kcli -C all list vm`` (kcli's config has the 3 lab
  hosts as clients), 3 shut-off domains defined on every host, both processes timed whole; both must
  list all 9.

Preparation, outside the measured time: the peers' venv (``var/bench/peers-venv``, from /usr/bin/python3
with --system-site-packages: Debian's libvirt binding; ``pip install --no-deps virt-lightning kcli``, then
what they import), the lab, the image in each tool's place (cloudops's store and hv1's pool; vl's
``/var/lib/virt-lightning/pool/upstream/debian12-cloudops.qcow2``, the path vl requires on the machine it
runs on, made and removed by the bench; kcli's pool ``default`` on hv1, /var/lib/libvirt/images), vl's
network and pool made by vl's own code, kcli's network by ``kcli create network``, one tiny cloudops VM
(its network and pool on hv1).

hv1 offers no kvm: /dev/kvm here is a paravirtual KVM on which guests hang, and virt-lightning takes
domain type kvm whenever libvirt lists it (kcli too: ``virttype`` kvm when listed). hv1's mount namespace
gets a /dev without kvm (a tmpfs with the other nodes copied, pts and shm bound), its libvirtd is
restarted with ``namespaces = []`` (libvirt's private /dev per QEMU cannot move the mounts of that /dev)
and an empty capabilities cache; libvirt then lists only ``qemu``, so all three tools run TCG guests.

    .venv/bin/python bench/peers.py [--rounds 3] [--list-rounds 5] [--prefix bpr] [--json]
"""

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import libvirt  # noqa: E402

import peers_config as pc  # noqa: E402
from cloudops import inventory, virt  # noqa: E402
from cloudops.compute import guest  # noqa: E402
from cloudops.imaging import build as imagebuild  # noqa: E402
from cloudops.imaging import store as images  # noqa: E402
from cloudops.lab import hosts as lab  # noqa: E402
from cloudops.lab import links  # noqa: E402
from cloudops.ssh import connect  # noqa: E402
from cloudops.templating import render  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "var" / "bench"
VENV = BENCH / "peers-venv"
HOME = BENCH / "peers-home"  # the peers' $HOME: their config files, never the operator's
PEERS = ("virt-lightning", "kcli")
PEER_IMPORTS = ("argcomplete", "prettytable", "jinja2", "pyyaml")
IMAGE = "debian12-cloudops"  # the peers' name for the image
MEMORY, DISK_GB = 512, 3
VL_ROOT = Path("/var/lib/virt-lightning")  # virt_lightning.DEFAULT_STORAGE_DIR's parent: fixed in vl
VL_MARK = VL_ROOT / ".made-by-cloudops-bench-peers"
VL_CIDR, KCLI_CIDR, KCLI_NET = "192.168.170.0/24", "192.168.160.0/24", "kcli-bench"
TIMEOUT = 900  # seconds for one tool to reach SSH-ready
NO_KVM_DEV = r"""set -eu
[ -e /dev/kvm ] || exit 0
new=/run/nokvm-dev
mkdir -p "$new"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$new"
for entry in /dev/* /dev/.[!.]*; do
  [ -e "$entry" ] || [ -L "$entry" ] || continue
  name=${entry#/dev/}
  [ "$name" = kvm ] && continue
  if mountpoint -q "$entry"; then mkdir "$new/$name"; mount --rbind "$entry" "$new/$name"
  else cp -a "$entry" "$new/"
  fi
done
mount --move "$new" /dev
grep -qx 'namespaces = \[\]' /etc/libvirt/qemu.conf || printf '%s\n' 'namespaces = []' >> /etc/libvirt/qemu.conf
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(argv, env=None, timeout=TIMEOUT, check=True) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    done = subprocess.run([str(a) for a in argv], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    wall = time.perf_counter() - t0
    if check and done.returncode:
        raise RuntimeError(f"`{pc.quoted(argv)[:200]}` failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-800:]}")
    return wall, done


# ---------------------------------------------------------------- preparation (not timed)

def ensure_venv() -> dict:
    """The peers' own venv: never cloudops dependencies. Their declared libvirt-python would compile
    (no libvirt-dev here): Debian's binding serves them through --system-site-packages."""
    pip = VENV / "bin" / "pip"
    if not (VENV / "bin" / "vl").exists() or not (VENV / "bin" / "kcli").exists():
        run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", VENV])
        run([pip, "install", "-q", "--no-deps", *PEERS], timeout=600)
        run([pip, "install", "-q", *PEER_IMPORTS], timeout=600)
    run([VENV / "bin" / "vl", "--help"], timeout=60)
    run([VENV / "bin" / "kcli", "-h"], timeout=60)
    _, done = run([pip, "list", "--format", "json"], timeout=120)
    return {p["name"]: p["version"] for p in json.loads(done.stdout) if p["name"] in PEERS}


def hide_kvm(the_lab, host) -> list[str]:
    """hv1 without /dev/kvm, its libvirtd restarted on an empty capabilities cache; returns the domain
    types its libvirt then lists."""
    subprocess.run([*lab.enter(host), "sh", "-s"], input=NO_KVM_DEV, text=True, check=True, capture_output=True)
    caps = Path(host.dir) / "var-cache-libvirt" / "qemu" / "capabilities"
    for cached in caps.glob("*.xml"):
        cached.unlink()
    lab.restart_libvirtd(the_lab.prefix, host.name)
    _, done = run([*lab.enter(host), "virsh", "-c", "qemu:///system", "capabilities"], timeout=120)
    import xml.etree.ElementTree as ET

    return sorted({d.get("type") for d in ET.fromstring(done.stdout).findall("./guest/arch/domain")})


def peer_env() -> dict:
    return {**os.environ, "HOME": str(HOME)}


def in_netns(ns: str, argv) -> list:
    return ["ip", "netns", "exec", ns, *argv]


def prepare_peers(the_lab, inv, image_path: Path, key: Path) -> None:
    hv1 = inv.hosts["hv1"]
    shutil.rmtree(HOME, ignore_errors=True)
    (HOME / ".config" / "virt-lightning").mkdir(parents=True)
    (HOME / ".kcli").mkdir()
    for suffix in ("", ".pub"):  # kcli uses one key for the hosts and the VMs: the lab's
        shutil.copy(f"{key}{suffix}", HOME / ".kcli" / f"id_ed25519{suffix}")
    config = HOME / ".config" / "virt-lightning" / "config.ini"
    config.touch(mode=0o600)
    config.write_text(pc.vl_config(pc.libvirt_uri(hv1.address, key), VL_CIDR, f"{key}.pub", secrets.token_hex(12)))
    (HOME / ".kcli" / "config.yml").write_text(pc.kcli_config(
        [(h.name, h.address) for h in inv.hypervisors()], str(key), KCLI_NET))
    # vl: its storage directory on this machine (vl checks it here) at the path hv1 sees too
    if VL_ROOT.exists() and not VL_MARK.exists():
        raise RuntimeError(f"{VL_ROOT} exists and was not made by this bench: not touching it")
    (VL_ROOT / "pool" / "upstream").mkdir(parents=True, exist_ok=True)
    VL_MARK.touch()
    shutil.copyfile(image_path, VL_ROOT / "pool" / "upstream" / f"{IMAGE}.qcow2")
    make_vl = ("import sys, libvirt, virt_lightning.virt_lightning as vl; "
               "hv = vl.LibvirtHypervisor(libvirt.open(sys.argv[1])); "
               "hv.init_network('virt-lightning', sys.argv[2]); hv.init_storage_pool('virt-lightning')")
    run(in_netns(the_lab.host("hv1").namespace, [VENV / "bin" / "python", "-c", make_vl, pc.libvirt_uri(hv1.address, key), VL_CIDR]),
        env=peer_env(), timeout=120)
    # kcli: `kcli create pool` needs sudo on the host (there is none here): the pool defined by libvirt
    images_dir = Path(the_lab.host("hv1").dir) / "var-lib-libvirt" / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(image_path, images_dir / f"{IMAGE}.qcow2")
    with virt.open_host(hv1) as conn:
        pool = conn.storagePoolDefineXML(
            "<pool type='dir'><name>default</name><target><path>/var/lib/libvirt/images</path></target></pool>")
        pool.create()
    run([VENV / "bin" / "kcli", "create", "network", "-c", KCLI_CIDR, KCLI_NET], env=peer_env(), timeout=120)


def teardown_peers() -> None:
    if VL_MARK.exists():
        shutil.rmtree(VL_ROOT, ignore_errors=True)


# ---------------------------------------------------------------- SSH-ready

def login_poll(ns: str, address_of, key: Path, known_hosts: Path, deadline: float) -> float:
    """Seconds until an SSH login as root with the key runs `true` (the address from ``address_of()``),
    from inside the host's network namespace; the guest's key trusted on first use (a file per VM)."""
    t0 = time.perf_counter()
    ip = None
    while time.perf_counter() < deadline:
        ip = ip or address_of()
        if ip:
            argv = in_netns(ns, ["ssh", "-F", "/dev/null", "-i", key, "-o", "IdentitiesOnly=yes",
                                   "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=accept-new",
                                   "-o", "BatchMode=yes", "-o", "ConnectTimeout=3", f"root@{ip}", "true"])
            if subprocess.run([str(a) for a in argv], capture_output=True, timeout=30).returncode == 0:
                return time.perf_counter() - t0
        time.sleep(1)
    raise RuntimeError(f"no SSH login at {ip or 'an unknown address'} before the deadline")


def lease_of(conn, name):
    def address():
        try:
            ifaces = conn.lookupByName(name).interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE)
        except libvirt.libvirtError:
            return None
        return next((a["addr"] for i in ifaces.values() for a in i.get("addrs") or [] if a["type"] == 0), None)
    return address


def gone(conn, name) -> bool:
    """No domain and no volume named after it in any pool of the host (the tool's delete verified)."""
    try:
        conn.lookupByName(name)
        return False
    except libvirt.libvirtError:
        pass
    for pool in conn.listAllStoragePools():
        if pool.isActive():
            pool.refresh()
            if any(v.startswith(name) for v in pool.listVolumes()):
                return False
    return True


def round_cloudops(inv_path, inv, name, pw_file, key) -> dict:
    hv1 = inv.hosts["hv1"]
    invoke = [Path(sys.executable).with_name("invoke")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    tool, done = run([*invoke, "vm.start", "--name", name, "--image", "debian", "--memory", MEMORY, "--vcpus", 1,
                      "--host", "hv1", "--password-file", pw_file, "--ssh-key", f"{key}.pub", "--json",
                      "--timeout", TIMEOUT, "--inventory", inv_path], env=env, timeout=TIMEOUT + 120)
    vm = json.loads(done.stdout)
    t0 = time.perf_counter()
    with connect(hv1) as hv, guest.connect_vm(hv, vm["ip"]) as conn:
        conn.run("true", hide=True, in_stream=False)
    after = time.perf_counter() - t0
    delete, _ = run([*invoke, "vm.delete", name, "--inventory", inv_path], env=env, timeout=300)
    return {"tool_s": tool, "after_s": after, "total_s": tool + after, "delete_s": delete, "ip": vm["ip"]}


def round_vl(ns, conn, name, key, tmp) -> dict:
    vl = VENV / "bin" / "vl"
    deadline = time.perf_counter() + TIMEOUT
    try:
        tool, _ = run(in_netns(ns, [vl, "start", "--name", name, "--memory", MEMORY, "--vcpus", 1, "--disk", DISK_GB,
                                     "--show-console", "", IMAGE]), env=peer_env())
        ip = pc.vl_address(conn.lookupByName(name).XMLDesc(0))
        after = login_poll(ns, lambda: ip, key, Path(tmp) / f"{name}.known_hosts", deadline)
    finally:
        delete, _ = run(in_netns(ns, [vl, "stop", name]), env=peer_env(), timeout=300, check=False)
    return {"tool_s": tool, "after_s": after, "total_s": tool + after, "delete_s": delete, "ip": ip}


def round_kcli(ns, conn, name, key, tmp) -> dict:
    kcli = VENV / "bin" / "kcli"
    deadline = time.perf_counter() + TIMEOUT
    try:
        tool, _ = run([kcli, "create", "vm", "-i", f"{IMAGE}.qcow2", "-P", f"memory={MEMORY}", "-P", "numcpus=1",
                       "-P", f"disks=[{DISK_GB}]", name], env=peer_env())
        after = login_poll(ns, lease_of(conn, name), key, Path(tmp) / f"{name}.known_hosts", deadline)
        ip = lease_of(conn, name)()
    finally:
        delete, _ = run([kcli, "delete", "vm", "-y", name], env=peer_env(), timeout=300, check=False)
    return {"tool_s": tool, "after_s": after, "total_s": tool + after, "delete_s": delete, "ip": ip}


# ---------------------------------------------------------------- listing

def define_listed(inv, per_host: int) -> list[str]:
    names = []
    for h, host in enumerate(inv.hypervisors(), start=1):
        with virt.open_host(host) as conn:
            for i in range(1, per_host + 1):
                name = f"bpl-{h}-{i}"
                conn.defineXML(render("lab/diskless-domain.xml.j2", name=name, ns=virt.METADATA_NS,
                                      ip=f"10.99.{h}.{10 + i}", mac=f"52:54:00:99:{h:02x}:{i:02x}", group="bench"))
                names.append(name)
    return names


def undefine_listed(inv, names) -> None:
    for host in inv.hypervisors():
        with virt.open_host(host) as conn:
            for name in names:
                try:
                    conn.lookupByName(name).undefine()
                except libvirt.libvirtError:
                    pass


def list_rounds(inv_path, names, rounds: int) -> dict:
    invoke = [Path(sys.executable).with_name("invoke")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    samples = {"cloudops": [], "kcli": []}
    for n in range(1, rounds + 1):
        wall, done = run([*invoke, "vm.list", "--json", "--inventory", inv_path], env=env, timeout=120)
        listed = {row["name"] for row in json.loads(done.stdout)["vms"]}
        if not set(names) <= listed:
            raise RuntimeError(f"vm.list missed {sorted(set(names) - listed)}")
        samples["cloudops"].append(wall)
        wall, done = run([VENV / "bin" / "kcli", "-C", "all", "list", "vm"], env=peer_env(), timeout=120)
        listed = set(pc.kcli_table_names(done.stdout))
        if not set(names) <= listed:
            raise RuntimeError(f"kcli list vm missed {sorted(set(names) - listed)}")
        samples["kcli"].append(wall)
        log(f"list #{n}: vm.list {samples['cloudops'][-1]:.2f} s, kcli {samples['kcli'][-1]:.2f} s")
    return samples


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="provisioning rounds per tool (at least 3)")
    ap.add_argument("--list-rounds", type=int, default=5, help="listing rounds per tool")
    ap.add_argument("--per-host", type=int, default=3, help="shut-off domains defined per host for the listing")
    ap.add_argument("--prefix", default="bpr", help="the bench's own lab prefix")
    ap.add_argument("--only", default="list,provision", help="comma-separated: list, provision")
    ap.add_argument("--json", action="store_true", help="print only the JSON report")
    ap.add_argument("--out", help="also write the report to this file, after every sample (a cut run keeps them)")
    ap.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    args = ap.parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parts = set(args.only.split(","))

    def save(partial: dict) -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(partial, indent=2))

    started, load_start = time.strftime("%Y-%m-%d %H:%M:%S %Z"), os.getloadavg()
    log("peers' venv")
    versions = ensure_venv()
    debian_path = imagebuild.build_image("debian")
    debian = images.add_image(debian_path, name="debian", replace=True)[0]
    tiny = images.add_image(imagebuild.build_image("tiny"), name="tiny", replace=True)[0]
    report = {"date": started, "machine": f"{platform.node()}, {os.cpu_count()} cpu {platform.machine()}, QEMU TCG",
              "link": links.describe(None), "peers": versions, "load_average_at_start": [round(x, 2) for x in load_start]}
    log(f"lab {args.prefix} (3 hosts)")
    the_lab = lab.up(3, prefix=args.prefix)
    listed = []
    try:
        inv_path = the_lab.inventory_path
        inv = inventory.load(inv_path)
        hv1, ns = inv.hosts["hv1"], the_lab.host("hv1").namespace
        key = Path(the_lab.dir) / "id_ed25519"
        report["hv1_domain_types"] = hide_kvm(the_lab, the_lab.host("hv1"))
        log(f"hv1's libvirt lists domain types {report['hv1_domain_types']}")
        if "kvm" in report["hv1_domain_types"]:
            raise RuntimeError("hv1 still lists kvm")
        prepare_peers(the_lab, inv, Path(debian_path), key)
        with tempfile.TemporaryDirectory(prefix="cloudops-peers-") as tmp:
            pw_file = Path(tmp) / "pw"
            pw_file.touch(mode=0o600)
            pw_file.write_text(secrets.token_hex(12) + "\n")
            with connect(hv1) as hv:
                images.ensure_on_host(debian, hv1, hv)
                images.ensure_on_host(tiny, hv1, hv)
            invoke = [Path(sys.executable).with_name("invoke")]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            run([*invoke, "vm.start", "--name", "bpw-warm", "--image", "tiny", "--memory", 96, "--host", "hv1",
                 "--password-file", pw_file, "--ssh-key", f"{key}.pub", "--inventory", inv_path], env=env)
            run([*invoke, "vm.delete", "bpw-warm", "--inventory", inv_path], env=env)
            if "list" in parts:
                listed = define_listed(inv, args.per_host)
                report["list"] = {"domains": len(listed), "hosts": 3,
                                  "samples": list_rounds(inv_path, listed, args.list_rounds)}
                report["list"]["summary"] = pc.summarize(report["list"]["samples"])
                save(report)
                undefine_listed(inv, listed)
                listed = []
            if "provision" in parts:
                samples = {"cloudops": [], "virt-lightning": [], "kcli": []}
                loads = []
                with virt.open_host(hv1) as conn:
                    for n in range(1, args.rounds + 1):
                        for way, fn in (("cloudops", lambda m: round_cloudops(inv_path, inv, m, pw_file, key)),
                                        ("virt-lightning", lambda m: round_vl(ns, conn, m, key, tmp)),
                                        ("kcli", lambda m: round_kcli(ns, conn, m, key, tmp))):
                            name = f"bp-{way[:2]}{n}"
                            loads.append(round(os.getloadavg()[0], 2))
                            try:
                                sample = fn(name)
                            except Exception as exc:  # recorded, and the other rounds still run
                                sample = {"error": str(exc)[-600:]}
                            sample["cleaned"] = gone(conn, name)
                            if not sample["cleaned"]:
                                raise RuntimeError(f"{way} left {name} behind on hv1")
                            samples[way].append(sample)
                            save({**report, "provision": {"samples": samples, "load_average_1min_before_each": loads}})
                            log(f"{way} #{n}: {json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in sample.items()})}")
                report["provision"] = {
                    "image": "debian", "memory_mib": MEMORY, "vcpus": 1, "disk_gib": DISK_GB,
                    "load_average_1min_before_each": loads, "samples": samples,
                    "summary": pc.summarize({w: [s.get("total_s") for s in v] for w, v in samples.items()}),
                    "tool_only": pc.summarize({w: [s.get("tool_s") for s in v] for w, v in samples.items()}),
                    "after_tool": pc.summarize({w: [s.get("after_s") for s in v] for w, v in samples.items()}),
                }
    finally:
        if listed:
            undefine_listed(inv, listed)
        teardown_peers()
        if not args.keep:
            lab.down(args.prefix)
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    save(report)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for part in ("provision", "list"):
        if part in report:
            print(f"{part}: " + ", ".join(f"{w} {s['median']} s (x{s['ratio']})"
                                          for w, s in report[part]["summary"].items()))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
