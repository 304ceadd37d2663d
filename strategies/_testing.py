"""Test helpers for the strategy tests (no test functions here).

- :class:`FakeGrid`: a Flower ``Grid`` with fixed node ids; ``send_and_receive`` calls an in-process
  client function per message (for ``Strategy.start`` tests).
- Synthetic nested and peft LoRA global states on two non-square layers + a ``modules_to_save`` head,
  with random orthonormal outer factors for nested dense ΔW = s·B·R·A.
- Reply builders that construct reply ``Message``s exactly as a ClientApp would
  (``Message(content, reply_to=instruction)`` / ``Message(Error, reply_to=...)``, arrays packed as
  :func:`strategies.wire.pack_state` packs them), valid or with one fault (:func:`bad_reply`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedlora.lora_math import A_SUFFIX, B_SUFFIX, DELTA_A, DELTA_B
from strategies.inprocess_grid import InProcessGrid
from strategies.wire import LAYOUT_KEY, pack_state, unpack_state

FINGERPRINT = "f" * 64
NODE_IDS = [101, 202, 303, 404, 505]
NUM_EXAMPLES = [10, 40, 25, 7, 90]  # unequal
# two non-square layers (d, k) + a modules_to_save head
LAYERS = {"enc.0.q": (24, 16), "enc.0.ffn": (20, 28)}
HEAD = {"classifier.weight": (3, 16), "classifier.bias": (3,)}


class FakeGrid(InProcessGrid):
    """An :class:`~strategies.inprocess_grid.InProcessGrid` that also records every batch it was sent."""

    def __init__(self, node_ids: Iterable[int], client_fn: Callable[[Message], Message | None] | None = None):
        super().__init__(node_ids, client_fn)
        self.sent: list[list[Message]] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Record the batch, then answer it as InProcessGrid does."""
        messages = list(messages)
        self.sent.append(messages)
        return super().send_and_receive(messages, timeout=timeout)


# ---------------------------------------------------------------------------------------- states
def orthonormal(rng: np.random.Generator, n: int, r: int) -> np.ndarray:
    """n×r matrix with orthonormal columns (float64)."""
    q, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return q


def nested_outer(r: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random orthonormal outer factors per layer: B (d×r), A (r×k)."""
    rng = np.random.default_rng(seed)
    return {name: (orthonormal(rng, d, r), orthonormal(rng, k, r).T) for name, (d, k) in LAYERS.items()}


def head_state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random ``modules_to_save`` arrays."""
    return {k: rng.standard_normal(shape) for k, shape in HEAD.items()}


def nested_global(r: int, seed: int = 1, dtype: Any = np.float64) -> dict[str, np.ndarray]:
    """Nested global state: non-zero ``L.R0`` (r×r) per layer + head."""
    rng = np.random.default_rng(seed)
    out = {f"{name}.R0": rng.standard_normal((r, r)) for name in LAYERS}
    out.update(head_state(rng))
    return {k: v.astype(dtype) for k, v in out.items()}


def peft_global(
    r: int, seed: int = 2, zero_b: bool = False, dtype: Any = np.float64
) -> dict[str, np.ndarray]:
    """peft LoRA global state of rank r (A: r×k, B: d×r) + head."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, (d, k) in LAYERS.items():
        out[f"{name}{A_SUFFIX}"] = rng.uniform(-1, 1, (r, k)) / np.sqrt(k)
        out[f"{name}{B_SUFFIX}"] = np.zeros((d, r)) if zero_b else rng.standard_normal((d, r))
    out.update(head_state(rng))
    return {k: v.astype(dtype) for k, v in out.items()}


def random_upload(expected: Mapping[str, tuple[int, ...]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A valid upload: random float64 arrays of the expected shapes."""
    return {k: rng.standard_normal(shape) for k, shape in expected.items()}


def clipped_upload(upload: Mapping[str, np.ndarray], download: Mapping[str, np.ndarray], clip: float
                   ) -> dict[str, np.ndarray]:
    """What an honest user-level DP client sends: its update Δ (upload − download for downloaded keys, the
    upload itself otherwise) clipped to L2 norm ``clip``, the download added back."""
    from fedlora.privacy import clip_update  # loads opacus

    delta = {k: v - download[k] if k in download else v for k, v in upload.items()}
    small, _ = clip_update(delta, clip)
    return {k: small[k] + download[k] if k in download else small[k] for k in upload}


def pad(m: np.ndarray, r: int) -> np.ndarray:
    """Zero-pad an rᵢ×rᵢ matrix top-left into r×r."""
    out = np.zeros((r, r))
    out[: m.shape[0], : m.shape[1]] = m
    return out


def delta_dense(state: Mapping[str, np.ndarray], prefix: str) -> np.ndarray:
    """Dense ΔW of a delta-form global state (delta_B·delta_A)."""
    return state[prefix + DELTA_B].astype(np.float64) @ state[prefix + DELTA_A].astype(np.float64)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """‖got − want‖_F / ‖want‖_F."""
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# ---------------------------------------------------------------------------------------- replies
def reply(
    msg: Message,
    state: Mapping[str, np.ndarray] | None,
    *,
    num_examples: float | None = 10,
    fingerprint: str | None = FINGERPRINT,
    train_loss: float | None = 0.5,
    arrays_key: str = "arrays",
    pack: bool = True,
) -> Message:
    """A ClientApp-style train reply to ``msg`` (``arrays`` + ``metrics`` + ``meta``); ``pack=False``: the
    arrays unpacked, one Array per key, and no layout (a third-party client)."""
    content: dict[str, Any] = {}
    meta: dict[str, Any] = {} if fingerprint is None else {"fingerprint": fingerprint}
    if state is not None and pack:
        content[arrays_key], meta[LAYOUT_KEY] = pack_state(state)
    elif state is not None:
        content[arrays_key] = ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()})
    metrics: dict[str, Any] = {}
    if num_examples is not None:
        metrics["num-examples"] = num_examples
    if train_loss is not None:
        metrics["train-loss"] = train_loss
    content["metrics"] = MetricRecord(metrics)
    if meta:
        content["meta"] = ConfigRecord(meta)
    return Message(RecordDict(content), reply_to=msg)


def error_reply(msg: Message, code: int = 2, reason: str = "ClientApp raised RuntimeError: boom") -> Message:
    """An error reply, as Flower delivers a ClientApp exception."""
    return Message(Error(code=code, reason=reason), reply_to=msg)


def node_of(msg: Message) -> int:
    """Destination node id of an instruction message."""
    return int(msg.metadata.dst_node_id)


def config_of(msg: Message) -> dict[str, Any]:
    """The ConfigRecord of an instruction message as a dict."""
    return dict(msg.content["config"])


def arrays_of(msg: Message) -> dict[str, np.ndarray]:
    """The state a message carries as ``dict[str, ndarray]``, unpacked with the layout of its ``config``
    (instruction) or ``meta`` (reply) ConfigRecord, or one Array per key without a layout."""
    for name in ("config", "meta"):
        record = msg.content.config_records.get(name)
        if record is not None and LAYOUT_KEY in record:
            return unpack_state(msg.content["arrays"], record[LAYOUT_KEY])
    return unpack_state(msg.content["arrays"], None)


# ---------------------------------------------------------------------------------------- strategies
NESTED = {"fedsb", "hetero", "flora"}
HETERO = {"hetero", "flora", "flora-lora", "flexlora"}
R = 8


def make(name: str, *, with_initial: bool = True, **kw: Any) -> Any:
    """A strategy (rank 8) with the synthetic initial state of its family; fingerprint checked for all,
    heterogeneous strategies get ranks cycling 8, 4, 2, FLoRA inner rank 4."""
    from strategies import build_strategy

    kw.setdefault("outer_fingerprint", FINGERPRINT)
    kw.setdefault("min_train_nodes", 2)
    kw.setdefault("min_available_nodes", 2)
    if name in HETERO:
        kw.setdefault("ranks", f"{R},{R // 2},{R // 4}")
    if name == "flora":
        kw.setdefault("inner_rank", 4)
    if with_initial and "initial_state" not in kw:
        kw["initial_state"] = nested_global(R) if name in NESTED else peft_global(R)
    return build_strategy(name, rank=R, **kw)


def configure(
    strategy: Any,
    nodes: Iterable[int] = NODE_IDS,
    server_round: int = 1,
    config: Mapping[str, Any] | None = None,
) -> list[Message]:
    """``configure_train`` on a FakeGrid with ``nodes``; returns the instruction messages."""
    cfg = ConfigRecord(dict(config or {"lr": 0.01, "local-epochs": 2}))
    return list(strategy.configure_train(server_round, strategy.global_arrayrecord(), cfg, FakeGrid(nodes)))


def good_replies(strategy: Any, msgs: list[Message], seed: int = 0) -> list[Message]:
    """Valid random replies to ``msgs`` (num-examples cycling through NUM_EXAMPLES)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, m in enumerate(msgs):
        up = random_upload(strategy._tasks[node_of(m)].expected, rng)
        out.append(reply(m, up, num_examples=NUM_EXAMPLES[i % len(NUM_EXAMPLES)]))
    return out


def random_replies(
    strategy: Any, msgs: list[Message], rng: np.random.Generator
) -> tuple[list[tuple[dict[str, np.ndarray], int]], list[Message]]:
    """Random valid uploads for ``msgs`` in order (num-examples NUM_EXAMPLES[i]): ([(upload, rank)], replies)."""
    uploads, replies = [], []
    for m, n in zip(msgs, NUM_EXAMPLES):
        task = strategy._tasks[node_of(m)]
        up = random_upload(task.expected, rng)
        uploads.append((up, task.rank))
        replies.append(reply(m, up, num_examples=n))
    return uploads, replies


# ---------------------------------------------------------------------------------------- bad replies
#: the faulty replies :func:`bad_reply` builds → the screening category each must be rejected with
REJECTION_CATEGORY = {
    "nan": "non-finite",
    "inf": "non-finite",
    "shape": "shape",
    "missing-key": "keys",
    "extra-key": "keys",
    "fingerprint": "fingerprint",
    "no-meta": "missing-record",
    "oversized": "oversized",
    "error": "error",
    "no-arrays": "missing-record",
    "no-num-examples": "bad-metrics",
    "zero-num-examples": "bad-metrics",
    "int-dtype": "dtype",
}


def bad_reply(kind: str, strategy: Any, msg: Message, rng: np.random.Generator) -> Message:
    """A reply to ``msg`` with one fault ``kind`` (a key of :data:`REJECTION_CATEGORY`)."""
    up = random_upload(strategy._tasks[node_of(msg)].expected, rng)
    first = next(iter(up))
    replies_of_kind = {
        "fingerprint": lambda: reply(msg, up, fingerprint="0" * 64),
        "no-meta": lambda: reply(msg, up, fingerprint=None, pack=False),
        "error": lambda: error_reply(msg),
        "no-arrays": lambda: reply(msg, None),
        "no-num-examples": lambda: reply(msg, up, num_examples=None),
        "zero-num-examples": lambda: reply(msg, up, num_examples=0),
    }
    if kind in replies_of_kind:
        return replies_of_kind[kind]()
    if kind == "nan":
        up[first].flat[0] = np.nan
    elif kind == "inf":
        up[first].flat[-1] = np.inf
    elif kind == "shape":
        up[first] = np.zeros(tuple(n + 1 for n in up[first].shape))
    elif kind == "missing-key":
        del up[first]
    elif kind == "extra-key":
        up["rogue.weight"] = np.zeros(3)
    elif kind == "oversized":
        up["junk"] = np.zeros(20_000)
    elif kind == "int-dtype":
        up[first] = np.ones(up[first].shape, dtype=np.int64)
    else:
        raise AssertionError(kind)
    return reply(msg, up)


def admitting_limit(strategy: Any) -> int:
    """max_update_bytes admitting every valid upload (payload + npy headers) but not 160 kB of junk."""
    biggest = max(
        sum(int(np.prod(s)) * 8 + 128 for s in t.expected.values()) for t in strategy._tasks.values()
    )
    return biggest + 4096


def snapshot(state: Mapping[str, np.ndarray]) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Bit-exact fingerprint of a state (dtype, shape, bytes per key)."""
    return {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in state.items()}


# ---------------------------------------------------------------------------------------- exactness runs
NESTED_ALPHA = 4.0  # nested s = alpha / r = 0.5 (outer factors are the test's own)


def run_nested_rounds(
    name: str,
    inner: Callable[[dict[str, np.ndarray], str], np.ndarray],
    rounds: int = 2,
    **kwargs,
) -> list[dict[str, float]]:
    """Run ``rounds`` rounds of ``name`` with random uploads; per round and layer return the relative
    error of the new global's dense ΔW = s·B·R0·A against Σ pᵢ ΔWᵢ, ΔWᵢ = s·B·(R0 + pad(innerᵢ))·A.

    ``inner(upload, layer)`` turns a node's upload into its rᵢ×rᵢ inner update.
    """
    s_scale = NESTED_ALPHA / R
    outer = nested_outer(R)
    from strategies import build_strategy

    strategy = build_strategy(
        name,
        rank=R,
        outer_fingerprint=FINGERPRINT,
        initial_state=nested_global(R),
        min_available_nodes=5,
        **kwargs,
    )
    rng = np.random.default_rng(42)
    errors = []
    for rnd in range(1, rounds + 1):
        old = {k: v.copy() for k, v in strategy.global_state.items()}
        msgs = list(
            strategy.configure_train(rnd, strategy.global_arrayrecord(), ConfigRecord(), FakeGrid(NODE_IDS))
        )
        assert sorted(node_of(m) for m in msgs) == NODE_IDS
        uploads, replies = random_replies(strategy, sorted(msgs, key=node_of), rng)
        _, metrics = strategy.aggregate_train(rnd, replies)
        assert metrics["clients-used"] == 5 and metrics["kept-previous"] == 0
        p = np.array(NUM_EXAMPLES, dtype=np.float64) / sum(NUM_EXAMPLES)
        new = strategy.global_state
        errs = {}
        for layer in LAYERS:
            B, A = outer[layer]
            want = sum(
                pi * s_scale * B @ (old[f"{layer}.R0"] + pad(inner(up, layer), R)) @ A
                for pi, (up, _) in zip(p, uploads)
            )
            got = s_scale * B @ new[f"{layer}.R0"] @ A
            errs[layer] = rel_err(got, want)
        for key in HEAD:
            want = sum(pi * up[key] for pi, (up, _) in zip(p, uploads))
            errs[key] = rel_err(new[key], want)
        errors.append(errs)
    return errors


def run_lora_round(strategy: Any, rnd: int, rng: np.random.Generator) -> dict[str, Any]:
    """One round of a peft LoRA strategy with 5 nodes (unequal num-examples) and random uploads.

    Returns ``old`` (global before), ``uploads`` [(state, rank)] in NODE_IDS order, ``p`` (weights),
    ``msgs`` (instruction messages) and ``metrics``.
    """
    old = {k: v.copy() for k, v in strategy.global_state.items()}
    msgs = sorted(
        strategy.configure_train(rnd, strategy.global_arrayrecord(), ConfigRecord(), FakeGrid(NODE_IDS)),
        key=node_of,
    )
    assert [node_of(m) for m in msgs] == NODE_IDS
    uploads, replies = random_replies(strategy, msgs, rng)
    _, metrics = strategy.aggregate_train(rnd, replies)
    assert metrics["clients-used"] == 5 and metrics["kept-previous"] == 0
    p = np.array(NUM_EXAMPLES, dtype=np.float64) / sum(NUM_EXAMPLES)
    return {"old": old, "uploads": uploads, "p": p, "msgs": msgs, "metrics": metrics}
