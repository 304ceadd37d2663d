"""Write or check requirements/lock.txt, the pip constraints file of an environment known to pass.

    python scripts/lock.py write requirements/lock.txt   # every installed distribution, pinned
    python scripts/lock.py check requirements/lock.txt   # exit 1 if an installed version differs from its pin

Run with the Python of the environment in question (scripts/setup.sh calls ``check``; scripts/check_latest.sh
``--write-lock`` calls ``write``). Pins are ``name==version`` with PEP 503 names; local version labels are
dropped (``torch==2.13.0`` matches the local ``2.13.0+cpu`` wheel). fedlora itself, pip, setuptools and wheel
are not pinned (pip's own rule for ``pip freeze``).
"""

from __future__ import annotations

import re
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

SKIP = {"fedlora", "pip", "setuptools", "wheel"}
HEADER = """\
# fedlora's lock: exact versions of every package of an environment in which the whole suite passed
# (`make test`), transitive packages included. A pip constraints file: scripts/setup.sh installs with
# `pip install -c requirements/lock.txt`. Resolved for CPython {python} on {platform}; a package this
# file does not name (another Python's back-port) is left to pip. pyproject.toml keeps the supported ranges.
# Regenerate: `bash scripts/check_latest.sh --write-lock` (fresh venv, newest allowed versions, fast
# integration subset), then `make test` must pass on the new lock before it is committed.
# Written {date} by scripts/lock.py.
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    return version.split("+", 1)[0]


def same_version(a: str, b: str) -> bool:
    """PEP 440 equality of the public versions (``3.8`` == ``3.8.0``; local labels ignored)."""
    try:
        from packaging.version import Version
    except ImportError:  # packaging comes with every environment setup.sh builds; be safe anyway
        return public(a) == public(b)
    return Version(public(a)) == Version(public(b))


def installed() -> dict[str, str]:
    """{canonical name: version} of every distribution on this interpreter's path except :data:`SKIP`."""
    out: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) not in SKIP:
            out.setdefault(canonical(name), dist.version)
    return out


def read_lock(path: Path) -> dict[str, str]:
    """{canonical name: version} of every ``name==version`` line; raises ValueError naming a bad line."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if match is None:
            raise ValueError(f"{path}:{number}: {raw!r} is not 'name==version'")
        pins[canonical(match.group(1))] = match.group(2)
    return pins


def mismatches(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    """Pinned packages whose installed version differs (packages the lock pins but nothing installed are
    fine: a constraints file only constrains)."""
    return [f"{name}: installed {have[name]}, lock {want}" for name, want in sorted(pins.items())
            if name in have and not same_version(have[name], want)]


def write(path: Path) -> None:
    import platform

    lines = [f"{name}=={public(version)}" for name, version in sorted(installed().items())]
    header = HEADER.format(python=platform.python_version(), platform=f"{platform.system()} {platform.machine()}",
                           date=datetime.now(timezone.utc).strftime("%Y-%m-%d"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n".join(lines) + "\n")
    print(f"lock: wrote {len(lines)} pins to {path}")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("write", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(argv[1])
    if argv[0] == "write":
        write(path)
        return 0
    bad = mismatches(read_lock(path), installed())
    for line in bad:
        print(f"lock: {line}", file=sys.stderr)
    if bad:
        print(f"lock: the environment differs from {path} in {len(bad)} package(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
