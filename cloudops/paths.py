"""Where the project keeps its files: templates (inside the package), the checkout's root, the var/ tree.

Templates and recipes ship inside the package and are found with ``importlib.resources``, so
an installed cloudops needs no source tree. ``ROOT`` is the checkout the package runs from (or,
installed, the directory above the package); the state directory of an installed cloudops is the
work of issue 11 and still defaults to ``<ROOT>/var`` (``CLOUDOPS_VAR`` overrides it).
"""

import os
from importlib.resources import files
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = Path(str(files("cloudops") / "templates"))


def var_dir() -> Path:
    """State, caches and lab files; ``CLOUDOPS_VAR`` overrides the default ``<repo>/var``."""
    return Path(os.environ.get("CLOUDOPS_VAR", ROOT / "var")).resolve()


def lab_dir() -> Path:
    return var_dir() / "lab"
