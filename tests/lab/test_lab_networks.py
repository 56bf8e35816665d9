"""Networks on a real lab: idempotent define on two hosts, namespacing, reservations, delete, CLI, bad input."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from cloudops import fleet, virt
from cloudops.net import ipam, networks
from cloudops.net.networks import NetworkSpec
from cloudops.state.sqlite import SqliteStore
from tests.conftest import ROOT, TEST_PREFIX, invoke

# Names carry the lab prefix: processes of every lab share one PID space, so a test that looks
# for "its" dnsmasq must not find another lab's.
NAT = NetworkSpec(name=f"t{TEST_PREFIX}-nat", mode="nat", cidr="192.168.151.0/24")
ISO = NetworkSpec(name=f"t{TEST_PREFIX}-iso", mode="isolated", cidr="10.151.0.0/24")

SHIM = """import sys
sys.path.insert(0, {root!r})
from invoke import Collection
from cloudops.tasks import net
ns = Collection()
ns.add_collection(Collection.from_module(net))
ns.configure({{"inventory": None, "fleet": {{"workers": 16, "timeout": 60}}}})
"""


@pytest.fixture(scope="module")
def net_cli(tmp_path_factory):
    """Run `invoke net.*`: through tasks/__init__.py once it has the collection, until then through a shim."""
    try:
        from cloudops.tasks import ns
        registered = "net" in ns.collections
    except Exception:  # tasks/__init__.py mid-edit elsewhere: the shim still tests this collection
        registered = False
    if registered:
        return invoke
    shim_dir = tmp_path_factory.mktemp("shim")
    (shim_dir / "cn_net_tasks.py").write_text(SHIM.format(root=str(ROOT)))
    return lambda *args: invoke("--search-root", str(shim_dir), "-c", "cn_net_tasks", *args)


def hosts(lab_inventory, *names):
    return [lab_inventory.hosts[n] for n in names]


def on_host(host, func, *args, **kwargs):
    with virt.open_host(host) as conn:
        return func(conn, *args, **kwargs)


def sh(host, command) -> str:
    result = fleet.run_command([host], command, timeout=30)
    assert result.exit_code == 0, result.to_dict()
    return result[host.name].value.stdout


def names_on(host) -> set[str]:
    return {row["name"] for row in on_host(host, networks.list_networks)}


@pytest.fixture
def clean(lab_inventory):
    """Every test starts and ends without its networks on any host."""
    def wipe_one(host):
        with virt.open_host(host) as conn:
            for spec in (NAT, ISO):
                networks.delete_network(conn, spec.name, force=True)

    def wipe():
        result = fleet.run(list(lab_inventory.hosts.values()), wipe_one, timeout=60)
        assert result.exit_code == 0, result.to_dict()
    wipe()
    yield
    wipe()


def test_nat_network_on_two_hosts_is_idempotent(lab, lab_inventory, clean):
    for host in hosts(lab_inventory, "hv1", "hv2"):
        changed, message = on_host(host, networks.ensure_network, NAT)
        assert changed and "defined" in message and "started" in message, message
        changed, message = on_host(host, networks.ensure_network, NAT)
        assert (changed, message) == (False, f"network {NAT.name} already active, autostart on")
        row = next(r for r in on_host(host, networks.list_networks) if r["name"] == NAT.name)
        assert row == {"name": NAT.name, "active": True, "autostart": True, "persistent": True, "mode": "nat",
                       "bridge": NAT.bridge, "cidr": NAT.cidr, "dhcp_range": "192.168.151.128-192.168.151.254",
                       "reservations": 0}
    assert NAT.name not in names_on(lab_inventory.hosts["hv3"])


def test_bridge_and_dnsmasq_live_in_the_hosts_namespace(lab, lab_inventory, clean):
    hv1 = lab_inventory.hosts["hv1"]
    on_host(hv1, networks.ensure_network, NAT)
    assert f"{NAT.gateway}/24" in sh(hv1, f"ip -br addr show dev {NAT.bridge}")
    root_ns = subprocess.run(["ip", "link", "show", "dev", NAT.bridge], capture_output=True, text=True)
    assert root_ns.returncode != 0, f"bridge {NAT.bridge} leaked into the root namespace"
    pid = int(sh(hv1, f"cat /run/libvirt/network/{NAT.name}.pid").strip())
    assert "dnsmasq" in Path(f"/proc/{pid}/comm").read_text()
    netns = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True).stdout.split()
    assert netns == [lab.host("hv1").namespace]


def test_reservation_add_and_remove_reach_xml_and_dnsmasq(lab, lab_inventory, clean):
    hv1 = lab_inventory.hosts["hv1"]
    on_host(hv1, networks.ensure_network, NAT)
    mac, ip = "52:54:00:0a:0b:0c", "192.168.151.10"
    assert on_host(hv1, networks.add_reservation, NAT.name, mac, ip, "web1")[0] is True
    assert on_host(hv1, networks.add_reservation, NAT.name, mac, ip, "web1")[0] is False

    def hosts_in_xml(live):
        with virt.open_host(hv1) as conn:
            root = networks._xml(conn.networkLookupByName(NAT.name), live=live)
        return [h.attrib for h in root.findall("ip/dhcp/host")]

    expected = [{"mac": mac, "ip": ip, "name": "web1"}]
    assert hosts_in_xml(live=True) == expected and hosts_in_xml(live=False) == expected
    hostsfile = f"/var/lib/libvirt/dnsmasq/{NAT.name}.hostsfile"
    assert sh(hv1, f"cat {hostsfile}").split() == [f"{mac},{ip},web1"]

    with pytest.raises(Exception, match="conflicts with") as exc:
        on_host(hv1, networks.add_reservation, NAT.name, "52:54:00:0a:0b:0d", ip, "web2")
    assert "\n" not in str(exc.value)

    assert on_host(hv1, networks.remove_reservation, NAT.name, mac)[0] is True
    assert on_host(hv1, networks.remove_reservation, NAT.name, mac)[0] is False
    assert hosts_in_xml(live=True) == [] and hosts_in_xml(live=False) == []
    assert sh(hv1, f"cat {hostsfile}").split() == []


def test_ipam_address_is_the_same_on_every_host(lab, lab_inventory, clean, tmp_path):
    """A VM that moves between hosts keeps its cloud-wide allocation and its reservation."""
    allocation = ipam.allocate(NAT, "mover", store=SqliteStore(tmp_path / "s.sqlite"))
    for host in hosts(lab_inventory, "hv1", "hv2"):
        on_host(host, networks.ensure_network, NAT)
        assert on_host(host, networks.add_reservation, NAT.name, allocation.mac, allocation.ip, "mover")[0]
    assert ipam.allocate(NAT, "mover", store=SqliteStore(tmp_path / "s.sqlite")) == allocation
    for host in hosts(lab_inventory, "hv1", "hv2"):
        assert sh(host, f"cat /var/lib/libvirt/dnsmasq/{NAT.name}.hostsfile").split() == \
            [f"{allocation.mac},{allocation.ip},mover"]


def test_delete_leaves_nothing(lab, lab_inventory, clean):
    hv1 = lab_inventory.hosts["hv1"]
    on_host(hv1, networks.ensure_network, NAT)
    pid = int(sh(hv1, f"cat /run/libvirt/network/{NAT.name}.pid").strip())
    assert on_host(hv1, networks.delete_network, NAT.name) == (True, f"network {NAT.name}: stopped, undefined")
    assert on_host(hv1, networks.delete_network, NAT.name) == (False, f"network {NAT.name} not defined")
    assert NAT.name not in names_on(hv1)
    assert "does not exist" in sh(hv1, f"ip -br link show dev {NAT.bridge} 2>&1 || true")
    files = sh(hv1, "ls /var/lib/libvirt/dnsmasq/ /etc/libvirt/qemu/networks/ /etc/libvirt/qemu/networks/autostart/")
    assert NAT.name not in files
    assert _gone(pid), "the network's dnsmasq must end with it"


def _gone(pid: int, within: float = 20.0) -> bool:
    """libvirt signals dnsmasq and does not wait for it: give it a bounded moment to exit."""
    import time

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if "dnsmasq" not in Path(f"/proc/{pid}/comm").read_text():
                return True
        except OSError:
            return True
        time.sleep(0.2)
    return False


def test_isolated_network(lab, lab_inventory, clean):
    hv2 = lab_inventory.hosts["hv2"]
    changed, message = on_host(hv2, networks.ensure_network, ISO)
    assert changed, message
    with virt.open_host(hv2) as conn:
        root = networks._xml(conn.networkLookupByName(ISO.name), live=True)
    assert root.find("forward") is None and root.find("ip").get("address") == "10.151.0.1"
    assert root.find("ip/dhcp/range").attrib == {"start": "10.151.0.128", "end": "10.151.0.254"}
    assert "10.151.0.1/24" in sh(hv2, f"ip -br addr show dev {ISO.bridge}")
    assert on_host(hv2, networks.ensure_network, ISO)[0] is False
    assert on_host(hv2, networks.add_reservation, ISO.name, "52:54:00:0a:0b:0e", "10.151.0.7", "db")[0]
    assert on_host(hv2, networks.delete_network, ISO.name)[0] is True
    assert ISO.name not in names_on(hv2)


def test_changed_range_redefines_and_keeps_reservations(lab, lab_inventory, clean):
    hv1 = lab_inventory.hosts["hv1"]
    on_host(hv1, networks.ensure_network, NAT)
    on_host(hv1, networks.add_reservation, NAT.name, "52:54:00:0a:0b:0f", "192.168.151.20", "keep")
    narrower = NetworkSpec(name=NAT.name, cidr=NAT.cidr, dhcp_start="192.168.151.200", dhcp_end="192.168.151.250")
    changed, message = on_host(hv1, networks.ensure_network, narrower, check=True)
    assert changed and "would redefine" in message
    assert on_host(hv1, networks.ensure_network, NAT)[0] is False  # check changed nothing
    changed, message = on_host(hv1, networks.ensure_network, narrower)
    assert changed and "redefined (dhcp_range" in message and "restarted" in message, message
    with virt.open_host(hv1) as conn:
        live = networks._xml(conn.networkLookupByName(NAT.name), live=True)
    assert live.find("ip/dhcp/range").attrib == {"start": "192.168.151.200", "end": "192.168.151.250"}
    assert [h.get("name") for h in live.findall("ip/dhcp/host")] == ["keep"]
    assert on_host(hv1, networks.ensure_network, narrower)[0] is False


def test_overlap_with_another_network_on_the_host_defines_nothing(lab, lab_inventory, clean):
    hv1 = lab_inventory.hosts["hv1"]
    on_host(hv1, networks.ensure_network, NAT)
    clash = NetworkSpec(name=ISO.name, mode="isolated", cidr="192.168.151.0/25")
    with pytest.raises(Exception, match=f"overlaps network {NAT.name}"):
        on_host(hv1, networks.ensure_network, clash)
    assert ISO.name not in names_on(hv1)


def test_network_that_cannot_start_is_not_left_defined(lab, lab_inventory, clean):
    """The lab's own subnet is routed on the host's eth0: libvirt defines the network but refuses to start it."""
    hv3 = lab_inventory.hosts["hv3"]
    clash = NetworkSpec(name=ISO.name, mode="isolated", cidr=lab.subnet)
    with pytest.raises(Exception, match=f"starting network {ISO.name}: .*eth0") as exc:
        on_host(hv3, networks.ensure_network, clash)
    assert "\n" not in str(exc.value)
    assert ISO.name not in names_on(hv3)


# ---------------------------------------------------------------- the CLI

def test_cli_define_check_define_list_delete(lab, lab_inventory, clean, net_cli):
    common = ["--inventory", str(lab.inventory_path), "--hosts", "hv1,hv2"]
    spec = ["--name", NAT.name, "--cidr", NAT.cidr]
    proc = net_cli("net.define", *spec, "--check", *common, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["summary"] == {"ok": 0, "changed": 2, "failed": 0}
    assert all("would define" in h["value"] for h in data["hosts"])
    assert NAT.name not in names_on(lab_inventory.hosts["hv1"])

    proc = net_cli("net.define", *spec, *common)
    assert proc.returncode == 0, proc.stderr
    assert "2 hosts: 0 ok, 2 changed, 0 failed" in proc.stdout
    proc = net_cli("net.define", *spec, *common)
    assert "2 hosts: 2 ok, 0 changed, 0 failed" in proc.stdout and "already active" in proc.stdout

    proc = net_cli("net.list", "--inventory", str(lab.inventory_path), "--json")
    assert proc.returncode == 0, proc.stderr
    listed = {h["host"]: {n["name"] for n in h["value"]} for h in json.loads(proc.stdout)["hosts"]}
    assert NAT.name in listed["hv1"] and NAT.name in listed["hv2"] and NAT.name not in listed["hv3"]
    proc = net_cli("net.list", "--inventory", str(lab.inventory_path), "--hosts", "hv1")
    assert NAT.name in proc.stdout and NAT.bridge in proc.stdout

    proc = net_cli("net.delete", "--name", NAT.name, "--check", *common)
    assert proc.returncode == 0 and "would stop" in proc.stdout
    assert NAT.name in names_on(lab_inventory.hosts["hv2"])
    proc = net_cli("net.delete", "--name", NAT.name, *common)
    assert "2 hosts: 0 ok, 2 changed, 0 failed" in proc.stdout
    proc = net_cli("net.delete", "--name", NAT.name, *common)
    assert "2 hosts: 2 ok, 0 changed, 0 failed" in proc.stdout and "not defined" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--name", "bad;name", "--cidr", "10.152.0.0/24"], "invalid network name 'bad;name'"),
    (["--name", "x$(id)", "--cidr", "10.152.0.0/24"], "invalid network name"),
    (["--name", f"t{TEST_PREFIX}-bad", "--cidr", "10.152.0.7/24"], "host bits set"),
    (["--name", f"t{TEST_PREFIX}-bad", "--cidr", "10.152.0.0/24", "--dhcp-start", "10.152.0.1",
      "--dhcp-end", "10.152.0.9"], "contains the gateway"),
    (["--name", f"t{TEST_PREFIX}-bad", "--mode", "bridge"], "bridge mode needs"),
])
def test_cli_bad_input_leaves_nothing_defined(lab, lab_inventory, net_cli, args, message):
    before = {name: names_on(host) for name, host in lab_inventory.hosts.items()}
    proc = net_cli("net.define", *args, "--inventory", str(lab.inventory_path))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and message in proc.stderr, proc.stderr
    assert {name: names_on(host) for name, host in lab_inventory.hosts.items()} == before


def test_cli_from_inventory_with_overlap_defines_nothing(lab, lab_inventory, net_cli, tmp_path, clean):
    data = yaml.safe_load(lab.inventory_path.read_text())
    data["vars"]["networks"] = [{"name": NAT.name, "cidr": "10.153.0.0/24"},
                                {"name": ISO.name, "mode": "isolated", "cidr": "10.153.0.0/25"}]
    bad = tmp_path / "overlap.yaml"
    bad.write_text(yaml.safe_dump(data))
    proc = net_cli("net.define", "--from-inventory", "--inventory", str(bad))
    assert proc.returncode != 0 and "overlap" in proc.stderr, proc.stderr
    assert all(NAT.name not in names_on(h) and ISO.name not in names_on(h) for h in lab_inventory.hosts.values())

    data["vars"]["networks"][1]["cidr"] = "10.153.1.0/24"
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(data))
    proc = net_cli("net.define", "--inventory", str(good), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["summary"] == {"ok": 0, "changed": 3, "failed": 0}
    assert all({NAT.name, ISO.name} <= names_on(h) for h in lab_inventory.hosts.values())
