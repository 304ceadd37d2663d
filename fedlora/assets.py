"""Where fedlora finds things on disk: installed asset packages and its own cache root.

Asset packages (models, datasets) are located with ``importlib.util.find_spec`` and never imported: importing
them could run code or pull heavy dependencies, and only their files are needed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def cache_root() -> Path:
    """Root of fedlora's on-disk cache: ``$FEDLORA_CACHE`` or ``~/.cache/fedlora``.

    Read on every call, so a changed environment variable takes effect at once (tests isolate it)."""
    env = os.environ.get("FEDLORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedlora"


def package_dir(module: str, pip_name: str | None = None) -> Path:
    """Directory of the installed package ``module``, located without importing it.

    Raises:
        ModuleNotFoundError: naming the pip package to install (``pip_name``, default ``module`` with ``_``
            replaced by ``-``) when ``module`` is not installed.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pip_name = pip_name or module.replace("_", "-")
        raise ModuleNotFoundError(
            f"package {module!r} is not installed; install it with `pip install --no-deps {pip_name}`"
        )
    return Path(list(spec.submodule_search_locations)[0])
