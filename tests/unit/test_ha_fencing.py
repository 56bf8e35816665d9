"""fence_command: validated (a list of strings, known placeholders only), substituted, run with a timeout."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from cloudops.errors import CloudopsError
from cloudops.ha import fencing


def host(fence_command=None, **vars_):
    if fence_command is not None:
        vars_["fence_command"] = fence_command
    return SimpleNamespace(name="hv1", address="10.0.0.11", user="root", port=2222, vars=vars_)


def test_placeholders_are_substituted():
    template = fencing.validate(["ipmitool", "-H", "{host}-bmc", "--addr={address}", "{user}@{port}", "{{literal}}"],
                                "hv1")
    assert fencing.substitute(template, host()) == ["ipmitool", "-H", "hv1-bmc", "--addr=10.0.0.11", "root@2222",
                                                    "{literal}"]


@pytest.mark.parametrize("value", ["ipmitool power off", [], ["ok", 3], ["ok", ""], {"cmd": "x"}, [["nested"]]])
def test_not_a_list_of_strings_is_one_line(value):
    with pytest.raises(CloudopsError, match="fence_command of hv1 must be a list of argument strings") as info:
        fencing.validate(value, "hv1")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("arg, unknown", [("{hostname}", "{hostname}"), ("{host.name}", "{host.name}"),
                                          ("{host!r}", "{host}"), ("{port:>5}", "{port}"), ("{0}", "{0}")])
def test_an_unknown_variable_is_one_line(arg, unknown):
    with pytest.raises(CloudopsError, match="unknown variable") as info:
        fencing.validate(["fence", arg], "hv1")
    assert unknown in str(info.value) and "{address}" in str(info.value) and "\n" not in str(info.value)


def test_a_malformed_brace_is_one_line():
    with pytest.raises(CloudopsError, match="malformed"):
        fencing.validate(["fence", "{host"], "hv1")


def test_no_fence_command_is_a_failure_that_says_so():
    result = fencing.fence(host())
    assert not result.ok and result.reason == "no fence_command for hv1 in the inventory" and result.argv == []


def test_exit_zero_is_success_and_the_argv_is_not_a_shell_line(tmp_path):
    out = tmp_path / "fenced"
    script = f"import sys; open({str(out)!r}, 'w').write(' '.join(sys.argv[1:]))"
    result = fencing.fence(host([sys.executable, "-c", script, "{host}", "a b; rm -rf /"]))
    assert result.ok and result.exit_code == 0
    assert out.read_text() == "hv1 a b; rm -rf /"


def test_a_failing_command_is_not_fenced_with_its_last_line():
    result = fencing.fence(host([sys.executable, "-c", "import sys; print('BMC says no', file=sys.stderr); sys.exit(3)"]))
    assert not result.ok and result.exit_code == 3 and result.reason == "fence_command exited 3: BMC says no"


def test_a_missing_program_is_not_fenced():
    result = fencing.fence(host(["/nonexistent/fence-agent", "{host}"]))
    assert not result.ok and "could not run" in result.reason


def test_a_hanging_command_is_stopped_at_its_timeout():
    def run(argv, **kwargs):
        assert kwargs["timeout"] == 2.5
        raise subprocess.TimeoutExpired(argv, kwargs["timeout"])

    result = fencing.fence(host(["sleep", "100"]), timeout=2.5, run=run)
    assert not result.ok and result.reason == "fence_command did not finish within 2.5s"


def test_a_bad_template_is_refused_before_anything_runs():
    ran = []
    with pytest.raises(CloudopsError, match="unknown variable"):
        fencing.fence(host(["fence", "{bmc}"]), run=lambda *a, **k: ran.append(a))
    assert ran == []
