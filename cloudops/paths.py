"""Where the project keeps its files: repository root, templates, and the git-ignored var/ tree."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"


def var_dir() -> Path:
    """State, caches and lab files; ``CLOUDOPS_VAR`` overrides the default ``<repo>/var``."""
    return Path(os.environ.get("CLOUDOPS_VAR", ROOT / "var")).resolve()


def lab_dir() -> Path:
    return var_dir() / "lab"
