"""The node-identity handshake shared by the server and the ClientApp (Flower-free).

Flower gives simulated SuperNodes random node ids in every run. The server asks each node once, with a
``query`` message whose ConfigRecord holds ``{"ask": IDENTITY_KEY}``, for its identity; the ClientApp
answers with :func:`node_identity` of its node config, in a ConfigRecord named ``IDENTITY_KEY``.
:func:`stable_id` maps an identity to the stable node id the strategy sees
(``simulations.stable_grid.StableIdGrid``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

IDENTITY_KEY = "identity"
#: stable ids live above this offset so they never collide with a small partition index
STABLE_BASE = 1_000_000


def stable_id(identity: str) -> int:
    """``partition:<i>`` -> STABLE_BASE + i; any other identity -> a 62-bit hash."""
    if identity.startswith("partition:"):
        return STABLE_BASE + int(identity.split(":", 1)[1])
    return int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "little") >> 2


def node_identity(node_config: Mapping[str, Any]) -> str:
    """The identity a ClientApp reports: ``partition:<id>`` in simulation, ``data:<path>`` in deployment."""
    if node_config.get("partition-id") not in (None, ""):
        return f"partition:{int(node_config['partition-id'])}"
    if node_config.get("data-path"):
        return f"data:{node_config['data-path']}"
    return ""
