"""The fedlora ServerApp: builds the strategy from the run config, runs the rounds with central
evaluation on a held-out test split (round 0 included), checkpoints every round, and writes
``config.json``, ``metrics.jsonl``, the final peft adapter and PNG plots under
``<results-dir>/<run-name>/``."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flwr
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clients.node_data import check_partitioning
from fedlora import data as fdata
from fedlora.experiment import adapter_for, build_model, make_loader, set_torch_threads
from fedlora.nested import outer_bundle_of
from fedlora.outer_bundle import OuterBundle, OuterBundleStore, sketch
from fedlora.run_config import ConfigError, RunConfig, parse_run_config
from fedlora.training import evaluate
from simulations.audit import audit_dir, install_audit
from simulations.console import done_line, resume_line, round_line, say, setup_logging, start_line
from simulations.loop import run_rounds
from simulations.plots import plot_runs
from simulations.results import CheckpointError, RunOutputs, resolve_results_dir
from simulations.stable_grid import StableIdGrid
from strategies import UserLevelDP, build_strategy
from strategies.outer_delivery import OUTER_SKETCH

LOGGER = logging.getLogger("fedlora.server")
#: metrics.jsonl columns on every line, null where a round has no value (round 0: no bytes or clients;
#: a classification run: no perplexity, a causal-LM run: no accuracy; no central evaluation: neither)
METRICS_COLUMNS = (
    "round", "accuracy", "loss", "perplexity", "upload-bytes", "download-bytes", "outer-bytes", "cumulative-bytes",
    "clients-used", "clients-rejected", "clients-missing", "train-loss", "round-seconds", "elapsed-seconds",
)

def strategy_kwargs(cfg: RunConfig, fingerprint: str | None, initial_state: dict,
                    outer: OuterBundle | None = None) -> dict[str, Any]:
    """Constructor arguments of the strategy named by ``cfg.strategy``. ``outer``: the server's outer factors
    of a nested run, shipped to the nodes (``outer-factors = "server"``), or only their sketch in every train
    config (``"local"``: nodes compute their own and compare, :func:`fedlora.outer_bundle.check_sketch`)."""
    local = outer is not None and cfg.outer_factors == "local"
    kwargs: dict[str, Any] = dict(
        rank=cfg.rank,
        ranks=cfg.ranks or None,
        outer_fingerprint=fingerprint,
        outer_bundle=None if local else outer,
        initial_state=initial_state,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=min(cfg.min_train_nodes, cfg.min_available_nodes) if cfg.fraction_evaluate else 0,
        min_available_nodes=cfg.min_available_nodes,
        weighting=cfg.aggregation_weighting,
        max_update_bytes=int(cfg.max_update_mb * 2**20),
        max_num_examples=cfg.max_num_examples or None,  # bounded client claims (strategies/screening.py)
        max_update_norm=cfg.max_update_norm or None,
        norm_factor=cfg.max_update_norm_factor or None,
        num_examples_factor=cfg.max_num_examples_factor or None,  # the median rule (strategies/reply_claims.py)
        seed=cfg.seed,
        train_config={"lr": cfg.lr_for_strategy(), "local-steps": cfg.local_steps, "local-epochs": cfg.local_epochs,
                      **({OUTER_SKETCH: sketch(outer).tobytes()} if local else {})},
    )
    if cfg.strategy == "flora":
        kwargs["inner_rank"] = cfg.inner_rank
    if cfg.spec().is_nested is False:
        kwargs["lora_alpha"] = cfg.lora_alpha or None
    return kwargs


def user_dp_wrapper(strategy: Any, cfg: RunConfig, population: int) -> UserLevelDP:
    """The user-level DP wrapper of the run config: δ = ``user-dp-delta`` or 1/(10·population), refused
    unless < 1/population; σ = ``user-dp-noise`` (the run stops before exceeding ``user-dp-epsilon`` when
    one is set), or calibrated to ``user-dp-epsilon`` for the planned rounds and sampling rate.

    Raises:
        ConfigError: naming ``user-dp-delta``, ``population`` or ``user-dp-epsilon``.
    """
    from fedlora.privacy.config import default_delta

    if population < 1:
        raise ConfigError("population", f"user-level DP needs a population >= 1 (no node connected at start); "
                                        f"got {population}")
    delta = cfg.user_dp_delta or default_delta(population)
    try:
        if cfg.user_dp_noise > 0:
            return UserLevelDP(strategy, cfg.user_dp_noise, cfg.user_dp_clip, delta, population,
                               cfg.user_dp_epsilon or None)
        return UserLevelDP.calibrated(strategy, cfg.user_dp_epsilon, cfg.user_dp_clip, delta, population,
                                      cfg.num_server_rounds)
    except ValueError as err:
        key = "user-dp-delta" if str(err).startswith("delta=") else "user-dp-epsilon"
        raise ConfigError(key, str(err)) from err


class CentralEvaluator:
    """Evaluates a global state on the fixed held-out test split (no client sees it), or with
    ``validation-size`` on the central validation split held out from the training pool (tuning: the test
    split is never touched). ``max-test-examples`` evaluates on the split's first N rows; with
    ``final-full-test`` the last round (``num-server-rounds``) uses the whole split."""

    def __init__(self, cfg: RunConfig, outer: OuterBundle | None = None) -> None:
        self.cfg = cfg
        self.spec = cfg.spec()
        self.model = build_model(self.spec, outer)
        self.adapter = adapter_for(cfg.strategy)
        if cfg.validation_split_size is not None:
            full = fdata.load_validation_set(cfg.dataset, cfg.validation_split_size, seed=cfg.seed,
                                             test_size=cfg.test_split_size)
        else:
            full = fdata.load_test_set(cfg.dataset, seed=cfg.seed, test_size=cfg.test_split_size)
        self.split = "validation" if cfg.validation_split_size is not None else "test"
        self._full = full
        self._loaders: dict[int, tuple[object, int]] = {}
        self.num_examples = self._loader(False)[1]

    def _loader(self, whole: bool) -> tuple[object, int]:
        n = len(self._full) if whole or not self.cfg.max_test_examples else min(self.cfg.max_test_examples,
                                                                                 len(self._full))
        if n not in self._loaders:
            ds = self._full if n == len(self._full) else self._full.select(range(n))
            self._loaders[n] = (make_loader(self.spec, ds, batch_size=self.cfg.eval_batch_size, shuffle=False), n)
        return self._loaders[n]

    def __call__(self, rnd: int, state: dict) -> dict[str, float]:
        loader, n = self._loader(self.cfg.final_full_test and rnd >= self.cfg.num_server_rounds)
        self.adapter.load_for_eval(self.model, state)
        res = evaluate(self.model, loader, task=self.cfg.task)
        out = {"loss": float(res["loss"]), f"{self.split}-examples": n}
        for key in ("accuracy", "perplexity"):
            if key in res:
                out[key] = float(res[key])
        return out


def refuse_noise_reuse(cfg: RunConfig, skipped: list[str], run_dir: Path) -> None:
    """Under user-level DP, refuse to resume from anything but the newest checkpoint version.

    The newer version's noised global state may already have been released to the nodes; redoing its round
    from an older generator state would draw the same noise on another aggregate, and the difference of the
    two releases would cancel it."""
    if cfg.user_dp_enabled and skipped:
        raise CheckpointError(f"{run_dir}: the newest checkpoint is damaged ({'; '.join(skipped)}); under user-level "
                              "DP resuming from an older one could reuse released noise: refused")


def run_server(grid: Grid, cfg: RunConfig) -> Path:
    """Run a whole federated job (or resume it) and return its output directory."""
    t_start = time.perf_counter()
    set_torch_threads(0)
    cfg.resolved_device()  # ConfigError naming 'device' / 'dtype' before anything is loaded or written
    grid = StableIdGrid(grid)
    try:
        check_partitioning(cfg, cfg.num_partitions)
    except ValueError as err:
        raise ConfigError("partitioner", str(err)) from err
    run_dir = resolve_results_dir(cfg.results_dir) / cfg.resolved_run_name  # the ClientApp keys its ledger by it
    say(start_line(cfg, run_dir))
    out = RunOutputs(run_dir, columns=METRICS_COLUMNS)
    resumed = out.prepare(cfg)  # resume / overwrite refusals, before any model is loaded
    outer_store = OuterBundleStore(run_dir / "outer-factors")  # the server's factors persist with the run
    saved_digest = resumed.extra.get("outer-digest") if resumed is not None else None
    evaluator = CentralEvaluator(cfg, outer_store.get(saved_digest) if saved_digest else None)
    model, adapter = evaluator.model, evaluator.adapter
    initial = adapter.initial_global_state(model)
    fingerprint = adapter.fingerprint(model, exact=cfg.outer_factors == "server")
    outer = outer_bundle_of(model) if evaluator.spec.is_nested else None
    if outer is not None and cfg.outer_factors == "server":
        outer_store.put(outer)
    strategy = build_strategy(cfg.strategy, **strategy_kwargs(cfg, fingerprint, initial, outer))
    if audit_dir() is not None:
        install_audit(strategy, audit_dir() / cfg.resolved_run_name)

    if cfg.secure_aggregation:  # SecAgg+: the server learns only the sum of the updates (simulations/secure.py)
        from simulations.secure import secure_wrapper

        strategy = secure_wrapper(strategy, cfg)
    if cfg.user_dp_enabled:  # noise + accounting wrap the strategy; their state is in its checkpoint
        strategy = user_dp_wrapper(strategy, cfg, cfg.population or len(list(grid.get_node_ids())))

    cumulative = 0.0
    elapsed_before = 0.0

    def checkpoint_now(elapsed: float) -> None:
        if cfg.checkpoint:
            out.save_checkpoint(strategy.state_dict(), {"cumulative-bytes": cumulative, "elapsed-seconds": elapsed,
                                                        "run-config": cfg.to_dict(), "fingerprint": fingerprint,
                                                        "outer-digest": outer.digest if outer else None})

    if resumed is not None:
        refuse_noise_reuse(cfg, resumed.skipped, run_dir)
        resumed.require_fingerprint(fingerprint)
        resumed.restore_rngs()
        strategy.load_state_dict(resumed.state)
        extra = resumed.extra
        out.truncate_metrics(strategy.round)
        cumulative = float(extra.get("cumulative-bytes", 0.0))
        elapsed_before = float(extra.get("elapsed-seconds", 0.0))
        say(resume_line(run_dir, strategy.round))
    else:
        out.write_config({**cfg.to_dict(), "fingerprint": fingerprint, "outer-digest": outer.digest if outer else None,
                          "flwr": flwr.__version__,
                          "run-dir": str(run_dir)})
        out.reset_metrics()
        rec0 = {"round": 0, "cumulative-bytes": 0,
                **(evaluator(0, strategy.global_state) if cfg.central_eval else {})}
        rec0["elapsed-seconds"] = time.perf_counter() - t_start
        out.append_metrics(rec0)
        checkpoint_now(rec0["elapsed-seconds"])  # round 0: a failure in round 1 resumes from here
        say(round_line(cfg, rec0))

    def on_round_end(rnd: int, rec: dict[str, Any]) -> None:
        nonlocal cumulative
        cumulative += float(rec.get("upload-bytes") or 0) + float(rec.get("download-bytes") or 0)
        rec["cumulative-bytes"] = cumulative
        rec["elapsed-seconds"] = elapsed_before + time.perf_counter() - t_start
        out.append_metrics(rec)
        if not rec.get("failed"):  # a round that aggregated nothing is not checkpointed (simulations/loop.py)
            checkpoint_now(rec["elapsed-seconds"])
        say(round_line(cfg, rec))

    run_rounds(grid, strategy, num_rounds=cfg.num_server_rounds, timeout=cfg.round_timeout,
               evaluate_fn=evaluator if cfg.central_eval else None, on_round_end=on_round_end,
               allow_empty_rounds=cfg.allow_empty_rounds)

    rows = out.read_metrics()
    plot_runs({cfg.strategy: rows}, run_dir, title=run_dir.name)
    if cfg.export_adapter and strategy.global_state is not None:
        adapter.load_for_eval(model, strategy.global_state)
        adapter.export(model, str(run_dir / "adapter"))
    say(done_line(rows, run_dir))
    return run_dir


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is ``context.run_config`` updated with ``overrides``."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        setup_logging()
        cfg = parse_run_config({**dict(context.run_config), **dict(overrides or {})})
        run_server(grid, cfg)

    return server


app = make_server_app()
