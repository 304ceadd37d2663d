"""The node's side of the outer-factor protocol (:mod:`strategies.outer_delivery`).

Every train / evaluate message names the server's outer factors by digest (``outer-digest``); the first one
a node receives also carries them (``ArrayRecord`` ``outer``). The node keeps them in its own store
(:class:`fedlora.outer_bundle.OuterBundleStore` under ``$FEDLORA_CACHE/outer/bundles``, one file per digest,
re-verified on every read) and builds its model with exactly those values, after checking that they fit its
own base weights. Before it trains it compares the server's fingerprint with its own model's, so a node
that cannot contribute an exact update refuses with a clear error instead of spending compute and privacy
budget on an update the server would reject.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Message

from fedlora.outer_bundle import OuterBundle, OuterBundleStore, check_sketch
from strategies.outer_delivery import OUTER_DIGEST, OUTER_MISSING, OUTER_RECORD, OUTER_SKETCH
from strategies.wire import arrayrecord_to_state


class OuterFactorsMissing(RuntimeError):
    """The server announced outer factors this node does not hold (its reason carries ``OUTER_MISSING``)."""


class FingerprintMismatch(RuntimeError):
    """This node's outer-factor fingerprint differs from the server's."""


@functools.lru_cache(maxsize=4)
def _store(directory: str | None) -> OuterBundleStore:
    return OuterBundleStore(directory)


def node_store() -> OuterBundleStore:
    """The node's bundle store (the default directory, read from ``$FEDLORA_CACHE`` at call time)."""
    from fedlora.outer_bundle import default_bundle_dir

    return _store(str(default_bundle_dir()))


def received_bundle(msg: Message, config: Mapping[str, Any], store: OuterBundleStore | None = None
                    ) -> OuterBundle | None:
    """The server's outer factors for this message: stored first if the message carries them, else read
    from the node's store. ``None`` when the server announces none (peft baselines, nodes computing their
    own). Raises :class:`OuterFactorsMissing` when announced but not held, and
    :class:`~fedlora.outer_bundle.OuterMismatch` when the carried bundle does not match its digest."""
    digest = str(config.get(OUTER_DIGEST, "") or "")
    if not digest:
        return None
    store = store or node_store()
    bundle = store.get(digest)
    if bundle is None and OUTER_RECORD in msg.content.array_records:
        bundle = OuterBundle.from_state(arrayrecord_to_state(msg.content[OUTER_RECORD]), expected_digest=digest)
        store.put(bundle)
    if bundle is None:
        raise OuterFactorsMissing(f"{OUTER_MISSING} this node does not hold the server's outer factors "
                                  f"{digest[:16]}… (not in {store.directory}); the server re-sends them")
    return bundle


def check_fingerprint(config: Mapping[str, Any], ours: str | None) -> None:
    """Refuse (before training) unless the server's fingerprint is empty or equals this node's."""
    theirs = str(config.get("fingerprint", "") or "")
    if theirs and ours is not None and theirs != ours:
        raise FingerprintMismatch(
            f"this node's outer-factor fingerprint {ours[:16]}… differs from the server's {theirs[:16]}…: the "
            "node's adapted layers, r, mode or init differ from the server's; refusing to train")


def check_own_factors(model: Any, config: Mapping[str, Any]) -> float | None:
    """With ``outer-factors = "local"`` the server sends a sketch of its factors (``outer-sketch``, float32
    bytes) instead of the factors: compare this node's own with it (:func:`fedlora.outer_bundle.check_sketch`,
    raising :class:`~fedlora.outer_bundle.OuterMismatch` naming the cause). Returns the largest difference,
    or None when the server sent no sketch. Checked once per model and sketch."""
    raw = config.get(OUTER_SKETCH)
    if not raw:
        return None
    from fedlora.nested import outer_bundle_of

    memo = getattr(model, "fedlora_sketch_checked", {})
    key = hashlib.sha256(bytes(raw)).hexdigest()
    if key not in memo:
        memo[key] = check_sketch(outer_bundle_of(model), np.frombuffer(bytes(raw), dtype="<f4"))
        model.fedlora_sketch_checked = memo
    return memo[key]
