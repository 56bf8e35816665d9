"""The etcd state store against the store contract, on a real 3-member etcd cluster with TLS, and its faults.

No hypervisor lab is needed: each cluster is only the lab's etcd part (cloudops/lab/etcd.py) under a
prefix of this test run, taken down at the end. Faults are real: members are killed by pid.
"""

import json
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest
import yaml

from cloudops.lab import etcd as lab_etcd
from cloudops.state import open_store
from cloudops.state.etcd import EtcdStore
from cloudops.state.store import LockBusy, StoreError, StoreUnavailable
from tests import state_contract
from tests.conftest import require_root

RUN = f"et{os.getpid() % 100}"  # lab prefixes of this run: et<NN><letter>, at most 5 characters


def _cluster(letter: str):
    require_root()
    prefix = RUN + letter
    lab_etcd.up(prefix, 3)
    return prefix


@pytest.fixture(scope="module")
def cluster():
    """A healthy cluster shared by the contract checks (each check works under a prefix of its own)."""
    prefix = _cluster("a")
    yield prefix
    lab_etcd.down(prefix)


@pytest.fixture
def broken():
    """A cluster of one test's own, for killing members."""
    prefix = _cluster("f")
    yield prefix
    lab_etcd.down(prefix)


def _store(prefix: str, store_prefix: str, **overrides) -> EtcdStore:
    return EtcdStore.from_settings({**lab_etcd.settings(prefix), "prefix": store_prefix, **overrides})


def _fresh(prefix: str):
    """An empty store (a prefix of its own) and a function that opens a second handle on it."""
    store_prefix = f"/cloudops-test/{uuid.uuid4().hex}/"
    return _store(prefix, store_prefix), lambda: _store(prefix, store_prefix)


def _member_of(prefix: str, endpoint: str) -> str:
    return next(m["name"] for m in lab_etcd.status(prefix)["members"] if m["endpoint"] == endpoint)


def _one_line_error(exc: Exception, endpoints) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text, text
    assert any(e in text for e in endpoints), text
    return text


def _within(seconds: float, call):
    """Run ``call`` in a thread; fail when it has not returned or raised after ``seconds`` (a generous bound)."""
    outcome = {}

    def run():
        try:
            outcome["result"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the call was still waiting after {seconds:.0f}s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


# ---------------------------------------------------------------- the contract

@pytest.mark.parametrize("check", state_contract.CHECKS, ids=lambda f: f.__name__)
def test_contract(check, cluster):
    store, other = _fresh(cluster)
    check(store, other)


def test_corrupt_values_are_refused_naming_the_key(cluster):
    from etcd3gw.client import Etcd3Client

    store, _other = _fresh(cluster)
    settings = lab_etcd.settings(cluster)
    host, port = settings["endpoints"][0].removeprefix("https://").split(":")
    raw = Etcd3Client(host=host, port=int(port), protocol="https", ca_cert=settings["ca"],
                      cert_cert=settings["cert"], cert_key=settings["key"], timeout=5)
    raw.session.trust_env = False  # the cluster's CA, not $REQUESTS_CA_BUNDLE

    def write_raw(key, value):
        raw.put(store.prefix + key, value)

    state_contract.check_corrupt_value_names_the_key(store, None, write_raw)


def test_the_lab_config_opens_the_store(cluster):
    """state.yaml, as lab.up writes it, is what `invoke -f` or cloudops.yaml would give open_store."""
    config = yaml.safe_load(lab_etcd.config_path(cluster).read_text())["state"]
    assert config["backend"] == "etcd" and len(config["endpoints"]) == 3
    store = open_store({**config, "prefix": f"/cloudops-test/{uuid.uuid4().hex}/"})
    assert isinstance(store, EtcdStore)
    assert store.create("maintenance/hv1", {"on": True}) and store.value("maintenance/hv1") == {"on": True}
    for name in ("ca-key.pem", "client-key.pem", "etcd1/server-key.pem"):
        assert oct((lab_etcd.etcd_dir(cluster) / name).stat().st_mode & 0o777) == "0o600", name


def test_a_second_up_says_it_is_already_up(cluster):
    pids = [m["pid"] for m in lab_etcd.status(cluster)["members"]]
    again = lab_etcd.up(cluster, 3)
    assert again["already_up"] and [m["pid"] for m in again["members"]] == pids


# ---------------------------------------------------------------- faults, for real

def test_one_member_killed_mid_run_the_contract_still_works(broken):
    store, other = _fresh(broken)
    half = len(state_contract.CHECKS) // 2
    for check in state_contract.CHECKS[:half]:
        check(*_fresh(broken))
    with store.lock("vm/held", ttl=2):
        killed = store.current_endpoint  # the member this store talks to
        lab_etcd.kill_member(broken, _member_of(broken, killed))
        time.sleep(3.5)  # longer than the ttl: the lease thread kept the lock alive through another member
        with pytest.raises(LockBusy):
            with other().lock("vm/held", ttl=2):
                pass
    assert store.current_endpoint != killed
    for check in state_contract.CHECKS[half:]:
        check(*_fresh(broken))


def test_quorum_lost_is_one_line_in_bounded_time(broken):
    store = _store(broken, f"/cloudops-test/{uuid.uuid4().hex}/", timeout=2)
    store.create("ipam/lan", {"n": 1})
    for name in ("etcd1", "etcd2"):
        lab_etcd.kill_member(broken, name)
    for call in (lambda: store.get("ipam/lan"), lambda: store.update("ipam/lan", lambda v: v.update(n=2)),
                 lambda: store.create("ipam/other", {"n": 1})):
        with pytest.raises(StoreUnavailable) as caught:
            _within(60, call)
        _one_line_error(caught.value, store.endpoints)
    with pytest.raises(StoreUnavailable):
        _within(60, lambda: store.lock("vm/web", ttl=2).__enter__())


def test_all_members_down_is_one_line(broken):
    store, _other = _fresh(broken)
    store.create("ipam/lan", {"n": 1})
    for name in ("etcd1", "etcd2", "etcd3"):
        lab_etcd.kill_member(broken, name)
    with pytest.raises(StoreUnavailable) as caught:
        _within(60, lambda: store.items("ipam/"))
    text = _one_line_error(caught.value, store.endpoints)
    assert all(e in text for e in store.endpoints), text


def test_a_lock_of_a_killed_process_expires_after_its_lease(cluster):
    store, _other = _fresh(cluster)
    code = ("import json, sys, time; from cloudops.state.etcd import EtcdStore; "
            "s = EtcdStore.from_settings(json.loads(sys.argv[1])); l = s.lock('vm/x', ttl=2); l.__enter__(); "
            "print('held', flush=True); time.sleep(120)")
    settings = {**lab_etcd.settings(cluster), "prefix": store.prefix}
    child = subprocess.Popen([sys.executable, "-c", code, json.dumps(settings)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(LockBusy):
            with store.lock("vm/x", ttl=5):
                pass
        time.sleep(3)  # more than the ttl: the child's lease thread keeps it alive
        with pytest.raises(LockBusy):
            with store.lock("vm/x", ttl=5):
                pass
        child.kill()
        child.wait()
        deadline = time.monotonic() + 30
        while True:
            try:
                with store.lock("vm/x", ttl=5):
                    break
            except LockBusy:
                assert time.monotonic() < deadline, "the killed holder's lock never expired"
                time.sleep(0.3)
    finally:
        child.kill()
        child.wait()


def test_a_wrong_ca_is_one_clear_error(cluster, tmp_path):
    lab_etcd.make_ca(tmp_path, "some other CA")
    store = _store(cluster, "/cloudops-test/ca/", ca=str(tmp_path / "ca.pem"))
    with pytest.raises(StoreUnavailable, match="certificate verify failed") as caught:
        _within(60, lambda: store.get("images/a"))
    _one_line_error(caught.value, store.endpoints)
    with pytest.raises(StoreError, match="does not exist"):
        _store(cluster, "/cloudops-test/ca/", ca=str(tmp_path / "missing.pem"))


def test_requests_ca_bundle_does_not_replace_the_clusters_ca(cluster, monkeypatch):
    """requests lets $REQUESTS_CA_BUNDLE override a session's CA; the store must keep the cluster's."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    store, _other = _fresh(cluster)
    assert store.create("images/a", {"id": "x"}) and store.value("images/a") == {"id": "x"}


def test_lab_up_etcd_from_the_command_line():
    """`lab.up --hosts 0 --etcd 3`: a cluster and its state.yaml; again: already up; lab.down: every member gone."""
    from tests.conftest import invoke

    require_root()
    prefix = RUN + "c"
    try:
        first = invoke("lab.up", "--prefix", prefix, "--hosts", "0", "--etcd", "3")
        assert first.returncode == 0, first.stderr
        config = lab_etcd.config_path(prefix)
        assert str(config) in first.stdout and config.exists()
        pids = [m["pid"] for m in lab_etcd.status(prefix)["members"]]
        again = invoke("lab.up", "--prefix", prefix, "--hosts", "0", "--etcd", "3")
        assert again.returncode == 0 and "etcd already up with 3 members" in again.stdout, again.stdout + again.stderr
        assert [m["pid"] for m in lab_etcd.status(prefix)["members"]] == pids
        shown = invoke("lab.status", "--prefix", prefix)
        assert shown.stdout.count("https://127.") == 3 and "no hosts" in shown.stdout, shown.stdout
    finally:
        gone = invoke("lab.down", "--prefix", prefix)
    assert gone.returncode == 0 and "stopped 3 etcd members" in gone.stderr, gone.stderr
    assert not any(lab_etcd._alive(pid) for pid in pids)
    assert not lab_etcd.etcd_dir(prefix).exists() and not config.exists()
