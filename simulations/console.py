"""What a run says: one start line, one line per round and one end line on the console, everything else
to the log.

Console lines start with :data:`PREFIX` (``[fedlora]``). ``scripts/run.sh`` writes the whole stream of
``flwr run`` (Flower's own INFO/DEBUG lines, the fedlora loggers' records, library output) to
``<run-dir>/run.log`` and shows only the ``[fedlora]`` lines; a deployment (``deploy/submit.sh``) shows
the whole stream.

- :func:`start_line` / :func:`resume_line`: the run, its main settings and where its results go;
- :func:`round_line`: one line per round (round 0 = the pretrained model): central metric, loss, bytes
  up/down, clients used/rejected/missing, seconds, DP ε, and FAILED for a round that aggregated nothing;
- :func:`done_line`: the final metric, rounds, wall time and the results directory;
- :func:`setup_logging`: the fedlora loggers (``fedlora.server``, ``fedlora.strategy``, ...) log INFO and
  above, without the prefix (to the log, not the console); library progress bars are off.

:func:`format_bytes` is the one byte formatter of the project (the benchmarks' tables use it too).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from fedlora.run_config import RunConfig

PREFIX = "[fedlora]"
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def format_bytes(n: float) -> str:
    """A byte count in decimal SI units with 3 significant digits: ``39944`` → ``"39.9 kB"``,
    ``2.66e6`` → ``"2.66 MB"``; below 1 kB whole bytes (``"512 B"``)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def format_seconds(s: float) -> str:
    """``404.2`` → ``"6m44s"``; below a minute ``"12.3s"``."""
    if s < 60:
        return f"{s:.1f}s"
    minutes, seconds = divmod(round(s), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def say(line: str) -> None:
    """Print one console line (flushed: Flower streams the ServerApp's output line by line)."""
    print(line, flush=True)


def start_line(cfg: RunConfig, run_dir: Path) -> str:
    """The first line of a fresh run: what trains, on what, how long, and where the results go."""
    ranks = f" ranks={cfg.ranks}" if cfg.ranks else ""
    dp = ""
    if cfg.dp_enabled:  # a target ε (σ calibrated on the nodes), or a fixed σ whose ε the nodes account
        dp = f" dp-epsilon={cfg.dp_epsilon:g}" if cfg.dp_epsilon > 0 else f" dp-noise={cfg.dp_noise:g}"
    user_dp = (f" user-dp-clip={cfg.user_dp_clip:g} user-dp-noise={cfg.user_dp_noise:g} "
               f"user-dp-epsilon={cfg.user_dp_epsilon:g}" if cfg.user_dp_enabled else "")
    return (f"{PREFIX} start {run_dir.name}: {cfg.strategy} rank={cfg.rank}{ranks} {cfg.model} on {cfg.dataset} "
            f"({cfg.partitioner}), {cfg.num_server_rounds} rounds, fraction-train={cfg.fraction_train:g}, "
            f"{cfg.local_steps} local steps{dp}{user_dp}; results in {run_dir}")


def resume_line(run_dir: Path, after_round: int) -> str:
    return f"{PREFIX} resuming {run_dir} after round {after_round}"


def round_line(cfg: RunConfig, rec: Mapping[str, Any]) -> str:
    """One round's line from its metrics record (``metrics.jsonl`` keys)."""
    metric = "accuracy" if rec.get("accuracy") is not None else "perplexity"
    value = rec.get(metric)
    parts = [f"{PREFIX} round {rec['round']}/{cfg.num_server_rounds}"]
    if value is not None:
        parts.append(f"{metric}={value:.4f}")
    if rec.get("loss") is not None:
        parts.append(f"loss={rec['loss']:.4f}")
    if rec["round"] > 0:
        parts.append(f"up={format_bytes(rec.get('upload-bytes') or 0)} "
                     f"down={format_bytes(rec.get('download-bytes') or 0)}")
        parts.append(f"clients ok={rec.get('clients-used')} rejected={rec.get('clients-rejected')} "
                     f"missing={rec.get('clients-missing')}")
        parts.append(f"{rec.get('round-seconds', 0):.1f}s")
    if rec.get("dp-epsilon") is not None:
        parts.append(f"dp-epsilon(max)={rec['dp-epsilon']:.3f}")
    if rec.get("dp-refused"):
        parts.append(f"dp-refused={rec['dp-refused']}")
    if rec.get("user-dp-epsilon") is not None:
        parts.append(f"user-dp-epsilon={rec['user-dp-epsilon']:.3f}")
    if rec.get("failed"):
        parts.append("FAILED: the round aggregated nothing (reasons in the log and metrics.jsonl)")
    return " ".join(parts)


def done_line(rows: Sequence[Mapping[str, Any]], run_dir: Path) -> str:
    """The last line of a run: final central metric, last round, wall time, results directory."""
    final = rows[-1] if rows else {}
    metric = "accuracy" if final.get("accuracy") is not None else "perplexity"
    value = final.get(metric)
    result = f"final {metric}={value:.4f}" if value is not None else "no central evaluation"
    took = f" in {format_seconds(final['elapsed-seconds'])}" if final.get("elapsed-seconds") is not None else ""
    return f"{PREFIX} done: {result} after round {final.get('round')}{took}; results in {run_dir}"


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler writing to whatever ``sys.stderr`` is when a record is emitted (Flower and pytest
    replace it; a handler bound to an old stream would write into a closed file)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Let the ``fedlora.*`` loggers' records of ``level`` and above through, to stderr unless the process
    already routes records (Flower's ServerApp process and pytest put handlers on the root logger; records
    propagate there), and switch off the progress bars and load reports of datasets and transformers."""
    from fedlora.experiment import quiet_libraries

    quiet_libraries()
    logger = logging.getLogger("fedlora")
    if logger.level == logging.NOTSET:
        logger.setLevel(level)
    if not logging.getLogger().handlers and not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
