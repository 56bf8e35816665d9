"""vm.start --dry-run: the scheduler's choice with its reasons, IPAM's next address peeked (not allocated), the disk,
what would be made; nothing is written to the state store or to any host (libvirt's test driver stands in for hosts)."""

import contextlib
import sqlite3
import types

import libvirt
import pytest

from cloudops import inventory, virt
from cloudops.compute import placement, plan, scheduler, vms
from cloudops.errors import CloudopsError
from cloudops.net import ipam, networks

G = 1 << 30
IMAGE = types.SimpleNamespace(name="tiny", id="ab" * 32, format="qcow2", virtual_size=128 << 20, direct_boot=False,
                              files=lambda: {"tiny.qcow2": (f"{'ab' * 32}.qcow2", "ab" * 32)})


class ReadOnlyShell:
    """A host's SSH connection that answers ``ls`` with nothing and refuses anything that could change the host."""

    def __init__(self):
        self.commands = []

    def run(self, command, **kwargs):
        self.commands.append(command)
        assert command.startswith("cd ") and command.endswith("&& ls"), f"a dry run ran {command!r}"
        return types.SimpleNamespace(stdout="", exited=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class LibvirtTestDriver:
    """libvirt's test driver, whose networks do not take the INACTIVE flag of XMLDesc (real libvirtd does)."""

    def __init__(self, conn):
        self._conn = conn

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def listAllNetworks(self, *args):
        return [types.SimpleNamespace(name=n.name, XMLDesc=lambda flags=0, n=n: n.XMLDesc(0))
                for n in self._conn.listAllNetworks(*args)]


@pytest.fixture
def cloud(tmp_path, monkeypatch):
    path = tmp_path / "inv.yaml"
    path.write_text("hosts:\n  hv1: {address: 192.0.2.1}\n  hv2: {address: 192.0.2.2}\n  hv3: {address: 192.0.2.3}\n")
    inv = inventory.load(path)
    conn = libvirt.open("test:///default")
    before = {"domains": sorted(d.name() for d in conn.listAllDomains()),
              "networks": sorted(n.name() for n in conn.listAllNetworks()),
              "pools": sorted(p.name() for p in conn.listAllStoragePools())}

    @contextlib.contextmanager
    def open_host(host, uri=None):  # a connection of its own to the one test driver state: hosts are asked in
        own = libvirt.open("test:///default")  # parallel, and one connection's last error is not per thread
        try:
            yield LibvirtTestDriver(own)
        finally:
            own.close()

    shell = ReadOnlyShell()
    monkeypatch.setattr(virt, "open_host", open_host)
    monkeypatch.setattr(plan, "connect", lambda host: shell)
    monkeypatch.setattr(plan.images, "resolve", lambda ref: IMAGE)
    states = [scheduler.HostState("hv1", memory_total_mb=4096, memory_free_mb=3000, vm_count=2, vcpus_total=4),
              scheduler.HostState("hv2", memory_total_mb=4096, memory_free_mb=3500, vm_count=0, vcpus_total=4),
              scheduler.HostState("hv3", memory_total_mb=8192, maintenance=True)]
    monkeypatch.setattr(placement, "host_states", lambda hosts: [s for s in states if s.name in {h.name for h in hosts}])
    yield types.SimpleNamespace(inventory=inv, conn=conn, before=before, shell=shell)
    after = {"domains": sorted(d.name() for d in conn.listAllDomains()),
             "networks": sorted(n.name() for n in conn.listAllNetworks()),
             "pools": sorted(p.name() for p in conn.listAllStoragePools())}
    assert after == before, "a dry run changed the host"
    conn.close()


def store_rows(store) -> list:
    db = sqlite3.connect(store.path)
    try:
        return db.execute("SELECT * FROM kv").fetchall() + db.execute("SELECT * FROM locks").fetchall()
    finally:
        db.close()


def test_dry_run_plans_and_makes_nothing(cloud, _own_state_store):
    spec = vms.VMSpec(name="web1", image="tiny", memory=96, disk_size="1G")
    planned = plan.plan_start(spec, cloud.inventory)
    assert planned.host == "hv2"  # more free memory, fewer VMs
    assert [h["host"] for h in planned.hosts] == ["hv2", "hv1", "hv3"]
    assert planned.hosts[0]["score"] > planned.hosts[1]["score"]
    assert planned.hosts[2] == {"host": "hv3", "refused": "in maintenance"}
    assert (planned.disk_size, planned.image, planned.network) == (G, "tiny", "cloudops")
    data = planned.to_dict()
    assert data["dry_run"] is True and data["disk"]["size"] == G and data["disk"]["size_human"] == "1G"
    made = "\n".join(planned.actions)
    assert "copy image tiny to hv2" in made and "network cloudops: would define and start" in made
    assert "web1.qcow2: qcow2 overlay of 1G on image tiny" in made and "web1-seed.iso" in made
    text = "\n".join(planned.lines())
    assert "nothing was made" in text and "hv3: refused: in maintenance" in text and "<- chosen" in text
    # nothing in the state store: no allocation, no lock
    assert store_rows(_own_state_store) == []
    # the address peeked is the one a real allocation gives next
    assert ipam.allocate(networks.DEFAULT_NETWORK, "web1").ip == planned.ip


def test_peek_is_the_next_allocation_and_writes_nothing(_own_state_store):
    net = networks.DEFAULT_NETWORK
    first = ipam.allocate(net, "a1")
    rows = store_rows(_own_state_store)
    peeked = ipam.peek(net, "a2")
    assert store_rows(_own_state_store) == rows
    assert peeked != first and ipam.peek(net, "a1") == first  # an existing allocation is what it would keep
    assert ipam.peek(net, "a3", also_taken=[peeked.ip]).ip not in (first.ip, peeked.ip)
    assert ipam.allocate(net, "a2") == peeked


def test_dry_run_refuses_what_start_refuses(cloud, _own_state_store):
    with pytest.raises(CloudopsError, match="smaller than image tiny"):
        plan.plan_start(vms.VMSpec(name="web1", image="tiny", disk_size="64M"), cloud.inventory)
    with pytest.raises(CloudopsError, match="no host can take 'web1' .*hv3: in maintenance"):
        plan.plan_start(vms.VMSpec(name="web1", image="tiny", host="hv3"), cloud.inventory)
    with pytest.raises(CloudopsError, match="defined on several hosts"):
        plan.plan_start(vms.VMSpec(name="test", image="tiny"), cloud.inventory)  # the test driver's own domain
    assert store_rows(_own_state_store) == []


def test_cli_dry_run_json(cloud, _own_state_store, monkeypatch, capsys):
    from invoke import Config, Context

    from cloudops.tasks import vm as vm_tasks

    monkeypatch.setattr(vm_tasks, "load_inventory", lambda c, path=None: cloud.inventory)
    monkeypatch.setattr(vm_tasks.vms, "start_vm", lambda *a, **k: pytest.fail("a dry run started a VM"))
    monkeypatch.setattr("cloudops.state.configure", lambda config: None)  # keep the test's own store
    c = Context(Config(overrides={"vm": {"image": "tiny", "memory": 128, "vcpus": 1, "customize": "seed",
                                         "timeout": 180, "flavors": {"small": {"memory": 64, "disk_size": "1G"}}}}))
    vm_tasks.start.body(c, name="web1", flavor="small", dry_run=True, json=True)
    import json

    data = json.loads(capsys.readouterr().out)
    assert (data["host"], data["memory"], data["disk"]["size"]) == ("hv2", 64, G)
    assert store_rows(_own_state_store) == []


def test_stack_plan_places_in_a_row_and_makes_nothing(cloud, _own_state_store, tmp_path):
    from cloudops.compute import stack

    path = tmp_path / "stack.yaml"
    path.write_text("vms:\n  - {name: web1, image: tiny, memory: 96, group: web}\n"
                    "  - {name: web2, image: tiny, memory: 96, group: web}\n")
    report, plans = stack.plan(stack.load(path), cloud.inventory)
    assert [p.name for p in plans] == ["web1", "web2"]
    assert plans[0].ip != plans[1].ip  # the second as if the first were made
    assert plans[0].host == "hv2" and plans[1].host == "hv1"  # hv2 claimed: it now runs a VM of group web
    assert report.changes[0].startswith("vm web1: would start on hv2 at ")
    assert store_rows(_own_state_store) == []


def test_dry_run_says_the_user_data_is_passed_and_makes_nothing(cloud, _own_state_store, tmp_path):
    path = tmp_path / "boot.sh"
    path.write_text("#!/bin/sh\necho secret-value\n")
    planned = plan.plan_start(vms.VMSpec(name="web1", image="tiny", user_data=str(path)), cloud.inventory)
    seed_line = next(a for a in planned.actions if "web1-seed.iso" in a)
    assert f"user-data {path} (MIME multipart: cloudops's cloud-config, then 1 part of the user's)" in seed_line
    assert planned.to_dict()["user_data"].startswith(f"user-data {path}")
    assert "secret-value" not in "\n".join(planned.lines())
    path.write_text("#cloud-config\n[\n")
    with pytest.raises(CloudopsError, match="not valid YAML"):
        plan.plan_start(vms.VMSpec(name="web1", image="tiny", user_data=str(path)), cloud.inventory)
    assert store_rows(_own_state_store) == []


def test_dry_run_shows_the_address_asked_for_and_refuses_a_bad_one(cloud, _own_state_store):
    planned = plan.plan_start(vms.VMSpec(name="web1", image="tiny", memory=96, ip="192.168.150.77"), cloud.inventory)
    assert (planned.ip, planned.ip_requested, planned.to_dict()["ip_requested"]) == ("192.168.150.77", True, True)
    assert "address: 192.168.150.77 (52:54:00:" in "\n".join(planned.lines())
    assert "as asked (--ip)" in "\n".join(planned.lines())
    assert "IPAM allocation 192.168.150.77" in "\n".join(planned.actions)
    for ip, why in (("192.168.150.1", "the gateway"), ("192.168.150.200", "in the DHCP range"),
                    ("10.0.0.1", "outside network cloudops")):
        with pytest.raises(CloudopsError, match=f"address {ip} for web1 is {why}"):
            plan.plan_start(vms.VMSpec(name="web1", image="tiny", memory=96, ip=ip), cloud.inventory)
    assert store_rows(_own_state_store) == []
    ipam.allocate(networks.DEFAULT_NETWORK, "db1", ip="192.168.150.77")
    with pytest.raises(CloudopsError, match="already allocated to VM db1"):
        plan.plan_start(vms.VMSpec(name="web1", image="tiny", memory=96, ip="192.168.150.77"), cloud.inventory)


def test_dry_run_of_two_nics_peeks_an_address_on_each_network(cloud, _own_state_store, tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text("vars:\n  networks:\n    - {name: cloudops, mode: nat, cidr: 192.168.150.0/24}\n"
                    "    - {name: lan, mode: bridge, bridge: lan0, cidr: 10.20.0.0/24, gateway: 10.20.0.1}\n"
                    "hosts:\n  hv1: {address: 192.0.2.1}\n  hv2: {address: 192.0.2.2}\n")
    planned = plan.plan_start(vms.VMSpec(name="web1", image="tiny", memory=96, network="cloudops,lan"),
                              inventory.load(path))
    nics = planned.to_dict()["nics"]
    assert [n["network"] for n in nics] == ["cloudops", "lan"] and nics[0]["ip"] == planned.ip
    assert nics[1]["ip"].startswith("10.20.0.") and nics[0]["mac"] != nics[1]["mac"]
    text = "\n".join(planned.lines())
    assert f"address: {nics[1]['ip']} ({nics[1]['mac']}) on network lan: another NIC" in text
    assert f"IPAM allocation {nics[1]['ip']} ({nics[1]['mac']}) on network lan" in "\n".join(planned.actions)
    assert store_rows(_own_state_store) == []
