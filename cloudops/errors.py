"""The one exception type that means "the user asked for something that cannot be done".

Library code raises ``CloudopsError("one clear line")``; tasks turn it into
``invoke.Exit`` (see ``cloudops.tasks._cli``) so the operator sees one line and a non-zero
exit, never a traceback. Any other exception is a bug and keeps its traceback.
"""


class CloudopsError(Exception):
    """A user-facing failure whose message is one clear line."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
