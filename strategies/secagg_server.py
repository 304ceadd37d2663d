"""The server's side of one SecAgg+ round (Flower's ``SecAggPlusWorkflow`` stages on the Message API), driven by
:class:`strategies.secure_aggregation.SecureAggregation`.

:class:`SecAggRound` holds one round: ``setup`` and ``share_keys`` run inside ``configure_train`` (``query``
messages over the grid), ``attach`` puts the forwarded ciphertexts on the train messages, ``add_masked`` sums
each accepted masked vector into one running total at once (no individual vector is kept), and ``unmask``
collects the shares and returns the unmasked weighted mean.

What the server receives, and nothing else: public keys, ciphertexts it cannot read (Fernet under keys agreed
between two nodes), masked vectors (uniform in [0, 2³²) to anyone without the masks), and per node either ≥ t
shares of its mask seed (it survived: its vector is in the sum) or ≥ t shares of its secret key 1 (it dropped
after sharing: its vector is not in the sum), never both (:meth:`SecAggRound.unmask` asks survivors only, and
every node refuses a request that lists one node as both). ``received`` logs what each reply carried, for tests.

Dropouts: a node that fails setup or share-keys is left out of the round (no train message; no one masks with
it). A node that fails after share-keys (no reply, an error, a rejected reply) is *dropped*: the survivors'
pairwise masks with it are removed from its rebuilt secret key. Each survivor and each dropped node needs ≥ t
answering neighbours, and the round needs ≥ max(t, min-train-nodes) survivors; otherwise :class:`SecAggError`.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from strategies.secagg_protocol import (
    MASKED_KEY,
    MODULUS,
    SECAGG_KEY,
    SecAggError,
    SecAggParams,
    Stage,
    combine,
    neighbourhoods,
    remove_masks,
    unmasked_mean,
)

LOGGER = logging.getLogger("fedlora.strategy")


def record_bytes(record: ConfigRecord | ArrayRecord) -> int:
    """Serialized size of one record (Flower's deflated form)."""
    return len(record.deflate())


@dataclass
class SecAggRound:
    """One round of the protocol: ``rnd``, the sampled ``nodes``, (k, t), and what the stages established."""

    rnd: int
    nodes: list[int]
    params: SecAggParams
    min_survivors: int
    noise_std: float
    weighting: str = "uniform"
    session: str = field(default_factory=lambda: secrets.token_hex(16))
    k: int = 0
    t: int = 0
    neighbours: dict[int, frozenset[int]] = field(default_factory=dict)
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    active: set[int] = field(default_factory=set)  # completed share-keys: sent a train message
    forward: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)  # dst → [(src, ciphertext)]
    dropped: dict[int, str] = field(default_factory=dict)  # node → the stage it was lost in
    trained: set[int] = field(default_factory=set)  # nodes sent a train message
    abort: str = ""
    total: np.ndarray | None = None  # Σ masked vectors mod 2³², int64 (1 + d)
    survivors: list[int] = field(default_factory=list)
    factors: dict[int, int] = field(default_factory=dict)  # survivor → its weight factor qᵢ (public)
    upload_bytes: int = 0  # protocol records nodes sent (serialized)
    download_bytes: int = 0  # protocol records the server sent (serialized)
    seconds: float = 0.0
    received: list[tuple[int, str, Any]] = field(default_factory=list)  # (node, stage, what its reply carried)

    def __post_init__(self) -> None:
        self.k, self.t = self.params.shares_and_threshold(len(self.nodes))

    # ------------------------------------------------------------------ messaging
    def _exchange(self, grid: Any, requests: Mapping[int, dict[str, Any]], timeout: float | None, stage: str
                  ) -> dict[int, ConfigRecord]:
        """Send one ``query`` per node; return the SecAgg record of each good reply (errors: dropped)."""
        t0 = time.perf_counter()
        messages = []
        for nid, body in requests.items():
            record = ConfigRecord({"stage": stage, "session": self.session, **body})
            self.download_bytes += record_bytes(record)
            messages.append(Message(RecordDict({SECAGG_KEY: record}), dst_node_id=nid,
                                    message_type=MessageType.QUERY))
        out: dict[int, ConfigRecord] = {}
        for reply in grid.send_and_receive(messages, timeout=timeout) if messages else []:
            nid = int(reply.metadata.src_node_id)
            if nid not in requests or nid in out:
                continue
            if reply.has_error():
                LOGGER.warning("round %d: SecAgg+ %s: node %d: error reply: %s", self.rnd, stage, nid,
                               reply.error.reason)
                continue
            record = reply.content.config_records.get(SECAGG_KEY)
            if record is None:
                LOGGER.warning("round %d: SecAgg+ %s: node %d: reply without a %r record", self.rnd, stage, nid,
                               SECAGG_KEY)
                continue
            self.upload_bytes += record_bytes(record)
            self.received.append((nid, stage, dict(record)))
            out[nid] = record
        for nid in requests:
            if nid not in out:
                self.dropped.setdefault(nid, stage)
        self.seconds += time.perf_counter() - t0
        return out

    def _check_neighbourhoods(self, alive: set[int], who: set[int], what: str) -> None:
        for nid in sorted(who):
            have = len(self.neighbours[nid] & alive)
            if have < self.t:
                raise SecAggError(f"{what}: node {nid} has {have} live neighbours (itself included) < threshold "
                                  f"t={self.t} (k={self.k}, {len(alive)} of {len(self.nodes)} sampled nodes left)")

    # ------------------------------------------------------------------ stages before training
    def setup(self, grid: Any, timeout: float | None) -> None:
        """Stage 0: parameters out, two public keys per node back."""
        n = len(self.nodes)
        if n < 2:
            raise SecAggError(f"secure aggregation needs >= 2 sampled nodes, got {n}")
        if n > self.params.max_nodes():
            raise SecAggError(f"{n} sampled nodes: sums of more than {self.params.max_nodes()} nodes wrap mod 2^32 at "
                              f"secagg-quantization-range={self.params.quantization_range}; lower it")
        self.neighbours = neighbourhoods(self.nodes, self.k)
        p = self.params
        body = {"round": self.rnd, "share-num": self.k, "threshold": self.t, "clipping-range": float(p.clipping_range),
                "quantization-range": p.quantization_range, "noise-std": float(self.noise_std),
                "weighting": self.weighting, "max-weight": float(p.max_weight)}
        replies = self._exchange(grid, {nid: {**body, "node": nid} for nid in self.nodes}, timeout, Stage.SETUP)
        seen: set[bytes] = set()
        for nid, rec in replies.items():
            pk1, pk2 = rec.get("pk1"), rec.get("pk2")
            if not isinstance(pk1, bytes) or not isinstance(pk2, bytes) or {pk1, pk2} & seen or pk1 == pk2:
                LOGGER.warning("round %d: SecAgg+ setup: node %d: missing or repeated public keys", self.rnd, nid)
                self.dropped[nid] = Stage.SETUP
                continue
            seen |= {pk1, pk2}
            self.public_keys[nid] = (pk1, pk2)
        self.active = set(self.public_keys)
        self._check_neighbourhoods(self.active, self.active, "after setup")

    def share_keys(self, grid: Any, timeout: float | None) -> None:
        """Stage 1: each node gets its live neighbourhood's public keys and returns one ciphertext per neighbour."""
        requests = {}
        for nid in sorted(self.active):
            hood = sorted(self.neighbours[nid] & self.active)
            requests[nid] = {"nids": hood, "pk1": [self.public_keys[n][0] for n in hood],
                             "pk2": [self.public_keys[n][1] for n in hood]}
        replies = self._exchange(grid, requests, timeout, Stage.SHARE_KEYS)
        sent: dict[int, list[tuple[int, bytes]]] = {}
        for nid, rec in replies.items():
            dsts, ctxts = rec.get("dsts"), rec.get("ctxts")
            want = set(cast(list[int], requests[nid]["nids"])) - {nid}
            if (not isinstance(dsts, list) or not isinstance(ctxts, list) or len(dsts) != len(ctxts)
                    or len(set(dsts)) != len(dsts) or set(dsts) != want
                    or not all(isinstance(c, bytes) for c in ctxts)):
                LOGGER.warning("round %d: SecAgg+ share-keys: node %d: not one ciphertext per neighbour", self.rnd, nid)
                self.dropped[nid] = Stage.SHARE_KEYS
                continue
            sent[nid] = list(zip(cast(list[int], dsts), cast(list[bytes], ctxts)))
        self.active = set(sent)
        self._check_neighbourhoods(self.active, self.active, "after share-keys")
        self.forward = {nid: [] for nid in self.active}
        for src, pairs in sorted(sent.items()):
            for dst, ctxt in pairs:
                if dst in self.active:
                    self.forward[dst].append((src, ctxt))

    def attach(self, messages: list[Message]) -> list[Message]:
        """The train messages of the nodes that completed share-keys, each with its ``collect`` record."""
        out = []
        for msg in messages:
            nid = int(msg.metadata.dst_node_id)
            if nid not in self.active:
                continue
            fwd = self.forward[nid]
            record = ConfigRecord({"stage": Stage.COLLECT, "session": self.session, "srcs": [s for s, _ in fwd],
                                   "ctxts": [c for _, c in fwd]})
            self.download_bytes += record_bytes(record)
            msg.content[SECAGG_KEY] = record
            self.trained.add(nid)
            out.append(msg)
        return out

    # ------------------------------------------------------------------ after training
    def check_masked(self, record: ArrayRecord | None, d: int) -> np.ndarray:
        """The masked vector of a train reply: one uint32 Array ``masked`` of shape (1 + d,). Raises ValueError."""
        if record is None or set(record) != {MASKED_KEY}:
            raise ValueError(f"no ArrayRecord {SECAGG_KEY!r} holding exactly one Array {MASKED_KEY!r}")
        arr = record[MASKED_KEY].numpy()
        if arr.dtype != np.uint32 or arr.shape != (1 + d,):
            raise ValueError(f"masked vector {arr.dtype} {arr.shape}, expected uint32 ({1 + d},)")
        return arr

    def add_masked(self, nid: int, masked: np.ndarray, factor: int) -> None:
        """Add one survivor's masked vector (its weight factor qᵢ) to the running total (mod 2³²); only the total
        is kept."""
        self.received.append((nid, Stage.COLLECT, masked))
        total = masked.astype(np.int64) if self.total is None else (self.total + masked.astype(np.int64)) % MODULUS
        self.total = total
        self.survivors.append(nid)
        self.factors[nid] = int(factor)

    def unmask(self, grid: Any, timeout: float | None) -> np.ndarray:
        """Stage 3: the survivors' shares → mask seeds of the survivors, secret keys of the dropped → the weighted
        mean vector (d,) (:func:`~strategies.secagg_protocol.unmasked_mean`). Raises :class:`SecAggError`."""
        alive = set(self.survivors)
        for nid in self.active - alive:
            self.dropped.setdefault(nid, Stage.COLLECT)
        dead = self.active - alive
        if len(alive) < self.min_survivors or self.total is None:
            raise SecAggError(f"{len(alive)} masked vectors < {self.min_survivors} needed (threshold t={self.t}, "
                              f"min-train-nodes): not unmasking; {len(dead)} nodes dropped after sharing their keys")
        self._check_neighbourhoods(alive, alive | dead, "before unmasking")
        holds = {nid: {nid} | {s for s, _ in self.forward[nid]} for nid in alive}
        requests = {nid: {"active": sorted(holds[nid] & alive), "dead": sorted(holds[nid] & dead)}
                    for nid in sorted(alive)}
        replies = self._exchange(grid, requests, timeout, Stage.UNMASK)
        seed_shares: dict[int, list[bytes]] = {n: [] for n in alive}
        key_shares: dict[int, list[bytes]] = {n: [] for n in dead}
        for nid, rec in sorted(replies.items()):
            asked = requests[nid]["active"] + requests[nid]["dead"]
            nids, shares = rec.get("nids"), rec.get("shares")
            if nids != asked or not isinstance(shares, list) or len(shares) != len(asked) or not all(
                    isinstance(s, bytes) for s in shares):
                LOGGER.warning("round %d: SecAgg+ unmask: node %d answered other shares than asked; ignored",
                               self.rnd, nid)
                continue
            for owner, share in zip(asked, cast(list[bytes], shares)):
                (seed_shares if owner in alive else key_shares)[owner].append(share)
        seeds = {n: combine(s, self.t, n, "mask seed") for n, s in sorted(seed_shares.items())}
        keys = {n: combine(s, self.t, n, "secret key") for n, s in sorted(key_shares.items())}
        pairs = [(u, s) for u in sorted(alive) for s, _ in self.forward[u] if s in dead]
        total = remove_masks(self.total, seeds, keys, {n: pk[0] for n, pk in self.public_keys.items()}, pairs)
        self.total = None
        return unmasked_mean(total, len(alive), sum(self.factors.values()), self.params)
