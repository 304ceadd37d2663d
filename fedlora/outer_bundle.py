"""The server's outer factors as one shippable bundle, the node's store of bundles, and the checks a node
runs on them before it trains.

Exactness needs B and A *identical* on every node and the server (docs/design.md, condition 1). Two
machines need not compute the same SVD bits (another math-library code path, another thread count, a GPU),
so the server is the one source of truth: it computes the factors once, and every node trains with exactly
the server's values, delivered once per node and kept in the node's store keyed by their content digest.

Bundle layout (:meth:`OuterBundle.to_state`): for every nested layer ``L`` (sorted by name)
``L.B`` (d, r), ``L.S`` (r,), ``L.A`` (r, k), all of one float dtype (the adapters' dtype: float32, or
float64 for a float64 model) — exactly the buffers the layer computes with. ``digest`` = sha256 over a
version tag and, per key in order, the key, dtype, shape and little-endian bytes.

Before a node uses a bundle it checks that the bundle fits *its own* base weights W
(:func:`check_fits`): the same layers (targets), shapes and r, and for every layer and i
``|b_iᵀ W a_iᵀ − S_i| ≤ tol · S_1`` (in float64). Last-bit differences between machines, or a bf16 copy of
the same weights, pass; another base model or checkpoint, or a flipped singular vector (b_iᵀ W a_iᵀ = −S_i),
fail with a message that names the cause.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedlora.durable import replace_durably
from fedlora.outer import OuterFactors, default_cache_dir

LOGGER = logging.getLogger("fedlora.outer")
BUNDLE_VERSION = "fedlora-outer-bundle-v1"
#: default tolerance of :func:`check_fits`, relative to the layer's largest singular value
FIT_TOLERANCE = 1e-3
_PARTS = ("B", "S", "A")


class OuterMismatch(ValueError):
    """The server's outer factors do not fit this node's model; ``cause`` is one of ``targets``, ``shape``,
    ``rank``, ``flipped``, ``weights``, ``corrupt``; ``layer`` names the first offending layer."""

    def __init__(self, cause: str, message: str, layer: str | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        self.layer = layer


def _digest(state: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256(BUNDLE_VERSION.encode())
    for key, arr in state.items():
        a = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        h.update(f"|{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class OuterBundle:
    """Outer factors per layer name: ``factors[L] = OuterFactors(U=B (d,r), S (r,), Vh=A (r,k))``, one
    float dtype, sorted by layer; equal (and hashed) by :attr:`digest`."""

    factors: dict[str, OuterFactors]
    digest: str

    @classmethod
    def from_factors(cls, factors: Mapping[str, OuterFactors]) -> OuterBundle:
        """A bundle of ``factors`` (copied, contiguous; the digest is computed here)."""
        fs = {name: OuterFactors(U=f.U.detach().to("cpu").contiguous().clone(),
                                 S=f.S.detach().to("cpu").contiguous().clone(),
                                 Vh=f.Vh.detach().to("cpu").contiguous().clone())
              for name, f in sorted(factors.items())}
        bundle = cls(factors=fs, digest="")
        object.__setattr__(bundle, "digest", _digest(bundle.to_state()))
        return bundle

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray], expected_digest: str | None = None) -> OuterBundle:
        """Parse :meth:`to_state` output, checking its structure and, if given, its digest.

        Raises :class:`OuterMismatch` (cause ``corrupt``) naming the problem."""
        layers: dict[str, dict[str, np.ndarray]] = {}
        for key, arr in state.items():
            name, _, part = str(key).rpartition(".")
            if not name or part not in _PARTS:
                raise OuterMismatch("corrupt", f"outer factors: unexpected key {key!r} (expected L.B, L.S, L.A)")
            layers.setdefault(name, {})[part] = np.asarray(arr)
        if not layers:
            raise OuterMismatch("corrupt", "outer factors: empty bundle")
        dtypes = {a.dtype for parts in layers.values() for a in parts.values()}
        if len(dtypes) != 1 or next(iter(dtypes)) not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise OuterMismatch("corrupt", f"outer factors: dtypes {sorted(map(str, dtypes))}, expected one of "
                                           "float32/float64")
        factors: dict[str, OuterFactors] = {}
        for name, parts in sorted(layers.items()):
            if set(parts) != set(_PARTS):
                raise OuterMismatch("corrupt", f"outer factors of layer {name}: parts {sorted(parts)}", name)
            B, S, A = parts["B"], parts["S"], parts["A"]
            if B.ndim != 2 or S.ndim != 1 or A.ndim != 2 or not (B.shape[1] == S.shape[0] == A.shape[0] > 0):
                raise OuterMismatch("corrupt", f"outer factors of layer {name}: shapes B{B.shape} S{S.shape} "
                                               f"A{A.shape} are not (d, r), (r,), (r, k)", name)
            if not all(np.all(np.isfinite(x)) for x in (B, S, A)):
                raise OuterMismatch("corrupt", f"outer factors of layer {name}: non-finite values", name)
            factors[name] = OuterFactors(U=torch.from_numpy(B.copy()), S=torch.from_numpy(S.copy()),
                                         Vh=torch.from_numpy(A.copy()))
        bundle = cls.from_factors(factors)
        if expected_digest is not None and bundle.digest != expected_digest:
            raise OuterMismatch("corrupt", f"outer factors: content digest {bundle.digest[:16]}… differs from the "
                                           f"announced {expected_digest[:16]}… (corrupted in transit or in store)")
        return bundle

    def to_state(self) -> dict[str, np.ndarray]:
        """``{L.B, L.S, L.A}`` per layer, numpy, in sorted layer order."""
        return {f"{name}.{part}": t.numpy() for name, f in self.factors.items()
                for part, t in zip(_PARTS, (f.U, f.S, f.Vh), strict=True)}

    @property
    def rank(self) -> int:
        """r (every layer has the same)."""
        return int(next(iter(self.factors.values())).S.shape[0])

    def nbytes(self) -> int:
        """Payload bytes: Σ r·(d + k + 1) · item size over the layers."""
        return sum(int(t.numel() * t.element_size()) for f in self.factors.values() for t in (f.U, f.S, f.Vh))

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OuterBundle) and other.digest == self.digest


# ---------------------------------------------------------------------------------------------- fit check
def fit_error(weight: torch.Tensor, factors: OuterFactors) -> torch.Tensor:
    """(r,) signed errors (b_iᵀ W a_iᵀ − S_i) / S_1 in float64 for a (d, k) ``weight``."""
    W = weight.detach().to("cpu", torch.float64)
    B, S, A = (t.to(torch.float64) for t in (factors.U, factors.S, factors.Vh))
    proj = ((W @ A.T) * B).sum(dim=0)  # b_iᵀ W a_i, O(d·k·r)
    return (proj - S) / S[0].abs().clamp_min(torch.finfo(torch.float64).tiny)


def check_fits(weights: Mapping[str, torch.Tensor], bundle: OuterBundle, r: int,
               tol: float = FIT_TOLERANCE) -> None:
    """Raise :class:`OuterMismatch` unless ``bundle`` holds the rank-``r`` outer factors of exactly these
    (d, k) base ``weights`` (by layer name), within ``tol`` (see the module docstring)."""
    ours, theirs = set(weights), set(bundle.factors)
    if ours != theirs:
        only_server, only_node = sorted(theirs - ours), sorted(ours - theirs)
        raise OuterMismatch("targets", "the server's outer factors adapt other layers than this node's model: "
                                       f"server only {only_server[:3]}, node only {only_node[:3]} (targets or "
                                       "model architecture differ)", (only_server or only_node)[0])
    if bundle.rank != r:
        raise OuterMismatch("rank", f"the server's outer factors have r={bundle.rank}, this node's config r={r}")
    for name, w in weights.items():
        f = bundle.factors[name]
        d, k = w.shape
        if f.U.shape[0] != d or f.Vh.shape[1] != k:
            raise OuterMismatch("shape", f"layer {name}: this node's weight is {d}x{k}, the server's factors are "
                                         f"for {f.U.shape[0]}x{f.Vh.shape[1]}: another base model", name)
    for name, w in weights.items():
        err = fit_error(w, bundle.factors[name])
        worst = int(err.abs().argmax())
        if float(err[worst].abs()) <= tol:
            continue
        S = bundle.factors[name].S.to(torch.float64)
        flipped = torch.isclose(err * S[0], -2 * S, rtol=tol, atol=tol * float(S[0]))
        if bool(flipped[worst]):
            raise OuterMismatch("flipped", f"layer {name}: singular vector {worst} of the server's outer factors is "
                                           f"flipped relative to this node's base weights (b_iᵀWa_i = −S_i)", name)
        raise OuterMismatch("weights", f"layer {name}: the server's outer factors do not fit this node's base "
                                       f"weights (|b_iᵀWa_i − S_i|/S_1 = {float(err[worst].abs()):.3g} > {tol:g} at "
                                       f"i={worst}): this node has another base model or checkpoint", name)


# ---------------------------------------------------------------------------------------------- store
def default_bundle_dir() -> Path:
    """``<fedlora cache root>/outer/bundles``."""
    return default_cache_dir() / "bundles"


class OuterBundleStore:
    """A node's bundles on disk, one safetensors file per digest (atomic, durable writes).

    :meth:`get` re-computes the digest of what it reads: a corrupt or tampered entry is logged, removed and
    reported as missing (the server then re-sends the bundle), never used."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory) if directory else default_bundle_dir()
        self._memory: dict[str, OuterBundle] = {}

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise OuterMismatch("corrupt", f"outer-digest {digest[:80]!r} is not a sha256 hex digest")
        return self.directory / f"{digest}.safetensors"

    def get(self, digest: str) -> OuterBundle | None:
        """The bundle with this digest, or None if this node does not hold a valid copy."""
        if digest in self._memory:
            return self._memory[digest]
        path = self.path(digest)
        if not path.exists():
            return None
        from safetensors.numpy import load_file

        try:
            bundle = OuterBundle.from_state(load_file(str(path)), expected_digest=digest)
        except Exception as err:  # noqa: BLE001 - any unreadable entry is replaced, never trusted
            LOGGER.warning("outer factors %s… in %s are corrupt (%s): removed, the server re-sends them",
                           digest[:16], path, err)
            path.unlink(missing_ok=True)
            return None
        self._memory[digest] = bundle
        return bundle

    def put(self, bundle: OuterBundle) -> Path:
        """Store ``bundle`` under its digest; returns the file."""
        from safetensors.numpy import save

        path = self.path(bundle.digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_durably(path, save(bundle.to_state()))
        self._memory[bundle.digest] = bundle
        return path


# ---------------------------------------------------------------------------------------------- sketch
#: default tolerance of :func:`check_sketch` (absolute; sketch entries are ~N(0, 1))
SKETCH_TOLERANCE = 1e-4


def _probe(name: str, part: str, n: int) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(f"fedlora-sketch|{name}|{part}".encode()).digest()[:8], "little") >> 1
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sketch(bundle: OuterBundle) -> np.ndarray:
    """Per layer (sorted) Bᵀg and A h (2r values, ~N(0, 1)) for fixed Gaussian probes g (d), h (k) seeded by
    the layer name: float32 (2·r·layers,). Nodes that compute their own factors compare theirs with the
    server's within a tolerance (:func:`check_sketch`) instead of bit for bit."""
    parts = []
    for name, f in bundle.factors.items():
        B, A = f.U.to(torch.float64), f.Vh.to(torch.float64)
        parts += [B.T @ _probe(name, "B", B.shape[0]), A @ _probe(name, "A", A.shape[1])]
    return torch.cat(parts).to(torch.float32).numpy()


def check_sketch(ours: OuterBundle, theirs: np.ndarray, tol: float = SKETCH_TOLERANCE) -> float:
    """Compare this node's own factors with the server's sketch; return the largest absolute difference.

    Raises :class:`OuterMismatch`: ``shape`` when the sketch's length differs (other layers or r), ``flipped``
    when a singular pair has the opposite sign, ``weights`` otherwise."""
    mine = sketch(ours)
    theirs = np.asarray(theirs, dtype=np.float32)
    if theirs.shape != mine.shape:
        raise OuterMismatch("shape", f"the server's outer-factor sketch has {theirs.size} values, this node's "
                                     f"{mine.size}: the adapted layers or r differ")
    diff = np.abs(mine.astype(np.float64) - theirs)
    worst = float(diff.max(initial=0.0))
    if worst <= tol:
        return worst
    names = list(ours.factors)
    r = ours.rank
    at = int(diff.argmax())
    layer = names[at // (2 * r)]
    flipped = np.isclose(mine, -theirs, atol=tol, rtol=0) & (diff > tol)
    cause = "flipped" if flipped.sum() >= max(1, (diff > tol).sum()) else "weights"
    what = ("a singular vector is flipped relative to the server's" if cause == "flipped" else
            "the factors differ from the server's: another base model or checkpoint")
    raise OuterMismatch(cause, f"layer {layer}: outer-factor sketch differs by {worst:.3g} > {tol:g}: {what}",
                        layer)
