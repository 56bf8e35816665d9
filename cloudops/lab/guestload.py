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
    awk itself, nor the shell running the command, whose arguments are longer)."""
    return f"ps -o pid,args | awk 'NF == 3 && $2 == \"sh\" && $3 == \"{_script(run_dir)}\" {{print $1}}'"


def stop(run_dir: str = "/run") -> str:
    """The guest command that ends every writer; it exits non-zero if one is still there after 5 s."""
    return (f"i=0; while pids=$({_writers(run_dir)}); [ -n \"$pids\" ]; do kill $pids 2>/dev/null; "
            "i=$((i + 1)); if [ $i -gt 25 ]; then echo \"a writer survived kill: $pids\" >&2; exit 1; fi; "
            "usleep 200000; done")


def start(mib: int = 4, run_dir: str = "/run") -> str:
    """The guest command that starts the writer, rewriting ``mib`` MiB of ``<run_dir>/dirty`` in a loop,
    in the background and in its own session, after stopping any other; it prints the writer's pid."""
    loop = (f"while :; do dd if=/dev/zero of={run_dir}/dirty bs=1M count={int(mib)} conv=notrunc "
            "2>/dev/null; done")
    return (f"{stop(run_dir)}; echo {shlex.quote(loop)} > {_script(run_dir)}; "
            f"setsid sh {_script(run_dir)} >/dev/null 2>&1 </dev/null & echo $!")


def count(run_dir: str = "/run") -> str:
    """The guest command that prints how many writers run."""
    return f"{_writers(run_dir)} | wc -l"
