"""Reading a booting guest's console: which lines end the wait for SSH, which are only reported."""

import pytest

from cloudops.compute import console
from cloudops.errors import CloudopsError

DEBIAN_NO_NETWORK = (
    "[  OK  ] Finished systemd-udev-settle.service\r\n"
    "\x1b[0;1;31mFAILED\x1b[0m] Failed to start \x1b[0;1;39mnetworking.service\x1b[0m - Raise network interfaces.\r\n"
    "[FAILED] Failed to start networking.service - Raise network interfaces.\r\n"
    "See 'systemctl status networking.service' for details.\r\n"
)
PANIC = "[    2.1] Run /sbin/init as init process\n[    2.2] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n"
HARMLESS = "[FAILED] Failed to start systemd-modules-load.service - Load Kernel Modules.\n[  OK  ] Reached target multi-user.target\n"


@pytest.mark.parametrize("text, meaning", [
    (DEBIAN_NO_NETWORK, "network failed: Failed to start networking.service - Raise network interfaces."),
    (PANIC, "kernel panic: Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100"),
    ("cloudops-tiny: initramfs: cannot mount root /dev/vda1 (/dev/vda1); dropping to a shell\n",
     "root filesystem not found: cloudops-tiny: initramfs: cannot mount root /dev/vda1 (/dev/vda1); dropping to a shell"),
    ("SeaBIOS (version 1.16.2)\nBooting from Hard Disk...\nNo bootable device.\n", "no bootable disk: No bootable device."),
    ("BdsDxe: failed to load Boot0001 \"UEFI QEMU HARDDISK\" from PciRoot(0x0): Not Found\r\n"
     "BdsDxe: No bootable option or device was found.\r\n",
     "the UEFI firmware finds nothing to boot: No bootable option or device was found."),
    ("boot: \r\n" * 7, "the bootloader finds nothing to boot (boot: prompt repeats): boot:"),
    ("You are in emergency mode. After logging in, type ...\n", "emergency mode: You are in emergency mode. After logging in, type ..."),
])
def test_fatal_lines_are_named(text, meaning):
    assert console.fatal(text) == meaning


def test_the_first_fatal_line_wins():
    assert console.fatal(DEBIAN_NO_NETWORK + PANIC).startswith("network failed")


@pytest.mark.parametrize("text", [HARMLESS, "cloudops-tiny: no DHCP lease on eth0 yet\n", "", "Oops in a word\n",
                                  "boot: \nLoading vmlinuz... ok\n"])
def test_other_lines_are_not_fatal(text):
    assert console.fatal(text) is None


def test_failed_units_once_each_and_without_escapes():
    assert console.failed_units(DEBIAN_NO_NETWORK + HARMLESS + HARMLESS) == [
        "Failed to start networking.service - Raise network interfaces.",
        "Failed to start systemd-modules-load.service - Load Kernel Modules.",
    ]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def watch(text, alive=True, offset=0):
    said = []
    clock = Clock()
    w = console.BootWatch("web1", lambda: text[0], lambda: alive, said.append, offset=offset, every=3, clock=clock)
    return w, said, clock


def test_a_harmless_failed_unit_is_reported_once_and_the_wait_goes_on():
    text = [HARMLESS]
    w, said, clock = watch(text)
    w.check()
    clock.now = 10
    w.check()
    assert said == ["web1's console: [FAILED] Failed to start systemd-modules-load.service - Load Kernel Modules."]


def test_a_panic_ends_the_wait_with_the_console_tail():
    text = ["booting\n"]
    w, _, clock = watch(text)
    w.check()
    text[0] += PANIC
    clock.now = 1
    w.check()  # read at most every 3 s: not yet
    clock.now = 3
    with pytest.raises(CloudopsError) as caught:
        w.check()
    message = str(caught.value)
    assert message.splitlines()[0] == ("web1 will not boot to SSH (kernel panic: Kernel panic - not syncing: "
                                       "Attempted to kill init! exitcode=0x00000100); the console's last lines:")
    assert "  | [    2.1] Run /sbin/init as init process" in message


def test_a_domain_that_stopped_ends_the_wait():
    w, _, _ = watch(["[ 1.0] reboot: Power down\n"], alive=False)
    with pytest.raises(CloudopsError, match=r"web1 stopped while booting; the console's last lines:\n  \| \[ 1.0\] reboot: Power down"):
        w.check()


def test_what_the_console_said_before_this_boot_is_skipped():
    text = [PANIC + "cloudops-tiny: ready\n"]
    w, _, _ = watch(text, offset=len(PANIC))
    w.check()  # an earlier boot's panic is history


def test_an_unreadable_console_never_ends_the_wait():
    def broken():
        raise OSError("no route to host")

    w = console.BootWatch("web1", broken, lambda: True)
    w.check()
