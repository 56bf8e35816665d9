"""cloudops.net.probe's side of the probes: what it asks the host, and what it makes of the JSON answer.
(The packets themselves are sent in tests/lab/test_net_probe.py, on the lab's bridges.)"""

import json
import types

import pytest

from cloudops.errors import CloudopsError
from cloudops.net import ipam, packets, probe
from cloudops.net.networks import NetworkSpec

LAN = NetworkSpec(name="lan", mode="bridge", bridge="lan0", cidr="10.9.1.0/24", gateway="10.9.1.1")


class FakeHost:
    """A host's SSH connection that answers every command with one canned result and keeps the commands."""

    def __init__(self, stdout="", stderr="", exited=0):
        self.result = types.SimpleNamespace(stdout=stdout, stderr=stderr, exited=exited, ok=exited == 0)
        self.commands = []

    def run(self, command, **kwargs):
        self.commands.append((command, kwargs))
        return self.result


def test_an_address_nobody_answers_for_is_free():
    hv = FakeHost(json.dumps({"answers": {}}))
    probe.ensure_free(hv, "hv1", LAN, "10.9.1.120", requested=False)
    command, kwargs = hv.commands[0]
    assert command.startswith("/usr/bin/python3 -c ") and command.endswith("arp lan0 10.9.1.120 --timeout 1.0 --tries 2 --dhcp-wait 5.0")
    assert kwargs["timeout"] > 0 and kwargs["warn"] is True  # bounded, and a failure is read, not raised


@pytest.mark.parametrize("requested, hint", [(True, "choose another --ip"), (False, "reserved addresses")])
def test_an_answered_address_is_refused_naming_the_mac(requested, hint):
    hv = FakeHost(json.dumps({"answers": {"10.9.1.120": ["52:54:00:aa:bb:cc"]}}))
    with pytest.raises(CloudopsError) as err:
        probe.ensure_free(hv, "hv1", LAN, "10.9.1.120", requested=requested)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("address 10.9.1.120 on network lan is taken: 52:54:00:aa:bb:cc answered ARP on hv1's lan0")
    assert hint in message


@pytest.mark.parametrize("stderr, reason", [
    ("Traceback ...\nModuleNotFoundError: No module named 'scapy'\n", "python3-scapy is not installed there"),
    ("no bridge lan0 on this host\n", "no bridge lan0 on this host"),
])
def test_a_failed_probe_is_one_line_naming_the_host(stderr, reason):
    hv = FakeHost(stderr=stderr, exited=1)
    with pytest.raises(CloudopsError) as err:
        probe.ensure_free(hv, "hv2", LAN, "10.9.1.120", requested=False)
    assert str(err.value).startswith(f"network probe on hv2 (arp on lan0) failed: {reason}")
    assert "\n" not in str(err.value)


def test_probe_network_names_what_cloudops_knows():
    ipam.allocate(LAN, "web1", ip="10.9.1.120")
    answers = [json.dumps({"offers": [],
                           "answers": {"10.9.1.120": ["52:54:00:00:00:01"], "10.9.1.1": ["02:00:00:00:00:01"],
                                       "10.9.1.77": ["02:00:00:00:00:77"]}})]

    class Scripted(FakeHost):
        def run(self, command, **kwargs):
            self.commands.append(command)
            return types.SimpleNamespace(stdout=answers.pop(0), stderr="", exited=0, ok=True)

    hv = Scripted()
    report = probe.probe_network(hv, "hv1", LAN).to_dict()
    (command,) = hv.commands  # one run on the host: the discover and the scan from one port
    assert " survey lan0 10.9.1.0/24 " in command
    assert [(a["ip"], a["known"]) for a in report["answering"]] == [
        ("10.9.1.1", "gateway"), ("10.9.1.77", None), ("10.9.1.120", "web1")]
    assert report["unknown"] == [{"ip": "10.9.1.77", "macs": ["02:00:00:00:00:77"], "known": None}]
    assert report["dhcp_servers"] == []


def test_the_host_script_refuses_a_scan_too_big_and_a_bad_address(capsys):
    assert packets.main(["scan", "lan0", "10.0.0.0/16"]) == 1
    assert "more than 1024 addresses" in capsys.readouterr().err
    assert packets.main(["arp", "lan0", "10.0.0.300"]) == 1
    assert capsys.readouterr().err == "not an IPv4 address: '10.0.0.300'\n"


def test_the_host_script_imports_nothing_of_cloudops():
    text = probe.SCRIPT.read_text()
    assert "cloudops" not in "".join(line for line in text.splitlines() if line.startswith(("import", "from")))


def test_a_macs_addresses_are_those_that_answer_from_it_in_one_scan_of_the_subnet():
    hv = FakeHost(json.dumps({"answers": {"10.9.1.120": ["52:54:00:aa:bb:cc"], "10.9.1.9": ["52:54:00:aa:bb:cc"],
                                          "10.9.1.1": ["02:00:00:00:00:01"]}}))
    found = probe.addresses_of(hv, "hv1", LAN, ["52:54:00:AA:BB:CC", "52:54:00:00:00:99"])
    assert found == {"52:54:00:aa:bb:cc": ["10.9.1.9", "10.9.1.120"], "52:54:00:00:00:99": []}  # in address order
    assert len(hv.commands) == 1 and " scan lan0 10.9.1.0/24 " in hv.commands[0][0]


def test_a_network_without_a_subnet_cannot_be_scanned_for_an_address():
    bare = NetworkSpec(name="wan", mode="bridge", bridge="br9")
    with pytest.raises(CloudopsError, match="network wan has no cidr"):
        probe.addresses_of(FakeHost(), "hv1", bare, ["52:54:00:aa:bb:cc"])
