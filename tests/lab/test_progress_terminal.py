"""Progress of a real copy to two lab hosts (SFTP to their sshd): a live bar on a pseudo-terminal, plain
lines in a pipe. The copies are checked on the hosts with sha256sum, not with cloudops's own read-back."""

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

import pytest

from cloudops.errors import CloudopsError
from cloudops.imaging import store as images
from cloudops.ssh import connect
from tests.conftest import ROOT, invoke

BAR_GLYPH = "━"  # rich's bar
HOSTS = ("hv1", "hv2")


def disk(path, pattern: int):
    """A small qcow2 of its own content (8 MiB written with ``pattern``), so each run copies anew."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} 0 8M", str(path)], check=True,
                   capture_output=True)
    return path


def on_a_terminal(args: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on a pseudo-terminal (120 columns); its exit code and all it drew."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "invoke"), *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the terminal's other end is closed
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


def held_by(lab_inventory, image_id: str, filename: str) -> dict[str, str]:
    """host -> sha256sum of the image file in its pool (what the host itself says)."""
    found = {}
    for name in HOSTS:
        host = lab_inventory.hosts[name]
        with connect(host) as conn:
            out = conn.run(f"sha256sum {images.pool_path(host)}/images/{filename} 2>/dev/null || true",
                           hide=True, in_stream=False).stdout.split()
        found[name] = out[0] if out else ""
    return found


@pytest.mark.parametrize("where", ["terminal", "pipe"])
def test_a_copy_to_two_hosts_draws_a_live_bar_on_a_terminal_and_plain_lines_in_a_pipe(
        lab, lab_inventory, tmp_path, where):
    name = f"progress-{where}"
    source = disk(tmp_path / f"{name}.qcow2", 0x5A if where == "terminal" else 0xA5)
    args = ["image.add", str(source), "--name", name, "--replace", "--distribute", "--hosts", ",".join(HOSTS),
            "--inventory", str(lab.inventory_path)]
    try:
        if where == "terminal":
            code, drawn = on_a_terminal(args)
            assert code == 0, drawn[-3000:]
            assert "\x1b[?25l" in drawn and BAR_GLYPH in drawn, drawn[-3000:]  # rich's live display: cursor hidden
            for host in HOSTS:
                # from this machine or from a host that already has it (peer-to-peer distribution)
                assert re.search(rf"copying image {name} \S+ -> {host} \(", drawn), drawn[-3000:]
                assert re.search(rf"copied image {name} \S+ -> {host}: ", drawn), drawn[-3000:]
        else:
            proc = invoke(*args)
            assert proc.returncode == 0, proc.stderr
            assert "\x1b" not in proc.stderr + proc.stdout and BAR_GLYPH not in proc.stderr, proc.stderr
            lines = proc.stderr.splitlines()
            for host in HOSTS:
                assert any(re.match(rf"… copying image {name} \S+ -> {host} \(", line) for line in lines), lines
                assert any(re.match(rf"… copied image {name} \S+ -> {host}: ", line) and "MiB/s" in line
                           for line in lines), lines
        image = images.resolve(name)
        assert held_by(lab_inventory, image.id, image.filename) == {h: image.id for h in HOSTS}
    finally:
        proc = invoke("image.rm", name, "--inventory", str(lab.inventory_path), "--json")
        assert proc.returncode == 0, proc.stderr
    assert held_by(lab_inventory, image.id, image.filename) == {h: "" for h in HOSTS}
    with pytest.raises(CloudopsError):
        images.resolve(name)
