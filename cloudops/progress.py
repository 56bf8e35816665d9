"""Progress of long steps on stderr: stage lines, and bars drawn live by rich on a terminal, plain lines elsewhere.

A ``Reporter`` is what tasks pass to the library as its ``progress`` callback: calling it with a
message prints the stage line ``… message``; ``reporter.bar(label, total)`` gives a ``Bar`` for a
long step (bytes copied, steps done, or figures of one's own such as a migration's). On a terminal
the bars of one process share one rich live display (one line per bar: parallel copies to several
hosts each get theirs) and stage lines are printed above it; elsewhere (a pipe, a file, cron) a
bar is plain lines: one when it starts, one at most every ``every`` seconds as it goes, and the
final one. Stdout is never written, so ``--json`` stays clean.

Library functions keep taking a plain ``progress(message)`` callback (default: do nothing) and
ask ``bar_for(progress, ...)`` for a bar: the reporter's own when it is one, else a bar that
reports its plain lines through the callback, so the library needs no terminal.
"""

import atexit
import threading
import time
from typing import Self

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

MiB = 1 << 20
EVERY = 2.0  # seconds between two plain lines of one bar
BYTES, STEPS, FIGURES = "bytes", "steps", "figures"


def mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def no_progress(_message: str) -> None:
    """The library's default ``progress``: say nothing."""


class Bar:
    """One long step: ``start()``, ``update(done)`` as it goes, then ``finish()``, or ``stop()`` when it failed.

    ``unit`` says what ``done`` and ``total`` count: ``bytes`` (shown in MiB with the rate), ``steps``,
    or ``figures`` (the caller gives the text of each update: ``update(done, figures=...)``).
    ``verb`` (doing, done) words the start line ("copying x (40.0 MiB)") and the final one ("copied x:
    ..."); without one there is no start line and the final line is the last figures. This class
    writes plain lines through ``say``; ``Reporter.bar`` gives one drawn live on a terminal.
    As a context manager: started on entry, finished on a normal exit, stopped on an exception."""

    def __init__(self, say, label: str, total: float | None = None, *, unit: str = BYTES,
                 verb: tuple[str, str] | None = ("copying", "copied"), done: float = 0, every: float = EVERY,
                 clock=time.monotonic):
        self.say, self.label, self.total, self.unit, self.verb = say, label, total, unit, verb
        self.done = self.first = done
        self.every, self.clock = every, clock
        self.text = ""
        self.started = self.last = None
        self.closed = False

    # -------------------------------------------------------- what it says

    def elapsed(self) -> float:
        return max(self.clock() - self.started, 1e-6) if self.started is not None else 0.0

    def rate(self) -> float:
        """Units per second since the start (bytes a resumed download already had do not count)."""
        return (self.done - self.first) / self.elapsed()

    def percent(self) -> int | None:
        return int(self.done * 100 // self.total) if self.total else None

    def figures(self) -> str:
        """Where the step is, after its label: "12.0 MiB of 40.0 MiB (30 %), 5.1 MiB/s"."""
        if self.unit == FIGURES:
            return self.text
        pct = self.percent()
        if self.unit == STEPS:
            of = f" of {self.total:g} ({pct} %)" if self.total else ""
            return f"{self.done:g}{of}, {self.elapsed():.0f} s"
        of = f" of {mib(self.total)} ({pct} %)" if self.total else ""
        return f"{mib(self.done)}{of}, {mib(self.rate())}/s"

    def opening(self) -> str | None:
        if not self.verb:
            return None
        if self.unit == BYTES:
            size = mib(self.total) if self.total else "size unknown"
            resumed = f", resuming at {mib(self.done)}" if self.done else ""
            return f"{self.verb[0]} {self.label} ({size}){resumed}"
        return f"{self.verb[0]} {self.label}" + (f" ({self.total:g} steps)" if self.unit == STEPS and self.total else "")

    def closing(self) -> str:
        if not self.verb:
            return f"{self.label}: {self.figures()}"
        if self.unit == BYTES:
            return f"{self.verb[1]} {self.label}: {mib(self.done)} in {self.elapsed():.1f} s, {mib(self.rate())}/s"
        return f"{self.verb[1]} {self.label}: {self.figures()}"

    # -------------------------------------------------------- the step's life

    def start(self) -> Self:
        self.started = self.last = self.clock()
        line = self.opening()
        if line:
            self.say(line)
        self.draw()
        return self

    def update(self, done: float, total: float | None = None, figures: str | None = None) -> None:
        if self.closed:
            return
        if self.started is None:
            self.start()
        self.done = done
        if total is not None:
            self.total = total
        if figures is not None:
            self.text = figures
        self.redraw()

    def advance(self, n: float = 1) -> None:
        self.update(self.done + n)

    def finish(self) -> None:
        if self.closed:
            return
        if self.started is None:
            self.start()
        self.closed = True
        self.erase()
        self.say(self.closing())

    def stop(self) -> None:
        """The step failed or was interrupted: no final line (the error says what happened)."""
        if not self.closed:
            self.closed = True
            self.erase()

    def __enter__(self) -> Self:
        return self if self.started is not None else self.start()

    def __exit__(self, exc_type, _exc, _tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.stop()

    # -------------------------------------------------------- plain lines (a live bar draws instead)

    def draw(self) -> None:
        """Show the bar for the first time (plain: the start line was enough)."""

    def redraw(self) -> None:
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self.say(f"{self.label}: {self.figures()}")

    def erase(self) -> None:
        """Take the bar off the screen before the final line (plain: nothing to take off)."""


class LiveBar(Bar):
    """A bar drawn by the reporter's rich live display, one line of it, redrawn in place."""

    def __init__(self, reporter: "Reporter", label: str, total=None, **kw):
        super().__init__(reporter, label, total, **kw)
        self.reporter = reporter
        self.task = None

    def draw(self) -> None:
        self.task = self.reporter._add(self)

    def redraw(self) -> None:
        if self.task is not None:
            self.reporter._show(self)

    def erase(self) -> None:
        if self.task is not None:
            self.reporter._show(self, refresh=True)  # the last figures drawn at least once, however short the step
            self.reporter._remove(self)
            self.task = None


class Reporter:
    """Stage lines and bars on stderr (``console``: rich's Console on stderr unless given).

    Live bars when the console is an interactive terminal; plain lines otherwise. Thread-safe:
    parallel steps (a copy to each host) each draw their own bar on the one live display."""

    def __init__(self, console: Console | None = None, every: float = EVERY, clock=time.monotonic):
        self._console = console
        self.every, self.clock = every, clock
        self._lock = threading.RLock()
        self._live: Progress | None = None
        self._closing_registered = False

    @property
    def console(self) -> Console:
        if self._console is None:
            self._console = Console(stderr=True)
        return self._console

    @property
    def live(self) -> bool:
        """Whether bars are drawn live: stderr is a terminal that understands cursor moves."""
        return self.console.is_interactive

    def __call__(self, message: str) -> None:
        """The stage line ``… message``."""
        line = f"… {message}"
        with self._lock:
            if self._live is not None:  # printed above the bars
                self.console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)
            else:
                stream = self.console.file
                stream.write(line + "\n")
                stream.flush()

    def bar(self, label: str, total: float | None = None, **kw) -> Bar:
        """A bar for one long step (see ``Bar`` for ``unit``, ``verb``, ``done``); not started yet."""
        if self.live:
            return LiveBar(self, label, total, clock=self.clock, **kw)
        return Bar(self, label, total, every=self.every, clock=self.clock, **kw)

    def close(self) -> None:
        """Stop the live display (at exit, or when a step never finished its bar)."""
        with self._lock:
            if self._live is not None:
                self._live.stop()
                self._live = None

    # -------------------------------------------------------- the live display, for LiveBar

    def _add(self, bar: LiveBar):
        with self._lock:
            if self._live is None:
                self._live = Progress(TextColumn("{task.description}"), BarColumn(bar_width=30),
                                      TextColumn("{task.fields[figures]}"), console=self.console, transient=True,
                                      redirect_stdout=False, redirect_stderr=False, refresh_per_second=5)
                self._live.start()
                if not self._closing_registered:
                    atexit.register(self.close)  # a bar left running must not leave the cursor hidden
                    self._closing_registered = True
            task = self._live.add_task(bar.label, total=bar.total or None, completed=bar.done, figures=bar.figures())
            self._live.refresh()  # drawn at once: a short step shows its bar too
            return task

    def _show(self, bar: LiveBar, refresh: bool = False) -> None:
        with self._lock:
            if self._live is not None:
                self._live.update(bar.task, completed=bar.done, total=bar.total or None, figures=bar.figures())
                if refresh:
                    self._live.refresh()

    def _remove(self, bar: LiveBar) -> None:
        with self._lock:
            if self._live is None:
                return
            self._live.remove_task(bar.task)
            if not self._live.tasks:
                self.close()


def bar_for(progress, label: str, total: float | None = None, **kw) -> Bar:
    """A bar for a library's ``progress`` callback: the reporter's own (live on a terminal) when it is a
    ``Reporter``, else one saying its plain lines through the callback."""
    if isinstance(progress, Reporter):
        return progress.bar(label, total, **kw)
    return Bar(progress or no_progress, label, total, **kw)


stderr = Reporter()  # the process's one reporter on stderr: its bars share one live display
