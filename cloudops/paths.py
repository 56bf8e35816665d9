"""Where the project keeps its files: templates (inside the package), the checkout's root, the var/ tree.

Templates and recipes ship inside the package and are found with ``importlib.resources``, so
an installed cloudops needs no source tree. ``ROOT`` is the checkout the package runs from (or,
installed, the directory above the package).

The state directory (``var_dir``: what belongs to this control machine, caches, spool, the
lab's files) is, first match wins: ``$CLOUDOPS_STATE_DIR``, ``$CLOUDOPS_VAR`` (the older name),
``state_dir`` in the configuration, ``<checkout>/var`` when running from a checkout (a ``pyproject.toml`` beside the package), else
``/var/lib/cloudops`` for root and ``$XDG_STATE_HOME/cloudops`` (``~/.local/state/cloudops``)
for anyone else.
"""

import os
from importlib.resources import files
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = Path(str(files("cloudops") / "templates"))


def in_checkout() -> bool:
    """True when this cloudops runs from a source checkout (editable install or ``invoke`` in the tree)."""
    return (ROOT / "pyproject.toml").is_file() and (ROOT / "cloudops" / "__init__.py").is_file()


def default_state_dir() -> Path:
    if in_checkout():
        return ROOT / "var"
    if os.geteuid() == 0:
        return Path("/var/lib/cloudops")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "cloudops"


_configured: str | None = None  # ``state_dir`` from the configuration (see ``configure``)


def configure(state_dir) -> None:
    """Use ``state_dir`` (the configuration's key) unless $CLOUDOPS_STATE_DIR or $CLOUDOPS_VAR is set."""
    global _configured
    _configured = str(state_dir) if state_dir else None


def var_dir() -> Path:
    """This control machine's state directory (see the module docstring for the order)."""
    chosen = os.environ.get("CLOUDOPS_STATE_DIR") or os.environ.get("CLOUDOPS_VAR") or _configured
    return Path(chosen).expanduser().resolve() if chosen else default_state_dir().resolve()


def lab_inventory() -> Path:
    """Where ``lab.up`` links the default lab's inventory: ``inventory/lab.yaml`` of a checkout,
    else ``<state_dir>/inventory/lab.yaml`` (never beside an installed package)."""
    if in_checkout():
        return ROOT / "inventory" / "lab.yaml"
    return var_dir() / "inventory" / "lab.yaml"


def lab_dir() -> Path:
    return var_dir() / "lab"
