"""Glue between tasks and the library: user errors become one line and a non-zero exit."""

import functools
import json
import os
import signal
import sys
import threading

import libvirt
from invoke import Exit

from cloudops import state
from cloudops.errors import CloudopsError
from cloudops.progress import stderr as stderr_progress


def terminate_as_interrupt(_signum, frame):
    """SIGTERM (``timeout``, cron's and runbooks' way to stop a command) does what Ctrl-C does.

    It goes to whatever handles SIGINT now: the default raises KeyboardInterrupt, so a half-made
    VM is undone; during a migration job the press is counted, never raised inside libvirt."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


HELP_FLAGS = ("--help", "-h")


def show_task_help(func_name: str):
    """Show the task's help for ``<program> TASK --help`` when Invoke's parser took ``--help`` as the value of
    a positional argument (it fills missing positionals first): the same command line with the flag before
    the task (the word naming the function ``func_name``), which Invoke reads as a help request."""
    argv = [a for a in sys.argv if a not in HELP_FLAGS]
    name = func_name.rstrip("_").replace("_", "-")
    tasks = [i for i, a in enumerate(argv) if i and (a == name or a.endswith(f".{name}")
                                                       or a.endswith(f".{func_name.rstrip('_')}"))]
    if not tasks:
        raise Exit(f"cloudops: for a task's options: {os.path.basename(sys.argv[0])} --help TASK", code=2)
    first = tasks[0]
    sys.stdout.flush()
    os.execvp(argv[0], [argv[0], *argv[1:first], "--help", argv[first]])


def user_errors(func):
    """Decorator for task bodies: CloudopsError -> invoke.Exit("cloudops: <message>")."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if any(isinstance(a, str) and a in HELP_FLAGS for a in (*args[1:], *kwargs.values())):  # see show_task_help
            show_task_help(func.__name__)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, terminate_as_interrupt)
        try:
            if args and hasattr(args[0], "config"):  # the task's Context: state_dir and the state store
                state.configure(args[0].config)
            return func(*args, **kwargs)
        except CloudopsError as exc:
            raise Exit(f"cloudops: {exc}", code=exc.exit_code) from None
        except libvirt.libvirtError as exc:  # one line; the traceback only on request
            if os.environ.get("CLOUDOPS_TRACEBACK"):
                raise
            raise Exit(f"cloudops: libvirt: {str(exc).strip()} (CLOUDOPS_TRACEBACK=1 shows where)", code=1) from None
        except KeyboardInterrupt:
            raise Exit("cloudops: interrupted", code=130) from None
        except BrokenPipeError:  # output piped into `head` and the like
            sys.stderr.close()
            raise Exit(code=0) from None
        finally:
            stderr_progress.close()  # a bar a failed step left: off the screen before the error line

    return wrapper


def emit_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


# Stage lines ("… message") and bars on stderr, so stdout stays clean for --json: what tasks pass to the library
# as its ``progress`` callback (cloudops.progress: live bars on a terminal, plain lines elsewhere).
progress = stderr_progress


def load_inventory(c, path=None):
    from cloudops import inventory as inv

    return inv.load(inv.default_path(path, c.config.get("inventory")))


def select_hosts(c, hosts=None, group=None, limit=None, inventory_path=None):
    """The inventory hosts chosen by --hosts/--group/--limit (all when none is given)."""
    return load_inventory(c, inventory_path).select(hosts=hosts, groups=group, limit=limit)


def finish(result, as_json: bool, describe_value=None) -> None:
    """Print a fleet result as a table or JSON; exit non-zero when any host failed."""
    if as_json:
        emit_json(result.to_dict())
    else:
        print(result.table(describe_value) if describe_value else result.table())
    if result.exit_code:
        failed = ", ".join(r.host for r in result.failed)
        raise Exit(f"cloudops: failed on {len(result.failed)} host(s): {failed}", code=result.exit_code)


SELECT_HELP = {
    "hosts": "host names or glob patterns, comma-separated",
    "group": "inventory group(s), comma-separated",
    "limit": "further limit to these hosts/groups/patterns (!x excludes)",
    "inventory": "inventory file (default: $CLOUDOPS_INVENTORY, config 'inventory', then the lab's)",
    "json": "print JSON for scripts instead of a table",
    "workers": "hosts worked on at once (default: config fleet.workers)",
    "timeout": "seconds each host may take (default: config fleet.timeout)",
}
