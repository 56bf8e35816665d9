"""A network the hosts have defined (net.define) but the inventory does not describe: its spec read back from libvirt's
XML (strings, and libvirt's test driver standing in for the hosts), unchanged by ensure_network, and one line when no
host has it or two hosts disagree."""

import contextlib
import types

import libvirt
import pytest

from cloudops import inventory, virt
from cloudops.compute import vms
from cloudops.errors import CloudopsError
from cloudops.net import defined, networks

LAN = networks.NetworkSpec(name="lan", cidr="192.168.171.0/24")


def test_a_rendered_network_reads_back_as_the_same_spec():
    for spec in (LAN, networks.NetworkSpec(name="back", mode="isolated", cidr="10.9.0.0/16", gateway="10.9.0.254",
                                           dhcp_start="10.9.200.0", dhcp_end="10.9.255.0")):
        got = defined.spec_from_xml(networks.network_xml(spec))
        assert {k: getattr(got, k) for k in defined.SAME} == {k: getattr(spec, k) for k in defined.SAME}
        assert got.reservations == ()


def test_libvirts_own_form_netmask_and_several_ranges():
    xml = """<network><name>default</name><forward mode='nat'/><bridge name='virbr0' stp='on' delay='0'/>
      <ip address='192.168.122.1' netmask='255.255.255.0'><dhcp>
        <range start='192.168.122.100' end='192.168.122.199'/><range start='192.168.122.240' end='192.168.122.250'/>
        <host mac='52:54:00:aa:bb:cc' ip='192.168.122.5' name='someone'/>
      </dhcp></ip><ip family='ipv6' address='fd00::1' prefix='64'/></network>"""
    spec = defined.spec_from_xml(xml, autostart=False)
    assert (spec.mode, spec.cidr, spec.gateway, spec.bridge, spec.autostart) == (
        "nat", "192.168.122.0/24", "192.168.122.1", "virbr0", False)
    assert (spec.dhcp_start, spec.dhcp_end) == (
        "192.168.122.100", "192.168.122.199")
    assert spec.reserved == ("192.168.122.240-192.168.122.250",)  # dnsmasq leases the second range too
    pool = {str(a) for a in spec.static_pool()}
    assert "192.168.122.245" not in pool and "192.168.122.150" not in pool and "192.168.122.1" not in pool
    assert spec.reservations == ()  # a VM's DHCP entry goes with the VM, not into the network's spec


def test_a_bridge_network_has_no_subnet_of_its_own():
    spec = defined.spec_from_xml("<network><name>br</name><forward mode='bridge'/><bridge name='br0'/></network>")
    assert (spec.mode, spec.bridge, spec.cidr) == ("bridge", "br0", None)


@pytest.mark.parametrize("xml, message", [
    ("<network><name>r</name><forward mode='route'/><bridge name='virbr9'/>"
     "<ip address='10.1.0.1' prefix='24'><dhcp><range start='10.1.0.100' end='10.1.0.200'/></dhcp></ip></network>",
     "network r on hv1: forward mode 'route' is not one cloudops manages"),
    ("<network><name>n</name><forward mode='nat'/><bridge name='virbr9'/></network>",
     "network n on hv1: it has no IPv4 address on its bridge"),
    ("<network><name>d</name><bridge name='virbr9'/><ip address='10.1.0.1' prefix='24'/></network>",
     "network d on hv1: it has no DHCP range"),
])
def test_a_network_cloudops_cannot_use_is_one_line(xml, message):
    with pytest.raises(CloudopsError) as exc:
        defined.spec_from_xml(xml, where="hv1")
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


class NoInactiveFlag:
    """libvirt's test driver, whose networks refuse the INACTIVE flag of XMLDesc (a real libvirtd takes it)."""

    def __init__(self, conn):
        self._conn = conn

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def _net(self, net):
        return types.SimpleNamespace(**{k: getattr(net, k) for k in ("name", "isActive", "isPersistent", "autostart",
                                                                     "setAutostart", "create", "destroy", "undefine",
                                                                     "update")},
                                     XMLDesc=lambda flags=0: net.XMLDesc(0))

    def networkLookupByName(self, name):
        return self._net(self._conn.networkLookupByName(name))

    def networkDefineXML(self, xml):
        return self._net(self._conn.networkDefineXML(xml))

    def listAllNetworks(self, *args):
        return [self._net(n) for n in self._conn.listAllNetworks(*args)]


@pytest.fixture
def hosts(tmp_path, monkeypatch):
    """Three hosts, each its own test driver (a node file of its own: no network but the file's)."""
    conns = {}
    for name in ("hv1", "hv2", "hv3"):
        node = tmp_path / f"{name}.xml"
        node.write_text("<node/>")
        conns[name] = NoInactiveFlag(libvirt.open(f"test://{node}"))

    @contextlib.contextmanager
    def open_host(host, uri=None):
        yield conns[host.name]

    monkeypatch.setattr(virt, "open_host", open_host)
    path = tmp_path / "inv.yaml"
    path.write_text("hosts:\n  hv1: {address: 192.0.2.1}\n  hv2: {address: 192.0.2.2}\n  hv3: {address: 192.0.2.3}\n")
    yield types.SimpleNamespace(inventory=inventory.load(path), conns=conns)
    for conn in conns.values():
        conn.close()


def test_a_network_defined_on_one_host_is_found_and_ensure_changes_nothing(hosts):
    inv = hosts.inventory
    assert networks.ensure_network(hosts.conns["hv2"], LAN)[0]  # what `net.define --name lan --cidr ...` does
    candidates = inv.hypervisors()
    spec = vms.network_spec("lan", candidates[0], hosts=vms.network_hosts(candidates, inv))
    assert (spec.name, spec.cidr, spec.gateway, spec.dhcp_start) == ("lan", LAN.cidr, LAN.gateway, LAN.dhcp_start)
    changed, message = networks.ensure_network(hosts.conns["hv2"], spec)
    assert not changed, message  # the host that has it keeps it as it is
    assert networks.ensure_network(hosts.conns["hv1"], spec, check=True)[1].startswith("network lan: would define")
    # a start on hv3 alone still finds it on the other hypervisors
    spec3 = vms.network_spec("lan", inv.hosts["hv3"], hosts=vms.network_hosts([inv.hosts["hv3"]], inv))
    assert spec3 == spec
    # the inventory's own networks still come first, without asking any host
    assert vms.network_spec("cloudops", inv.hosts["hv1"]) == networks.DEFAULT_NETWORK


def test_an_unknown_network_names_where_it_looked(hosts):
    inv = hosts.inventory
    with pytest.raises(CloudopsError) as exc:
        vms.network_spec("nosuch", inv.hosts["hv1"], hosts=inv.hypervisors())
    assert str(exc.value) == ("unknown network 'nosuch': not in the inventory's networks (cloudops) nor defined on "
                              "hv1, hv2, hv3")
    with pytest.raises(CloudopsError, match="invalid network name"):
        vms.network_spec("No<Such>", inv.hosts["hv1"], hosts=inv.hypervisors())


def test_two_hosts_that_disagree_are_refused(hosts):
    inv = hosts.inventory
    networks.ensure_network(hosts.conns["hv1"], LAN)
    networks.ensure_network(hosts.conns["hv3"], networks.NetworkSpec(name="lan", cidr="192.168.172.0/24"))
    with pytest.raises(CloudopsError) as exc:
        vms.network_spec("lan", inv.hosts["hv1"], hosts=inv.hypervisors())
    assert str(exc.value).startswith("network lan differs between hosts: cidr is 192.168.171.0/24 on hv1 but "
                                     "192.168.172.0/24 on hv3")
