"""Two operators, one cloud: two control directories, one inventory, one etcd (the lab's, 3 members, TLS).

Each operator is the real ``invoke`` CLI with a state directory of its own (its own cloud key,
image store and known_hosts file) and the same ``state:`` configuration. The oracles are the
hypervisors themselves (``virsh net-dumpxml``, ``virsh dumpxml``, ``virsh list``), and etcd's own
``etcdctl`` for what is stored.
"""

import json
import re
import subprocess
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import invoke, own_inventory, own_lab

NETWORK = "cloudops"
# A cloud has one store: this team's VMs get a lab of their own, whose network no other store's
# allocations touch (the session lab's belong to the test run's sqlite store).
lab = own_lab("t")
lab_inventory = own_inventory()
RUN = uuid.uuid4().hex[:4]  # VM names (and so MACs) of this run only: no lease of an earlier run matches


@dataclass
class Operator:
    name: str
    directory: Path
    config: Path
    inventory: Path

    def run(self, *args, timeout=600):
        return invoke("-f", str(self.config), *args, *self._inventory_flag(args),
                      env={"CLOUDOPS_STATE_DIR": str(self.directory / "state")}, timeout=timeout)

    def _inventory_flag(self, args):
        task = args[0]
        return [] if task.startswith(("state.show", "state.import")) else ["--inventory", str(self.inventory)]


@pytest.fixture(scope="module")
def etcd(lab):
    from cloudops.lab import etcd as lab_etcd

    lab_etcd.up(lab.prefix, 3)
    yield lab_etcd.settings(lab.prefix)
    lab_etcd.down(lab.prefix)


def _operator(name, tmp_path_factory, settings, lab):
    directory = tmp_path_factory.mktemp(f"operator-{name}")
    config = directory / "invoke.yaml"
    config.write_text(yaml.safe_dump({"state": settings}))
    return Operator(name, directory, config, lab.inventory_path)


@pytest.fixture(scope="module")
def team(etcd, lab, tiny_image, tmp_path_factory):
    a, b = (_operator(n, tmp_path_factory, etcd, lab) for n in ("a", "b"))
    added = a.run("image.add", str(tiny_image.local_path), "--name", "tiny", "--replace", "--distribute", "--json")
    assert added.returncode == 0, added.stderr
    yield a, b
    for who in (a, b):
        for host in ("hv1", "hv2", "hv3"):
            who.run("host.maintenance", host, "off")


def etcdctl(settings, *args):
    return subprocess.run(["etcdctl", "--endpoints", ",".join(settings["endpoints"]), "--cacert", settings["ca"],
                           "--cert", settings["cert"], "--key", settings["key"], *args],
                          capture_output=True, text=True, timeout=30, env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"})


def errors(proc) -> list[str]:
    """The error lines of a CLI run (progress lines start with "… ")."""
    return [line for line in proc.stderr.strip().splitlines() if not line.startswith("… ")]


def wait_for_quorum(settings, deadline=60):
    """After members come back: until etcd takes a write again (etcdctl, not cloudops)."""
    import time

    end = time.monotonic() + deadline
    while etcdctl(settings, "put", "/cloudops-test/ping", "x").returncode != 0:
        assert time.monotonic() < end, "etcd did not regain quorum"
        time.sleep(0.5)


def sh(host, command):
    from cloudops.ssh import connect

    with connect(host) as conn:
        return conn.run(command, hide=True, in_stream=False, warn=True).stdout


def reservations(lab_inventory) -> dict[str, list[tuple[str, str, str]]]:
    """host -> (name, mac, ip) of every DHCP host entry of the cloudops network, from virsh."""
    found = {}
    for name, host in lab_inventory.hosts.items():
        xml = sh(host, f"virsh -q net-dumpxml {NETWORK}")
        found[name] = re.findall(r"<host mac='([^']+)' name='([^']+)' ip='([^']+)'", xml)
    return {h: [(n, m, ip) for m, n, ip in rows] for h, rows in found.items()}


def domains(lab_inventory, prefix) -> dict[str, str]:
    """VM name -> host, for every domain (running or not) whose name starts with ``prefix``, from virsh."""
    found = {}
    for name, host in lab_inventory.hosts.items():
        for dom in sh(host, "virsh -q list --all --name").split():
            if dom.startswith(prefix):
                found[dom] = name
    return found


def mac_of(lab_inventory, host, dom) -> str:
    xml = sh(lab_inventory.hosts[host], f"virsh -q dumpxml {dom}")
    return re.search(r"<mac address='([^']+)'", xml).group(1)


def delete_all(operator, names):
    for name in names:
        operator.run("vm.delete", name)


def test_maintenance_set_by_one_operator_is_honoured_by_the_other(team, lab_inventory):
    a, b = team
    on = b.run("host.maintenance", "hv1", "on")
    assert on.returncode == 0, on.stderr
    try:
        refused = a.run("vm.start", "--name", "t-tm", "--host", "hv1", "--no-wait")
        assert refused.returncode != 0 and "maintenance" in refused.stderr
        assert len(errors(refused)) == 1, refused.stderr
        assert "t-tm" not in domains(lab_inventory, "t-tm")
    finally:
        assert b.run("host.maintenance", "hv1", "off").returncode == 0


def test_eight_starts_at_once_from_two_operators_get_eight_addresses_and_macs(team, lab_inventory):
    a, b = team
    names = [f"t-tw{i}-{RUN}" for i in range(8)]
    results = {}

    def start(name, who):
        results[name] = who.run("vm.start", "--name", name, "--memory", "96", "--no-wait", "--json")

    threads = [threading.Thread(target=start, args=(n, (a, b)[i % 2])) for i, n in enumerate(names)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = {n: r.stderr for n, r in results.items() if r.returncode != 0}
        assert failed == {}
        placed = domains(lab_inventory, "t-tw")
        placed = {n: h for n, h in placed.items() if n.endswith(RUN)}
        assert sorted(placed) == sorted(names)
        macs = {name: mac_of(lab_inventory, host, name) for name, host in placed.items()}
        rows = [row for host_rows in reservations(lab_inventory).values() for row in host_rows if row[0] in macs]
        ips = {name: ip for name, _mac, ip in rows}
        assert len(set(macs.values())) == len(names) == len(set(ips.values())) and sorted(ips) == sorted(names)
        for name, mac, ip in rows:  # each host's reservation is the MAC its domain really has
            assert macs[name] == mac
        reported = {n: json.loads(r.stdout)["ip"] for n, r in results.items()}
        assert reported == ips
    finally:
        delete_all(a, names)
    assert {n for n in domains(lab_inventory, "t-tw") if n.endswith(RUN)} == set()


def test_the_same_name_from_both_gives_one_vm_and_the_other_reaches_it_verified(team, lab_inventory):
    a, b = team
    name = f"t-both-{RUN}"
    results = {}
    barrier = threading.Barrier(2)

    def start(who):
        barrier.wait()
        results[who.name] = who.run("vm.start", "--name", name, "--memory", "96", "--json")

    threads = [threading.Thread(target=start, args=(who,)) for who in (a, b)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [w for w, r in results.items() if r.returncode == 0]
        assert len(winners) == 1, {w: r.stderr for w, r in results.items()}
        loser = results[{"a": "b", "b": "a"}[winners[0]]]
        assert len(errors(loser)) == 1
        assert "being changed by another" in loser.stderr or "already exists" in loser.stderr
        assert list(domains(lab_inventory, name)) == [name]
        other = b if winners[0] == "a" else a
        # the other operator never saw this VM boot: its host key comes from the shared store
        ran = other.run("vm.run", name, "cat /proc/sys/kernel/hostname")
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip().splitlines()[-1] == name
        stored = etcdctl(lab_inventory_settings(other), "get", "--prefix", "/cloudops/hostkeys/" + name)
        assert name in stored.stdout and "ssh-ed25519" in stored.stdout
        known = (other.directory / "state" / "cloud" / "known_hosts").read_text()
        assert known.count(f"{name},") >= 1
    finally:
        a.run("vm.delete", name)
    assert domains(lab_inventory, name) == {}


def lab_inventory_settings(operator):
    return yaml.safe_load(operator.config.read_text())["state"]


def test_one_etcd_member_killed_work_goes_on(team, lab, lab_inventory):
    from cloudops.lab import etcd as lab_etcd

    a, b = team
    members = lab_etcd.status(lab.prefix)["members"]
    victim = members[0]["name"]
    lab_etcd.kill_member(lab.prefix, victim)
    try:
        assert a.run("host.maintenance", "hv3", "on").returncode == 0
        shown = b.run("state.show", "--prefix", "maintenance/", "--json")
        assert shown.returncode == 0, shown.stderr
        assert "maintenance/hv3" in json.loads(shown.stdout)["keys"]
        assert b.run("host.maintenance", "hv3", "off").returncode == 0
        started = b.run("vm.start", "--name", "t-one", "--memory", "96", "--no-wait")
        assert started.returncode == 0, started.stderr
        assert list(domains(lab_inventory, "t-one")) == ["t-one"]
    finally:
        a.run("vm.delete", "t-one")
        lab_etcd.start_member(lab.prefix, victim)
        wait_for_quorum(lab_inventory_settings(a))


def test_quorum_lost_vm_start_fails_in_one_line_and_leaves_nothing(team, lab, lab_inventory):
    from cloudops.lab import etcd as lab_etcd

    a, _b = team
    victims = [m["name"] for m in lab_etcd.status(lab.prefix)["members"][:2]]
    for victim in victims:
        lab_etcd.kill_member(lab.prefix, victim)
    try:
        proc = a.run("vm.start", "--name", "t-quorum", "--memory", "96", "--no-wait", timeout=180)
        assert proc.returncode != 0
        assert len(errors(proc)) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "state store" in proc.stderr
    finally:
        for victim in victims:
            lab_etcd.start_member(lab.prefix, victim)
        wait_for_quorum(lab_inventory_settings(a))
    assert domains(lab_inventory, "t-quorum") == {}
    assert all("t-quorum" not in {n for n, _m, _ip in rows} for rows in reservations(lab_inventory).values())


def test_an_unreachable_store_is_one_clear_error(team, tmp_path):
    a, _b = team
    settings = {**lab_inventory_settings(a), "endpoints": ["https://127.0.0.1:9"]}
    config = tmp_path / "invoke.yaml"
    config.write_text(yaml.safe_dump({"state": settings}))
    nowhere = Operator("c", tmp_path, config, a.inventory)
    for args in (("state.show",), ("host.maintenance", "hv1", "on"), ("vm.start", "--name", "t-nowhere", "--no-wait")):
        proc = nowhere.run(*args, timeout=120)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert len(errors(proc)) == 1 and "state store" in proc.stderr, proc.stderr


def test_foreign_data_in_the_store_is_refused_naming_the_key(team):
    a, _b = team
    settings = lab_inventory_settings(a)
    assert etcdctl(settings, "put", "/cloudops/maintenance/hv2", "not json at all").returncode == 0
    try:
        proc = a.run("vm.start", "--name", "t-foreign", "--no-wait")
        assert proc.returncode != 0 and "maintenance/hv2" in proc.stderr
        assert len(errors(proc)) == 1, proc.stderr
    finally:
        etcdctl(settings, "del", "/cloudops/maintenance/hv2")
