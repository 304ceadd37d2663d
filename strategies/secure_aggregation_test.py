"""SecAgg+ on the Message API (strategies.secure_aggregation, secagg_server, secagg_node, secagg_protocol): the
result equals the wrapped strategy's plain aggregation within the quantisation bound, the server never holds an
individual unmasked update, dropouts after share-keys are recovered, and every failure keeps the global state."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fedlora.aggregation import apply_increment, exact_mean, hetero_mean, stack_inner
from strategies._testing import FINGERPRINT, NODE_IDS, FakeGrid, R, arrays_of, make, node_of, random_upload, snapshot
from strategies.secagg_node import ProtocolViolation, handle, masked_vector
from strategies.secagg_protocol import (
    MASKED_KEY,
    MODULUS,
    SECAGG_KEY,
    SecAggParams,
    Stage,
    node_vector,
    vector_layout,
    weight_factor,
)
from strategies.secure_aggregation import SecureAggregation

EXAMPLES = {nid: n for nid, n in zip(NODE_IDS, [10, 40, 25, 7, 90])}


class Nodes:
    """In-process nodes running the node side of the protocol (strategies.secagg_node) with random uploads.

    ``drop``: node → stage at which it stops answering; ``tamper``: node → function(stage, reply entries) that
    corrupts its reply. ``uploads`` records each node's plain upload (the test's oracle; the server never sees
    it)."""

    def __init__(self, wrapper: SecureAggregation, seed: int = 0, drop: dict[int, str] | None = None,
                 tamper: dict | None = None, scale: float = 0.1) -> None:
        self.wrapper, self.rng, self.scale = wrapper, np.random.default_rng(seed), scale
        self.drop, self.tamper = drop or {}, tamper or {}
        self.states: dict[int, ConfigRecord | None] = {}
        self.uploads: dict[int, dict[str, np.ndarray]] = {}

    def __call__(self, msg: Message) -> Message | None:
        nid = node_of(msg)
        request = msg.content.config_records[SECAGG_KEY]
        stage = request["stage"]
        if self.drop.get(nid) == stage:
            return None
        try:
            if msg.metadata.message_type == MessageType.QUERY:
                out, self.states[nid] = handle(self.states.get(nid), request)
                if nid in self.tamper:
                    out = self.tamper[nid](stage, out)
                return Message(RecordDict({SECAGG_KEY: ConfigRecord(out)}), reply_to=msg)
            return self._train(nid, msg, request)
        except Exception as err:  # noqa: BLE001 - as Flower turns a ClientApp exception into an error reply
            return Message(Error(code=2, reason=f"{type(err).__name__}: {err}"), reply_to=msg)

    def _train(self, nid: int, msg: Message, request: ConfigRecord) -> Message:
        task = self.wrapper.strategy._tasks[nid]
        download = arrays_of(msg)
        upload = {k: v * self.scale for k, v in random_upload(task.expected, self.rng).items()}
        for key in upload:
            if key in download:  # a head: its value is the download plus a small change
                upload[key] = download[key] + upload[key]
        self.uploads[nid] = upload
        vector = node_vector(upload, download, vector_layout(download))
        factor = weight_factor(self.wrapper.strategy.weighting, EXAMPLES[nid], self.wrapper.params)
        masked, self.states[nid] = masked_vector(self.states[nid], request, vector, factor)
        if nid in self.tamper:
            masked = self.tamper[nid](Stage.COLLECT, masked)
        content = RecordDict({SECAGG_KEY: ArrayRecord({MASKED_KEY: Array(masked)}),
                              "metrics": MetricRecord({"num-examples": EXAMPLES[nid], "train-loss": 0.5}),
                              "meta": ConfigRecord({"fingerprint": FINGERPRINT})})
        return Message(content, reply_to=msg)


class RecordingGrid(FakeGrid):
    """A FakeGrid that also keeps every reply the server received."""

    def __init__(self, node_ids, client_fn) -> None:
        super().__init__(node_ids, client_fn)
        self.replies: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies


def _wrapped(name: str = "fedsb", nodes: int = 3, **kw) -> tuple[SecureAggregation, RecordingGrid, Nodes]:
    params = kw.pop("params", None)
    node_kw = {k: kw.pop(k) for k in ("drop", "tamper", "scale") if k in kw}
    kw.setdefault("weighting", "uniform")
    wrapper = SecureAggregation(make(name, min_available_nodes=nodes, fraction_train=1.0, **kw), params, timeout=5)
    sim = Nodes(wrapper, **node_kw)
    return wrapper, RecordingGrid(NODE_IDS[:nodes], sim), sim


def _round(wrapper: SecureAggregation, grid: FakeGrid) -> tuple[dict, dict, MetricRecord]:
    """One round as simulations.loop drives it: (global before, after, metrics)."""
    before = {k: v.copy() for k, v in wrapper.global_state.items()}
    msgs = list(wrapper.configure_train(1, wrapper.global_arrayrecord(), ConfigRecord(), grid))
    replies = list(grid.send_and_receive(msgs))
    _, metrics = wrapper.aggregate_train(1, replies)
    return before, dict(wrapper.global_state), metrics


def _plain(name: str, before: dict, uploads: dict[int, dict], weights: np.ndarray) -> dict:
    """The wrapped strategy's own rule on the same uploads (the oracle)."""
    states = [uploads[n] for n in sorted(uploads)]
    rule = {"fedsb": lambda: exact_mean(states, weights), "hetero": lambda: hetero_mean(states, weights, R),
            "flora": lambda: stack_inner(states, weights, R)}[name]
    return apply_increment(before, rule())


def _max_err(got: dict, want: dict) -> float:
    return max(float(np.max(np.abs(got[k].astype(np.float64) - want[k].astype(np.float64)))) for k in want)


@pytest.mark.parametrize("name, nodes", [("fedsb", 3), ("fedsb", 5), ("hetero", 5), ("flora", 5)])
def test_result_equals_plain_aggregation_within_the_quantisation_bound(name, nodes):
    wrapper, grid, sim = _wrapped(name, nodes)
    before, after, metrics = _round(wrapper, grid)
    assert metrics["kept-previous"] == 0 and metrics["clients-used"] == nodes
    want = _plain(name, before, sim.uploads, np.full(nodes, 1.0 / nodes))
    bound = wrapper.params.quantum()
    assert metrics["secagg-error-bound"] == pytest.approx(bound)
    assert 0 < _max_err(after, want) <= bound * (1 + 1e-6)  # quantised (not bit-equal), within 2c/T
    assert wrapper.history[-1]["secagg-dropped"] == {}


def test_tighter_quantisation_lowers_the_error():
    errs = []
    for T in (2**12, 2**22):
        wrapper, grid, sim = _wrapped(params=SecAggParams(clipping_range=1.0, quantization_range=T))
        before, after, _ = _round(wrapper, grid)
        errs.append(_max_err(after, _plain("fedsb", before, sim.uploads, np.full(3, 1 / 3))))
        assert errs[-1] <= 2.0 / T
    assert errs[1] < errs[0] / 100


def test_num_examples_weights_are_premultiplied_inside_the_mask():
    wrapper, grid, sim = _wrapped(nodes=5, weighting="num-examples", params=SecAggParams(max_weight=100.0))
    before, after, metrics = _round(wrapper, grid)
    q = np.array([weight_factor("num-examples", EXAMPLES[n], wrapper.params) for n in NODE_IDS], dtype=np.float64)
    want = _plain("fedsb", before, sim.uploads, q / q.sum())
    assert _max_err(after, want) <= metrics["secagg-error-bound"] * (1 + 1e-6)
    assert metrics["num-examples"] == sum(EXAMPLES.values())
    # the weights are nᵢ / Σn up to the rounding of qᵢ = round(nᵢ/max-weight·T)
    assert np.allclose(q / q.sum(), np.array(list(EXAMPLES.values())) / sum(EXAMPLES.values()), rtol=1e-5)


def test_the_server_never_holds_an_individual_unmasked_update():
    wrapper, grid, sim = _wrapped(nodes=5, drop={NODE_IDS[4]: Stage.COLLECT})
    _round(wrapper, grid)
    state = wrapper.last_round
    # every reply the server got: no float arrays at all, only the masked uint32 vectors of the train replies
    arrays = [a.numpy() for r in grid.replies if not r.has_error() for rec in r.content.array_records.values()
              for a in rec.values()]
    assert len(arrays) == 4 and all(a.dtype == np.uint32 for a in arrays)
    masked = {nid: v for nid, stage, v in state.received if stage == Stage.COLLECT}
    assert sorted(masked) == NODE_IDS[:4]
    layout = vector_layout(wrapper.global_state)
    T = wrapper.params.quantization_range
    seeds: dict[int, list[bytes]] = {}
    keys: dict[int, list[bytes]] = {}
    for _, stage, what in state.received:
        if stage == Stage.UNMASK:
            for owner, share in zip(what["nids"], what["shares"]):
                (seeds if owner in masked else keys).setdefault(owner, []).append(share)
    # per node either its mask-seed shares (survivor) or its secret-key shares (dropped), never both
    assert set(seeds) == set(masked) and set(keys) == {NODE_IDS[4]} and not set(seeds) & set(keys)
    from strategies.secagg_protocol import combine, remove_masks

    dead = NODE_IDS[4]
    dead_key = {dead: combine(keys[dead], state.t, dead, "secret key")}
    pk1 = {n: pk[0] for n, pk in state.public_keys.items()}
    for nid, vec in masked.items():
        assert vec.dtype == np.uint32 and vec.shape == (1 + sum(math.prod(s) for _, s in layout),)
        # all the server can take off one vector (its rebuilt mask seed, its pairwise mask with the dropped node)
        # leaves it masked by its pairwise masks with the other survivors: an honest quantised vector lies in
        # [0, T], this one is spread over [0, 2³²)
        seed = {nid: combine(seeds[nid], state.t, nid, "mask seed")}
        stripped = remove_masks(vec.astype(np.int64), seed, dead_key, pk1, [(nid, dead)])
        assert np.mean(stripped[1:] <= T) < 0.05 and np.mean(vec[1:] <= T) < 0.05
        assert int(stripped[0]) != T  # not even its weight factor is exposed


def test_a_dropout_after_share_keys_is_recovered():
    for nodes, dropped in ((3, [NODE_IDS[1]]), (5, [NODE_IDS[0], NODE_IDS[3]])):
        wrapper, grid, sim = _wrapped(nodes=nodes, drop=dict.fromkeys(dropped, Stage.COLLECT))
        before, after, metrics = _round(wrapper, grid)
        survivors = {n: u for n, u in sim.uploads.items() if n not in dropped}
        assert metrics["kept-previous"] == 0 and metrics["clients-used"] == nodes - len(dropped)
        want = _plain("fedsb", before, survivors, np.full(len(survivors), 1 / len(survivors)))
        assert _max_err(after, want) <= wrapper.params.quantum() * (1 + 1e-6)
        assert wrapper.history[-1]["secagg-dropped"] == {str(n): Stage.COLLECT for n in dropped}


def test_a_dropout_during_unmask_is_recovered_from_the_other_shares():
    wrapper, grid, sim = _wrapped(nodes=5, drop={NODE_IDS[2]: Stage.UNMASK})
    before, after, metrics = _round(wrapper, grid)
    assert metrics["kept-previous"] == 0 and metrics["clients-used"] == 5
    assert _max_err(after, _plain("fedsb", before, sim.uploads, np.full(5, 0.2))) <= wrapper.params.quantum() * 1.01


def test_below_the_threshold_the_round_keeps_the_state_without_unmasking():
    wrapper, grid, _ = _wrapped(nodes=5, min_train_nodes=2, drop={n: Stage.COLLECT for n in NODE_IDS[:3]})
    before, after, metrics = _round(wrapper, grid)
    assert metrics["kept-previous"] == 1 and snapshot(after) == snapshot(before)
    assert "2 masked vectors < 3 needed (threshold t=3" in wrapper.history[-1]["kept-reason"]
    stages = [m.content.config_records[SECAGG_KEY]["stage"] for batch in grid.sent for m in batch]
    assert Stage.UNMASK not in stages  # no share was asked for


def test_too_few_nodes_at_setup_sends_no_train_message():
    wrapper, grid, _ = _wrapped(nodes=3, drop={n: Stage.SETUP for n in NODE_IDS[:2]})
    before = snapshot(wrapper.global_state)
    msgs = list(wrapper.configure_train(1, wrapper.global_arrayrecord(), ConfigRecord(), grid))
    assert msgs == []
    _, metrics = wrapper.aggregate_train(1, [])
    assert metrics["kept-previous"] == 1 and snapshot(wrapper.global_state) == before
    assert "could not start" in wrapper.history[-1]["kept-reason"]
    assert metrics["download-bytes"] == metrics["secagg-download-bytes"] > 0  # no train message went out
    assert wrapper.history[-1]["secagg-dropped"] == {str(n): Stage.SETUP for n in NODE_IDS[:2]}


def _garbage_shares(stage, out):
    if stage == Stage.UNMASK:
        out["shares"] = [bytes(len(s)) if i == 0 else s for i, s in enumerate(out["shares"])]
    return out


def _swapped_shares(stage, out):
    if stage == Stage.UNMASK:
        out["shares"] = out["shares"][1:] + out["shares"][:1]
    return out


def _wrong_share(stage, out):
    """A well-formed share of another secret: one byte of the first 16-byte chunk changed (the padding, in the
    last chunk, still checks out, so it combines, to a wrong secret)."""
    if stage == Stage.UNMASK:
        first = out["shares"][0]
        out["shares"] = [first[:4] + bytes([first[4] ^ 1]) + first[5:]] + out["shares"][1:]
    return out


def _random_vector(stage, out):
    if stage == Stage.COLLECT:
        return np.random.default_rng(0).integers(0, MODULUS, out.shape, dtype=np.uint64).astype(np.uint32)
    return out


@pytest.mark.parametrize("nodes, tamper, drop, reason", [
    (3, _garbage_shares, None, "do not combine"),
    (5, _garbage_shares, None, "do not combine"),
    (5, _swapped_shares, None, "do not combine"),
    (3, _wrong_share, None, "inconsistent"),  # 3 shares for t = 2: two subsets disagree
    (3, _wrong_share, Stage.UNMASK, "unmasked weight total"),  # exactly t shares: a wrong seed, caught by the sum
    (3, _random_vector, None, "unmasked weight total"),
])
def test_a_garbage_share_or_masked_vector_fails_the_round_safely(nodes, tamper, drop, reason):
    dropped = {NODE_IDS[2]: drop} if drop else {}
    wrapper, grid, _ = _wrapped(nodes=nodes, tamper={NODE_IDS[1]: tamper}, drop=dropped)
    before, after, metrics = _round(wrapper, grid)
    assert metrics["kept-previous"] == 1 and snapshot(after) == snapshot(before)
    assert wrapper.history[-1]["kept-reason"].startswith("secure aggregation failed:")
    assert reason in wrapper.history[-1]["kept-reason"]
    assert wrapper.round == 1  # the round is over (recorded), nothing applied


def test_a_malformed_masked_vector_is_rejected_and_its_node_treated_as_dropped():
    wrapper, grid, sim = _wrapped(nodes=5, tamper={NODE_IDS[3]: lambda s, out: out[:-1] if s == Stage.COLLECT else out})
    before, after, metrics = _round(wrapper, grid)
    assert metrics["kept-previous"] == 0 and metrics["clients-used"] == 4 and metrics["clients-rejected"] == 1
    assert wrapper.history[-1]["rejected"][0]["category"] == "secagg-format"
    survivors = {n: u for n, u in sim.uploads.items() if n != NODE_IDS[3]}
    assert _max_err(after, _plain("fedsb", before, survivors, np.full(4, 0.25))) <= wrapper.params.quantum() * 1.01


def test_nodes_refuse_requests_that_break_the_protocol():
    params = {"session": "s", "node": 1, "round": 1, "share-num": 3, "threshold": 2, "clipping-range": 8.0,
              "quantization-range": 2**22, "noise-std": 0.0, "weighting": "uniform", "max-weight": 1e4}
    states = {}
    pks = {}
    for nid in (1, 2, 3):
        out, states[nid] = handle(None, ConfigRecord({"stage": Stage.SETUP, **params, "node": nid}))
        pks[nid] = (out["pk1"], out["pk2"])
    keys = {"nids": [1, 2, 3], "pk1": [pks[n][0] for n in (1, 2, 3)], "pk2": [pks[n][1] for n in (1, 2, 3)]}
    with pytest.raises(ProtocolViolation, match="after 'setup'"):
        handle(states[1], ConfigRecord({"stage": Stage.UNMASK, "session": "s", "active": [1, 2], "dead": []}))
    with pytest.raises(ProtocolViolation, match="session"):
        handle(states[1], ConfigRecord({"stage": Stage.SHARE_KEYS, "session": "other", **keys}))
    with pytest.raises(ProtocolViolation, match="own public keys"):
        handle(states[1], ConfigRecord({"stage": Stage.SHARE_KEYS, "session": "s",
                                        **{**keys, "pk1": keys["pk1"][::-1]}}))
    sent = {}
    for nid in (1, 2, 3):
        sent[nid], states[nid] = handle(states[nid], ConfigRecord({"stage": Stage.SHARE_KEYS, "session": "s", **keys}))
    fwd = [(src, c) for src in (2, 3) for dst, c in zip(sent[src]["dsts"], sent[src]["ctxts"]) if dst == 1]
    collect = ConfigRecord({"stage": Stage.COLLECT, "session": "s", "srcs": [s for s, _ in fwd],
                            "ctxts": [c for _, c in fwd]})
    with pytest.raises(ProtocolViolation, match="not finite"):
        masked_vector(states[1], collect, np.array([np.nan, 0.0]), 2**22)
    bad = ConfigRecord({**dict(collect), "srcs": [3, 2]})  # ciphertexts attributed to the wrong sender
    with pytest.raises(ProtocolViolation, match="arrived as"):
        masked_vector(states[1], bad, np.zeros(2), 2**22)
    _, state = masked_vector(states[1], collect, np.zeros(2), 2**22)
    for active, dead, text in (([1, 2], [2], "both"), ([1], [], "threshold"), ([1, 2, 4], [], "does not hold")):
        with pytest.raises(ProtocolViolation, match=text):
            handle(state, ConfigRecord({"stage": Stage.UNMASK, "session": "s", "active": active, "dead": dead}))
    out, wiped = handle(state, ConfigRecord({"stage": Stage.UNMASK, "session": "s", "active": [1, 2], "dead": [3]}))
    assert out["nids"] == [1, 2, 3] and wiped is None
    with pytest.raises(ProtocolViolation, match="no SecAgg"):  # a second unmask in the session is refused
        handle(wiped, ConfigRecord({"stage": Stage.UNMASK, "session": "s", "active": [1, 2], "dead": []}))


def test_params_are_validated():
    assert SecAggParams().shares_and_threshold(3) == (3, 2) and SecAggParams().shares_and_threshold(5) == (5, 3)
    assert SecAggParams(num_shares=5).shares_and_threshold(20) == (5, 3)
    for bad in ({"num_shares": 4}, {"num_shares": 1}, {"threshold": 0.5}, {"threshold": 1.2},
                {"clipping_range": 0.0}, {"clipping_range": math.inf}, {"quantization_range": 2**31},
                {"quantization_range": 1.5}, {"max_weight": 0}):
        with pytest.raises(ValueError):
            SecAggParams(**bad)
    with pytest.raises(ValueError, match="max-weight"):
        weight_factor("num-examples", 101, SecAggParams(max_weight=100.0))
    with pytest.raises(ValueError, match="fedsb, hetero or flora"):
        SecureAggregation(make("fedit"))


def test_secagg_plus_neighbourhoods_recover_a_dropout():
    wrapper, grid, sim = _wrapped(nodes=5, params=SecAggParams(num_shares=3, threshold=0.6),
                                  drop={NODE_IDS[2]: Stage.COLLECT})
    before, after, metrics = _round(wrapper, grid)
    assert wrapper.last_round.k == 3 and wrapper.last_round.t == 2
    assert all(len(h) == 3 for h in wrapper.last_round.neighbours.values())
    survivors = {n: u for n, u in sim.uploads.items() if n != NODE_IDS[2]}
    assert metrics["kept-previous"] == 0
    assert _max_err(after, _plain("fedsb", before, survivors, np.full(4, 0.25))) <= wrapper.params.quantum() * 1.01


def test_checkpoint_round_trip_and_delegation():
    wrapper, grid, _ = _wrapped()
    _round(wrapper, grid)
    state = wrapper.state_dict()
    assert state["secure-aggregation"]["params"]["quantization_range"] == 2**22
    other, _, _ = _wrapped()
    other.load_state_dict(state)
    assert other.round == 1 and snapshot(other.global_state) == snapshot(wrapper.global_state)
    assert other.weighting == "uniform" and other.min_train_nodes == 2


def test_distributed_dp_the_nodes_add_the_noise_and_the_dp_wrapper_only_accounts():
    from strategies import UserLevelDP

    sigma, clip = 2.0, 0.5
    wrapper, grid, sim = _wrapped(nodes=5, scale=0.01)
    dp = UserLevelDP(wrapper, sigma, clip, 1e-5, 10)
    t_min = 3  # max(t = ⌈0.6·5⌉, min-train-nodes = 2)
    assert wrapper.noise_in_mask and wrapper.node_noise_std(5) == pytest.approx(sigma * clip / math.sqrt(t_min))
    before = {k: v.copy() for k, v in wrapper.global_state.items()}
    replies = list(grid.send_and_receive(list(dp.configure_train(1, wrapper.global_arrayrecord(), ConfigRecord(),
                                                                 grid))))
    _, metrics = dp.aggregate_train(1, replies)
    setups = [m.content.config_records[SECAGG_KEY] for batch in grid.sent for m in batch
              if m.content.config_records[SECAGG_KEY]["stage"] == Stage.SETUP]
    assert len(setups) == 5 and all(s["noise-std"] == pytest.approx(sigma * clip / math.sqrt(t_min)) for s in setups)
    noise = np.concatenate([(wrapper.global_state[k] - v).ravel() for k, v in
                            _plain("fedsb", before, sim.uploads, np.full(5, 0.2)).items()])
    want = sigma * clip / math.sqrt(5 * t_min)  # std on the mean of 5 noised vectors, ≥ σC/5 (central)
    assert metrics["secagg-noise-std"] == pytest.approx(want) and want >= sigma * clip / 5
    assert noise.size > 150 and abs(float(np.std(noise)) / want - 1) < 0.2
    assert metrics["user-dp-epsilon"] > 0 and dp.accountant.rounds == 1


def test_distributed_dp_refuses_a_clipping_range_that_would_clip_the_noise():
    from strategies import UserLevelDP

    with pytest.raises(ValueError, match="secagg-clipping-range"):
        UserLevelDP(_wrapped()[0], 10.0, 1.0, 1e-5, 10)


def test_mask_depends_on_every_seed_bit():
    """Two seeds that Flower's ``pseudo_rand_gen`` would fold to the same 32-bit numpy seed give unrelated masks,
    uniform over the ring."""
    from strategies.secagg_protocol import MODULUS, mask

    a = bytes(range(32))
    b = bytes(x ^ y for x, y in zip(a, b"\x01\x00\x00\x00\x01" + bytes(27), strict=True))  # same XOR fold
    ma, mb = mask(a, 4096), mask(b, 4096)
    assert ma.shape == (4097,) and np.array_equal(ma, mask(a, 4096))
    assert np.mean(ma == mb) < 0.01
    assert ma.min() >= 0 and ma.max() < MODULUS and abs(ma.mean() / MODULUS - 0.5) < 0.02
