"""A memory load inside a lab guest: a shell loop that keeps rewriting a file on the guest's tmpfs, so
that a live migration has pages to chase (pre-copy that does not converge at a low bandwidth, post-copy
with pages still to fetch).

The commands are for the tiny image's busybox, which has no ``pkill`` or ``pgrep`` (``pkill ...; true``
there did nothing, silently: writers piled up until the guest's 96 MiB and its one vCPU were gone).
The writer is ``sh /run/dirty.sh``; ``stop()`` kills every process with exactly those arguments and
fails (non-zero, a line on stderr) if one survives. ``start()`` stops any writer first: at most one runs.
"""

import shlex


def _script(run_dir: str) -> str:
    return f"{run_dir}/dirty.sh"


def _writers(run_dir: str) -> str:
    """The writers' pids: the processes whose arguments are exactly ``sh <run_dir>/dirty.sh`` (never the
    awk itself, nor the shell running the command, whose arguments are longer), less those whose parent
    is a writer: the writer forks for each ``dd``, and until that child has exec'd it carries the
    writer's arguments (a count of 2 for one writer, seen under load)."""
    return (f"ps -o pid,ppid,args | awk 'NF == 4 && $3 == \"sh\" && $4 == \"{_script(run_dir)}\" "
            "{ppid[$1] = $2} END {for (p in ppid) if (!(ppid[p] in ppid)) print p}'")


def stop(run_dir: str = "/run") -> str:
    """The guest command that ends every writer; it exits non-zero if one is still there after 5 s."""
    return (f"i=0; while pids=$({_writers(run_dir)}); [ -n \"$pids\" ]; do kill $pids 2>/dev/null; "
            "i=$((i + 1)); if [ $i -gt 25 ]; then echo \"a writer survived kill: $pids\" >&2; exit 1; fi; "
            "usleep 200000; done")


def start(mib: int = 4, run_dir: str = "/run") -> str:
    """The guest command that starts the writer, rewriting ``mib`` MiB of ``<run_dir>/dirty`` in a loop,
    in the background and in its own session, after stopping any other; it prints the writer's pid once
    the writer shows in ``ps`` (non-zero if it never does within 5 s)."""
    loop = (f"while :; do dd if=/dev/zero of={run_dir}/dirty bs=1M count={int(mib)} conv=notrunc "
            "2>/dev/null; done")
    # Until the child has exec'd, its arguments are still those of the shell that forked it: a stop (or
    # the next start) in that moment would not see it, and two writers would run (seen once in CI under
    # load). So start returns only once ps shows the writer by its own arguments.
    return (f"{stop(run_dir)}; echo {shlex.quote(loop)} > {_script(run_dir)}; "
            f"setsid sh {_script(run_dir)} >/dev/null 2>&1 </dev/null & pid=$!; i=0; "
            f"until {_writers(run_dir)} | grep -qx \"$pid\"; do i=$((i + 1)); if [ $i -gt 25 ]; then "
            "echo \"the writer did not start: $pid\" >&2; exit 1; fi; usleep 200000; done; echo $pid")


def count(run_dir: str = "/run") -> str:
    """The guest command that prints how many writers run."""
    return f"{_writers(run_dir)} | wc -l"


# ---------------------------------------------------------------- a working set kept dirty (python3 guests)

# A guest with python3 (the Debian image) keeps its own anonymous working set dirty: a bytearray of
# ``mib`` MiB rewritten 1 MiB at a time, one byte every ``stride`` bytes (4096: one byte per page, so
# every page is dirtied for the least CPU, as a program with a large, sparsely written heap does;
# 1: every byte, as a copy does), the byte alternating between two non-zero values so that no pass
# leaves zero pages (sent almost free). It runs at nice 19, so sshd and the rest of the guest always
# get the vCPU first, and writes the rate at which it dirtied pages over the last second (MiB/s of
# pages, an integer) to ``<run_dir>/dirty.rate``: under TCG the rate is what the vCPU manages, and
# auto-converge's throttle lowers it, which that file shows.
_PAGES = """\
import os, sys, time
os.nice(19)
mib, stride, rate_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
buf = bytearray(mib << 20)
step = 1 << 20
blocks = (b"\\x01" * (step // stride), b"\\x02" * (step // stride))
n, done, t0 = 0, 0, time.monotonic()
while True:
    block = blocks[n & 1]
    n += 1
    for off in range(0, len(buf), step):
        buf[off:off + step:stride] = block
        done += step
        now = time.monotonic()
        if now - t0 >= 1:
            with open(rate_file + ".tmp", "w") as f:
                f.write("%d\\n" % (done / (now - t0) / 1048576))
            os.replace(rate_file + ".tmp", rate_file)
            done, t0 = 0, now
"""


def stop_pages(run_dir: str = "/run") -> str:
    """The guest command that ends the python writer (by its pid file); non-zero if it outlives 5 s."""
    pid_file = shlex.quote(f"{run_dir}/dirty-pages.pid")
    return (f"if [ -s {pid_file} ]; then pid=$(cat {pid_file}); kill \"$pid\" 2>/dev/null; i=0; "
            "while kill -0 \"$pid\" 2>/dev/null; do i=$((i + 1)); if [ $i -gt 25 ]; then "
            "echo \"a writer survived kill: $pid\" >&2; exit 1; fi; sleep 0.2; done; fi; "
            f"rm -f {pid_file}")


def start_pages(mib: int = 256, stride: int = 4096, run_dir: str = "/run") -> str:
    """The guest command that starts the python writer over ``mib`` MiB, one byte in ``stride`` (a power
    of two, at most a page), after stopping the one before; it prints the writer's pid."""
    if stride < 1 or stride > 4096 or stride & (stride - 1):
        raise ValueError(f"stride {stride}: a power of two from 1 to 4096")
    script, pid_file = shlex.quote(f"{run_dir}/dirty.py"), shlex.quote(f"{run_dir}/dirty-pages.pid")
    rate_file = shlex.quote(f"{run_dir}/dirty.rate")
    return (f"{stop_pages(run_dir)} && rm -f {rate_file} && printf %s {shlex.quote(_PAGES)} > {script} && "
            f"{{ setsid python3 {script} {int(mib)} {int(stride)} {rate_file} >/dev/null 2>&1 </dev/null & }}; "
            f"echo $! > {pid_file}; echo $!")


def rate_pages(run_dir: str = "/run") -> str:
    """The guest command that prints the python writer's last rate, MiB/s (empty before its first second)."""
    return f"cat {shlex.quote(f'{run_dir}/dirty.rate')} 2>/dev/null; true"
