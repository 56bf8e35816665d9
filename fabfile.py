"""`fab` looks for a module named fabfile: it gets the same task collection as `invoke`."""

from cloudops.tasks import ns  # noqa: F401
