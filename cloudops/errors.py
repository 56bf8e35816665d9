"""The one exception type that means "the user asked for something that cannot be done".

Library code raises ``CloudopsError("one clear line")``; tasks turn it into
``invoke.Exit`` (see ``cloudops.tasks._cli``) so the operator sees one line and a non-zero
exit, never a traceback. Any other exception is a bug and keeps its traceback.
A failure that callers branch on has a subclass of its own (``NotFound``), so they catch the
type instead of matching the message.
"""


class CloudopsError(Exception):
    """A user-facing failure whose message is one clear line."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class NotFound(CloudopsError):
    """What was asked for is not there (a VM no selected host has); ``unreachable`` lists the hosts
    that could not be asked, each as "host: why" (the thing may be on one of them)."""

    def __init__(self, message: str, *, unreachable=(), exit_code: int | None = None):
        super().__init__(message, exit_code=exit_code)
        self.unreachable = tuple(unreachable)
