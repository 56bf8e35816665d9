"""Glue between tasks and the library: user errors become one line and a non-zero exit."""

import functools
import json
import sys

from invoke import Exit

from cloudops.errors import CloudopsError


def user_errors(func):
    """Decorator for task bodies: CloudopsError -> invoke.Exit("cloudops: <message>")."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CloudopsError as exc:
            raise Exit(f"cloudops: {exc}", code=exc.exit_code) from None
        except KeyboardInterrupt:
            raise Exit("cloudops: interrupted", code=130) from None

    return wrapper


def emit_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")
