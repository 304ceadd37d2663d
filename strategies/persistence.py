"""Strategy checkpoint state as files (safetensors + JSON, no pickle), and durable file writes.

A strategy's ``state_dict()`` is a dict with ``format`` = :data:`STATE_FORMAT`, ``strategy`` (registry
name), ``round``, ``global_state`` (``dict[str, ndarray]`` or ``None``), ``rng`` (numpy bit-generator
state), ``assigner``, ``history``, ``settings`` (``rank``, ``inner_rank``, ``outer_fingerprint``,
``weighting``, ``seed``), ``extra`` (strategy specific), ``outer-holders`` (nodes known to hold the server's
outer factors) and, from wrapper strategies, further keys (e.g. ``user-dp``). :func:`state_files` turns it
into named files:

- ``global_state.safetensors``: the global state, one tensor per key (absent when there is no state);
- ``strategy.json``: everything else, plus ``global_keys`` (the key order of the global state, or
  ``null``);
- ``strategy.safetensors``: only when the rest of the state holds numpy arrays; in ``strategy.json`` each
  is the object ``{"$array": "<name>"}``.

Invariants (tested in ``strategies/persistence_test.py``):

- exact: :func:`state_from_files` of :func:`state_files` equals the state; arrays keep their dtype (stored
  little-endian), shape and bytes; dicts keep their key order; floats (NaN and ±inf included), Python ints
  of any size, ``None``, strings, bools, lists and str-keyed dicts come back as they were;
- anything else (a tuple, a non-str dict key, a numpy scalar, an object) is refused with a ``TypeError``
  naming its path instead of being changed silently on the way to disk.

Files are written with :mod:`fedlora.durable` (the one copy of fsync'ed writes); the checkpoint protocol
of ``simulations/results.py`` and the ``save_strategy_state`` helper use them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from fedlora.durable import fsync_dir, write_durably

STATE_FORMAT = "fedlora.strategy/1"
#: settings a checkpoint must share with the strategy that loads it
MATCHING_SETTINGS = ("rank", "inner_rank", "outer_fingerprint")
#: JSON object standing for an array kept in the tree's safetensors file
ARRAY_REF = "$array"
GLOBAL_FILE = "global_state.safetensors"


# ------------------------------------------------------------------------------------------ durable files
# ------------------------------------------------------------------------------------------ JSON trees
def tree_files(tree: Any, stem: str) -> dict[str, bytes]:
    """``<stem>.json`` holding ``tree`` and, if it contains numpy arrays, ``<stem>.safetensors`` holding them.

    Raises:
        TypeError: a value JSON would not give back exactly (the message names its path).
    """
    arrays: dict[str, np.ndarray] = {}
    text = json.dumps(_encode(tree, "", arrays), allow_nan=True)  # dict order kept
    files = {f"{stem}.json": text.encode()}
    if arrays:
        files[f"{stem}.safetensors"] = _arrays_bytes(arrays)
    return files


def tree_from_files(files: Mapping[str, bytes], stem: str) -> Any:
    """What :func:`tree_files` was given.

    Raises:
        KeyError: ``<stem>.json`` is missing, or an array it refers to is.
    """
    arrays = load_safetensors(files[f"{stem}.safetensors"]) if f"{stem}.safetensors" in files else {}
    return _decode(json.loads(files[f"{stem}.json"]), arrays)


def _encode(value: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
    if value is None or type(value) in (bool, int, float, str):
        return value
    if type(value) is list:
        return [_encode(v, f"{path}[{i}]", arrays) for i, v in enumerate(value)]
    if type(value) is dict:
        bad = [k for k in value if type(k) is not str]
        if bad:
            raise TypeError(f"state {path or '/'}: dict key {bad[0]!r} is not a str (JSON would turn it into one)")
        if ARRAY_REF in value:
            raise TypeError(f"state {path or '/'}: the key {ARRAY_REF!r} is reserved for array references")
        return {k: _encode(v, f"{path}/{k}", arrays) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        name = f"a{len(arrays)}"
        arrays[name] = value
        return {ARRAY_REF: name}
    raise TypeError(f"state {path or '/'}: {type(value).__name__} is not stored exactly (use None, bool, int, "
                    "float, str, list, str-keyed dict or numpy array)")


def _decode(value: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    if isinstance(value, dict):
        if set(value) == {ARRAY_REF}:
            return arrays[value[ARRAY_REF]]
        return {k: _decode(v, arrays) for k, v in value.items()}
    return value


def _arrays_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """safetensors bytes of ``arrays`` (made C-contiguous first: safetensors writes the raw buffer;
    ``np.ascontiguousarray`` would turn a 0-d array into shape (1,))."""
    return save_safetensors({k: np.asarray(v).copy(order="C") for k, v in arrays.items()})


# ------------------------------------------------------------------------------------------ strategy state
def state_files(state: Mapping[str, Any]) -> dict[str, bytes]:
    """A ``state_dict()`` as named files (see the module docstring)."""
    meta = {k: v for k, v in state.items() if k != "global_state"}
    gs = state.get("global_state")
    meta["global_keys"] = list(gs.keys()) if gs is not None else None
    files = tree_files(meta, "strategy")
    if gs is not None:
        files[GLOBAL_FILE] = _arrays_bytes(gs)
    return files


def state_from_files(files: Mapping[str, bytes]) -> dict[str, Any]:
    """What :func:`state_files` was given."""
    meta = tree_from_files(files, "strategy")
    keys = meta.pop("global_keys")
    if keys is None:
        meta["global_state"] = None
    else:
        arrays = load_safetensors(files[GLOBAL_FILE])
        if sorted(arrays) != sorted(keys):
            raise ValueError(f"{GLOBAL_FILE} holds {sorted(arrays)}, strategy.json lists {sorted(keys)}")
        meta["global_state"] = {k: arrays[k] for k in keys}
    return meta


def save_strategy_state(state: Mapping[str, Any], directory: str | Path) -> None:
    """Write a ``state_dict()`` as :func:`state_files` under ``directory`` (each file fsync'ed).

    A plain directory of files: the run's checkpoints (versioned, switched atomically, verified on load)
    are ``simulations.results.RunOutputs.save_checkpoint``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in state_files(state).items():
        write_durably(out / name, data)
    fsync_dir(out)


def load_strategy_state(directory: str | Path) -> dict[str, Any]:
    """Read what :func:`save_strategy_state` wrote."""
    src = Path(directory)
    return state_from_files({p.name: p.read_bytes() for p in src.iterdir() if p.is_file()})


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
