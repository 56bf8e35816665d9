"""The ``cloudops`` command: a Fabric program over the same task collection as ``invoke`` and ``fab``.

``pip install`` puts it on PATH; it works from any directory (the collection is imported, not
searched for), so ``cloudops vm.start ...``, ``cloudops --list`` and ``cloudops -H hv1,hv2 deploy``
all work. Its configuration files are ``cloudops.yaml`` (``/etc/cloudops.yaml``,
``~/.cloudops.yaml``, ``./cloudops.yaml``) and ``CLOUDOPS_*`` variables for keys the collection
defines; ``invoke`` in a checkout keeps reading ``invoke.yaml``.
"""

from importlib.metadata import PackageNotFoundError, version

from fabric import Config
from fabric.executor import Executor
from fabric.main import Fab


class CloudopsConfig(Config):
    """Fabric's configuration (SSH settings, ``-H`` hosts), read from cloudops's own files."""

    prefix = "cloudops"


def program() -> Fab:
    from cloudops.tasks import ns

    try:
        release = version("cloudops")
    except PackageNotFoundError:
        release = "unknown"
    return Fab(name="cloudops", version=release, namespace=ns, executor_class=Executor,
               config_class=CloudopsConfig)


def main(argv=None) -> None:
    program().run(argv)
