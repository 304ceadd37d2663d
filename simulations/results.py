"""Run outputs under ``<results-dir>/<run-name>/``: config, per-round metrics, checkpoints, plots.

Layout::

    config.json          the validated run config (+ fingerprint, versions)
    metrics.jsonl        one JSON object per round (round 0 = the initial model): every JSON-serialisable
                         entry of the round record, keys sorted; the ``columns`` given to
                         :class:`RunOutputs` are on every line (null where a round has no value)
    checkpoint/LATEST    the name of the current version directory
    checkpoint/round-000003/
                         global_state.safetensors, strategy.json (+ strategy.safetensors), server.json +
                         server.safetensors (run config, fingerprint, bytes, time, RNG states), and
                         MANIFEST.json, written last: the sha256 and size of every other file
    adapter/             final peft LoRA adapter (export_peft_adapter)
    accuracy_vs_round.png, accuracy_vs_bytes.png

Checkpoint protocol (:class:`CheckpointStore`), so that at every moment one complete checkpoint exists:
write ``round-K.tmp/`` (every file fsync'ed, the manifest last, the directory fsync'ed) → rename it to
``round-K`` → fsync ``checkpoint/`` → switch ``LATEST`` (temp file, fsync, ``os.replace``, fsync
``checkpoint/``) → only then delete the previous version. A version is *complete* when its manifest parses
and every file it lists has the listed size and sha256. Loading follows ``LATEST`` and, if the pointer is
missing or corrupt or names an incomplete version, falls back to the newest complete version. Round 0 (the
initial global state) is checkpointed before round 1 starts. No pickle anywhere: arrays in safetensors,
the rest in JSON (:mod:`strategies.persistence`).

Start of a run (:meth:`RunOutputs.prepare`), before any model is loaded: ``resume=true`` needs a complete
checkpoint written with the same settings (every run-config key but those of
:data:`fedlora.run_config.RESUME_MAY_CHANGE`), else it refuses naming the run dir or each difference; a
run dir that already holds a run (a checkpoint or metrics) is not overwritten unless ``overwrite=true``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora.durable import fsync_dir, replace_durably, sha256_hex, write_durably
from fedlora.run_config import ConfigError, RunConfig, resume_differences
from strategies.persistence import (
    state_files,
    state_from_files,
    tree_files,
    tree_from_files,
)

LOGGER = logging.getLogger("fedlora.server")
CHECKPOINT_FORMAT = "fedlora.checkpoint/2"
MANIFEST = "MANIFEST.json"
POINTER = "LATEST"
#: a version directory's name: ``round-<round, 6+ digits>`` or ``round-<round>-<n>`` (n-th rewrite of a round)
_VERSION = re.compile(r"round-(\d{6,})(?:-(\d+))?")


def resolve_results_dir(results_dir: str) -> Path:
    """Absolute results root: the ``results-dir`` key, else ``$FEDLORA_RESULTS_DIR``, else ``~/fedlora-results``.

    The ServerApp's working directory is the SuperLink's, so relative paths are refused."""
    root = results_dir or os.environ.get("FEDLORA_RESULTS_DIR") or str(Path.home() / "fedlora-results")
    path = Path(root).expanduser()
    if not path.is_absolute():
        raise ValueError(
            f"results directory {root!r} (run config 'results-dir' or $FEDLORA_RESULTS_DIR): must be an absolute "
            "path (the ServerApp runs in the "
            "SuperLink's working directory)"
        )
    return path


class CheckpointError(RuntimeError):
    """No complete checkpoint can be loaded; the message names the directory and what is wrong."""


# ============================================================================== versioned checkpoint store
class CheckpointStore:
    """Versioned checkpoint directories under ``directory`` with an atomically switched ``LATEST`` pointer.

    Invariant: once :meth:`save` has returned for some round, a kill at any later instant (including
    inside a later :meth:`save`) leaves a directory from which :meth:`load` returns the files of that
    round or of a later saved one, never a mix and never nothing."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def exists(self) -> bool:
        """Whether anything checkpoint-like is there (complete or not, any format)."""
        return self.dir.is_dir() and any(self.dir.iterdir())

    def versions(self) -> list[str]:
        """Names of the version directories (complete or not), oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted((p.name for p in self.dir.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name)),
                      key=_version_order)

    def save(self, rnd: int, files: Mapping[str, bytes]) -> str:
        """Write ``files`` as the version of round ``rnd``, make it current, delete the others; return its name."""
        if not files or MANIFEST in files or any("/" in n or n.startswith(".") for n in files):
            raise ValueError(f"checkpoint files {sorted(files)}: plain names, not {MANIFEST!r}, at least one")
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True)
            fsync_dir(self.dir.parent)
        name = self._free_name(rnd)
        tmp = self.dir / f"{name}.tmp"
        if tmp.exists():  # left by a kill during an earlier save
            shutil.rmtree(tmp)
        tmp.mkdir()
        for fname, data in files.items():
            write_durably(tmp / fname, data)
        manifest = {"format": CHECKPOINT_FORMAT, "round": int(rnd),
                    "files": {f: {"sha256": sha256_hex(d), "size": len(d)} for f, d in sorted(files.items())}}
        write_durably(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        fsync_dir(tmp)
        os.replace(tmp, self.dir / name)
        fsync_dir(self.dir)
        pointer_tmp = self.dir / f".{POINTER}.tmp"
        write_durably(pointer_tmp, f"{name}\n".encode())
        os.replace(pointer_tmp, self.dir / POINTER)
        fsync_dir(self.dir)
        for old in sorted(self.dir.iterdir()):  # the new version is current: everything else goes
            if old.name in (name, POINTER):
                continue
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        fsync_dir(self.dir)
        return name

    def load(self) -> tuple[str, dict[str, bytes], list[str]]:
        """``(version, files, skipped)``: the version ``LATEST`` names if complete, else the newest complete
        one; ``skipped`` says which were passed over and why.

        Raises:
            CheckpointError: no complete version (the message lists what was found and why it failed).
        """
        skipped: list[str] = []
        if (self.dir / "strategy.json").exists() and not self.versions():
            raise CheckpointError(f"{self.dir} holds a checkpoint of an older fedlora (pickle, no manifest): it "
                                  "is not loaded; start the run again with overwrite=true")
        pointed = self._pointer(skipped)
        order = ([pointed] if pointed else []) + [v for v in reversed(self.versions()) if v != pointed]
        for version in order:
            try:
                return version, self._verified(version), skipped
            except (OSError, ValueError, KeyError, TypeError) as err:
                skipped.append(f"{version}: {err}")
        found = "; ".join(skipped) if skipped else "nothing"
        raise CheckpointError(f"no complete checkpoint in {self.dir} (found: {found})")

    # ---------------------------------------------------------------------------------- internals
    def _free_name(self, rnd: int) -> str:
        """``round-<rnd>``, or ``round-<rnd>-<n>`` if a version of that round exists (it may be the current
        one, which must survive until the new one is current)."""
        taken = set(self.versions())
        name, n = f"round-{rnd:06d}", 1
        while name in taken:
            name, n = f"round-{rnd:06d}-{n}", n + 1
        return name

    def _pointer(self, skipped: list[str]) -> str | None:
        path = self.dir / POINTER
        try:
            name = path.read_text().strip()
        except FileNotFoundError:
            if self.versions():
                skipped.append(f"{POINTER}: missing")
            return None
        except (OSError, UnicodeDecodeError) as err:
            skipped.append(f"{POINTER}: unreadable ({err})")
            return None
        if not _VERSION.fullmatch(name):
            skipped.append(f"{POINTER}: corrupt ({name[:40]!r} is not a version name)")
            return None
        return name

    def _verified(self, version: str) -> dict[str, bytes]:
        src = self.dir / version
        manifest = json.loads((src / MANIFEST).read_text())
        if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{MANIFEST}: format is not {CHECKPOINT_FORMAT!r}")
        files: dict[str, bytes] = {}
        for fname, meta in manifest["files"].items():
            data = (src / fname).read_bytes()
            if len(data) != meta["size"] or sha256_hex(data) != meta["sha256"]:
                raise ValueError(f"{fname}: size or sha256 differs from {MANIFEST} (corrupt file)")
            files[fname] = data
        return files


def _version_order(name: str) -> tuple[int, int]:
    m = _VERSION.fullmatch(name)
    assert m is not None
    return int(m.group(1)), int(m.group(2) or 0)


# ============================================================================== a loaded checkpoint
@dataclass
class Checkpoint:
    """A complete checkpoint as loaded: ``state`` (the strategy's ``state_dict()``), ``server`` (run config,
    fingerprint, cumulative bytes, elapsed time, RNG states), its ``version`` and the versions ``skipped``."""

    version: str
    state: dict[str, Any]
    server: dict[str, Any]
    skipped: list[str] = field(default_factory=list)

    @property
    def round(self) -> int:
        return int(self.state["round"])

    @property
    def extra(self) -> dict[str, Any]:
        """What the caller passed as ``extra`` to :meth:`RunOutputs.save_checkpoint`."""
        return {k: v for k, v in self.server.items() if k not in ("format", "rng")}

    def require_fingerprint(self, fingerprint: str | None) -> None:
        """Raise ``ConfigError('resume', ...)`` unless the checkpoint's outer-factor fingerprint is ``fingerprint``
        (same run config, but other outer factors: e.g. the model files changed)."""
        saved = self.server.get("fingerprint")
        if saved != fingerprint:
            raise ConfigError("resume", f"the checkpoint {self.version} was written with outer-factor fingerprint "
                                        f"{str(saved)[:16]}…, this model's is {str(fingerprint)[:16]}… (the model "
                                        "or its outer factors changed): it cannot be continued")

    def restore_rngs(self) -> None:
        """Set Python's, numpy's global and torch's CPU RNG to their states at the checkpoint."""
        rng = self.server["rng"]
        py = rng["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
        npy = rng["numpy"]
        np.random.set_state((npy["name"], npy["keys"], npy["pos"], npy["has-gauss"], npy["cached-gaussian"]))
        torch.set_rng_state(torch.from_numpy(np.array(rng["torch"], dtype=np.uint8)))


def _rng_states() -> dict[str, Any]:
    """Python's, numpy's global and torch's CPU RNG states as JSON values and arrays (exact)."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": {"version": version, "state": list(state), "gauss": gauss},
        "numpy": {"name": str(name), "keys": np.asarray(keys), "pos": int(pos), "has-gauss": int(has_gauss),
                  "cached-gaussian": float(cached)},
        "torch": torch.get_rng_state().numpy().copy(),
    }


# ============================================================================== the run's outputs
class RunOutputs:
    """Writes one run's outputs; every file write is atomic (temp + fsync + rename) and checkpoints follow
    the protocol of :class:`CheckpointStore`.

    ``columns``: keys every metrics.jsonl line carries, null where a record has none (so that every line
    has the same columns whatever the round, task or options); other keys are written as they come.
    """

    def __init__(self, run_dir: Path, columns: Iterable[str] = ()) -> None:
        self.dir = run_dir
        self.columns = tuple(columns)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.checkpoint_dir = self.dir / "checkpoint"
        self.store = CheckpointStore(self.checkpoint_dir)

    # -------------------------------------------------------------- start of a run
    def prepare(self, cfg: RunConfig) -> Checkpoint | None:
        """Check the run dir against ``cfg`` before anything is loaded or written; return the checkpoint to
        resume from (``resume=true``) or None for a fresh run (previous outputs removed if ``overwrite=true``).

        Raises:
            ConfigError: ``resume``: no complete checkpoint (the message names the run dir), or one written
                with different settings (the message names each key, saved and new value);
                ``overwrite``: the run dir holds a previous run and neither resume nor overwrite is set.
        """
        if cfg.resume:
            try:
                ckpt = self.read_checkpoint()
            except CheckpointError as err:
                raise ConfigError("resume", f"nothing to resume in {self.dir}: {err}") from None
            diffs = resume_differences(ckpt.server.get("run-config", {}), cfg)
            if diffs:
                raise ConfigError("resume", f"the checkpoint in {self.dir} ({ckpt.version}) was written with other "
                                            f"settings: {'; '.join(diffs)}")
            return ckpt
        previous = self.previous_run()
        if previous and not cfg.overwrite:
            raise ConfigError("overwrite", f"{self.dir} already holds a run ({previous}): add resume=true to "
                                           "continue it, overwrite=true to replace it, or choose another run-name")
        if previous:
            LOGGER.warning("overwrite=true: removing the previous run's outputs in %s (%s)", self.dir, previous)
            for sub in (self.checkpoint_dir, self.dir / "adapter"):
                if sub.exists():
                    shutil.rmtree(sub)
            self.reset_metrics()
        return None

    def previous_run(self) -> str:
        """What in the run dir shows an earlier run ("" if nothing): a checkpoint, metrics lines."""
        found = []
        if self.store.exists():
            found.append(f"a checkpoint in {self.checkpoint_dir.name}/")
        if self.metrics_path.exists() and self.metrics_path.read_text().strip():
            found.append(f"{self.metrics_path.name} with {len(self.read_metrics())} rounds")
        return " and ".join(found)

    # -------------------------------------------------------------- config and metrics
    def write_config(self, config: dict[str, Any]) -> None:
        _atomic_text(self.dir / "config.json", json.dumps(config, indent=2, sort_keys=True, default=str))

    def reset_metrics(self) -> None:
        _atomic_text(self.metrics_path, "")

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one line: the :attr:`columns` (null if absent) and every JSON-serialisable entry of ``record``."""
        line = dict.fromkeys(self.columns)
        line.update({k: v for k, v in record.items() if k in line or _jsonable(v)})
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(line, sort_keys=True, default=_default) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self, up_to_round: int | None = None) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        rows = [json.loads(x) for x in self.metrics_path.read_text().splitlines() if x.strip()]
        return [r for r in rows if up_to_round is None or r["round"] <= up_to_round]

    def truncate_metrics(self, up_to_round: int) -> list[dict[str, Any]]:
        """Keep rounds ≤ ``up_to_round`` (lines a killed run wrote after its last checkpoint go)."""
        rows = self.read_metrics(up_to_round)
        _atomic_text(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        return rows

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(self, strategy_state: dict[str, Any], extra: dict[str, Any]) -> str:
        """Make ``strategy_state`` + ``extra`` (+ the RNG states, added here) the current checkpoint (of round
        ``strategy_state["round"]``); return its version name. ``extra`` must be JSON values (e.g. the run
        config, fingerprint, bytes and time so far)."""
        server = {**extra, "format": CHECKPOINT_FORMAT, "rng": _rng_states()}
        files = {**state_files(strategy_state), **tree_files(server, "server")}
        return self.store.save(int(strategy_state["round"]), files)

    def has_checkpoint(self) -> bool:
        """Whether anything checkpoint-like is in ``checkpoint/`` (complete or not)."""
        return self.store.exists()

    def read_checkpoint(self) -> Checkpoint:
        """The current complete checkpoint (RNGs untouched; see :meth:`Checkpoint.restore_rngs`).

        Raises:
            CheckpointError: none is complete (the message names the directory and each problem).
        """
        version, files, skipped = self.store.load()
        for problem in skipped:
            LOGGER.warning("checkpoint %s: passed over %s", self.checkpoint_dir, problem)
        try:
            state, server = state_from_files(files), tree_from_files(files, "server")
        except (KeyError, ValueError, TypeError) as err:  # complete on disk, but not a fedlora checkpoint
            raise CheckpointError(f"{self.checkpoint_dir / version}: unreadable checkpoint ({err!r})") from None
        return Checkpoint(version, state, server, skipped)

    def load_checkpoint(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(strategy state, extra)`` of the current checkpoint; restores the RNG states."""
        ckpt = self.read_checkpoint()
        ckpt.restore_rngs()
        return ckpt.state, ckpt.extra


def _jsonable(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool, type(None), list, dict))


def _default(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return str(v)


def _atomic_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically and durably (:func:`fedlora.durable.replace_durably`)."""
    replace_durably(path, text.encode())
