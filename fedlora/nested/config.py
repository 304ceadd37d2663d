"""Configuration of nested low-rank adapters.

A nested adapter on a weight W (d×k, out×in) is ΔW = s·B·R_eff·A with frozen orthonormal outer
factors B = U_r (d×r) and A = V_rᵀ (r×k) from W's truncated SVD, and a tiny trainable inner part:
one r×r matrix R (``mode="sb"``, Fed-SB / LoRA-XS family) or a low-rank pair P (r×q), Q (q×r) on
top of a frozen r×r offset R0 (``mode="nora"``, NoRA). See docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from fedlora.svd import DEFAULT_NITER, DEFAULT_OVERSAMPLE, SVD_METHODS

MODES = ("sb", "nora")
INITS = ("zero", "principal")


@dataclass
class NestedLoraConfig:
    """Configuration of :func:`fedlora.apply_nested`.

    Attributes:
        r: outer rank (columns of B, rows of A), the size of the global r×r state. ``r >= 1``.
        mode: ``"sb"`` (train one rᵢ×rᵢ matrix R) or ``"nora"`` (train P (rᵢ×q), Q (q×rᵢ)).
        inner_rank: q, the inner rank of P and Q in ``nora`` mode (``1 <= q <= r``); default ``max(1, r // 4)``.
            Ignored in ``sb`` mode.
        init: ``"zero"`` (W unchanged, R0 = 0) or ``"principal"`` (PiSSA-like: base weight becomes the
            residual W − U_r S_r V_rᵀ and R0 = diag(S_r)/s). Both leave the model's outputs unchanged.
        alpha: scaling numerator, s = alpha / r, the same for every client and layer. Default ``r`` (s = 1).
        target_modules: module names to adapt, peft-style: a list of names matched exactly or as a
            dotted suffix (``"query"`` matches ``bert.encoder.layer.0.attention.self.query``), or a
            single string used as a regular expression (full match). Only ``nn.Linear`` and
            transformers ``Conv1D`` are adapted.
        modules_to_save: modules trained in full and sent in full (e.g. a classifier head), matched like
            ``target_modules`` lists.
        client_rank: rᵢ ≤ r, the rank this model trains (its top-left rᵢ×rᵢ block); ``None`` means r.
        dropout: dropout on the adapter input (0 disables it).
        svd_method: ``"auto"`` (default: ``"randomized"`` for layers with min(d, k) >= 1024 and
            r <= min(d, k)/8, else ``"full"``; :func:`fedlora.svd.resolve_svd_method`), ``"full"`` (LAPACK
            SVD in float64, one thread) or ``"randomized"`` (seeded top-r range finder with subspace
            iterations in float64, multi-threaded; :mod:`fedlora.svd`).
        svd_niter: subspace iterations of the randomized SVD (default 6).
        svd_oversample: extra columns of the randomized SVD (default 32).
        seed: seed of the random Q initialisation in ``nora`` mode.
        cache_dir: directory of the outer-factor cache; ``None`` uses ``$FEDLORA_CACHE/outer`` or
            ``~/.cache/fedlora/outer``; ``""`` disables the disk cache.
    """

    r: int = 16
    mode: Literal["sb", "nora"] = "sb"
    inner_rank: int | None = None
    init: Literal["zero", "principal"] = "zero"
    alpha: float | None = None
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    client_rank: int | None = None
    dropout: float = 0.0
    svd_method: Literal["auto", "full", "randomized"] = "auto"
    svd_niter: int = DEFAULT_NITER
    svd_oversample: int = DEFAULT_OVERSAMPLE
    seed: int = 0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is None:
            self.modules_to_save = []
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"NestedLoraConfig.{name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise bad("r", "must be an integer >= 1")
        if self.mode not in MODES:
            raise bad("mode", f"must be one of {MODES}")
        if self.init not in INITS:
            raise bad("init", f"must be one of {INITS}")
        if self.inner_rank is not None:
            if not isinstance(self.inner_rank, int) or isinstance(self.inner_rank, bool):
                raise bad("inner_rank", "must be an integer")
            if not 1 <= self.inner_rank <= self.r:
                raise bad("inner_rank", f"must satisfy 1 <= inner_rank <= r (r={self.r})")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise bad("alpha", "must be a positive number")
        if self.client_rank is not None:
            if not isinstance(self.client_rank, int) or isinstance(self.client_rank, bool):
                raise bad("client_rank", "must be an integer")
            if not 1 <= self.client_rank <= self.r:
                raise bad("client_rank", f"must satisfy 1 <= client_rank <= r (r={self.r})")
        if self.target_modules is not None and not isinstance(self.target_modules, (str, list)):
            raise bad("target_modules", "must be a list of module names or a regex string")
        if isinstance(self.target_modules, list) and not all(isinstance(t, str) for t in self.target_modules):
            raise bad("target_modules", "every entry must be a string")
        if isinstance(self.target_modules, list) and len(self.target_modules) == 0:
            raise bad("target_modules", "must not be empty")
        if not isinstance(self.modules_to_save, list) or not all(
            isinstance(m, str) for m in self.modules_to_save
        ):
            raise bad("modules_to_save", "must be a list of module names")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise bad("dropout", "must be in [0, 1)")
        if self.svd_method not in SVD_METHODS:
            raise bad("svd_method", f"must be one of {SVD_METHODS}")
        if not isinstance(self.svd_niter, int) or self.svd_niter < 0:
            raise bad("svd_niter", "must be an integer >= 0")
        if not isinstance(self.svd_oversample, int) or self.svd_oversample < 0:
            raise bad("svd_oversample", "must be an integer >= 0")

    @property
    def q(self) -> int:
        """The inner rank q used in ``nora`` mode."""
        return self.inner_rank if self.inner_rank is not None else max(1, self.r // 4)

    @property
    def scaling(self) -> float:
        """s = alpha / r."""
        return float(self.alpha if self.alpha is not None else self.r) / self.r

    @property
    def rank(self) -> int:
        """The rank rᵢ this model trains."""
        return self.client_rank if self.client_rank is not None else self.r

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NestedLoraConfig:
        return cls(**d)
