"""`invoke` in a checkout looks for a module named tasks: the collection itself is ``cloudops.tasks``."""

from cloudops.tasks import ns  # noqa: F401
