"""bench/peers_config.py: the peers' config files, the address read from vl's metadata, kcli's table, medians."""

import configparser
import importlib.util
from pathlib import Path

import pytest
import yaml

SPEC = importlib.util.spec_from_file_location(
    "peers_config", Path(__file__).resolve().parents[2] / "bench" / "peers_config.py")
pc = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(pc)


def test_uri_verifies_the_host_key():
    uri = pc.libvirt_uri("10.1.0.11", "/k/id")
    assert uri == "qemu+ssh://root@10.1.0.11/system?keyfile=/k/id"
    assert "no_verify" not in uri


def test_vl_config_reads_back():
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(pc.vl_config("qemu+ssh://root@a/system?keyfile=/k", "192.168.170.0/24", "/k.pub", "p%w"))
    main = parser["main"]
    assert main["libvirt_uri"] == "qemu+ssh://root@a/system?keyfile=/k"
    assert main["network_cidr"] == "192.168.170.0/24"
    assert main["ssh_key_file"] == "/k.pub"
    assert main["root_password"] == "p%w"
    assert main["storage_pool"] == main["network_name"] == "virt-lightning"


def test_kcli_config_one_client_per_host():
    config = yaml.safe_load(pc.kcli_config([("hv1", "10.0.0.11"), ("hv2", "10.0.0.12")], "/k", "net1"))
    assert config["default"]["client"] == "hv1"
    assert config["default"]["nets"] == ["net1"]
    assert config["hv2"] == {"type": "kvm", "host": "10.0.0.12", "user": "root", "protocol": "ssh",
                             "url": "qemu+ssh://root@10.0.0.12/system?keyfile=/k"}
    assert set(config) == {"default", "hv1", "hv2"}


def test_vl_address_from_metadata():
    xml = """<domain type='qemu'><name>x</name><metadata>
      <vl:distro xmlns:vl="distro" name="debian"/>
      <vl:ipv4 xmlns:vl="ipv4" name="192.168.170.5/24"/></metadata></domain>"""
    assert pc.vl_address(xml) == "192.168.170.5"
    assert pc.vl_address("<domain><name>x</name></domain>") is None


def test_kcli_table_names():
    text = """+--------+------+--------+-----+
| Name   | Host | Status | Ips |
+--------+------+--------+-----+
| bpl-1-1 | hv1  | down   |     |
| bpl-2-1 | hv2  | down   |     |
+--------+------+--------+-----+
"""
    assert pc.kcli_table_names(text) == ["bpl-1-1", "bpl-2-1"]
    assert pc.kcli_table_names("+--+\n| Name |\n+--+\n+--+\n") == []


def test_summarize_ratios_to_cloudops():
    out = pc.summarize({"cloudops": [2.0, 4.0, 3.0], "kcli": [9.0, 6.0, 7.5], "vl": []})
    assert out["cloudops"] == {"median": 3.0, "min": 2.0, "max": 4.0, "n": 3, "ratio": 1.0}
    assert out["kcli"]["median"] == 7.5 and out["kcli"]["ratio"] == pytest.approx(2.5)
    assert out["vl"] == {"median": None, "min": None, "max": None, "n": 0, "ratio": None}
