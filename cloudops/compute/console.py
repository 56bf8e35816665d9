"""What a guest's serial console says about its boot: the failures that end the wait for SSH early.

``vm.start`` waits for an address, a host key on the console and SSH. A guest whose kernel
panicked or whose network never came up will not get there, so waiting out ``--timeout``
only hides the reason. The console log libvirt keeps for every cloudops VM is read while
waiting; a *fatal* line ends the wait with the console's last lines, any other failed unit
is reported and the wait goes on (many images fail a unit or two that do not matter).
"""

import re
import time

from cloudops.errors import CloudopsError

# (pattern, what it means); the first match in the console wins.
_FATAL = [
    (re.compile(r"Kernel panic - not syncing[^\r\n]*"), "kernel panic"),
    (re.compile(r"cloudops-tiny: initramfs: cannot mount root[^\r\n]*"), "root filesystem not found"),
    (re.compile(r"No bootable device[^\r\n]*"), "no bootable disk"),
    (re.compile(r"No bootable option or device was found[^\r\n]*"), "the UEFI firmware finds nothing to boot"),
    (re.compile(r"(?:^boot: *\n){5}", re.MULTILINE), "the bootloader finds nothing to boot (boot: prompt repeats)"),
    (re.compile(r"You are in emergency mode[^\r\n]*"), "emergency mode"),
    (re.compile(r"Give root password for maintenance[^\r\n]*"), "emergency mode"),
    (re.compile(r"Failed to start [^\r\n]*(?:[Nn]etwork|networking|ifup@|dhcpcd)[^\r\n]*"), "network failed"),
    (re.compile(r"Failed to start [^\r\n]*(?:cloud-init|Cloud-init|OpenBSD Secure Shell|ssh\.service)[^\r\n]*"),
     "boot service failed"),
]
_FAILED_UNIT = re.compile(r"\[FAILED\] (Failed to start [^\r\n]*)")
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|[\x00-\x08\x0b-\x1f\x7f]")


def clean(text: str) -> str:
    """Console text without terminal escapes and control characters (kept: newlines and tabs)."""
    return _ESCAPES.sub("", text.replace("\r\n", "\n"))


def fatal(text: str) -> str | None:
    """The first line that means this boot will not reach SSH, as 'what: line'; None when there is none."""
    text = clean(text)
    found = None
    for pattern, meaning in _FATAL:
        match = pattern.search(text)
        if match and (found is None or match.start() < found[0]):
            found = (match.start(), f"{meaning}: {match.group(0).strip().splitlines()[0].strip()}")
    return found[1] if found else None


def failed_units(text: str) -> list[str]:
    """Every ``[FAILED] Failed to start ...`` line, in order, without repeats."""
    seen = []
    for line in _FAILED_UNIT.findall(clean(text)):
        if line.strip() not in seen:
            seen.append(line.strip())
    return seen


def last_lines(text: str, count: int = 15) -> list[str]:
    lines = [line.rstrip() for line in clean(text).splitlines() if line.strip()]
    return lines[-count:]


class BootWatch:
    """Reads a booting guest's console now and then; raises when it shows a fatal failure.

    ``read`` returns the whole console log; ``offset`` skips what was there before this boot
    (a reboot appends to the log). ``alive`` says whether the domain still runs.
    """

    def __init__(self, name: str, read, alive, progress=lambda m: None, offset: int = 0, every: float = 3.0,
                 clock=None):
        self.name, self.read, self.alive, self.progress = name, read, alive, progress
        self.offset, self.every = offset, every
        self.clock = clock or time.monotonic
        self.last = None
        self.reported = set()

    def check(self, force: bool = False) -> None:
        now = self.clock()
        if not force and self.last is not None and now - self.last < self.every:
            return
        self.last = now
        if not self.alive():
            raise CloudopsError(self._message(f"{self.name} stopped while booting", self.text()))
        text = self.text()
        for unit in failed_units(text):
            if unit not in self.reported:
                self.reported.add(unit)
                self.progress(f"{self.name}'s console: [FAILED] {unit}")
        reason = fatal(text)
        if reason:
            raise CloudopsError(self._message(f"{self.name} will not boot to SSH ({reason})", text))

    def text(self) -> str:
        try:
            return self.read()[self.offset:]
        except Exception:  # noqa: BLE001 - an unreadable console never ends the wait by itself
            return ""

    def _message(self, summary: str, text: str) -> str:
        tail = last_lines(text)
        if not tail:
            return f"{summary}; its console is empty"
        return summary + "; the console's last lines:\n" + "\n".join(f"  | {line}" for line in tail)
