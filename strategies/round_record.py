"""The record a strategy keeps of each training round (``strategy.history``, the checkpoint's history and,
with the central evaluation added, a ``metrics.jsonl`` line).

Keys of :func:`round_record` (the strategy's bookkeeping):

=============================  ===================================================================
``round``                      the strategy's round (absolute: continues after a resume)
``flower-round``               the ``server_round`` Flower passed (restarts at 1 after a resume)
``clients-sampled``            nodes sent a train instruction
``clients-replied``            replies received (error replies included)
``clients-used``               replies accepted and aggregated
``clients-rejected``           replies dropped by screening; ``rejected``: their
                               ``{"node", "category", "reason"}``
``clients-missing``            sampled nodes without any reply (timed out) or whose only reply is the
                               SuperLink's "node unavailable" error (``unreachable``: their ids)
``used-nodes``                 node ids of the accepted replies, ascending
``ranks``                      ``{node id (str): rank}`` of the sampled nodes
``upload-bytes``               payload bytes of the replies' arrays; ``-serialized-``: on the wire;
                               ``-overhead-``: serialized − payload (same three for ``download-``)
``aggregation-seconds``        wall time of the aggregation
``kept-previous``              the global state was kept (too few valid replies, aggregation failed);
                               ``kept-reason``: why ("" otherwise)
=============================  ===================================================================

plus what the strategy's ``train_metrics_fn`` adds (default: ``num-examples``, ``train-loss``, ``dp-*``;
see :mod:`strategies.client_metrics`) and what wrappers add (``user-dp-*``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Message, MetricRecord

from strategies.screening import NodeTask, ScreenedRound


def round_record(
    rnd: int,
    server_round: int,
    tasks: Mapping[int, NodeTask],
    replies: Sequence[Message],
    screened: ScreenedRound,
    kept_reason: str,
    aggregation_seconds: float,
) -> dict[str, Any]:
    """The bookkeeping entries of one round (see the module docstring)."""
    down_payload = sum(t.download_payload for t in tasks.values())
    down_serialized = sum(t.download_serialized for t in tasks.values())
    up_payload, up_serialized = screened.upload_payload, screened.upload_serialized
    return {
        "round": rnd,
        "flower-round": int(server_round),
        "clients-sampled": len(tasks),
        "clients-replied": len(replies),
        "clients-used": len(screened.used),
        "clients-rejected": len(screened.rejected),
        "clients-missing": len(set(tasks) - {int(m.metadata.src_node_id) for m in replies}) + len(screened.unreachable),
        "rejected": screened.rejected,
        "unreachable": sorted(screened.unreachable),
        "used-nodes": [u.node_id for u in screened.used],
        "ranks": {str(nid): t.rank for nid, t in tasks.items()},
        "upload-bytes": int(up_payload),
        "upload-serialized-bytes": int(up_serialized),
        "upload-overhead-bytes": int(up_serialized - up_payload),
        "download-bytes": int(down_payload),
        "download-serialized-bytes": int(down_serialized),
        "download-overhead-bytes": int(down_serialized - down_payload),
        "aggregation-seconds": float(aggregation_seconds),
        "kept-previous": bool(kept_reason),
        "kept-reason": kept_reason,
    }


def record_participation(ledger: dict[str, dict[str, int]], tasks: Mapping[int, NodeTask],
                         replies: Sequence[Message], entry: Mapping[str, Any]) -> None:
    """Count one round into the server's per-node ledger ``{node id (str): {"trained", "used"}}``.

    ``trained``: rounds in which the node was sampled and sent a non-error reply (it ran local training, and
    under DP-SGD spent privacy budget, whether or not its update was then accepted); ``used``: rounds whose
    aggregate includes its update (``used-nodes`` of a round that did not keep the previous state). A node's
    own ledger must show at least ``trained`` rounds; a reviewer or a resume compares the two."""
    trained = {int(m.metadata.src_node_id) for m in replies if not m.has_error()} & set(tasks)
    used = set() if entry.get("kept-previous") else set(entry.get("used-nodes", []))
    for nid in sorted(trained | used):
        counts = ledger.setdefault(str(nid), {"trained": 0, "used": 0})
        counts["trained"] += int(nid in trained)
        counts["used"] += int(nid in used)


def scalar_metrics(entry: Mapping[str, Any]) -> MetricRecord:
    """The numeric scalar entries of a round record as a MetricRecord (bools as 0/1; ``None``, strings,
    lists and dicts, e.g. ``rejected``, ``ranks``, ``dp-per-client``, stay in the history only)."""
    out: dict[str, int | float] = {}
    for key, value in entry.items():
        if isinstance(value, (bool, int, np.integer)):
            out[key] = int(value)
        elif isinstance(value, (float, np.floating)):
            out[key] = float(value)
    return MetricRecord(out)
