from cloudops import facts, output


def test_parse_system_facts():
    text = "hostname\thv1\ncpus\t4\nmem_total_kb\t8192000\nmem_available_kb\t4096000\nkvm\tno\nkernel\t6.1.0\n"
    parsed = facts.parse_system(text)
    assert parsed == {"hostname": "hv1", "cpus": 4, "memory_total_mb": 8000, "memory_free_mb": 4000,
                      "kvm": False, "kernel": "6.1.0"}


def test_parse_system_facts_tolerates_missing_lines():
    parsed = facts.parse_system("hostname\thv1\n")
    assert parsed["cpus"] is None and parsed["memory_total_mb"] is None and parsed["kvm"] is False


def test_table_renders_every_row_and_placeholder():
    text = output.table([{"a": 1, "b": None}, {"a": True, "b": "x" * 100}], ["a", "b"], max_width=10)
    lines = text.splitlines()
    assert lines[0].split() == ["A", "B"]
    assert lines[1].split() == ["1", "-"]
    assert lines[2].startswith("yes") and lines[2].endswith("…")
