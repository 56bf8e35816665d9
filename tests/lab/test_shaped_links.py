"""Shaped lab links (issue 15): `lab.up --link-rate` puts a rate limit on both ends of every host's link,
and on the control machine's uplink (the lab bridge's egress).

Oracles outside cloudops: `tc -s qdisc` on both ends (the qdisc, its rate, and the bytes it passed with
"overlimits": packets it had to hold back) after a transfer each way over SSH; the lab's inventory
names the shaping for the benchmarks. Bad input is refused in one line with nothing made.
"""

import subprocess

import pytest
import yaml

from cloudops.lab import links
from tests.conftest import TEST_PREFIX, invoke, ok_json, one_line_error, require_root

PREFIX = TEST_PREFIX + "l"
SIZE = 6_000_000  # bytes each way: half a second at 100mbit, so the shaper holds packets back


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{PREFIX}-hv")]


@pytest.fixture(scope="module")
def shaped():
    require_root()
    try:
        yield ok_json(invoke("lab.up", "--hosts", "1", "--bare", "--prefix", PREFIX, "--link-rate", "100mbit",
                             "--json"))
    finally:
        invoke("lab.down", "--prefix", PREFIX)
        assert namespaces() == []


def test_both_ends_of_a_hosts_link_are_held_to_the_rate(shaped):
    assert shaped["link"]["shaping"] == "100mbit each way, no added delay, control uplink 100mbit"
    assert shaped["link"]["qdiscs"] == {"hv1": {"to_host": "tbf", "from_host": "tbf"}}
    assert shaped["link"]["control_uplink"] == "tbf"
    host = shaped["hosts"][0]
    inventory = yaml.safe_load(open(shaped["inventory"]))
    assert inventory["vars"]["lab_link"] == "100mbit each way, no added delay, control uplink 100mbit"
    ssh = ["ssh", "-F", shaped["ssh_config"], host["address"]]
    subprocess.run([*ssh, "cat > /dev/null"], input=b"\0" * SIZE, check=True, timeout=120)
    subprocess.run([*ssh, f"head -c {SIZE} /dev/zero"], capture_output=True, check=True, timeout=120)
    held = {}
    for end, argv in (("to_host", ["tc", "-s", "qdisc", "show", "dev", f"{PREFIX}-hv1"]),
                      ("from_host", ["ip", "netns", "exec", f"{PREFIX}-hv1", "tc", "-s", "qdisc", "show", "dev",
                                     "eth0"]),
                      ("uplink", ["tc", "-s", "qdisc", "show", "dev", f"{PREFIX}-br"])):  # the control machine's
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        assert "qdisc tbf" in out and "rate 100Mbit" in out, out
        sent = int(out.split("Sent ")[1].split()[0])
        held[end] = int(out.split("overlimits ")[1].split()[0])
        assert sent >= SIZE, out  # each direction's transfer crossed its shaper
    # ...and was held back: the download by hv1's eth0, the upload by the control uplink or, when that one
    # had already paced it to the rate, by the machine's end of hv1's link (the same rate: it may never wait)
    assert held["from_host"] > 0 and held["uplink"] + held["to_host"] > 0, held


def test_status_shows_the_shaping(shaped):
    proc = invoke("lab.status", "--prefix", PREFIX)
    assert proc.returncode == 0, proc.stderr
    assert ("links: 100mbit each way, no added delay, control uplink 100mbit (hv1: tbf in, tbf out; "
            "control uplink: tbf)") in proc.stdout


@pytest.mark.parametrize("args, text", [
    (["--link-rate", "5"], "link rate '5': a number and bit, kbit, mbit or gbit"),
    (["--link-rate", "200gbit"], "from 1mbit to 100gbit"),
    (["--link-delay", "1ms"], "--link-delay goes with --link-rate"),
    (["--link-rate", "1gbit", "--link-delay", "soon"], "link delay 'soon'"),
])
def test_bad_shaping_is_one_line_and_makes_no_lab(args, text):
    require_root()
    one_line_error(invoke("lab.up", "--hosts", "1", "--bare", "--prefix", PREFIX + "x", *args), text)
    assert not subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.count(f"{PREFIX}x-")


def test_a_delay_is_netems_or_refused_in_one_line_by_a_kernel_without_it():
    require_root()
    args = ["lab.up", "--hosts", "1", "--bare", "--prefix", PREFIX + "x", "--link-rate", "1gbit", "--link-delay",
            "0.25ms", "--json"]
    if not links.netem_available():  # this machine's kernel (no sch_netem)
        one_line_error(invoke(*args), "needs tc's netem qdisc")
        return
    try:
        assert ok_json(invoke(*args))["link"]["qdiscs"]["hv1"] == {"to_host": "netem", "from_host": "netem"}
    finally:
        invoke("lab.down", "--prefix", PREFIX + "x")


def test_a_lab_whose_subnet_is_already_routed_is_refused_before_anything_is_made(shaped):
    from cloudops.errors import CloudopsError
    from cloudops.lab import hosts as lab_lib

    taken = lab_lib.load(PREFIX).subnet  # routed by the shaped lab's bridge
    with pytest.raises(CloudopsError, match=f"subnet {taken} is already routed on this machine"):
        lab_lib.up(1, bare=True, prefix=PREFIX + "y", subnet=taken)
    assert lab_lib.status(PREFIX + "y") == {"prefix": PREFIX + "y", "up": False, "hosts": [], "stale_namespaces": []}
    assert not lab_lib.lab_dir(PREFIX + "y").exists()


def test_a_lab_whose_default_subnet_is_taken_comes_up_on_the_next_free_one(shaped):
    from cloudops.lab import hosts as lab_lib

    taken = lab_lib.load(PREFIX).subnet
    # a prefix that hashes to the subnet the shaped lab routes (two prefixes can: 50 subnets)
    twin = next(p for p in (f"{TEST_PREFIX[:2]}z{i}" for i in range(1000)) if lab_lib.default_subnet(p) == taken)
    try:
        other = lab_lib.up(1, bare=True, prefix=twin)
        assert other.subnet != taken and other.subnet in lab_lib.candidate_subnets(twin)[1:]
        routes = subprocess.run(["ip", "route", "show", "exact", other.subnet], capture_output=True, text=True)
        assert f"{twin}-br" in routes.stdout  # the machine routes the new subnet to the new lab's bridge
        assert lab_lib.status(twin)["up"]
    finally:
        lab_lib.down(twin)
