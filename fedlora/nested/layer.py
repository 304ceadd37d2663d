"""The nested adapter layer that wraps one ``nn.Linear`` or transformers ``Conv1D``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedlora.precision import adapter_dtype, float32_region

try:  # transformers' GPT-2 style layer: y = x @ W + b with W of shape (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment,misc]


def linear_weight(base: nn.Module) -> torch.Tensor:
    """The base weight in ``nn.Linear`` layout (out × in = d × k), also for ``Conv1D`` (stored in × out)."""
    if isinstance(base, nn.Linear):
        return base.weight
    if Conv1D and isinstance(base, Conv1D):
        return base.weight.T
    raise TypeError(f"cannot adapt a {type(base).__name__}: only nn.Linear and transformers Conv1D")


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or bool(Conv1D and isinstance(module, Conv1D))


class NestedLinear(nn.Module):
    """y = base(x) + s · B · (R0 + pad_r(T)) · A · x, with T the trainable inner matrix.

    Precision: the buffers and the trainable part are float32 on a half-precision base (float64 on a float64
    one: :func:`fedlora.precision.adapter_dtype`); ``forward`` casts x at the boundary.
    Buffers (frozen):
        A: (r, k) = V_rᵀ, orthonormal rows.        B: (d, r) = U_r, orthonormal columns.
        S: (r,) singular values of the pretrained weight.
        R0: (r, r) the frozen offset: the global state received from the server.
    Trainable ``nn.Linear`` modules (no bias) on the r-dimensional projected activations, so that
    opacus computes per-sample gradients in r-dimensional space:
        sb:   R (rᵢ×rᵢ), T = R, initialised to zero.
        nora: Q (q×rᵢ) seeded Gaussian, P (rᵢ×q) zero; T = P·Q.
    ``pad_r`` places the rᵢ×rᵢ block top-left; rᵢ ≤ r is this model's rank.
    """

    def __init__(
        self,
        base: nn.Module,
        A: torch.Tensor,
        B: torch.Tensor,
        S: torch.Tensor,
        *,
        mode: str,
        scaling: float,
        rank: int,
        inner_rank: int,
        dropout: float = 0.0,
        seed: int = 0,
        principal: bool = False,
    ) -> None:
        super().__init__()
        w = linear_weight(base)
        d, k = w.shape
        r = A.shape[0]
        if A.shape != (r, k) or B.shape != (d, r) or S.shape != (r,):
            raise ValueError(f"outer factor shapes A{tuple(A.shape)} B{tuple(B.shape)} do not fit W{(d, k)}")
        self.base = base
        self.mode = mode
        self.scaling = float(scaling)
        self.r = r
        self.fan_in_fan_out = not isinstance(base, nn.Linear)
        self.principal = principal
        dtype, device = adapter_dtype(w.dtype), w.device
        self.register_buffer("A", A.to(device=device, dtype=dtype).contiguous(), persistent=False)
        self.register_buffer("B", B.to(device=device, dtype=dtype).contiguous(), persistent=False)
        self.register_buffer("S", S.to(device=device, dtype=dtype).contiguous())
        self.register_buffer("R0", torch.zeros(r, r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank = rank
        self.inner_rank = inner_rank
        self.reset_inner(rank, inner_rank, seed)

    # ------------------------------------------------------------------ trainable part
    def reset_inner(self, rank: int | None = None, inner_rank: int | None = None, seed: int = 0) -> None:
        """(Re)create the trainable part at rank ``rank`` (≤ r) with a zero product (T = 0)."""
        rank = self.rank if rank is None else rank
        inner_rank = self.inner_rank if inner_rank is None else inner_rank
        if not 1 <= rank <= self.r:
            raise ValueError(f"rank={rank} must satisfy 1 <= rank <= r={self.r}")
        dtype, device = self.A.dtype, self.A.device
        for name in ("R", "P", "Q"):
            if name in self._modules:
                del self._modules[name]
        self.rank = rank
        if self.mode == "sb":
            self.R = nn.Linear(rank, rank, bias=False, dtype=dtype, device=device)
            nn.init.zeros_(self.R.weight)
        else:
            if not 1 <= inner_rank <= rank:
                raise ValueError(f"inner_rank={inner_rank} must satisfy 1 <= inner_rank <= rank={rank}")
            self.inner_rank = inner_rank
            self.Q = nn.Linear(rank, inner_rank, bias=False, dtype=dtype, device=device)
            self.P = nn.Linear(inner_rank, rank, bias=False, dtype=dtype, device=device)
            gen = torch.Generator().manual_seed(int(seed) & 0x7FFFFFFF)
            q = torch.randn(inner_rank, rank, generator=gen, dtype=torch.float64) / math.sqrt(rank)
            with torch.no_grad():
                self.Q.weight.copy_(q.to(dtype))
                self.P.weight.zero_()

    def trainable_matrix(self) -> torch.Tensor:
        """T: (rᵢ, rᵢ), the trained block (R, or P·Q)."""
        if self.mode == "sb":
            return self.R.weight
        return self.P.weight @ self.Q.weight

    def effective_inner(self) -> torch.Tensor:
        """R_eff = R0 + pad_r(T): (r, r)."""
        t = self.trainable_matrix()
        pad = self.r - t.shape[0]
        return self.R0 + (F.pad(t, (0, pad, 0, pad)) if pad else t)

    def initial_inner(self) -> torch.Tensor:
        """The r×r inner matrix of the pretrained model: 0 (``zero``) or diag(S)/s (``principal``)."""
        if self.principal:
            return torch.diag(self.S) / self.scaling
        return torch.zeros_like(self.R0)

    def delta_weight(self) -> torch.Tensor:
        """ΔW (d×k, nn.Linear layout) of this layer relative to the pretrained weight."""
        return self.scaling * self.B @ (self.effective_inner() - self.initial_inner()) @ self.A

    @torch.no_grad()
    def merge_trainable(self, seed: int = 0) -> None:
        """R0 ← R0 + pad_r(T), then restart the trainable part at zero (same rank)."""
        self.R0.copy_(self.effective_inner())
        self.reset_inner(self.rank, self.inner_rank, seed)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + s·B·(R0 + pad_r(T))·A·x; x (..., k) in the base's dtype, the adapter path in the adapter
        dtype (float32 on a half base, also under autocast), its result cast to the base output's dtype."""
        out = self.base(x)
        with float32_region(x):
            h = F.linear(self.dropout(x.to(self.A.dtype)), self.A)  # (..., r)
            z = F.linear(h, self.R0)  # (..., r)
            hi = h[..., : self.rank] if self.rank < self.r else h
            u = self.R(hi) if self.mode == "sb" else self.P(self.Q(hi))  # (..., rᵢ)
            if self.rank < self.r:
                u = F.pad(u, (0, self.r - self.rank))
            delta = self.scaling * F.linear(z + u, self.B)
        return out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        q = f", q={self.inner_rank}" if self.mode == "nora" else ""
        return f"mode={self.mode}, r={self.r}, rank={self.rank}{q}, scaling={self.scaling:g}"
