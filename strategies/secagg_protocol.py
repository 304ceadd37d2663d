"""SecAgg+ for fedlora's exact strategies: what the server (:mod:`strategies.secure_aggregation`) and the nodes
(:mod:`strategies.secagg_node`, run by ``clients/secagg.py``) share: parameters, message keys, the vector a node
masks, and the server's arithmetic on masked sums.

The protocol is Flower's SecAgg+ (``flwr.server.workflow.secure_aggregation.secaggplus_workflow`` and
``flwr.client.mod.secure_aggregation.secaggplus_mod``) moved onto the Message API, built only from Flower's
primitives in ``flwr.common.secure_aggregation`` and ``flwr.supercore.primitives.asymmetric`` (ECDH key agreement
+ HKDF, Fernet authenticated encryption of the shares, Shamir secret sharing, stochastic quantisation); the masks
are a ChaCha20 keystream of the ``cryptography`` package (:func:`mask`; Flower's ``pseudo_rand_gen`` folds its
seed to 32 bits). Nothing here is cryptography of fedlora's own.

The vector (:func:`node_vector`), one per node and round, float64 of length d = Σ over :func:`vector_layout`:

==================  ==========  =====================================================================
layout key          shape       value
==================  ==========  =====================================================================
``L.R``             (r, r)      fedsb: Rᵢ; hetero: pad_r(Rᵢ); flora: pad_r(PᵢQᵢ) (the r×r product)
head key ``h``      h's shape   the change of the ``modules_to_save`` array: uploadᵢ[h] − global[h]
==================  ==========  =====================================================================

A node sends ``[qᵢ, quantize(wᵢ·xᵢ)] + masks mod 2³²`` as one uint32 array (``[1 + d]``): qᵢ = round(wᵢ·T) is its
weight factor (wᵢ = 1 for uniform weights, nᵢ / max-weight ≤ 1 for ``num-examples``, as Flower pre-multiplies
inside the mask), T the quantisation range, c the clipping range. Each coordinate is clipped to [−c, c] and
mapped to an integer in [0, T] by unbiased stochastic rounding (Flower's ``quantize``). The server learns
S = Σ over the survivors U of that, recovers Σ qᵢ = S[0] and

    mean = (dequantize(S[1:]) − (|U| − 1)·c) · T / S[0]  =  Σ wᵢxᵢ / Σ wᵢ  + e,

with |e| ≤ 2c·|U| / S[0] per coordinate (:meth:`SecAggParams.error_bound`; = 2c/T for uniform weights), exact
otherwise as long as no |wᵢxᵢ| exceeds c. The sum must not wrap: |U|·T < 2³² (checked before a round starts).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from strategies.wire import Shape, State

#: ConfigRecord of every protocol message and reply; ArrayRecord of the masked vector in a train reply
SECAGG_KEY = "secagg"
#: the node's protocol state in ``context.state.config_records`` (its secrets never leave the node)
NODE_STATE_KEY = "secagg-state"
#: the one Array of the masked-vector ArrayRecord
MASKED_KEY = "masked"
#: masks are drawn in [0, 2³²) and sums taken mod 2³² (Flower's default and largest modulus); uint32 on the wire
MODULUS = 2**32
#: domain separation of the mask keystream's key
MASK_TAG = b"fedlora-secagg-mask-v1|"
#: Flower's defaults: clipping range c, quantisation range T
DEFAULT_CLIPPING_RANGE = 8.0
DEFAULT_QUANTIZATION_RANGE = 2**22
#: a weight nᵢ / max-weight is quantised to round(·T); a node with nᵢ > max-weight refuses (as max-num-examples)
DEFAULT_MAX_WEIGHT = 10_000.0
DEFAULT_THRESHOLD = 0.6


class Stage:
    """Protocol stages in order; ``collect`` rides on the train message, the others are ``query`` messages."""

    SETUP = "setup"
    SHARE_KEYS = "share-keys"
    COLLECT = "collect"
    UNMASK = "unmask"
    ORDER = (SETUP, SHARE_KEYS, COLLECT, UNMASK)


class SecAggError(RuntimeError):
    """The protocol cannot finish this round (too few nodes, an inconsistent share, an unmasked sum out of range):
    the round keeps the previous global state and records this message as the reason."""


@dataclass(frozen=True)
class SecAggParams:
    """Validated SecAgg+ settings (run-config keys ``secagg-*``).

    Args:
        num_shares: neighbourhood size k (the node itself included): 0 = every sampled node (complete graph, the
            original SecAgg); an odd k ≥ 3 = SecAgg+ (each node shares with k − 1 ring neighbours, random order).
        threshold: fraction in (0.5, 1] of k: t = max(2, ⌈threshold·k⌉) shares rebuild a secret. A strict majority,
            so no two disjoint sets of t holders exist in a neighbourhood (a server cannot get a node's mask seed
            from some and its secret key from others).
        clipping_range: c > 0; every coordinate of wᵢxᵢ is clipped to [−c, c] before quantisation.
        quantization_range: T, an integer in [2, 2³¹): quantisation step 2c/T.
        max_weight: > 0; with ``num-examples`` weighting wᵢ = nᵢ / max_weight must be ≤ 1.
    """

    num_shares: int = 0
    threshold: float = DEFAULT_THRESHOLD
    clipping_range: float = DEFAULT_CLIPPING_RANGE
    quantization_range: int = DEFAULT_QUANTIZATION_RANGE
    max_weight: float = DEFAULT_MAX_WEIGHT

    def __post_init__(self) -> None:
        k = self.num_shares
        if isinstance(k, bool) or not isinstance(k, int) or (k != 0 and (k < 3 or k % 2 == 0)):
            raise ValueError(f"num_shares={k!r}: must be 0 (every sampled node) or an odd integer >= 3")
        if not (isinstance(self.threshold, (int, float)) and 0.5 < self.threshold <= 1):
            raise ValueError(f"threshold={self.threshold!r}: must be in (0.5, 1] (a strict majority of the shares)")
        if not (isinstance(self.clipping_range, (int, float)) and math.isfinite(self.clipping_range)
                and self.clipping_range > 0):
            raise ValueError(f"clipping_range={self.clipping_range!r}: must be a finite number > 0")
        T = self.quantization_range
        if isinstance(T, bool) or not isinstance(T, int) or not 2 <= T < 2**31:
            raise ValueError(f"quantization_range={T!r}: must be an integer in [2, 2**31)")
        if not (isinstance(self.max_weight, (int, float)) and math.isfinite(self.max_weight) and self.max_weight > 0):
            raise ValueError(f"max_weight={self.max_weight!r}: must be a finite number > 0")

    def shares_and_threshold(self, num_sampled: int) -> tuple[int, int]:
        """(k, t) for a round with ``num_sampled`` nodes: k = min(num_shares or n, n), t = max(2, ⌈threshold·k⌉)."""
        k = num_sampled if self.num_shares == 0 else min(self.num_shares, num_sampled)
        return k, max(2, math.ceil(self.threshold * k - 1e-9))

    def max_nodes(self) -> int:
        """The most nodes one sum may hold without wrapping mod 2³² ((n + 1)·T < 2³²)."""
        return MODULUS // self.quantization_range - 1

    def quantum(self) -> float:
        """The quantisation step 2c/T."""
        return 2.0 * self.clipping_range / self.quantization_range

    def error_bound(self, survivors: int, factor: int) -> float:
        """Largest error per coordinate of the mean from quantisation alone: 2c·|U| / Σqᵢ (2c/T uniform)."""
        return 2.0 * self.clipping_range * survivors / factor


def weight_factor(weighting: str, num_examples: float | None, params: SecAggParams) -> int:
    """qᵢ = round(wᵢ·T) in [1, T]: wᵢ = 1 (``uniform``) or nᵢ / max-weight (``num-examples``).

    Raises:
        ValueError: a missing or non-positive nᵢ, or nᵢ > max-weight (the weight would not fit the quantisation).
    """
    T = params.quantization_range
    if weighting == "uniform":
        return T
    if num_examples is None or not math.isfinite(num_examples) or num_examples <= 0:
        raise ValueError(f"num-examples={num_examples!r}: weighting 'num-examples' needs a finite count > 0")
    if num_examples > params.max_weight:
        raise ValueError(f"num-examples={num_examples:g} > secagg-max-weight={params.max_weight:g}: raise "
                         "secagg-max-weight (or use uniform weights)")
    return max(1, min(T, round(num_examples / params.max_weight * T)))


# ------------------------------------------------------------------------------------------ the vector
def vector_layout(global_state: Mapping[str, np.ndarray]) -> list[tuple[str, Shape]]:
    """(key, shape) of the masked vector's parts, in global-state order: ``L.R`` (r, r) for each ``L.R0``,
    every other (``modules_to_save``) key with its own shape."""
    return [(k[:-1], tuple(v.shape)) if k.endswith(".R0") else (k, tuple(v.shape)) for k, v in global_state.items()]


def vector_size(layout: Sequence[tuple[str, Shape]]) -> int:
    """d = Σ sizes of the layout's parts."""
    return int(sum(math.prod(shape) for _, shape in layout))


def node_vector(upload: Mapping[str, np.ndarray], download: Mapping[str, np.ndarray],
                layout: Sequence[tuple[str, Shape]]) -> np.ndarray:
    """A node's float64 vector (d,) from its upload (``L.R`` rᵢ×rᵢ, or ``L.P`` rᵢ×qᵢ and ``L.Q`` qᵢ×rᵢ, plus the
    head values) and the global state it downloaded (table in the module docstring).

    Raises:
        ValueError: a missing key or a block larger than r×r.
    """
    parts = []
    for key, shape in layout:
        if key.endswith(".R") and (key[:-2] + ".P") in upload and key not in upload:
            block = np.asarray(upload[key[:-2] + ".P"], np.float64) @ np.asarray(upload[key[:-2] + ".Q"], np.float64)
        elif key in upload:
            block = np.asarray(upload[key], np.float64)
        else:
            raise ValueError(f"upload has no {key!r} (nor its P/Q factors)")
        if key.endswith(".R") and key + "0" in download:
            r = shape[0]
            if block.ndim != 2 or block.shape[0] != block.shape[1] or block.shape[0] > r:
                raise ValueError(f"{key!r}: block of shape {block.shape} does not fit ({r}, {r})")
            padded = np.zeros(shape)
            padded[: block.shape[0], : block.shape[1]] = block
            parts.append(padded.ravel())
        else:
            if block.shape != tuple(shape):
                raise ValueError(f"{key!r}: shape {block.shape} != {tuple(shape)}")
            parts.append((block - np.asarray(download[key], np.float64)).ravel())
    return np.concatenate(parts) if parts else np.zeros(0)


def increment_of(mean: np.ndarray, layout: Sequence[tuple[str, Shape]], global_state: Mapping[str, np.ndarray]
                 ) -> State:
    """The ``apply_increment`` argument from the unmasked mean vector: ``L.R`` (r×r) as is, a head key as
    global + mean change (Σpᵢ = 1, so this is Σ pᵢ·headᵢ)."""
    out: State = {}
    pos = 0
    for key, shape in layout:
        size = math.prod(shape)
        part = mean[pos: pos + size].reshape(shape)
        pos += size
        out[key] = part if key.endswith(".R") and key + "0" in global_state else (
            np.asarray(global_state[key], np.float64) + part)
    return out


# ------------------------------------------------------------------------------------------ the server's side
def neighbourhoods(node_ids: Iterable[int], k: int) -> dict[int, frozenset[int]]:
    """SecAgg+ graph as Flower builds it: the nodes in a random ring (OS entropy), each with the k nearest
    (itself, (k − 1)/2 on each side); k ≥ n gives the complete graph."""
    order = list(node_ids)
    random.SystemRandom().shuffle(order)
    n, half = len(order), k // 2
    if k >= n:
        return {nid: frozenset(order) for nid in order}
    return {nid: frozenset(order[(i + off) % n] for off in range(-half, half + 1)) for i, nid in enumerate(order)}


def combine(shares: Sequence[bytes], threshold: int, owner: int, what: str) -> bytes:
    """Rebuild a secret from ≥ t Shamir shares (Flower's ``combine_shares`` on exactly t of them); with more
    than t, a second, different subset must give the same secret.

    Raises:
        SecAggError: fewer than t shares, shares that do not combine, or two subsets that disagree (a wrong or
            garbage share).
    """
    if len(shares) < threshold:
        raise SecAggError(f"only {len(shares)} shares of node {owner}'s {what} < threshold {threshold}")
    try:
        secret = combine_shares(list(shares[:threshold]))
        if len(shares) > threshold and combine_shares(list(shares[-threshold:])) != secret:
            raise SecAggError(f"the shares of node {owner}'s {what} are inconsistent (a wrong or garbage share)")
    except SecAggError:
        raise
    except Exception as err:  # noqa: BLE001 - any malformed share makes the round fail, naming the node
        raise SecAggError(f"the shares of node {owner}'s {what} do not combine: {type(err).__name__}: {err}") from None
    return secret


def mask(seed: bytes, d: int) -> np.ndarray:
    """The mask a seed expands to: int64 (1 + d,) uniform in [0, 2³²) (the weight factor, then the vector). The one
    mask generator of both sides.

    A ChaCha20 keystream (the ``cryptography`` package's, which Flower itself uses) under the key
    sha256(tag ‖ seed), read as little-endian uint32: every bit of the 32-byte seed matters. Flower's
    ``pseudo_rand_gen`` is not used: it XOR-folds the seed into a 32-bit numpy ``RandomState`` seed, so a mask
    would have at most 2³² values and a server that removed all but one of a vector's masks could search it."""
    key = hashlib.sha256(MASK_TAG + bytes(seed)).digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(4 * (1 + d)))
    return np.frombuffer(stream, dtype="<u4").astype(np.int64)


def remove_masks(total: np.ndarray, seeds: Mapping[int, bytes], dead_keys: Mapping[int, bytes],
                 public_key_1: Mapping[int, bytes], pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    """S = Σ masked vectors (int64, [1 + d]) minus every survivor's private mask (``seeds``: node → its rebuilt
    mask seed) and the pairwise masks survivors share with dropped nodes (``pairs``: (survivor u, dropped v) for
    every v whose shares u received; ``dead_keys``: v → its rebuilt secret key 1), mod 2³². u added the mask of
    (u, v) if u > v, subtracted it otherwise (Flower's sign convention).

    Raises:
        SecAggError: a rebuilt key that is not a key.
    """
    d = total.shape[0] - 1
    out = total.astype(np.int64)
    for seed in seeds.values():
        out = (out - mask(seed, d)) % MODULUS
    for u, v in pairs:
        try:
            shared = generate_shared_key(bytes_to_private_key(dead_keys[v]), bytes_to_public_key(public_key_1[u]))
        except Exception as err:  # noqa: BLE001 - a wrong share rebuilds garbage, not a key
            raise SecAggError(f"node {v}'s rebuilt secret key is not a key ({type(err).__name__}): a wrong share"
                              ) from None
        out = (out - mask(shared, d) if u > v else out + mask(shared, d)) % MODULUS
    return out


def unmasked_mean(total: np.ndarray, survivors: int, expected_factor: int, params: SecAggParams) -> np.ndarray:
    """The weighted mean vector (d,) from the unmasked sum S ([1 + d], each entry in [0, 2³²)).

    Checks (any failure: a wrong share or a garbage masked vector): S[0] = Σqᵢ must equal ``expected_factor``
    (the server knows every survivor's weight factor) and every S[j] must lie in [0, |U|·T], the range of a sum
    of |U| honest quantised values; a wrong mask makes S uniform in [0, 2³²) and fails this for all but a
    fraction (|U|·T / 2³²)^d of draws.

    Raises:
        SecAggError: naming the failed check.
    """
    T, c = params.quantization_range, params.clipping_range
    factor = int(total[0])
    if factor != expected_factor:
        raise SecAggError(f"the unmasked weight total {factor} != {expected_factor} expected from {survivors} "
                          "survivors: a wrong share or a garbage masked vector")
    body = total[1:]
    bad = int(np.count_nonzero(body > survivors * T))
    if bad:
        raise SecAggError(f"{bad} of {body.size} unmasked coordinates lie outside [0, {survivors}·T]: a wrong share "
                          "or a garbage masked vector")
    weighted_sum = dequantize([body.astype(np.int64)], c, T)[0] - (survivors - 1) * c
    return weighted_sum * (T / factor)
