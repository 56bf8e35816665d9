"""The etcd state store's settings: what is refused before any member is asked (no etcd needed)."""

import os

import pytest

from cloudops.state import open_store
from cloudops.state.etcd import EtcdStore
from cloudops.state.store import StoreError, StoreUnavailable


@pytest.fixture
def tls(tmp_path):
    for name in ("ca.pem", "client.pem"):
        (tmp_path / name).write_text("-----BEGIN CERTIFICATE-----\n")
    key = tmp_path / "client-key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    os.chmod(key, 0o600)
    return {"ca": str(tmp_path / "ca.pem"), "cert": str(tmp_path / "client.pem"), "key": str(key)}


def test_settings_open_an_etcd_store(tls):
    store = open_store({"backend": "etcd", "endpoints": ["https://10.0.0.1:2379", "https://10.0.0.2"], **tls,
                        "prefix": "team-a"})
    assert isinstance(store, EtcdStore)
    assert store.endpoints == ["https://10.0.0.1:2379", "https://10.0.0.2"] and store.prefix == "/team-a/"
    assert "10.0.0.1" in store.describe() and store.timeout == 5
    assert EtcdStore("https://a:2379, https://b:2379", **tls).endpoints == ["https://a:2379", "https://b:2379"]


@pytest.mark.parametrize("settings, message", [
    ({}, "needs endpoints"),
    ({"endpoints": ["10.0.0.1:2379"]}, "not an https://HOST:PORT URL"),
    ({"endpoints": ["http://10.0.0.1:2379"]}, "plain http"),
    ({"endpoints": ["https://a:2379"], "ca": "/nonexistent/ca.pem"}, "ca file /nonexistent/ca.pem does not exist"),
])
def test_bad_settings_are_one_line(settings, message):
    with pytest.raises(StoreError, match=message) as caught:
        open_store({"backend": "etcd", **settings})
    assert "\n" not in str(caught.value)


def test_a_client_key_needs_its_certificate_and_privacy(tls):
    with pytest.raises(StoreError, match="both cert and key"):
        EtcdStore(["https://a:2379"], ca=tls["ca"], key=tls["key"])
    os.chmod(tls["key"], 0o644)
    with pytest.raises(StoreError, match="readable by everyone"):
        EtcdStore(["https://a:2379"], **tls)


def test_nothing_listening_is_store_unavailable_naming_the_endpoints():
    """127.0.0.1:9 (discard) refuses at once on this machine: one line naming every endpoint."""
    store = EtcdStore(["http://127.0.0.1:9", "http://localhost:9"], timeout=2)
    with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1:9.*localhost:9") as caught:
        store.get("images/a")
    assert "\n" not in str(caught.value)
