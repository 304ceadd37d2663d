"""requirements/lock.txt (scripts/lock.py): what scripts/setup.sh installs is inside pyproject.toml's ranges,
and the lock's reader and checker catch what they are for."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock.txt"

_spec = importlib.util.spec_from_file_location("fedlora_lock_script", REPO / "scripts" / "lock.py")
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + extras["dev"] + extras["assets"]]


def test_lock_pins_every_requirement_inside_its_range():
    pins = lock.read_lock(LOCK)
    for req in _requirements():
        name = lock.canonical(req.name)
        assert name in pins, f"requirements/lock.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"
    assert pins["torch"] == "2.13.0"  # the local CPU wheel; any other torch is a multi-GB CUDA build
    assert "fedlora" not in pins


def test_lock_has_transitive_packages_and_no_local_labels():
    pins = lock.read_lock(LOCK)
    direct = {lock.canonical(r.name) for r in _requirements()}
    assert len(set(pins) - direct) >= 50  # flwr, transformers, ray, ... pull in many more
    assert not [v for v in pins.values() if "+" in v]


def test_read_lock_names_a_bad_line(tmp_path):
    path = tmp_path / "lock.txt"
    path.write_text("# header\nnumpy==2.0.0  # why\n\npeft>=0.17\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:4: 'peft>=0.17' is not 'name==version'")):
        lock.read_lock(path)


def test_check_reports_only_differing_installed_versions():
    pins = {"peft": "0.22.0", "torch": "2.13.0", "absent": "1.0", "numpy": "1.26"}
    have = {"peft": "0.21.2", "torch": "2.13.0+cpu", "other": "3.0", "numpy": "1.26.0"}
    assert lock.mismatches(pins, have) == ["peft: installed 0.21.2, lock 0.22.0"]


def test_write_then_check_round_trip(tmp_path):
    path = tmp_path / "lock.txt"
    lock.write(path)
    pins = lock.read_lock(path)
    assert pins and lock.mismatches(pins, lock.installed()) == []
    assert lock.canonical("Flwr_Datasets") == "flwr-datasets"
