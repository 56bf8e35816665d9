"""`invoke vm.start --help`: Invoke's parser fills a task's missing positional argument with ``--help``;
cloudops shows the task's help instead of refusing a VM named "--help"."""

import pytest
from invoke import Exit

from cloudops.tasks import _cli


def test_a_help_flag_in_a_positional_runs_the_help_of_that_task(monkeypatch):
    ran = []
    monkeypatch.setattr(_cli.sys, "argv", ["/x/bin/invoke", "-f", "c.yaml", "vm.start", "--help"])
    monkeypatch.setattr(_cli.os, "execvp", lambda prog, argv: ran.append((prog, argv)) or pytest.skip.Exception)

    @_cli.user_errors
    def start(c, name):
        raise AssertionError("the body ran with name=" + name)

    with pytest.raises(BaseException):  # execvp does not return; the fake raises instead
        start(object(), name="--help")
    assert ran == [("/x/bin/invoke", ["/x/bin/invoke", "-f", "c.yaml", "--help", "vm.start"])]


def test_without_a_task_on_the_command_line_it_says_how(monkeypatch):
    monkeypatch.setattr(_cli.sys, "argv", ["cloudops", "-h"])

    @_cli.user_errors
    def info(c, name):
        raise AssertionError("the body ran")

    with pytest.raises(Exit, match="for a task's options: cloudops --help TASK"):
        info(object(), "-h")


def test_an_ordinary_value_runs_the_task():
    @_cli.user_errors
    def info(c, name):
        return name

    assert info(object(), name="web1") == "web1"
