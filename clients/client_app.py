"""The fedlora ClientApp: local fine-tuning of the inner adapter parameters on a node's own data.

Train message: ``{"arrays": global state for this node, "config": ConfigRecord}`` (see
``strategies/base.py``). The model is built once per process and cached; every message loads the
global state, restarts the trainable part at the node's rank with the round's seed, trains locally
(AdamW, or DP-SGD with opacus when ``dp-epsilon`` or ``dp-noise`` is set) and replies with

- ``"arrays"``: the upload (``inner_state`` for nested strategies, peft LoRA keys for baselines), packed: one
  Array per dtype, its ``layout`` in ``"meta"`` (:mod:`strategies.wire`; downloads arrive packed the same way),
- ``"metrics"``: ``num-examples``, ``train-loss``, ``train-seconds``, ``client-seconds``, ``steps`` (+ ``dp-*``,
  ``update-norm``, ``user-dp-clip``), as far as the release policy allows: under DP none of them unless
  ``dp-release-metrics=true`` (:mod:`fedlora.privacy.release_policy`, the one list),
- ``"meta"``: ``fingerprint`` (outer-factor fingerprint, a string), ``partition-id`` (public), ``outer-digest``
  (the digest of the server's outer factors the node used, :mod:`clients.node_outer`).

Before it trains or evaluates, the node builds its model with the server's outer factors (received once,
kept in its store) and refuses with an error reply if they do not fit its base model or its fingerprint
differs from the server's (:mod:`clients.node_outer`).

Evaluate message: same arrays/config; replies with local validation ``loss`` and ``accuracy``
(``perplexity`` for causal LM) and ``num-examples``, as far as the release policy allows.

Error replies: under DP or secure aggregation every exception leaves the node as one fixed reason of
:data:`fedlora.privacy.release_policy.REFUSALS` (:mod:`clients.refusal`), the full text in the node's log only.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.node_data import node_client_data
from clients.node_outer import check_fingerprint, check_own_factors, received_bundle
from clients.refusal import guarded, private_mode
from fedlora.experiment import ExperimentSpec, adapter_for, build_model, make_loader, set_torch_threads
from fedlora.identity import IDENTITY_KEY, node_identity
from fedlora.privacy.release_policy import ReleaseMode, allowed_metrics, released
from fedlora.run_config import RunConfig, parse_run_config
from fedlora.training import evaluate, train_local
from strategies.outer_delivery import OUTER_DIGEST
from strategies.wire import LAYOUT_KEY, WireFormatError, pack_state, unpack_state

LOGGER = logging.getLogger("fedlora.client")
#: what ``fedlora.training.evaluate`` returns that an evaluate reply may carry (plus ``num-examples``)
EVALUATE_METRICS = ("loss", "accuracy", "perplexity")

def release_mode(cfg: RunConfig) -> ReleaseMode:
    """The release policy's mode of this run: which metrics a reply may carry."""
    return ReleaseMode(dp_sgd=cfg.dp_enabled, user_dp=cfg.user_dp_enabled, release_metrics=cfg.dp_release_metrics)


def _state(msg: Message) -> dict[str, np.ndarray]:
    """The state a message downloads: its ``arrays`` unpacked with the ``layout`` of its config (none: one
    Array per key; :mod:`strategies.wire`). Raises ``ValueError`` naming the problem of a malformed one."""
    config = msg.content.config_records.get("config")
    try:
        return unpack_state(msg.content["arrays"], config.get(LAYOUT_KEY) if config is not None else None)
    except WireFormatError as err:
        raise WireFormatError(f"malformed download: {err}") from err


def _reply(msg: Message, arrays: dict[str, np.ndarray] | None, metrics: Mapping[str, Any],
           meta: Mapping[str, Any]) -> Message:
    """A reply: ``arrays`` packed (:func:`strategies.wire.pack_state`, its layout in ``meta``), metrics, meta."""
    packed = pack_state(arrays) if arrays is not None else None
    meta = {**meta, LAYOUT_KEY: packed.layout} if packed is not None else dict(meta)
    content = RecordDict({"metrics": MetricRecord(dict(metrics)), "meta": ConfigRecord(meta)})
    if packed is not None:
        content["arrays"] = packed.record
    return Message(content, reply_to=msg)


def _fingerprint(adapter: Any, model: Any, cfg: RunConfig) -> str:
    """The fingerprint replies carry: exact with the server's factors, structural when nodes compute their own."""
    return adapter.fingerprint(model, exact=cfg.outer_factors == "server") or ""


def node_spec(cfg: RunConfig, context: Context) -> ExperimentSpec:
    """The run's :class:`~fedlora.experiment.ExperimentSpec` with this node's own copy of the base model: node
    config ``model-path`` (a local directory or hub id) replaces the run config's ``model``. Whether it really
    is the server's model is checked against the server's outer factors before anything is trained
    (:func:`fedlora.outer_bundle.check_fits`)."""
    spec = cfg.spec()
    path = context.node_config.get("model-path")
    return dataclasses.replace(spec, model=str(path)) if path else spec


def _prepare(msg: Message, context: Context, cfg: RunConfig) -> tuple[Any, Any, dict[str, Any], dict[str, np.ndarray]]:
    set_torch_threads(cfg.client_threads)
    spec = node_spec(cfg, context)
    tconf = dict(msg.content["config"].items()) if "config" in msg.content.config_records else {}
    model = build_model(spec, received_bundle(msg, tconf))
    adapter = adapter_for(cfg.strategy)
    check_own_factors(model, tconf)
    check_fingerprint(tconf, _fingerprint(adapter, model, cfg))
    download = _state(msg)
    adapter.load_download(model, download, tconf)
    return model, adapter, tconf, download


def train_handler(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Local training round; raises (an error reply) on bad input, an exhausted DP budget or an untrusted
    privacy ledger. The reply's metrics are those the release policy allows (:mod:`fedlora.privacy.release_policy`)."""
    t0 = time.perf_counter()
    model, adapter, tconf, download = _prepare(msg, context, cfg)
    spec = node_spec(cfg, context)
    data = node_client_data(cfg, context)
    seed = int(tconf.get("seed", cfg.seed))
    lr = float(tconf.get("lr", cfg.lr_for_strategy()))
    steps = int(tconf.get("local-steps", cfg.local_steps)) or None
    epochs = int(tconf.get("local-epochs", cfg.local_epochs))
    metrics: dict[str, Any] = {}
    if cfg.dp_enabled:
        from clients.dp import train_private

        result, metrics = train_private(model, spec, data.train, cfg, context, lr=lr, steps=steps, epochs=epochs,
                                        seed=seed)
    else:
        loader = make_loader(spec, data.train, batch_size=cfg.batch_size, shuffle=True, seed=seed)
        result = train_local(model, loader, epochs=epochs, max_steps=steps, lr=lr,
                             weight_decay=cfg.weight_decay, seed=seed)
    upload = adapter.upload(model)
    if cfg.user_dp_enabled:
        from clients.dp import clip_upload

        upload, norm = clip_upload(upload, download, cfg.user_dp_clip)
        metrics["update-norm"] = norm
        metrics["user-dp-clip"] = cfg.user_dp_clip
    metrics.update({
        "num-examples": int(data.num_examples),
        "train-loss": float(result.loss),
        "train-seconds": float(result.seconds),
        "client-seconds": float(time.perf_counter() - t0),
        "steps": int(result.steps),
    })
    meta = {"fingerprint": _fingerprint(adapter, model, cfg), "partition-id": int(data.partition_id),
            OUTER_DIGEST: str(tconf.get(OUTER_DIGEST, ""))}
    return _reply(msg, upload, released("train", metrics, release_mode(cfg), cfg.task), meta)


def evaluate_handler(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Local validation of the received global state; under DP its metrics leave the node only with
    ``dp-release-metrics=true`` (otherwise nothing is evaluated and the metrics record is empty)."""
    model, adapter, _, _ = _prepare(msg, context, cfg)
    mode = release_mode(cfg)
    metrics: dict[str, Any] = {}
    if allowed_metrics("evaluate", mode, cfg.task):
        data = node_client_data(cfg, context)
        ds = data.val if len(data.val) else data.train
        loader = make_loader(node_spec(cfg, context), ds, batch_size=cfg.eval_batch_size, shuffle=False)
        res = evaluate(model, loader, task=cfg.task)
        metrics = {k: float(res[k]) for k in EVALUATE_METRICS if k in res}
        metrics["num-examples"] = int(res.get("num_examples", len(ds)))
    return _reply(msg, None, released("evaluate", metrics, mode, cfg.task),
                  {"fingerprint": _fingerprint(adapter, model, cfg)})


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config is ``context.run_config`` updated with ``overrides`` (for in-process
    simulations, where Flower passes no run config). Under DP or secure aggregation an exception of a handler
    leaves the node only as a fixed reason (:mod:`clients.refusal`)."""
    client = ClientApp()

    def config(context: Context) -> RunConfig:
        return parse_run_config({**dict(context.run_config), **dict(overrides or {})})

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = config(context)
        if cfg.secure_aggregation:  # the update leaves the node only masked (clients/secagg.py)
            from clients.secagg import secagg_train

            return guarded(lambda: secagg_train(msg, context, cfg, train_handler), private_mode(cfg), "train")
        return guarded(lambda: train_handler(msg, context, cfg), private_mode(cfg), "train")

    @client.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        cfg = config(context)
        return guarded(lambda: evaluate_handler(msg, context, cfg), private_mode(cfg), "evaluate")

    @client.query()
    def query(msg: Message, context: Context) -> Message:
        """Identity handshake of :class:`simulations.stable_grid.StableIdGrid` (stable ids across runs), or a
        SecAgg+ stage (``secagg`` record, clients/secagg.py)."""
        from clients.secagg import is_secagg, secagg_query

        if is_secagg(msg):
            cfg = config(context)
            return guarded(lambda: secagg_query(msg, context, cfg), private_mode(cfg), "secure-aggregation query")
        identity = node_identity(dict(context.node_config))
        return Message(RecordDict({IDENTITY_KEY: ConfigRecord({IDENTITY_KEY: identity})}), reply_to=msg)

    return client


app = make_client_app()
