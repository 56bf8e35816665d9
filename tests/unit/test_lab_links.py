"""The lab's link shaping options: parsed and bounded in one line, and the qdisc each asks tc for."""

import pytest

from cloudops.errors import CloudopsError
from cloudops.lab import links


@pytest.mark.parametrize("text, bps", [("1gbit", 10**9), ("2.5gbit", 25 * 10**8), ("100MBIT", 10**8),
                                       ("1000kbit", 10**6)])
def test_rates_are_tcs_units(text, bps):
    assert links.parse_rate(text) == bps


@pytest.mark.parametrize("text", ["5", "1gb", "fast", "500kbit", "101gbit", "-1gbit"])
def test_a_bad_rate_is_one_line(text):
    with pytest.raises(CloudopsError, match="link rate") as info:
        links.parse_rate(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, ms", [("0.25ms", 0.25), ("100us", 0.1), ("1000ms", 1000.0)])
def test_delays_in_ms_or_us(text, ms):
    assert links.parse_delay(text) == ms


@pytest.mark.parametrize("text", ["0ms", "2s", "1001ms", "soon"])
def test_a_bad_delay_is_one_line(text):
    with pytest.raises(CloudopsError, match="link delay"):
        links.parse_delay(text)


def test_no_options_is_an_unshaped_lab_and_a_delay_needs_a_rate():
    assert links.spec(None, None) is None
    assert links.describe(None).startswith("unshaped")
    with pytest.raises(CloudopsError, match="--link-delay goes with --link-rate"):
        links.spec(None, "1ms")


def test_a_rate_alone_is_tbf_with_a_burst_for_a_kernel_tick_and_a_gso_packet():
    link = links.spec("1gbit", None)
    assert links.describe(link) == "1gbit each way, no added delay, control uplink 1gbit"
    assert links.qdisc(link) == ["tbf", "rate", "1000000000", "burst", "500000", "latency", "50ms"]
    assert links.qdisc(links.spec("10mbit", None))[4] == str(128 * 1024)


def test_a_delay_is_netems_with_the_rate():
    link = {"rate": "1gbit", "rate_bps": 10**9, "delay": "0.25ms", "delay_ms": 0.25}
    assert links.qdisc(link)[:5] == ["netem", "delay", "0.25ms", "rate", "1000000000"]
    assert links.describe(link) == "1gbit each way, 0.25ms added each way per link, control uplink 1gbit"


def test_a_prefix_asks_for_its_own_subnet_first_then_every_other_lab_subnet_once():
    from cloudops.lab import hosts as lab_lib

    first, *rest = lab_lib.candidate_subnets("abc")
    assert first == lab_lib.default_subnet("abc")
    assert len({first, *rest}) == 50 and all(s.startswith("10.2") and s.endswith(".0.0/24") for s in rest)
    assert {int(s.split(".")[1]) for s in [first, *rest]} == set(range(200, 250))
    assert lab_lib.candidate_subnets("cot") == ["10.252.0.0/24"]  # a fixed subnet stays the only one
