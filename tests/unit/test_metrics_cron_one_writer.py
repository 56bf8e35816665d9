"""deploy and metrics.install-cron render the same /etc/cron.d/cloudops-metrics for a host (one renderer)."""

import pytest
import yaml

from cloudops import inventory
from cloudops.hosts import deploy
from cloudops.metrics import cron as metrics_cron

CONFIG = {"carbon": "127.0.0.1:2004", "prefix": "cloudops", "cron_minutes": 1}  # tasks/__init__.py's defaults


@pytest.fixture
def hosts(tmp_path):
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump({
        "vars": {"pool_path": "/srv/pool"},
        "hosts": {
            "hv1": {"address": "10.0.0.1",
                    "vars": {"metrics": {"carbon": "10.0.0.9:2004", "prefix": "lab", "interval_minutes": 2}}},
            "hv2": {"address": "10.0.0.2",
                    "vars": {"metrics": {"carbon": "10.0.0.9:2004", "prefix": "lab"}, "metrics_var": "/srv/m"}},
        }}))
    return inventory.load(path).hosts


def install_cron_entry(host, carbon=None, prefix=None, every=None):
    """What tasks/metrics.py's install-cron renders for a host."""
    return metrics_cron.host_entry(host, *metrics_cron.host_settings(host, carbon, prefix, every, defaults=CONFIG))


@pytest.mark.parametrize("name", ["hv1", "hv2"])
def test_deploy_and_install_cron_render_the_same_file(hosts, name):
    host = hosts[name]
    from_deploy = deploy.metrics_cron(host, deploy.settings_for(host))
    assert from_deploy == install_cron_entry(host)
    assert "--local" in from_deploy and "lab" in from_deploy
    assert from_deploy == install_cron_entry(host, "10.0.0.9:2004", "lab", 2 if name == "hv1" else 1)


def test_install_cron_options_still_override(hosts):
    host = hosts["hv1"]
    assert "--prefix=other" in install_cron_entry(host, prefix="other")


def test_host_without_metrics_falls_back_to_the_configuration(tmp_path):
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump({"hosts": {"hv9": {"address": "10.0.0.9"}}}))
    host = inventory.load(path).hosts["hv9"]
    assert metrics_cron.host_settings(host, defaults=CONFIG) == ("127.0.0.1:2004", "cloudops", 1)
