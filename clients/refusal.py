"""What an error reply of this node may say under DP or secure aggregation: a fixed cause, never a number.

Flower turns an exception of the ClientApp into the reply's error reason (``<class '…'>:<'text'>``), and the
server's screening writes that reason into the published ``metrics.jsonl`` (``rejected[].reason``). Exception
texts name private numbers (``DPConfig.target_delta=0.01: must be < 1/N = 0.00081 for N=1234 records``), ε spent,
ledger paths, the node's identity. So under DP or secure aggregation (:func:`private_mode`) every handler of the
ClientApp runs inside :func:`guarded`: any exception becomes :class:`NodeRefused`, whose text is exactly one of
:data:`fedlora.privacy.release_policy.REFUSALS` (the reviewed list), chosen by :func:`cause_of`; the full
exception goes to the node's own log (``fedlora.client`` logger) only. Without DP or secure aggregation the
node's numbers are released anyway (the release policy) and exceptions pass unchanged, for debugging.

A curious server still learns the *cause* (e.g. that δ ≥ 1/N for the node's data, one bit about N per run it
configures) and that the node refused: that is visible by design (fedlora/privacy/README.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from fedlora.privacy.release_policy import REFUSALS
from fedlora.run_config import RunConfig

LOGGER = logging.getLogger("fedlora.client")
T = TypeVar("T")


class Refusal(RuntimeError):
    """A refusal whose cause (a key of :data:`~fedlora.privacy.release_policy.REFUSALS`) is known where it is
    raised; its text is the local detail, which :func:`guarded` keeps on the node under DP or secure aggregation."""

    def __init__(self, cause: str, detail: str) -> None:
        if cause not in REFUSALS:
            raise ValueError(f"cause={cause!r}: not in fedlora.privacy.release_policy.REFUSALS")
        super().__init__(detail)
        self.cause = cause


class NodeRefused(RuntimeError):
    """What leaves the node under DP or secure aggregation: its text is exactly ``REFUSALS[cause]``."""

    def __init__(self, cause: str) -> None:
        super().__init__(REFUSALS[cause])
        self.cause = cause


def cause_of(err: BaseException) -> str:
    """The :data:`~fedlora.privacy.release_policy.REFUSALS` key of an exception raised on the node (``failed`` for
    any exception no cause lists)."""
    if isinstance(err, (Refusal, NodeRefused)):
        return err.cause
    # here, not at module level: the ledger and the accountant load opacus (~1.5 s)
    from clients.node_outer import FingerprintMismatch, OuterFactorsMissing
    from fedlora.outer_bundle import OuterMismatch
    from fedlora.privacy.accounting import BudgetExhausted
    from fedlora.privacy.config import DeltaRefused
    from fedlora.privacy.ledger import LedgerError
    from strategies.secagg_node import ProtocolViolation
    from strategies.secagg_protocol import SecAggError
    from strategies.wire import WireFormatError

    causes: tuple[tuple[type[BaseException], str], ...] = (
        (BudgetExhausted, "budget"), (LedgerError, "ledger"), (DeltaRefused, "dp-delta"),
        (OuterFactorsMissing, "outer-missing"), (FingerprintMismatch, "outer-mismatch"),
        (OuterMismatch, "outer-mismatch"), (WireFormatError, "download"), (ProtocolViolation, "secagg-protocol"),
        (SecAggError, "secagg-protocol"),
    )
    return next((cause for kind, cause in causes if isinstance(err, kind)), "failed")


def private_mode(cfg: RunConfig) -> bool:
    """Whether this node's error replies carry only fixed reasons: under DP-SGD, user-level DP or secure
    aggregation."""
    return cfg.dp_enabled or cfg.user_dp_enabled or cfg.secure_aggregation


def guarded(handler: Callable[[], T], private: bool, what: str) -> T:
    """Run ``handler``; when ``private``, turn any exception into :class:`NodeRefused` (a fixed reason) after
    logging the full exception on this node (``what``: the message kind, for the log)."""
    if not private:
        return handler()
    try:
        return handler()
    except Exception as err:  # noqa: BLE001 - every exception leaves the node only as a fixed reason
        cause = cause_of(err)
        LOGGER.error("%s refused [%s]; the server is told only %r. Local detail: %s: %s", what, cause,
                     REFUSALS[cause], type(err).__name__, err, exc_info=err)
        raise NodeRefused(cause) from None
