"""Where facerecon keeps user-level data (converted face models, caches).

The data directory follows the platform convention and can be moved with the
``FACERECON_HOME`` environment variable:

* Linux and other Unix: ``$XDG_DATA_HOME/facerecon`` (default ``~/.local/share/facerecon``)
* macOS: ``~/Library/Application Support/facerecon``
* Windows: ``%LOCALAPPDATA%\\facerecon``
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_HOME = "FACERECON_HOME"
ENV_FACE_MODEL = "FACERECON_FACE_MODEL"
ENV_NO_DOWNLOAD = "FACERECON_NO_DOWNLOAD"


def data_dir() -> Path:
    """Return the user-level data directory (not created)."""
    override = os.environ.get(ENV_HOME)
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "facerecon"


def models_dir() -> Path:
    """Directory holding converted face models (``<name>.h5``)."""
    return data_dir() / "models"


def cache_dir() -> Path:
    """Directory for downloads and other re-creatable files."""
    return data_dir() / "cache"


def downloads_disabled() -> bool:
    """True when the environment switches automatic downloads off."""
    return os.environ.get(ENV_NO_DOWNLOAD, "").strip().lower() in {"1", "true", "yes", "on"}
