"""cloudops.progress: stage lines and bars, plain lines on a pipe (throttled by a fake clock), live on a terminal."""

import io
import re
import threading

from rich.console import Console

from cloudops import progress

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain_reporter(clock):
    out = io.StringIO()
    return progress.Reporter(Console(file=out, force_terminal=False), clock=clock), out


def tty_reporter():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, force_interactive=True, width=120, color_system="standard")
    return progress.Reporter(console), out


def test_a_stage_line_is_the_plain_format_on_a_pipe_and_on_a_terminal():
    reporter, out = plain_reporter(lambda: 0.0)
    reporter("checking hv2 can take web1")
    assert out.getvalue() == "… checking hv2 can take web1\n"
    live, tty = tty_reporter()
    live("checking hv2 can take web1")
    assert tty.getvalue() == "… checking hv2 can take web1\n"


def test_a_bar_on_a_pipe_is_plain_lines_one_every_two_seconds_and_the_final_one():
    now = [0.0]
    reporter, out = plain_reporter(lambda: now[0])
    assert not reporter.live
    with reporter.bar("tiny to hv1", 100 << 20) as bar:
        for n in range(1, 41):
            now[0] += 0.25  # 10 s in all
            bar.update(n * (100 << 20) // 40)
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and not ANSI.search(text)
    assert all(line.startswith("… ") for line in lines), lines
    # the start, one line per 2 s (5 of them in 10 s), the final one
    assert len(lines) == 1 + 5 + 1, lines
    assert lines[0] == "… copying tiny to hv1 (100.0 MiB)"
    assert lines[1] == "… tiny to hv1: 20.0 MiB of 100.0 MiB (20 %), 10.0 MiB/s"
    assert lines[-1] == "… copied tiny to hv1: 100.0 MiB in 10.0 s, 10.0 MiB/s"


def test_a_resumed_download_counts_its_rate_from_where_it_resumed():
    now = [0.0]
    lines = []
    bar = progress.bar_for(lines.append, "x.qcow2", 100 << 20, done=60 << 20, verb=("downloading", "downloaded"),
                           clock=lambda: now[0])
    bar.start()
    now[0] = 4.0
    bar.update(80 << 20)
    bar.finish()
    assert lines == ["downloading x.qcow2 (100.0 MiB), resuming at 60.0 MiB",
                     "x.qcow2: 80.0 MiB of 100.0 MiB (80 %), 5.0 MiB/s",
                     "downloaded x.qcow2: 80.0 MiB in 4.0 s, 5.0 MiB/s"]


def test_a_failed_step_says_no_final_line():
    lines = []
    try:
        with progress.bar_for(lines.append, "disk", 10, clock=lambda: 0.0) as bar:
            bar.update(3)
            raise OSError("gone")
    except OSError:
        pass
    assert lines == ["copying disk (0.0 MiB)"]


def test_a_bar_on_a_terminal_is_drawn_live_and_redrawn_in_place():
    reporter, out = tty_reporter()
    assert reporter.live
    reporter("before")
    with reporter.bar("tiny to hv1", 4 << 20) as bar:
        bar.update(1 << 20)
        bar.update(4 << 20)
    reporter("after")
    text = out.getvalue()
    assert "━" in text, text  # rich's bar
    assert "\r" in text and ANSI.search(text), text  # redrawn in place
    plain = ANSI.sub("", text)
    assert "tiny to hv1" in plain and "4.0 MiB of 4.0 MiB (100 %)" in plain  # drawn at least once when done
    lines = [line for line in plain.replace("\r", "\n").splitlines() if line.startswith("… ")]
    assert lines[0] == "… before" and lines[1] == "… copying tiny to hv1 (4.0 MiB)"
    assert lines[2].startswith("… copied tiny to hv1: 4.0 MiB in ") and lines[3] == "… after"
    assert reporter._live is None  # the display stopped with its last bar


def test_parallel_bars_share_one_display_and_each_has_its_line():
    reporter, out = tty_reporter()
    first, second = reporter.bar("tiny to hv1", 10).start(), reporter.bar("tiny to hv2", 10).start()
    assert len(reporter._live.tasks) == 2
    workers = [threading.Thread(target=lambda b=b: [b.update(n) for n in range(11)]) for b in (first, second)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    first.finish()
    assert reporter._live is not None and len(reporter._live.tasks) == 1
    second.finish()
    assert reporter._live is None
    plain = ANSI.sub("", out.getvalue())
    assert "copied tiny to hv1" in plain and "copied tiny to hv2" in plain


def test_a_dumb_terminal_gets_plain_lines():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, _environ={"TERM": "dumb"})
    assert not progress.Reporter(console).live


def test_a_plain_callback_gets_the_lines_of_a_bar_and_steps_count():
    lines, now = [], [0.0]
    with progress.bar_for(lines.append, "image tiny", 4, unit=progress.STEPS, verb=("building", "built"),
                          clock=lambda: now[0]) as steps:
        for _ in range(4):
            now[0] += 3
            steps.advance()
    assert lines[0] == "building image tiny (4 steps)"
    assert lines[1] == "image tiny: 1 of 4 (25 %), 3 s"
    assert lines[-1] == "built image tiny: 4 of 4 (100 %), 12 s"


def test_figures_of_ones_own_and_no_verb():
    lines, now = [], [0.0]
    bar = progress.bar_for(lines.append, "web1 to hv2", 100, unit=progress.FIGURES, verb=None, clock=lambda: now[0])
    bar.update(10, figures="10 % of it")
    now[0] = 2.5
    bar.update(50, figures="50 % of it")
    bar.finish()
    assert lines == ["web1 to hv2: 50 % of it", "web1 to hv2: 50 % of it"]


def _sample(percent, iteration=1, phase="memory"):
    from cloudops.migration.migrate import Progress

    return Progress(elapsed=percent / 10, percent=percent, remaining_mib=100 - percent, total_mib=100,
                    dirty_mib_s=2.5, speed_mib_s=40.0, iteration=iteration, eta=3.0, phase=phase)


def test_a_migration_bar_keeps_todays_figures_and_ends_with_the_last():
    from cloudops.migration.migrate import MigrationBar

    lines = []
    bar = MigrationBar(lines.append, "web1")
    bar(_sample(10))
    bar(_sample(100, iteration=3))
    bar.done()
    assert len(lines) == 1  # plain lines at most every 2 s: here only the final one
    assert MigrationBar.figures(_sample(10)).startswith(" 10.0%  memory    left   90.0/100 MiB")
    assert lines[-1] == "migrating web1: " + MigrationBar.figures(_sample(100, iteration=3))
    assert "dirty   2.5 MiB/s" in lines[-1] and "iter  3" in lines[-1] and "ETA 3s" in lines[-1]


def test_a_migration_bar_that_never_drew_says_nothing_at_the_end():
    from cloudops.migration.migrate import MigrationBar

    lines = []
    MigrationBar(lines.append, "web1").done()  # an offline migration: no job samples
    assert lines == []


def test_parallel_migrations_each_draw_their_line_on_a_terminal():
    from cloudops.migration.migrate import MigrationBar

    reporter, out = tty_reporter()
    bars = [MigrationBar(reporter, name) for name in ("web1", "web2")]
    for bar in bars:
        bar(_sample(40))
    screen = ANSI.sub("", out.getvalue())
    assert "migrating web1" in screen and "migrating web2" in screen
    for bar in bars:
        bar.done()
    reporter.close()
