"""The cloud report's pure parts: the page (escaped, bars, chart), the imbalance history, a graphite-web
that does not answer, the output path."""

import socket

import pytest

from cloudops.errors import CloudopsError
from cloudops.report import graphs, imbalance, page
from cloudops.report.facts import CloudFacts, HostRow

VM = {"name": "web1", "host": "hv1", "state": "running", "memory": 96, "vcpus": 1, "ip": "192.168.150.10",
      "image": "0123456789abcdef", "storage": "local"}


def facts(**overrides) -> CloudFacts:
    host = HostRow(name="hv1", health="up", memory_total_mb=2048, memory_limit_mb=1792, memory_committed_mb=896,
                   vcpus_total=2, vcpus_limit=8, vcpus_committed=2, vms=[VM])
    values = {"taken_at": 1_800_000_000.0, "hosts": [host, HostRow(name="hv2", health="missing", error="no route")],
              "imbalance": {"objective": 0.25, "cv": 0.5, "max_load": 0.5, "mean_load": 0.25}, "complete": False,
              "migrations": [{"time": 1_799_999_000.0, "name": "web1", "source": "hv2", "target": "hv1",
                              "mode": "live", "duration": 4.25, "downtime_ms": 37, "postcopy": False}],
              "failovers": []}
    values.update(overrides)
    return CloudFacts(**values)


def test_the_page_has_a_row_per_host_and_vm_a_bar_per_commitment_and_the_migration():
    html = page.render_page(facts(), graphs.unavailable("cloudops", "not asked for"), [], "")
    assert html.count('<tr class="host"') == 2 and html.count('<tr class="vm"') == 1
    assert 'style="width: 50.0%"' in html  # 896 of 1792 MiB
    assert 'style="width: 25.0%"' in html  # 2 of 8 vCPUs
    assert 'data-vm="web1" data-source="hv2" data-target="hv1"' in html and "37 ms" in html
    assert "no route" in html and "some hosts did not answer" in html
    assert html.count('class="graph-unavailable"') == 4 and "<script" not in html


def test_values_are_escaped_in_the_page():
    vm = {**VM, "name": '<script>alert(1)</script>', "ip": '"><b>'}
    hostile = facts(hosts=[HostRow(name="hv1", health="up", error="<img src=x>", vms=[vm])])
    html = page.render_page(hostile, graphs.unavailable("cloudops", "<i>why</i>"), [], "")
    assert "<script>" not in html and "<img src=x>" not in html and "<i>why</i>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&#34;&gt;&lt;b&gt;" in html


def test_a_full_host_has_its_bar_capped_and_marked():
    over = HostRow(name="hv1", health="up", memory_limit_mb=100, memory_committed_mb=150, vcpus_limit=4,
                   vcpus_committed=1)
    html = page.render_page(facts(hosts=[over]), [], [], "")
    assert 'class="high" style="width: 100%"' in html and over.memory_percent == 150.0


def test_the_imbalance_chart_spans_the_series_and_needs_two_points():
    assert page.imbalance_chart([{"time": 10.0, "objective": 0.5}]) is None
    chart = page.imbalance_chart([{"time": 10.0, "objective": 0.5}, {"time": 20.0, "objective": 0.0},
                                  {"time": 30.0, "objective": 0.25}])
    points = [tuple(map(float, p.split(","))) for p in chart["points"].split()]
    assert [x for x, _ in points] == [6.0, page.CHART_WIDTH / 2, page.CHART_WIDTH - 6.0]
    assert [y for _, y in points] == [6.0, page.CHART_HEIGHT - 6.0, page.CHART_HEIGHT / 2]  # 0.5 is the top


def test_imbalance_points_are_kept_oldest_first_and_bounded(monkeypatch):
    monkeypatch.setattr(imbalance, "KEEP", 3)
    for n in range(5):
        imbalance.record({"objective": n / 10, "cv": 0.0, "max_load": 0.0, "mean_load": 0.0}, when=100.0 + n)
    kept = imbalance.series()
    assert [p["time"] for p in kept] == [102.0, 103.0, 104.0] and kept[-1]["objective"] == 0.4
    assert {p["source"] for p in kept} == {"report"}


def test_graphite_web_not_answering_marks_every_graph_with_one_warning():
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    drawn, warning = graphs.fetch(port, "cloudops", timeout=2)
    assert warning.startswith("graphs unavailable: graphite-web at http://127.0.0.1:")
    assert [g.data_uri for g in drawn] == [None] * 4 and {g.unavailable for g in drawn} == {warning}


def test_graph_targets_name_hosts_and_vms_by_their_node():
    targets = [g.target for g in graphs.wanted("test.ci")]
    assert targets[0] == "aliasByNode(test.ci.hv.*.cpu.util_percent,3)"
    assert targets[2] == "aliasByNode(test.ci.vm.*.cpu.util_percent,3)"


def test_an_output_in_a_missing_directory_is_one_error(tmp_path):
    with pytest.raises(CloudopsError, match="does not exist"):
        page.write(tmp_path / "nowhere" / "cloud.html", "<html></html>")
    with pytest.raises(CloudopsError, match="is a directory"):
        page.write(tmp_path, "<html></html>")
    written = page.write(tmp_path / "cloud.html", "<html></html>")
    assert written.read_text() == "<html></html>" and list(tmp_path.iterdir()) == [written]
