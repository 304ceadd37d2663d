"""What fedlora strategies and clients put in Flower messages, and how many bytes that is.

Message formats
---------------
Server → client (``MessageType.TRAIN`` / ``EVALUATE``): ``RecordDict({"arrays": ArrayRecord,
"config": ConfigRecord})``. The ConfigRecord holds the user's train config (``lr``, ``local-epochs``, …)
plus the reserved keys :data:`RESERVED_CONFIG_KEYS` (``rank``, ``global-rank``, ``inner-rank``,
``server-round``, ``seed``, ``fingerprint``, ``mode``, ``strategy``, ``restart-inner``, ``layout``) and
any strategy extras (see each strategy).

Client → server (reply): ``RecordDict`` with

- ``"arrays"``: ``ArrayRecord`` holding exactly the keys/shapes the node was asked for (packed, below),
- ``"metrics"``: ``MetricRecord`` with ``num-examples`` (> 0; required with ``weighting="num-examples"``)
  and optionally ``train-loss`` and the ``dp-*`` metrics of a DP client,
- ``"meta"``: ``ConfigRecord`` with ``fingerprint`` (str) — required whenever the server has a
  fingerprint (MetricRecords cannot hold strings, hence a separate ConfigRecord) — and ``layout``.

Packed arrays
-------------
States are ``dict[str, np.ndarray]`` (:data:`State`, key order kept) everywhere but on the wire, where
:func:`pack_state` turns a state into

- an ``ArrayRecord`` with ONE 1-D ``Array`` per distinct dtype, keyed by the dtype's ``numpy`` ``str``
  (``"<f4"``; states are float32 today, so one Array): the values of that dtype's keys, each flattened
  in C order, concatenated in state order;
- the *layout* (:data:`LAYOUT_KEY` = ``"layout"``, a ``bytes`` entry): ``zlib.compress(json, 9)`` of the
  compact JSON list ``[[key, [dims…], dtype str], …]`` in state order, at most
  :data:`MAX_LAYOUT_BYTES` once decompressed. It travels in the same message's ConfigRecord: the per-node
  ``"config"`` of a download, the ``"meta"`` of a reply.

:func:`unpack_state` inverts it bit-exactly (values, dtypes, shapes, key order; the arrays it returns are
views into one buffer per dtype) and raises :class:`WireFormatError` naming the problem when the layout
and the arrays do not fit together (bad zlib data, over-size layout, not JSON, duplicated key, negative
or huge dimension, unknown or non-numeric dtype, element counts or dtypes that differ from the Arrays).
A message *without* a ``layout`` entry is read the unpacked way, one ``Array`` per key (third-party
clients that send that are still accepted; the server and the fedlora ClientApp always pack).

Byte accounting
---------------
``payload`` bytes = Σ over the Arrays of (number of elements × item size), i.e. the ``nbytes`` of the
numbers carried. ``serialized`` bytes = what Flower 1.41+ puts on the wire for those numbers: the sum of
the deflated inflatable objects of the ArrayRecord (ArrayRecord, Arrays, ArrayChunks: npy headers, keys,
object headers) PLUS the layout entry (:func:`layout_entry_bytes`: the deflated size of a ConfigRecord
holding only the layout minus that of an empty one; key, value and protobuf framing). ``overhead`` =
serialized − payload, reported separately. Measured 2026-11-30 on this machine (Flower 1.42, ``python -m
bench.comm_measured --models minilm --ranks 16 --heads no``): fedsb's upload at MiniLM r=16 without head,
12 arrays of 16×16 float32 (12,288 B), travels with 587 B of overhead (+4.78%): one Array (461 B) and
its layout entry (126 B). Unpacked, one Array per key, it was 18.2 kB (+48%, 2026-11-22).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

# Private Flower API, imported in this one place: Flower exposes no public way to list the objects it
# deflates and sends for a record, and ``serialized_bytes`` must count exactly those.
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
META_KEY = "meta"
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
#: config / meta key of a packed message's layout (see the module docstring)
LAYOUT_KEY = "layout"
#: the most bytes a layout may decompress to (zip bombs): ~40,000 keys of 100 characters
MAX_LAYOUT_BYTES = 4 << 20
#: the most elements one key may declare (a larger product of dimensions is refused, not allocated)
MAX_ELEMENTS = 1 << 48
#: the most dimensions one key may declare
MAX_NDIM = 32
#: numpy dtype kinds a packed state may hold: bool, signed and unsigned integers, floats, complex
WIRE_KINDS = "biufc"

#: config keys the strategy sets per node; a user train config may not override them
RESERVED_CONFIG_KEYS = frozenset(
    {
        "rank",
        "global-rank",
        "inner-rank",
        "server-round",
        "seed",
        "fingerprint",
        "outer-digest",
        "mode",
        "strategy",
        "restart-inner",
        LAYOUT_KEY,
    }
)

State = dict[str, np.ndarray]
Shape = tuple[int, ...]
#: one layout entry: (key, shape, dtype)
LayoutEntry = tuple[str, Shape, np.dtype]


class WireFormatError(ValueError):
    """Packed arrays and their layout do not fit together (the message names the problem)."""


class PackedState(NamedTuple):
    """A state as it travels (:func:`pack_state`): one Array per dtype plus the compressed layout."""

    record: ArrayRecord
    layout: bytes


# ------------------------------------------------------------------------------------------ conversions
def state_to_arrayrecord(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``dict[str, ndarray]`` → ``ArrayRecord`` of ``Array`` values (keys in order, C-contiguous copies)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def arrayrecord_to_state(record: ArrayRecord) -> State:
    """``ArrayRecord`` → ``dict[str, ndarray]`` (decodes every Array; dtypes and values bit-exact)."""
    return {k: v.numpy() for k, v in record.items()}


# ------------------------------------------------------------------------------------------ packing
def pack_state(state: Mapping[str, np.ndarray]) -> PackedState:
    """A state → one 1-D Array per distinct dtype (key: ``dtype.str``, first appearance first; values in
    state order, each flattened in C order) + the zlib-compressed JSON layout ``[[key, [dims], dtype], …]``.

    Deterministic: the same state gives the same bytes. Raises :class:`WireFormatError` for a dtype outside
    :data:`WIRE_KINDS` or a layout over :data:`MAX_LAYOUT_BYTES`.
    """
    entries: list[list[Any]] = []
    groups: dict[str, list[np.ndarray]] = {}
    for key, value in state.items():
        arr = np.asarray(value)
        if arr.dtype.kind not in WIRE_KINDS:
            raise WireFormatError(f"key {key!r}: dtype {arr.dtype} cannot be packed (numeric dtypes only)")
        entries.append([str(key), [int(n) for n in arr.shape], arr.dtype.str])
        groups.setdefault(arr.dtype.str, []).append(arr.reshape(-1))
    text = json.dumps(entries, separators=(",", ":")).encode()
    if len(text) > MAX_LAYOUT_BYTES:
        raise WireFormatError(f"layout of {len(entries)} keys is {len(text)} bytes > {MAX_LAYOUT_BYTES}")
    return PackedState(ArrayRecord({name: Array(_concat(parts, name)) for name, parts in groups.items()}),
                       zlib.compress(text, 9))


def _concat(parts: list[np.ndarray], dtype: str) -> np.ndarray:
    """1-D arrays → one, of exactly ``dtype`` (``np.concatenate`` would turn ``>f4`` into native order)."""
    out = np.empty(sum(p.size for p in parts), dtype=np.dtype(dtype))
    start = 0
    for part in parts:
        out[start:start + part.size] = part
        start += part.size
    return out


def parse_layout(blob: Any) -> list[LayoutEntry]:
    """Decompress (at most :data:`MAX_LAYOUT_BYTES`) and validate a layout; raise :class:`WireFormatError`
    naming the problem: not bytes, bad, truncated or over-size zlib data, not a JSON list of
    ``[key, [dims], dtype]``, a duplicated key, a negative or non-integer dimension, more than
    :data:`MAX_NDIM` dimensions or :data:`MAX_ELEMENTS` elements, an unknown or non-numeric dtype."""
    if not isinstance(blob, bytes):
        raise WireFormatError(f"layout must be bytes, got {type(blob).__name__}")
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(blob, MAX_LAYOUT_BYTES + 1)
    except zlib.error as err:
        raise WireFormatError(f"layout is not zlib data ({err})") from err
    if len(text) > MAX_LAYOUT_BYTES or inflater.unconsumed_tail:
        raise WireFormatError(f"layout decompresses to more than {MAX_LAYOUT_BYTES} bytes")
    if not inflater.eof or inflater.unused_data:
        raise WireFormatError("layout is truncated zlib data" if not inflater.eof else
                              f"layout has {len(inflater.unused_data)} bytes after its zlib data")
    try:
        items = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as err:
        raise WireFormatError(f"layout is not JSON ({str(err)[:80]})") from err
    if not isinstance(items, list):
        raise WireFormatError(f"layout must be a JSON list, got {type(items).__name__}")
    out: list[LayoutEntry] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)):
            raise WireFormatError(f"layout entry {i}: need [key, [dims], dtype], got {str(item)[:80]}")
        key, dims, dtype = item
        if key in seen:
            raise WireFormatError(f"layout: key {key!r} appears twice")
        seen.add(key)
        out.append((key, _layout_shape(key, dims), _layout_dtype(key, dtype)))
    return out


def _layout_shape(key: str, dims: Any) -> Shape:
    if not isinstance(dims, list) or not all(type(n) is int for n in dims):
        raise WireFormatError(f"layout: key {key!r}: dims {str(dims)[:80]} are not a list of integers")
    if len(dims) > MAX_NDIM:
        raise WireFormatError(f"layout: key {key!r}: {len(dims)} dimensions > {MAX_NDIM}")
    if any(n < 0 for n in dims):
        raise WireFormatError(f"layout: key {key!r}: negative dimension in {dims}")
    if math.prod(max(n, 1) for n in dims) > MAX_ELEMENTS:
        raise WireFormatError(f"layout: key {key!r}: shape {dims} overflows ({MAX_ELEMENTS} elements at most)")
    return tuple(dims)


def _layout_dtype(key: str, name: Any) -> np.dtype:
    try:
        dtype = np.dtype(name) if isinstance(name, str) else None
    except Exception:  # noqa: BLE001 - numpy raises TypeError, ValueError or SyntaxError for odd names
        dtype = None
    if dtype is None or dtype.kind not in WIRE_KINDS or dtype.str != name:
        raise WireFormatError(f"layout: key {key!r}: unknown or non-numeric dtype {str(name)[:40]!r}")
    return dtype


def unpack_state(record: ArrayRecord, layout: bytes | list[LayoutEntry] | None) -> State:
    """Invert :func:`pack_state`: ``record`` + its layout (bytes, or entries from :func:`parse_layout`) →
    the state, bit-exact, key order kept (views into one buffer per dtype). ``layout=None``: an unpacked
    record, one Array per key (:func:`arrayrecord_to_state`).

    Raises:
        WireFormatError: the layout is malformed, or its dtypes / element counts are not the Arrays' —
            checked on the Arrays' declared dtype and shape before their data is decoded, and again after.
    """
    if layout is None:
        return arrayrecord_to_state(record)
    entries = layout if isinstance(layout, list) else parse_layout(layout)
    counts: dict[str, int] = {}
    for _, shape, dtype in entries:
        counts[dtype.str] = counts.get(dtype.str, 0) + math.prod(shape)
    if set(record.keys()) != set(counts):
        raise WireFormatError(f"packed arrays {sorted(record.keys())[:5]} are not the layout's dtypes "
                              f"{sorted(counts)}")
    flats: dict[str, np.ndarray] = {}
    for name, count in counts.items():
        array = record[name]
        declared = _declared_dtype(array)  # Flower's Array.dtype drops the byte order: compare kind and size
        if tuple(array.shape) != (count,) or declared is None or (declared.kind, declared.itemsize) != (
                np.dtype(name).kind, np.dtype(name).itemsize):
            raise WireFormatError(f"packed array {name!r} is {array.dtype} {tuple(array.shape)}; the layout "
                                  f"describes {count} elements of {name}")
        try:
            flat = array.numpy()
        except Exception as err:  # noqa: BLE001 - any decoding failure is a malformed message
            raise WireFormatError(f"packed array {name!r} cannot be decoded: {err}") from err
        if flat.dtype.str != name or flat.shape != (count,):
            raise WireFormatError(f"packed array {name!r} decodes to {flat.dtype.str} {flat.shape}; the layout "
                                  f"describes ({count},)")
        flats[name] = flat
    offsets = dict.fromkeys(counts, 0)
    state: State = {}
    for key, shape, dtype in entries:
        start, size = offsets[dtype.str], math.prod(shape)
        state[key] = flats[dtype.str][start:start + size].reshape(shape)
        offsets[dtype.str] = start + size
    return state


def _declared_dtype(array: Array) -> np.dtype | None:
    try:
        return np.dtype(array.dtype)
    except Exception:  # noqa: BLE001 - a dtype name numpy does not know
        return None


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


def layout_entry_bytes(layout: Any) -> int:
    """Bytes the layout entry adds to its ConfigRecord on the wire (0 for ``None``): deflated size of a
    ConfigRecord holding only ``{LAYOUT_KEY: layout}`` minus that of an empty one. At most 2 bytes more
    than its marginal size in the actual record (the object header writes the body length in digits)."""
    if layout is None:
        return 0
    return len(ConfigRecord({LAYOUT_KEY: layout}).deflate()) - len(ConfigRecord().deflate())


def serialized_bytes(record: ArrayRecord, layout: Any = None) -> int:
    """Bytes Flower transmits for ``record`` (Σ deflated size of its unique inflatable objects) plus the
    layout entry that describes it (:func:`layout_entry_bytes`; ``None`` for an unpacked record)."""
    objects = sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())
    return objects + layout_entry_bytes(layout)
