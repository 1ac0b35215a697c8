"""The host's budgets, sans-I/O: admission of handshakes, what one client's values
cost, departed clients, subscriptions in bytes, and large values received once."""

from __future__ import annotations

import logging
import struct
import sys
from typing import Any, Dict, List

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from socketengine import codec, frames
from socketengine.codec import decoded_size
from socketengine.errors import ProtocolError
from socketengine.limits import (
    BATCH_READ_ABOVE,
    DEFAULT_MAX_MESSAGE,
    DEFAULT_MAX_STORED,
    SMALL_META,
    check_host_limits,
)
from socketengine.state import (
    Admission,
    BudgetExceeded,
    Departed,
    KeptValues,
    StoredValues,
    SubscriptionBuffer,
    forget_latest,
    item_size,
    value_size,
)

# -- admission -------------------------------------------------------------------------


def test_only_completed_handshakes_take_seats() -> None:
    adm = Admission(max_clients=2, max_pending=10)
    for key in range(5):  # five handshakes in progress: nobody is refused
        assert adm.arrive(key, "a") == (None, [])
    assert adm.pending == 5 and adm.clients == 0
    assert adm.opened(0) is None and adm.opened(1) is None
    assert adm.clients == 2 and adm.pending == 3
    reason, code = adm.opened(2)  # type: ignore[misc]
    assert code == "full" and "max_clients=2" in reason
    refusal, evicted = adm.arrive(9, "a")
    assert refusal is not None and refusal[1] == "full" and evicted == []
    assert adm.left(0) is True  # a client leaves: a seat is free again
    assert adm.left(2) is False  # turned away after its handshake: never had one
    assert adm.arrive(10, "a") == (None, [])


def test_a_full_pending_budget_evicts_the_oldest_of_the_busiest_address() -> None:
    adm = Admission(max_clients=100, max_pending=4)
    adm.arrive(1, "good", 0.0)
    for key in (2, 3, 4):
        adm.arrive(key, "flood", 0.0)
    assert adm.arrive(5, "flood", 1.0) == (None, [2])  # not 1: "flood" holds three
    assert adm.arrive(6, "other", 1.0) == (None, [3])
    assert adm.evicted == 2 and adm.pending == 4


def test_connections_that_sent_their_hello_are_evicted_last() -> None:
    adm = Admission(max_clients=100, max_pending=3)
    hello = {1}
    for key in (1, 2, 3):
        adm.arrive(key, "a", 0.0, hello.__contains__)
    # 1 is the oldest, but it progressed: 2 goes.
    assert adm.arrive(4, "a", 1.0, hello.__contains__) == (None, [2])
    # Younger than GRACE: 4 is spared while an older stalled one exists.
    assert adm.arrive(5, "a", 1.0 + Admission.GRACE / 2, hello.__contains__) == (None, [3])
    hello.update({4, 5})
    # Everyone progressed: the oldest goes.
    assert adm.arrive(6, "a", 2.0, hello.__contains__) == (None, [1])


def test_eviction_warnings_are_rate_limited() -> None:
    adm = Admission(max_clients=10, max_pending=1)
    assert adm.warning(0.0) is None
    for key in range(5):
        adm.arrive(key, "a", 0.0)
    first = adm.warning(0.0)
    assert first is not None and "evicted 4" in first and "max_pending=1" in first
    adm.arrive(9, "a", 1.0)
    assert adm.warning(1.0) is None  # within WARN_EVERY
    later = adm.warning(1.0 + Admission.WARN_EVERY)
    assert later is not None and "evicted 1 " in later


# -- one client's values ---------------------------------------------------------------


def test_stored_values_count_channels_and_bytes() -> None:
    stored = StoredValues(max_channels=3, max_stored=100)
    stored.store("a", 40)
    stored.store("a", 10)  # replaces: counts once
    assert stored.nbytes == 11  # the name counts too
    stored.store("b", 20)
    stored.store("c", 20)
    with pytest.raises(ProtocolError, match="max_channels=3"):
        stored.store("d", 1)
    with pytest.raises(ProtocolError, match="max_stored=100"):
        stored.store("a", 80)
    assert stored.nbytes == 11 + 21 + 21  # unchanged by the refused values


def test_a_batch_body_is_read_before_decoding_only_when_large() -> None:
    nested = b"\xa1a" + b"\x91" * 6 + b"\x90"  # "a": [[[[[[[]]]]]]], 9 bytes
    for stored in (StoredValues(10, 1_000_000), KeptValues(10, 1_000_000)):
        small = nested * (BATCH_READ_ABOVE // len(nested))  # ~3.6 MB decoded, unread
        stored.check_batch(small)
        big = nested * (BATCH_READ_ABOVE // len(nested) + 1)
        with pytest.raises(ProtocolError, match=r"BATCH frame .* max_stored=1000000"):
            stored.check_batch(big)
        plain = frames.value_item("k", [1, "v" * 100]) * (2 * BATCH_READ_ABOVE // 110)
        assert len(plain) > BATCH_READ_ABOVE
        stored.check_batch(plain)  # ~2.4x in memory: fits
        assert stored.nbytes == 0  # nothing counted: the items are, once decoded


def test_value_size_follows_the_payload() -> None:
    assert value_size(b"x" * 1000) == 1005
    assert value_size("é" * 10) == 15
    assert 8000 <= value_size(np.zeros(1000)) <= 8100
    nested = {"a": [b"x" * 100, (1, 2.0)], "b": None}
    assert 100 < value_size(nested) < 200


# -- what a decoded value takes --------------------------------------------------------


def _cached(obj: Any) -> bool:
    """An object CPython hands out without allocating (decoding one costs nothing)."""
    t = type(obj)
    if obj is None or t is bool:
        return True
    if t is int:
        return -5 <= obj <= 256
    if t is str:
        return len(obj) == 0 or (len(obj) == 1 and ord(obj) < 256)
    if t is bytes:
        return len(obj) <= 1
    return t is tuple and not obj


def _deep_size(value: Any) -> int:
    """What a decoded value takes, measured (deterministically): every object it holds,
    once, at sys.getsizeof rounded up to the allocators' 16 bytes."""
    seen = set()
    total = 0
    stack = [value]
    while stack:
        obj = stack.pop()
        if _cached(obj) or id(obj) in seen:
            continue
        seen.add(id(obj))
        total += (sys.getsizeof(obj) + 15) & -16
        if type(obj) in (list, tuple):
            stack.extend(obj)
        elif type(obj) is dict:
            stack.extend(obj)
            stack.extend(obj.values())
    return total


def _array32(item: bytes, n: int) -> bytes:
    return b"\xdd" + struct.pack(">I", n) + item * n


_RECORDS = [{"x": i * 0.5, "y": -i, "name": f"n{i}"} for i in range(3000)]
# The shapes that take the most memory per byte, and ordinary ones.
SHAPES = {
    "empty lists": _array32(b"\x90", 100_000),
    "empty dicts": _array32(b"\x80", 100_000),
    "one-entry dicts nested": _array32(b"\x81\xc0" * 100 + b"\x80", 500),
    "{0: {}}": _array32(b"\x81\x00\x80", 30_000),
    "[[]]": _array32(b"\x91\x90", 50_000),
    "fixints": _array32(b"\x05", 100_000),
    "negative fixints": _array32(b"\xe0", 100_000),
    "int8": _array32(b"\xd0\x9c", 50_000),
    "uint16": _array32(b"\xcd\x03\xe8", 30_000),
    "int64": _array32(b"\xd3" + struct.pack(">q", -(2**62)), 10_000),
    "float32": _array32(b"\xca" + struct.pack(">f", 1.5), 20_000),
    "float64": msgpack.packb([i / 7 for i in range(10_000)]),
    "two-character strs": _array32(b"\xa2ab", 30_000),
    "one wide character strs": _array32(b"\xa2\xc4\x80", 30_000),
    "emoji strs": _array32(b"\xa4\xf0\x9f\x98\x80", 20_000),
    "ascii + emoji str": msgpack.packb("a" * 100_000 + "\U0001f600"),
    "cjk str": msgpack.packb("\u6f22" * 30_000),
    "latin-1 str": msgpack.packb("\u00e9" * 30_000),
    "two-byte bytes": _array32(b"\xc4\x02ab", 20_000),
    "big bytes": msgpack.packb(b"x" * 100_000),
    "tuples": codec.encode([(i, i + 1000, -i) for i in range(10_000)])[0],
    "big ints": codec.encode([2**100 + i for i in range(5000)])[0],
    "records": msgpack.packb(_RECORDS),
    "distinct keys": msgpack.packb({f"k{i}": i for i in range(20_000)}),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_decoded_size_is_at_least_what_decoding_creates(name: str) -> None:
    meta = SHAPES[name]
    assert decoded_size(meta) >= _deep_size(codec.decode(meta))


@pytest.mark.parametrize("name", ["float64", "records", "tuples", "cjk str", "big bytes"])
def test_decoded_size_is_close_for_ordinary_values(name: str) -> None:
    # An upper bound, not a wild one: within 2.5x for ordinary data (records: shared
    # keys are counted at every use).
    meta = SHAPES[name]
    assert decoded_size(meta) <= 2.5 * _deep_size(codec.decode(meta))


def test_small_items_take_many_times_their_wire_size() -> None:
    # What the budget has to see (docs/guarantees.md, max_stored).
    for name, factor in (("empty lists", 64), ("empty dicts", 64), ("one-entry dicts nested", 100)):
        meta = SHAPES[name]
        assert decoded_size(meta) >= factor * len(meta)
        assert _deep_size(codec.decode(meta)) >= factor * len(meta)


def test_decoded_size_counts_the_lists_msgpack_allocates_for_declared_lengths() -> None:
    # Nested array headers each declaring 5,001 items: 5 KB that make msgpack allocate
    # 40 MB of list slots before it finds the items missing.
    meta = (b"\xdd" + struct.pack(">I", 5001)) * 1000 + b"\x90"
    assert decoded_size(meta) >= 1000 * 8 * 5001


def test_decoded_size_stops_at_the_limit() -> None:
    meta = SHAPES["empty lists"]
    full = decoded_size(meta)
    assert 10_000 < decoded_size(meta, 10_000) < full


def test_decoded_size_reads_any_buffer() -> None:
    for meta in SHAPES.values():
        want = decoded_size(meta)
        assert decoded_size(bytearray(meta)) == want
        assert decoded_size(memoryview(bytearray(meta))) == want


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decoded_size_takes_any_bytes(meta: bytes) -> None:
    assert decoded_size(meta) >= 0  # malformed msgpack gives a number, never an error


_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=12)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=6) | st.integers(-300, 300), inner, max_size=8)
    ),
    max_leaves=60,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_VALUES)
def test_decoded_size_bounds_any_value(value: Any) -> None:
    meta = codec.encode(value)[0]
    assert decoded_size(meta) >= _deep_size(codec.decode(meta))


# -- one client's values, counted before they are decoded ------------------------------


def _heavy(max_stored: int = 10_000_000) -> StoredValues:
    """A client whose values already take more than read_above: large values are read."""
    stored = StoredValues(max_channels=100, max_stored=max_stored)
    stored.store("ballast", stored.read_above)
    return stored


def test_a_small_value_counts_at_its_wire_size() -> None:
    stored = _heavy()
    before = stored.nbytes
    meta = msgpack.packb([[]] * 200)  # 203 bytes: not read, though it decodes to 13 KB
    assert len(meta) <= SMALL_META < decoded_size(meta)
    stored.store_frame("s", meta, None)
    assert stored.sizes["s"] == len(meta) + 1
    assert stored.nbytes == before + len(meta) + 1


def test_a_large_value_counts_at_its_decoded_size() -> None:
    stored = _heavy()
    before = stored.nbytes
    meta = SHAPES["empty lists"]
    stored.store_frame("big", meta, b"d" * 10)
    charge = decoded_size(meta) + 10 + len("big")
    assert stored.sizes["big"] == charge and stored.nbytes == before + charge
    stored.store_frame("big", b"\x01", None)  # replaced: the same number comes off
    assert stored.nbytes == before + 1 + len("big")


def test_a_large_value_of_little_memory_counts_at_its_wire_size() -> None:
    stored = _heavy()
    meta = SHAPES["cjk str"]  # 90 KB of UTF-8, 60 KB as a str
    stored.store_frame("t", meta, None)
    assert stored.sizes["t"] == len(meta) + 1


def test_a_large_value_from_a_client_holding_little_is_not_read() -> None:
    # Below read_above (max_stored / 128) even ~112x its wire size stays within
    # max_stored: counted at its wire size, unread.
    stored = StoredValues(max_channels=100, max_stored=10_000_000)
    meta = _array32(b"\x90", 50_000)
    assert len(meta) < stored.read_above
    stored.store_frame("big", meta, None)
    assert stored.nbytes == len(meta) + 3
    stored.store_frame("big2", meta, None)  # now beyond read_above: read
    assert stored.sizes["big2"] == decoded_size(meta) + 4


def test_a_value_that_decodes_beyond_max_stored_is_refused_and_nothing_changes() -> None:
    stored = _heavy(max_stored=1_000_000)
    stored.store_frame("a", b"\x01", None)
    sizes, nbytes = dict(stored.sizes), stored.nbytes
    meta = SHAPES["empty lists"]  # 100 KB: fits at wire size, 7 MB decoded does not
    with pytest.raises(ProtocolError, match="max_stored=1000000") as info:
        stored.store_frame("big", meta, None)
    assert "once decoded" in str(info.value)
    assert stored.sizes == sizes and stored.nbytes == nbytes


def test_max_channels_is_named_before_a_large_value_is_read() -> None:
    stored = StoredValues(max_channels=1, max_stored=1_000_000)
    stored.store("ballast", stored.read_above)
    with pytest.raises(ProtocolError, match="max_channels=1"):
        stored.store_frame("big", SHAPES["empty lists"], None)


def test_a_large_batch_item_counts_as_its_data_frame_would() -> None:
    value = [[] for _ in range(4000)]  # 4 KB of msgpack: a BATCH item
    meta = codec.encode(value)[0]
    assert len(meta) <= frames.ITEM_MAX
    assert item_size(value) == decoded_size(meta)
    stored = _heavy()
    before = stored.nbytes
    stored.store_items(["d", value, "e", 1])
    assert stored.sizes["d"] == decoded_size(meta) + 1
    assert stored.nbytes == before + decoded_size(meta) + 1 + value_size(1) + 1
    assert item_size([1, 2, 3]) == value_size([1, 2, 3])  # small: value_size, as before


def test_a_batch_item_beyond_max_stored_once_decoded_says_how_many_came_before() -> None:
    stored = _heavy(max_stored=200_000)
    items = ["c", 3, "d", [[] for _ in range(4000)], "e", 4]  # "d": ~290 KB decoded
    with pytest.raises(BudgetExceeded, match="max_stored=200000") as info:
        stored.store_items(items)
    assert info.value.accepted == 2


# -- departed clients ------------------------------------------------------------------


class _Gone:
    def __init__(self, name: str, values: Dict[str, Any]) -> None:
        self.name = name
        self.values = values


def test_departed_are_bounded_in_count_and_bytes() -> None:
    d: Departed[int, _Gone] = Departed(keep=3, keep_bytes=100)
    a, b, c, e = (_Gone(n, {}) for n in "abce")
    assert d.add(1, a, 40) == []
    assert d.add(2, b, 40) == []
    assert d.add(3, c, 40) == [a]  # 120 bytes > 100: the oldest goes
    assert d.nbytes == 80
    assert d.add(4, e, 500) == [b, c, e]  # alone too large: nothing of it is kept
    assert len(d) == 0 and d.nbytes == 0
    assert Departed(keep=0).add(1, a, 1) == [a]


def test_forgotten_values_leave_the_latest_table_unless_replaced() -> None:
    gone = _Gone("g", {"x": [1], "y": [2]})
    latest: Dict[str, Any] = {"x": gone.values["x"], "y": [2], "z": 3}
    forget_latest(latest, gone.values)
    assert latest == {"y": [2], "z": 3}  # "y" holds another peer's (equal) value


def test_a_named_client_that_comes_back_replaces_its_record() -> None:
    d: Departed[int, _Gone] = Departed(keep=5, keep_bytes=1000)
    cam = _Gone("cam", {})
    d.add(1, cam, 30)
    assert d.forget_named("cam") == [cam]
    assert d.nbytes == 0 and d.forget_named(None) == []


# -- subscriptions in bytes ------------------------------------------------------------


def test_a_subscription_pauses_its_source_at_maxbytes_and_releases_at_half() -> None:
    buf: SubscriptionBuffer[str] = SubscriptionBuffer(maxsize=1000, maxbytes=100)
    src = object()
    assert buf.put("a", src, 40) is False
    assert buf.put("b", src, 40) is False
    assert buf.put("c", src, 40) is True  # 120 bytes: pause
    assert buf.put("d", src, 40) is False  # already paused
    assert buf.nbytes == 160
    assert buf.take() == ("a", [])  # 120 left
    assert buf.take() == ("b", [])  # 80 left: above half
    assert buf.take() == ("c", [src])  # 40 left: released
    assert buf.nbytes == 40


# -- limits ----------------------------------------------------------------------------


def test_max_stored_follows_a_larger_max_message() -> None:
    assert check_host_limits(10, 1, 1).max_stored == DEFAULT_MAX_STORED
    big = 2 * DEFAULT_MAX_STORED
    assert check_host_limits(10, 1, 1, max_message=big).max_stored == big
    assert check_host_limits(10, 1, 1, max_stored=5).max_stored == 5
    for kwargs in ({"max_pending": 0}, {"max_channels": 0}, {"max_stored": 0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            check_host_limits(10, 1, 1, **kwargs)
    with pytest.raises(ValueError, match="keep_departed_bytes"):
        check_host_limits(10, 1, 1, keep_departed_bytes=-1)
    assert DEFAULT_MAX_STORED >= DEFAULT_MAX_MESSAGE


# -- a large value is received into its own buffer --------------------------------------


def _feed(dec: frames.FrameDecoder, wire: bytes, step: int) -> List[frames.Frame]:
    got: List[frames.Frame] = []
    for i in range(0, len(wire), step):
        got += dec.feed(wire[i : i + step])
    return got


@pytest.mark.parametrize("size", [70_000, 20_000_000])
def test_a_large_bytes_value_is_received_without_a_grown_stream_buffer(size: int) -> None:
    value = bytes(range(256)) * (size // 256)
    wire = b"".join(bytes(p) for p in frames.encode_value_frame(frames.DATA, "big", value))
    dec = frames.FrameDecoder(max_message=len(wire) + 1, expect_preamble=False)
    got = _feed(dec, wire + wire, 65536)
    assert [f.value() for f in got] == [value, value]
    assert isinstance(got[0].meta, memoryview) and got[0].data is None
    assert dec._capacity <= 4 * dec.read_size  # never grew to the value's size


def test_a_large_metadata_section_keeps_arrays_after_it_aligned_and_writable() -> None:
    value = {"blob": b"x" * 100_001, "arr": np.arange(50_000, dtype=np.float64)}
    wire = b"".join(bytes(p) for p in frames.encode_value_frame(frames.DATA, "mix", value))
    dec = frames.FrameDecoder(max_message=len(wire) + 1, expect_preamble=False)
    (frame,) = _feed(dec, wire, 4096)
    out = frame.value()
    assert out["blob"] == value["blob"]
    assert np.array_equal(out["arr"], value["arr"])
    assert out["arr"].flags.aligned and out["arr"].flags.writeable


def test_a_batch_is_counted_once_per_channel_when_it_fits() -> None:
    stored = StoredValues(max_channels=2, max_stored=100)
    stored.store_items(["a", b"x" * 30, "a", b"x" * 10, "b", 1])
    assert stored.nbytes == value_size(b"x" * 10) + 1 + value_size(1) + 1
    assert set(stored.sizes) == {"a", "b"}


def test_a_batch_counted_at_once_hands_back_the_last_value_of_each_channel() -> None:
    # What storing the items one by one leaves, channels in order of first arrival:
    # the threaded layer stores it in bulk when nobody watches.
    items = ["b", 1, "a", b"x" * 30, "b", 2, "a", b"y"]
    last = StoredValues(max_channels=2, max_stored=100).store_items(items)
    assert last == {"b": 2, "a": b"y"} and list(last) == ["b", "a"]
    # A client's budget beyond its limits counts the items one by one (it forgets
    # channels after storing, never refuses): nothing handed back then.
    kept = KeptValues(max_channels=1, max_stored=100)
    assert kept.store_items(items) is None
    assert kept.nbytes == value_size(2) + 1 + value_size(b"y") + 1


@pytest.mark.parametrize(
    "items, accepted, match",
    [
        (["a", 1, "b", 2, "a", 3, "c", 4, "a", 5], 6, "max_channels=2"),
        (["a", b"x" * 40, "b", b"x" * 40, "a", b"x" * 60], 4, "max_stored=100"),
        (["c", 1], 0, "max_channels=2"),
    ],
)
def test_a_batch_beyond_a_budget_says_how_many_items_came_before(
    items: List[Any], accepted: int, match: str
) -> None:
    stored = StoredValues(max_channels=2, max_stored=100)
    stored.store("a", 0)
    stored.store("b", 0)
    with pytest.raises(BudgetExceeded, match=match) as info:
        stored.store_items(items)
    assert info.value.accepted == accepted
    assert isinstance(info.value, ProtocolError)  # closes the connection like any other


def test_a_clients_budget_forgets_the_oldest_channels_after_storing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="socketengine")
    kept = KeptValues(max_channels=3, max_stored=100)
    latest: Dict[str, Any] = {}
    kept.tables = (latest,)
    for ch in ("a", "b", "c", "d"):
        kept.store(ch, 10)  # never raises: a client closes nothing
        latest[ch] = ch
    assert len(kept.sizes) == 4  # counted, not yet settled
    kept.settle()
    assert list(latest) == ["b", "c", "d"] and list(kept.sizes) == ["b", "c", "d"]
    assert kept.nbytes == 33 and "max_channels=3" in caplog.text
    kept.store("b", 20)  # a newer value on a kept channel keeps its place
    latest["b"] = "b2"
    kept.settle()
    assert list(latest) == ["b", "c", "d"] and kept.nbytes == 43
    kept.store("e", 200)  # alone beyond max_stored: everything else goes, it stays
    latest["e"] = "e"
    kept.settle()
    assert list(latest) == ["e"] and kept.nbytes == 201 and kept.forgotten == 4
    assert "max_stored=100" in caplog.text
    # Logged at the 1st, 2nd and 4th channel forgotten, not the 3rd.
    assert caplog.text.count("is forgotten") == 3


def test_a_clients_budget_counts_a_large_value_at_its_decoded_size_and_never_raises() -> None:
    kept = KeptValues(max_channels=10, max_stored=1_000_000)
    kept.store("ballast", kept.read_above)
    meta = SHAPES["empty lists"]  # 100 KB on the wire, 7 MB decoded: beyond max_stored
    kept.store_frame("big", meta, None)  # counted (reading stops past max_stored)
    assert kept.sizes["big"] > kept.max_stored
    kept.settle()  # the oldest go; the newest stays, even alone beyond the budget
    assert list(kept.sizes) == ["big"]
    small = SHAPES["float64"]
    kept.store_frame("f", small, b"d" * 8)
    assert kept.sizes["f"] == decoded_size(small) + 8 + 1
