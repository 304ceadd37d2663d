"""The node's side of SecAgg+ (Flower's ``secaggplus_mod`` logic on fedlora's messages), as functions of the
node's protocol state and the server's request; ``clients/secagg.py`` runs them in the ClientApp and keeps the
state in ``context.state`` (it never leaves the node: key pairs, the mask seed, the shares it holds).

Stages, in order, each refused out of order or for another session (a random id the server gives at setup):

- ``setup`` (query): parameters, the node's protocol id → two fresh ECDH key pairs; reply: the public keys.
- ``share-keys`` (query): the public keys of its neighbourhood (itself included, ≥ t, ≤ k, all distinct) → a
  fresh 32-byte mask seed bᵢ (``os.urandom``); bᵢ and secret key 1 are Shamir-split (t of k) and each
  neighbour's share pair is encrypted (Fernet under ECDH(sk2, pk2 of the neighbour)); reply: the ciphertexts.
- ``collect`` (the train message): the ciphertexts addressed to it → decrypted, sender and addressee checked,
  shares stored; the node's vector is masked (:func:`masked_vector`) and replaces the update in the reply.
- ``unmask`` (query): which neighbours survived and which dropped (disjoint, all holders of its shares,
  ≥ t survivors) → the mask-seed shares of the survivors and the secret-key shares of the dropped; the state
  is then wiped, so a second request in the same session is refused.

Under distributed DP the node adds N(0, s²) per coordinate (s from setup, drawn from OS entropy) to its clipped
vector before quantising, so the server never sees an un-noised sum.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, parameters_mod
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat, share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from strategies.secagg_protocol import MODULUS, SecAggParams, Stage, mask

LOGGER = logging.getLogger("fedlora.client")
#: setup parameters the node keeps, with their types
SETUP_KEYS: dict[str, type] = {"session": str, "node": int, "round": int, "share-num": int, "threshold": int,
                               "clipping-range": float, "quantization-range": int, "noise-std": float,
                               "weighting": str, "max-weight": float}


class ProtocolViolation(ValueError):
    """The server's request breaks the protocol (order, session, lists): the node refuses (an error reply)."""


def _ids(record: ConfigRecord, key: str) -> list[int]:
    value = record.get(key)
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise ProtocolViolation(f"'{key}' must be a list of node ids")
    return cast(list[int], value)


def _blobs(record: ConfigRecord, key: str) -> list[bytes]:
    value = record.get(key)
    if not isinstance(value, list) or any(not isinstance(v, bytes) for v in value):
        raise ProtocolViolation(f"'{key}' must be a list of bytes")
    return cast(list[bytes], value)


def _expect(state: ConfigRecord | None, request: ConfigRecord, stage: str) -> ConfigRecord:
    """The node's state, checked to be right before ``stage`` of the request's session."""
    if state is None or not state.get("stage"):
        raise ProtocolViolation(f"stage {stage!r} without a setup (no SecAgg+ session in progress)")
    if request.get("session") != state.get("session"):
        raise ProtocolViolation(f"stage {stage!r} for session {request.get('session')!r}, but this node is in "
                                f"session {state.get('session')!r}")
    previous = Stage.ORDER[Stage.ORDER.index(stage) - 1]
    if state["stage"] != previous:
        raise ProtocolViolation(f"stage {stage!r} after {state['stage']!r} (expected after {previous!r})")
    return state


def handle(state: ConfigRecord | None, request: ConfigRecord) -> tuple[dict[str, Any], ConfigRecord | None]:
    """Run the query stage ``request["stage"]`` (setup, share-keys, unmask); returns (reply entries, new state;
    ``None`` = wipe it). Raises :class:`ProtocolViolation` (or a decryption error) on a bad request."""
    stage = request.get("stage")
    if stage == Stage.SETUP:
        return setup(request)
    if stage == Stage.SHARE_KEYS:
        return share_keys(_expect(state, request, stage), request)
    if stage == Stage.UNMASK:
        return unmask(_expect(state, request, stage), request)
    raise ProtocolViolation(f"unknown or out-of-band SecAgg+ stage {stage!r}")


def setup(request: ConfigRecord) -> tuple[dict[str, Any], ConfigRecord]:
    """A new session (any previous one is dropped): keep the parameters, make two key pairs."""
    state = ConfigRecord()
    for key, kind in SETUP_KEYS.items():
        value = request.get(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not kind:
            raise ProtocolViolation(f"setup: '{key}' must be {kind.__name__}, got {value!r}")
        state[key] = value
    k, t = cast(int, state["share-num"]), cast(int, state["threshold"])
    if not 2 <= t <= k:
        raise ProtocolViolation(f"setup: threshold {t} must be in [2, share-num={k}]")
    if not math.isfinite(cast(float, state["noise-std"])) or cast(float, state["noise-std"]) < 0:
        raise ProtocolViolation(f"setup: noise-std {state['noise-std']!r} must be finite and >= 0")
    if state["weighting"] not in ("uniform", "num-examples"):
        raise ProtocolViolation(f"setup: weighting {state['weighting']!r} must be 'uniform' or 'num-examples'")
    try:
        params_of(state)
    except ValueError as err:
        raise ProtocolViolation(f"setup: {err}") from None
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    state.update({"stage": Stage.SETUP, "sk1": private_key_to_bytes(sk1), "pk1": public_key_to_bytes(pk1),
                  "sk2": private_key_to_bytes(sk2), "pk2": public_key_to_bytes(pk2)})
    return {"pk1": state["pk1"], "pk2": state["pk2"]}, state


def share_keys(state: ConfigRecord, request: ConfigRecord) -> tuple[dict[str, Any], ConfigRecord]:
    """Check the neighbourhood's public keys, split bᵢ and sk1 into shares, encrypt one pair per neighbour."""
    nids, pk1s, pk2s = _ids(request, "nids"), _blobs(request, "pk1"), _blobs(request, "pk2")
    me, k, t = cast(int, state["node"]), cast(int, state["share-num"]), cast(int, state["threshold"])
    if not len(nids) == len(pk1s) == len(pk2s) or len(set(nids)) != len(nids):
        raise ProtocolViolation("share-keys: nids, pk1 and pk2 must be lists of one length without repeated ids")
    if not t <= len(nids) <= k:
        raise ProtocolViolation(f"share-keys: {len(nids)} neighbours, need between threshold {t} and share-num {k}")
    if len(set(pk1s) | set(pk2s)) != 2 * len(nids):
        raise ProtocolViolation("share-keys: some public keys are identical")
    if me not in nids or (pk1s[nids.index(me)], pk2s[nids.index(me)]) != (state["pk1"], state["pk2"]):
        raise ProtocolViolation("share-keys: this node's own public keys are missing or wrong")
    seed = os.urandom(32)
    seed_shares = create_shares(seed, t, k)
    key_shares = create_shares(cast(bytes, state["sk1"]), t, k)
    sk2 = bytes_to_private_key(cast(bytes, state["sk2"]))
    dsts, ctxts = [], []
    held: dict[str, list[Any]] = {"holder": [], "seed-share": [], "key-share": []}
    for idx, (nid, pk2) in enumerate(zip(nids, pk2s)):
        if nid == me:
            held["holder"].append(me)
            held["seed-share"].append(seed_shares[idx])
            held["key-share"].append(key_shares[idx])
            continue
        shared = generate_shared_key(sk2, bytes_to_public_key(pk2))
        dsts.append(nid)
        ctxts.append(encrypt(shared, share_keys_plaintext_concat(me, nid, seed_shares[idx], key_shares[idx])))
    state.update({"stage": Stage.SHARE_KEYS, "seed": seed, "nids": nids, "pk1s": pk1s, "pk2s": pk2s, **held})
    return {"dsts": dsts, "ctxts": ctxts}, state


def check_collect(state: ConfigRecord | None, request: ConfigRecord) -> ConfigRecord:
    """The node's state if ``request`` is this session's ``collect`` stage (checked before training, so a node
    trains only when it can mask the result). Raises :class:`ProtocolViolation`."""
    return _expect(state, request, Stage.COLLECT)


def params_of(state: ConfigRecord) -> SecAggParams:
    """The session's quantisation and weighting parameters (as the server sent them at setup)."""
    return SecAggParams(clipping_range=cast(float, state["clipping-range"]),
                        quantization_range=cast(int, state["quantization-range"]),
                        max_weight=cast(float, state["max-weight"]))


def masked_vector(state: ConfigRecord | None, request: ConfigRecord, vector: np.ndarray, factor: int
                  ) -> tuple[np.ndarray, ConfigRecord]:
    """The ``collect`` stage: store the forwarded shares, then mask ``vector`` (float64 (d,), the node's
    :func:`~strategies.secagg_protocol.node_vector`, already clipped under user-level DP) with weight factor
    ``factor`` = qᵢ (:func:`~strategies.secagg_protocol.weight_factor`).

    Returns ``([qᵢ, quantize(qᵢ/T·(x + noise))] + bᵢ-mask ± pairwise masks) mod 2³²`` as uint32 (1 + d,) and the
    new state. Raises :class:`ProtocolViolation` on a bad request or a non-finite vector.
    """
    state = _expect(state, request, Stage.COLLECT)
    srcs, ctxts = _ids(request, "srcs"), _blobs(request, "ctxts")
    me, t = cast(int, state["node"]), cast(int, state["threshold"])
    nids = cast(list[int], state["nids"])
    if len(srcs) != len(ctxts) or len(set(srcs)) != len(srcs) or not set(srcs) <= set(nids) - {me}:
        raise ProtocolViolation("collect: srcs must be distinct neighbours, one per ciphertext")
    if len(srcs) + 1 < t:
        raise ProtocolViolation(f"collect: shares from {len(srcs)} neighbours + this node < threshold {t}")
    vector = np.asarray(vector, dtype=np.float64)
    if not np.all(np.isfinite(vector)):
        raise ProtocolViolation("collect: the update is not finite; refusing to mask it")
    sk2 = bytes_to_private_key(cast(bytes, state["sk2"]))
    pk1s, pk2s = cast(list[bytes], state["pk1s"]), cast(list[bytes], state["pk2s"])
    holders = list(cast(list[int], state["holder"]))
    seed_shares, key_shares = list(cast(list[bytes], state["seed-share"])), list(cast(list[bytes], state["key-share"]))
    for src, ctxt in zip(srcs, ctxts):
        try:
            plain = decrypt(generate_shared_key(sk2, bytes_to_public_key(pk2s[nids.index(src)])), ctxt)
        except Exception as err:  # noqa: BLE001 - Fernet's InvalidToken: another sender's, or tampered
            raise ProtocolViolation(f"collect: the ciphertext from {src} does not decrypt (it arrived as {src} → "
                                    f"{me}: another sender's, or tampered): {type(err).__name__}") from None
        actual_src, dst, seed_share, key_share = share_keys_plaintext_separate(plain)
        if actual_src != src or dst != me:
            raise ProtocolViolation(f"collect: a ciphertext from {actual_src} to {dst} arrived as {src} → {me}")
        holders.append(src)
        seed_shares.append(seed_share)
        key_shares.append(key_share)
    T, c = cast(int, state["quantization-range"]), cast(float, state["clipping-range"])
    std = cast(float, state["noise-std"])
    if std > 0:
        vector = vector + np.random.default_rng().normal(0.0, std, vector.shape)  # OS entropy, never a run seed
    scaled = vector * (factor / T)
    clipped = int(np.count_nonzero(np.abs(scaled) > c))
    if clipped:
        LOGGER.warning("secure aggregation: %d of %d coordinates exceed the clipping range %g and are clipped (the "
                       "sum is no longer exact: raise secagg-clipping-range)", clipped, scaled.size, c)
    quantized = np.concatenate([a.astype(np.int64).ravel() for a in factor_combine(factor, [_quantize(scaled, c, T)])])
    masked = quantized + mask(cast(bytes, state["seed"]), vector.size)
    sk1 = bytes_to_private_key(cast(bytes, state["sk1"]))
    for src in srcs:
        pair = mask(generate_shared_key(sk1, bytes_to_public_key(pk1s[nids.index(src)])), vector.size)
        masked = masked + pair if me > src else masked - pair
    out = parameters_mod([masked], MODULUS)[0].astype(np.uint32)
    state.update({"stage": Stage.COLLECT, "holder": holders, "seed-share": seed_shares, "key-share": key_shares})
    return out, state


def _quantize(x: np.ndarray, c: float, T: int) -> np.ndarray:
    """Flower's stochastic ``quantize`` with numpy's global generator reseeded from OS entropy for the call (and
    restored after), so the rounding is neither the run's seeded stream nor disturbs it."""
    saved = np.random.get_state()
    np.random.seed(None)
    try:
        return quantize([x], c, T)[0]
    finally:
        np.random.set_state(saved)


def unmask(state: ConfigRecord, request: ConfigRecord) -> tuple[dict[str, Any], None]:
    """Reveal the mask-seed shares of the surviving neighbours and the secret-key shares of the dropped ones (never
    both for one node), then wipe the session."""
    active, dead = _ids(request, "active"), _ids(request, "dead")
    t = cast(int, state["threshold"])
    holders = cast(list[int], state["holder"])
    if set(active) & set(dead) or len(set(active)) != len(active) or len(set(dead)) != len(dead):
        raise ProtocolViolation("unmask: a node is listed twice, or as both survivor and dropped")
    if not set(active) | set(dead) <= set(holders):
        raise ProtocolViolation("unmask: asked for shares this node does not hold")
    if len(active) < t:
        raise ProtocolViolation(f"unmask: {len(active)} survivors < threshold {t}")
    seeds, keys = cast(list[bytes], state["seed-share"]), cast(list[bytes], state["key-share"])
    shares = [seeds[holders.index(n)] for n in active] + [keys[holders.index(n)] for n in dead]
    return {"nids": active + dead, "shares": shares}, None
