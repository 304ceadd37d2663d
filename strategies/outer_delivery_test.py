"""OuterDelivery: the server's outer factors reach each node once, with its first message, are counted in the
round record, and are re-sent only to a node that reports them missing (a node whose store entry was
corrupted); every message names them by digest."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Message

from fedlora.outer import OuterFactors
from fedlora.outer_bundle import OuterBundle, OuterBundleStore
from strategies._testing import (
    NODE_IDS,
    FakeGrid,
    R,
    config_of,
    error_reply,
    make,
    nested_outer,
    node_of,
    random_upload,
    reply,
)
from strategies.outer_delivery import OUTER_DIGEST, OUTER_MISSING, OUTER_RECORD, OuterDelivery
from strategies.wire import arrayrecord_to_state


def _bundle() -> OuterBundle:
    factors = {}
    for name, (B, A) in nested_outer(R).items():
        factors[name] = OuterFactors(U=torch.from_numpy(B), S=torch.linspace(2, 1, R, dtype=torch.float64),
                                     Vh=torch.from_numpy(A))
    return OuterBundle.from_factors(factors)


class Nodes:
    """Nodes that keep the server's bundle in their own stores, as the ClientApp does."""

    def __init__(self, tmp_path, strategy) -> None:
        self.strategy = strategy
        self.stores = {nid: OuterBundleStore(tmp_path / str(nid)) for nid in NODE_IDS}
        self.rng = np.random.default_rng(0)

    def __call__(self, msg: Message) -> Message:
        nid, digest = node_of(msg), config_of(msg)[OUTER_DIGEST]
        store = self.stores[nid]
        if store.get(digest) is None:
            if OUTER_RECORD not in msg.content.array_records:
                return error_reply(msg, reason=f"ClientApp raised OuterFactorsMissing: {OUTER_MISSING} not held")
            store.put(OuterBundle.from_state(arrayrecord_to_state(msg.content[OUTER_RECORD]), digest))
        return reply(msg, random_upload(self.strategy._tasks[nid].expected, self.rng))


def _round(strategy, nodes: Nodes, rnd: int) -> tuple[list[Message], dict]:
    grid = FakeGrid(NODE_IDS, nodes)
    msgs = list(strategy.configure_train(rnd, strategy.global_arrayrecord(), None, grid))
    strategy.aggregate_train(rnd, grid.send_and_receive(msgs))
    return msgs, strategy.history[-1]


def test_bundle_goes_once_per_node_and_again_only_when_missing(tmp_path):
    bundle = _bundle()
    strategy = make("fedsb", outer_bundle=bundle, fraction_train=1.0)
    nodes = Nodes(tmp_path, strategy)
    msgs, rec = _round(strategy, nodes, 1)
    assert all(OUTER_RECORD in m.content.array_records for m in msgs)
    assert all(config_of(m)[OUTER_DIGEST] == bundle.digest for m in msgs)
    assert rec["outer-nodes"] == len(NODE_IDS) and rec["clients-used"] == len(NODE_IDS)
    assert rec["outer-bytes"] == len(NODE_IDS) * bundle.nbytes()
    assert rec["outer-serialized-bytes"] > rec["outer-bytes"]
    first_download = rec["download-bytes"]

    msgs, rec = _round(strategy, nodes, 2)
    assert rec["download-bytes"] == first_download  # the per-round payload never includes the factors
    assert not any(OUTER_RECORD in m.content.array_records for m in msgs)
    assert rec["outer-nodes"] == 0 and rec["outer-bytes"] == 0 and rec["clients-used"] == len(NODE_IDS)

    victim = NODE_IDS[1]  # its stored copy is damaged: it refuses, is sent the factors again, and rejoins
    path = nodes.stores[victim].path(bundle.digest)
    path.write_bytes(path.read_bytes()[:-7] + b"garbage")
    nodes.stores[victim] = OuterBundleStore(path.parent)
    _, rec = _round(strategy, nodes, 3)
    assert rec["clients-used"] == len(NODE_IDS) - 1 and victim not in rec["used-nodes"]
    assert OUTER_MISSING in rec["rejected"][0]["reason"]
    msgs, rec = _round(strategy, nodes, 4)
    assert [node_of(m) for m in msgs if OUTER_RECORD in m.content.array_records] == [victim]
    assert rec["outer-nodes"] == 1 and rec["clients-used"] == len(NODE_IDS)


def test_evaluate_messages_carry_the_bundle_to_new_nodes(tmp_path):
    strategy = make("fedsb", outer_bundle=_bundle(), fraction_evaluate=1.0, fraction_train=1.0)
    msgs = list(strategy.configure_evaluate(1, strategy.global_arrayrecord(), None, FakeGrid(NODE_IDS)))
    assert msgs and all(OUTER_RECORD in m.content.array_records for m in msgs)


def test_without_a_bundle_messages_announce_none():
    strategy = make("fedsb", fraction_train=1.0)
    msgs = list(strategy.configure_train(1, strategy.global_arrayrecord(), None, FakeGrid(NODE_IDS)))
    assert all(config_of(m)[OUTER_DIGEST] == "" and OUTER_RECORD not in m.content.array_records for m in msgs)


def test_a_reply_echoing_the_digest_marks_a_holder():
    bundle = _bundle()
    delivery = OuterDelivery(bundle)
    strategy = make("fedsb", fraction_train=1.0)
    msgs = list(strategy.configure_train(1, strategy.global_arrayrecord(), None, FakeGrid(NODE_IDS)))
    echo = reply(msgs[0], random_upload(strategy._tasks[node_of(msgs[0])].expected, np.random.default_rng(1)))
    echo.content["meta"][OUTER_DIGEST] = bundle.digest
    delivery.observe([echo])
    assert delivery.holders == {node_of(msgs[0])}
    delivery.observe([error_reply(msgs[1])])  # an error of a node never sent the factors: not a holder
    assert delivery.holders == {node_of(msgs[0])}
    delivery.observe([error_reply(msgs[0], reason=f"ClientApp raised OuterFactorsMissing: {OUTER_MISSING}")])
    assert delivery.holders == set()


def test_holders_survive_a_checkpoint(tmp_path):
    bundle = _bundle()
    strategy = make("fedsb", outer_bundle=bundle, fraction_train=1.0)
    nodes = Nodes(tmp_path, strategy)
    _round(strategy, nodes, 1)
    resumed = make("fedsb", outer_bundle=bundle, fraction_train=1.0)
    resumed.load_state_dict(strategy.state_dict())
    nodes.strategy = resumed
    msgs, rec = _round(resumed, nodes, 2)
    assert rec["outer-nodes"] == 0 and rec["clients-used"] == len(NODE_IDS)
