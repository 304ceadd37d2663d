"""What fedlora strategies and clients put in Flower messages, and how many bytes that is.

Message formats
---------------
Server → client (``MessageType.TRAIN`` / ``EVALUATE``): ``RecordDict({"arrays": ArrayRecord,
"config": ConfigRecord})``. The ConfigRecord holds the user's train config (``lr``, ``local-epochs``, …)
plus the reserved keys :data:`RESERVED_CONFIG_KEYS` (``rank``, ``global-rank``, ``inner-rank``,
``server-round``, ``seed``, ``fingerprint``, ``mode``, ``strategy``, ``restart-inner``) and any
strategy extras (see each strategy).

Client → server (reply): ``RecordDict`` with

- ``"arrays"``: ``ArrayRecord`` holding exactly the keys/shapes the node was asked for,
- ``"metrics"``: ``MetricRecord`` with ``num-examples`` (> 0; required with ``weighting="num-examples"``)
  and optionally ``train-loss`` and the ``dp-*`` metrics of a DP client,
- ``"meta"``: ``ConfigRecord`` with ``fingerprint`` (str) — required whenever the server has a
  fingerprint (MetricRecords cannot hold strings, hence a separate ConfigRecord).

States are ``dict[str, np.ndarray]`` (:data:`State`, key order kept); an ``ArrayRecord`` holds one
``Array`` per key.

Byte accounting
---------------
``payload`` bytes = Σ over the Arrays of (number of elements × item size), i.e. the ``nbytes`` of the
numbers carried. ``serialized`` bytes = what Flower 1.41+ puts on the wire for that ArrayRecord: the
sum of the deflated inflatable objects (ArrayRecord, Arrays, ArrayChunks: npy headers, keys, object
headers). ``overhead`` = serialized − payload, reported separately.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

# Private Flower API, imported in this one place: Flower exposes no public way to list the objects it
# deflates and sends for a record, and ``serialized_bytes`` must count exactly those.
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
META_KEY = "meta"
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"

#: config keys the strategy sets per node; a user train config may not override them
RESERVED_CONFIG_KEYS = frozenset(
    {
        "rank",
        "global-rank",
        "inner-rank",
        "server-round",
        "seed",
        "fingerprint",
        "mode",
        "strategy",
        "restart-inner",
    }
)

State = dict[str, np.ndarray]
Shape = tuple[int, ...]


# ------------------------------------------------------------------------------------------ conversions
def state_to_arrayrecord(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``dict[str, ndarray]`` → ``ArrayRecord`` of ``Array`` values (keys in order, C-contiguous copies)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def arrayrecord_to_state(record: ArrayRecord) -> State:
    """``ArrayRecord`` → ``dict[str, ndarray]`` (decodes every Array; dtypes and values bit-exact)."""
    return {k: v.numpy() for k, v in record.items()}


def copy_state(state: Mapping[str, np.ndarray]) -> State:
    """A deep copy with ``str`` keys (the caller may mutate its arrays afterwards)."""
    return {str(k): np.array(v, copy=True) for k, v in state.items()}


def finite_number(value: Any) -> float | None:
    """A metric value as a finite float, else None (bools, strings, NaN and ±inf are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def check_float_state(state: Mapping[str, np.ndarray]) -> None:
    """Raise ``ValueError`` naming the key unless every array of a global state is floating point and finite."""
    for key, arr in state.items():
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"initial_state: key {key!r} has dtype {arr.dtype}, expected floating point")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"initial_state: key {key!r} has non-finite values")


# ------------------------------------------------------------------------------------------ bytes
def array_payload_bytes(array: Array) -> int:
    """Bytes of the numbers one Array carries (elements × item size = the ndarray's ``nbytes``)."""
    try:
        itemsize = np.dtype(array.dtype).itemsize
    except TypeError:  # dtype numpy cannot name: fall back to the raw data length
        return len(array.data)
    return int(math.prod(array.shape)) * itemsize


def payload_bytes(record: ArrayRecord) -> int:
    """Σ payload bytes of an ArrayRecord (see the module docstring)."""
    return sum(array_payload_bytes(a) for a in record.values())


def raw_data_bytes(record: ArrayRecord) -> int:
    """Σ ``len(Array.data)`` (npy-encoded bytes, payload + per-array npy header)."""
    return sum(len(a.data) for a in record.values())


def serialized_bytes(record: ArrayRecord) -> int:
    """Bytes Flower transmits for ``record``: Σ deflated size of its unique inflatable objects."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())
