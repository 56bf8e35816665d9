"""NetworkSpec validation, specs from inventory data, and the rendered network XML checked by XPath."""

import xml.etree.ElementTree as ET

import pytest

from cloudops.errors import CloudopsError
from cloudops.net import networks
from cloudops.net.networks import DEFAULT_NETWORK, NetworkSpec


def xml_of(spec, **kwargs) -> ET.Element:
    return ET.fromstring(networks.network_xml(spec, **kwargs))


@pytest.mark.parametrize("name", [
    "a<b", "x'y", "n;rm", "n$(id)", "n`id`", "n&m", 'q"q', "with space", "UPPER", "1starts-with-digit", "",
    "-dash", "a" * 32, "under_score", "dot.ted", "slash/x",
])
def test_bad_names_are_one_line_errors(name):
    with pytest.raises(CloudopsError) as exc:
        NetworkSpec(name=name, cidr="10.0.0.0/24")
    assert "invalid network name" in str(exc.value) and "\n" not in str(exc.value)


def test_longest_name_and_derived_bridge_fit_ifnamsiz():
    spec = NetworkSpec(name="a" + "b" * 30, cidr="10.0.0.0/24")
    assert len(spec.bridge) <= 15 and spec.bridge.startswith("co-")
    assert NetworkSpec(name="short", cidr="10.0.0.0/24").bridge == "co-short"
    # two long names with the same start still get distinct bridges
    assert networks.derived_bridge("abcdefghij-one") != networks.derived_bridge("abcdefghij-two")


@pytest.mark.parametrize("cidr, message", [
    ("10.0.0.0", "lacks a prefix length"),
    ("10.0.0.5/24", "host bits set; did you mean 10.0.0.0/24"),
    ("10.0.0.0/33", "invalid cidr"),
    ("300.0.0.0/24", "invalid cidr"),
    ("fd00::/64", "IPv6"),
    ("10.0.0.0/31", "prefix length between"),
    ("16.0.0.0/4", "prefix length between"),
    ("nonsense", "invalid cidr"),
])
def test_bad_cidrs(cidr, message):
    with pytest.raises(CloudopsError, match=message):
        NetworkSpec(name="n", cidr=cidr)


def test_defaults_gateway_first_host_and_upper_half_range():
    spec = NetworkSpec(name="n", cidr="10.1.2.0/24")
    assert (spec.gateway, spec.dhcp_start, spec.dhcp_end) == ("10.1.2.1", "10.1.2.128", "10.1.2.254")
    pool = spec.static_pool()
    assert str(pool[0]) == "10.1.2.2" and str(pool[-1]) == "10.1.2.127" and len(pool) == 126


def test_default_range_steps_around_a_gateway_at_its_edge():
    spec = NetworkSpec(name="n", cidr="10.1.2.0/24", gateway="10.1.2.254")
    assert (spec.dhcp_start, spec.dhcp_end) == ("10.1.2.128", "10.1.2.253")


@pytest.mark.parametrize("kwargs, message", [
    ({"dhcp_start": "10.0.0.10", "dhcp_end": "10.0.1.20"}, "not a host address"),
    ({"dhcp_start": "10.0.0.50", "dhcp_end": "10.0.0.20"}, "start after end"),
    ({"dhcp_start": "10.0.0.1", "dhcp_end": "10.0.0.20"}, "contains the gateway"),
    ({"gateway": "10.0.0.30", "dhcp_start": "10.0.0.10", "dhcp_end": "10.0.0.40"}, "contains the gateway"),
    ({"dhcp_start": "10.0.0.10"}, "both dhcp_start and dhcp_end"),
    ({"gateway": "10.0.0.0"}, "not a host address"),
    ({"gateway": "10.0.0.255"}, "not a host address"),
    ({"gateway": "10.0.9.1"}, "not a host address"),
    ({"dhcp_start": "10.0.0.x", "dhcp_end": "10.0.0.9"}, "invalid dhcp_start"),
    ({"mode": "routed"}, "unknown mode"),
    ({"bridge": "x" * 16}, "invalid bridge device"),
    ({"bridge": "br0;reboot"}, "invalid bridge device"),
    ({"autostart": "yes"}, "autostart must be true or false"),
])
def test_bad_ranges_and_options(kwargs, message):
    with pytest.raises(CloudopsError, match=message):
        NetworkSpec(name="n", cidr="10.0.0.0/24", **kwargs)


def test_bridge_mode_needs_a_device_and_nat_needs_a_cidr():
    with pytest.raises(CloudopsError, match="bridge mode needs the host's bridge device"):
        NetworkSpec(name="lan", mode="bridge", cidr="10.0.0.0/24")
    with pytest.raises(CloudopsError, match="needs a cidr"):
        NetworkSpec(name="n", mode="nat")
    lan = NetworkSpec(name="lan", mode="bridge", bridge="br0")
    assert lan.cidr is None and lan.static_pool() == []


def test_reservations_are_checked():
    base = dict(name="n", cidr="10.0.0.0/24")
    with pytest.raises(CloudopsError, match="invalid MAC"):
        NetworkSpec(**base, reservations=({"mac": "zz:54:00:00:00:01", "ip": "10.0.0.5", "name": "a"},))
    with pytest.raises(CloudopsError, match="invalid MAC"):  # multicast
        NetworkSpec(**base, reservations=({"mac": "01:54:00:00:00:01", "ip": "10.0.0.5", "name": "a"},))
    with pytest.raises(CloudopsError, match="invalid host name"):
        NetworkSpec(**base, reservations=({"mac": "52:54:00:00:00:01", "ip": "10.0.0.5", "name": "a<b"},))
    with pytest.raises(CloudopsError, match="not a free host address"):
        NetworkSpec(**base, reservations=({"mac": "52:54:00:00:00:01", "ip": "10.0.0.1", "name": "gw"},))
    with pytest.raises(CloudopsError, match="share the ip"):
        NetworkSpec(**base, reservations=({"mac": "52:54:00:00:00:01", "ip": "10.0.0.5", "name": "a"},
                                          {"mac": "52:54:00:00:00:02", "ip": "10.0.0.5", "name": "b"}))


def test_default_network():
    assert DEFAULT_NETWORK.name == "cloudops" and DEFAULT_NETWORK.mode == "nat"
    assert DEFAULT_NETWORK.cidr == "192.168.150.0/24" and DEFAULT_NETWORK.autostart


# ---------------------------------------------------------------- specs_from

def test_specs_from_nothing_configured_is_the_default():
    assert networks.specs_from(None) == [DEFAULT_NETWORK]
    assert networks.specs_from({"pool_path": "/x"}) == [DEFAULT_NETWORK]
    assert networks.specs_from({"networks": []}) == []


def test_specs_from_inventory_vars():
    specs = networks.specs_from({"networks": [
        {"name": "front", "cidr": "10.10.0.0/24"},
        {"name": "back", "mode": "isolated", "cidr": "10.10.1.0/24", "dhcp_start": "10.10.1.200",
         "dhcp_end": "10.10.1.250", "reservations": [{"mac": "52:54:00:aa:bb:cc", "ip": "10.10.1.5", "name": "db"}]},
        {"name": "lan", "mode": "bridge", "bridge": "br0"},
    ]})
    assert [s.name for s in specs] == ["front", "back", "lan"]
    assert specs[1].mode == "isolated" and specs[1].reservations[0].ip == "10.10.1.5"


@pytest.mark.parametrize("networks_value, message", [
    ([{"name": "a", "cidr": "10.0.0.0/24"}, {"name": "b", "cidr": "10.0.0.0/25"}], "subnets of a .* and b .* overlap"),
    ([{"name": "a", "cidr": "10.0.0.0/16"}, {"name": "b", "cidr": "10.0.200.0/24"}], "DHCP ranges of a .* and b .* overlap"),
    ([{"name": "a", "cidr": "10.0.0.0/24"}, {"name": "a", "cidr": "10.0.1.0/24"}], "a is defined twice"),
    ([{"name": "a", "cidr": "10.0.0.0/24", "bridge": "br9"}, {"name": "b", "cidr": "10.0.1.0/24", "bridge": "br9"}],
     "both use bridge br9"),
    ([{"name": "a", "cidr": "10.0.0.0/24", "colour": "red"}], r"networks\[0\]: unknown key 'colour'"),
    ([{"cidr": "10.0.0.0/24"}], r"networks\[0\]: missing 'name'"),
    ([{"name": "ok", "cidr": "10.0.0.0/24"}, {"name": "b;x", "cidr": "10.0.1.0/24"}], r"networks\[1\]: invalid network name"),
    (["front"], "must be a mapping"),
    ({"front": {}}, "must be a list"),
])
def test_specs_from_rejects(networks_value, message):
    with pytest.raises(CloudopsError, match=message) as exc:
        networks.specs_from({"networks": networks_value})
    assert "\n" not in str(exc.value)


# ---------------------------------------------------------------- the template

def test_nat_xml():
    spec = NetworkSpec(name="front", cidr="10.10.0.0/24", reservations=(
        {"mac": "52:54:00:aa:bb:cc", "ip": "10.10.0.5", "name": "web"},))
    root = xml_of(spec)
    assert root.tag == "network" and root.findtext("name") == "front"
    assert root.find("forward").get("mode") == "nat"
    assert root.find("bridge").get("name") == "co-front"
    ip = root.find("ip")
    assert (ip.get("address"), ip.get("prefix")) == ("10.10.0.1", "24")
    assert root.find("ip/dhcp/range").attrib == {"start": "10.10.0.128", "end": "10.10.0.254"}
    assert root.find("ip/dhcp/host").attrib == {"mac": "52:54:00:aa:bb:cc", "ip": "10.10.0.5", "name": "web"}
    assert root.find("uuid") is None and root.find("mac") is None
    assert networks.owned(root) == {"mode": "nat", "bridge": "co-front", "gateway": "10.10.0.1", "prefix": 24,
                                    "dhcp_range": "10.10.0.128-10.10.0.254"}


def test_isolated_xml_has_no_forward():
    root = xml_of(NetworkSpec(name="back", mode="isolated", cidr="10.10.1.0/28"))
    assert root.find("forward") is None
    assert root.find("ip/dhcp/range").attrib == {"start": "10.10.1.8", "end": "10.10.1.14"}
    assert networks.owned(root)["mode"] == "isolated"


def test_bridge_xml_has_no_ip_and_no_dhcp():
    root = xml_of(NetworkSpec(name="lan", mode="bridge", bridge="br0", cidr="192.0.2.0/24"))
    assert root.find("forward").get("mode") == "bridge"
    assert root.find("bridge").attrib == {"name": "br0"}
    assert root.find("ip") is None and root.find(".//dhcp") is None


def test_redefinition_keeps_uuid_and_mac():
    root = xml_of(DEFAULT_NETWORK, uuid="0b6b2b8e-1d4c-4c1e-9e0a-6f7b1f1e2a3b", mac="52:54:00:01:02:03")
    assert root.findtext("uuid") == "0b6b2b8e-1d4c-4c1e-9e0a-6f7b1f1e2a3b"
    assert root.find("mac").get("address") == "52:54:00:01:02:03"


def test_values_cannot_inject_markup():
    # validation refuses markup first; the template escapes anyway (autoescape for .xml.j2)
    spec = NetworkSpec(name="n", cidr="10.0.0.0/24")
    object.__setattr__(spec, "bridge", 'x"/><evil/><bridge name="y')
    root = xml_of(spec)
    assert root.find("evil") is None and root.find("bridge").get("name") == 'x"/><evil/><bridge name="y'


def test_owned_reads_netmask_form():
    root = ET.fromstring("<network><name>d</name><forward mode='nat'/><bridge name='virbr0'/>"
                         "<ip address='192.168.122.1' netmask='255.255.255.0'><dhcp>"
                         "<range start='192.168.122.2' end='192.168.122.254'/></dhcp></ip></network>")
    assert networks.owned(root)["prefix"] == 24
    assert str(networks.subnet_of(root)) == "192.168.122.0/24"


def test_reservation_xml_is_escaped_element():
    res = networks.Reservation("52:54:00:AA:BB:CC", "10.0.0.5", "web")
    assert res.mac == "52:54:00:aa:bb:cc"
    assert ET.fromstring(res.to_xml()).attrib == {"mac": "52:54:00:aa:bb:cc", "ip": "10.0.0.5", "name": "web"}
