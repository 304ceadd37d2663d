"""Strategy checkpoints on disk.

A strategy's ``state_dict()`` is a dict with ``format`` = :data:`STATE_FORMAT`, ``strategy`` (registry
name), ``round``, ``global_state`` (``dict[str, ndarray]`` or ``None``), ``rng`` (numpy bit-generator
state), ``assigner``, ``history``, ``settings`` (``rank``, ``inner_rank``, ``outer_fingerprint``,
``weighting``, ``seed``), ``extra`` (strategy specific) and, from wrapper strategies, further
JSON-serialisable keys (e.g. ``user-dp``). On disk a directory holds it as

- ``global_state.npz``: the arrays as ``a0``, ``a1``, … in key order (absent when there is no state),
- ``strategy.json``: everything else, plus ``global_keys`` (the keys of ``a0``, ``a1``, …, or ``null``).

Saving then loading gives back equal values, arrays bit-identical (dtypes and bytes kept).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

STATE_FORMAT = "fedlora.strategy/1"
#: settings a checkpoint must share with the strategy that loads it
MATCHING_SETTINGS = ("rank", "inner_rank", "outer_fingerprint")


def save_strategy_state(state: Mapping[str, Any], directory: str | Path) -> None:
    """Write a ``state_dict()`` as ``global_state.npz`` + ``strategy.json`` under ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in state.items() if k != "global_state"}
    gs = state.get("global_state")
    meta["global_keys"] = list(gs.keys()) if gs is not None else None
    if gs is not None:
        np.savez(out / "global_state.npz", **{f"a{i}": v for i, v in enumerate(gs.values())})
    (out / "strategy.json").write_text(json.dumps(meta, indent=1, sort_keys=True))


def load_strategy_state(directory: str | Path) -> dict[str, Any]:
    """Read what :func:`save_strategy_state` wrote."""
    src = Path(directory)
    meta = json.loads((src / "strategy.json").read_text())
    keys = meta.pop("global_keys")
    if keys is None:
        meta["global_state"] = None
    else:
        with np.load(src / "global_state.npz", allow_pickle=False) as npz:
            meta["global_state"] = {k: npz[f"a{i}"].copy() for i, k in enumerate(keys)}
    return meta


def check_loadable(state: Mapping[str, Any], name: str, settings: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the mismatching key unless ``state`` is a checkpoint of strategy
    ``name`` with the same :data:`MATCHING_SETTINGS` as ``settings``."""
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"format={state.get('format')!r}: expected {STATE_FORMAT!r}")
    if state.get("strategy") != name:
        raise ValueError(f"strategy={state.get('strategy')!r}: this strategy is {name!r}")
    saved = state.get("settings", {})
    for key in MATCHING_SETTINGS:
        if saved.get(key) != settings.get(key):
            raise ValueError(f"{key}: checkpoint has {saved.get(key)!r}, strategy has {settings.get(key)!r}")
