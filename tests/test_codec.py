"""codec: values <-> (meta, data) bytes.  Sans-I/O: no sockets, no threads.

Round trips must be exact: the same type at every level (tuple stays tuple, numpy
scalar stays numpy scalar, float -0.0 keeps its sign), and hostile bytes may only ever
raise ValueError.
"""

from __future__ import annotations

import collections
import enum
import math
from typing import Any, Dict, List, Optional

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from socketengine import codec

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- helpers ---------------------------------------------------------------------------


def join(buffers: List[Any]) -> bytes:
    return b"".join(bytes(memoryview(b)) for b in buffers)


def roundtrip(value: Any, data_type: type = bytes) -> Any:
    """Encode ``value``, glue the data section together as the receiver would, decode."""
    meta, buffers, length = codec.encode(value)
    assert type(meta) is bytes
    data = join(buffers)
    assert len(data) == length
    assert length % 8 == 0, "every array starts (and so the data section ends) 8-aligned"
    return codec.decode(meta, data_type(data) if length else None)


def assert_same(got: Any, want: Any, path: str = "value") -> None:
    """Exact equality: same type at every level, arrays bit-identical, nan == nan."""
    assert type(got) is type(want), f"{path}: got {type(got)}, want {type(want)}"
    if isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.dtype.str == want.dtype.str, path
        assert got.shape == want.shape, path
        assert got.tobytes() == want.tobytes(), f"{path}: array content differs"
        if want.dtype.kind in "biufc":
            assert np.array_equal(got, want, equal_nan=want.dtype.kind in "fc"), path
    elif isinstance(want, np.generic):
        assert got.dtype == want.dtype, path
        assert got.tobytes() == want.tobytes(), f"{path}: scalar differs"
    elif type(want) is float:
        if math.isnan(want):
            assert math.isnan(got), path
        else:
            assert got == want, path
            assert math.copysign(1.0, got) == math.copysign(1.0, want), f"{path}: sign of zero"
    elif type(want) in (list, tuple):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    elif type(want) is dict:
        assert len(got) == len(want), path
        # msgpack keeps insertion order: compare item by item, keys included.
        for (gk, gv), (wk, wv) in zip(got.items(), want.items()):
            assert_same(gk, wk, f"{path} key {wk!r}")
            assert_same(gv, wv, f"{path}[{wk!r}]")
    else:
        assert got == want, path


def tuple_depth(value: Any) -> int:
    """How many tuples are nested inside each other (the codec caps it)."""
    if isinstance(value, tuple):
        return 1 + max((tuple_depth(v) for v in value), default=0)
    if isinstance(value, list):
        return max((tuple_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return max((tuple_depth(v) for v in value.values()), default=0)
    return 0


def ext(code: int, value: Any) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb(value, use_bin_type=True))


def array_meta(head: Any) -> bytes:
    return msgpack.packb(ext(codec.EXT_NDARRAY, head))


# -- strategies --------------------------------------------------------------------------

int64_range = st.integers(min_value=-(2**63), max_value=2**64 - 1)
big_ints = st.one_of(
    st.integers(min_value=2**64, max_value=2**300),
    st.integers(min_value=-(2**300), max_value=-(2**63) - 1),
    st.sampled_from([2**64, -(2**63) - 1, 2**64 - 1, -(2**63), 2**63, 2**1000, -(2**1000)]),
)
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, 1.7976931348623157e308]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    int64_range,
    big_ints,
    floats,
    st.text(max_size=20),
    st.binary(max_size=20),
)
keys = st.one_of(st.text(max_size=8), int64_range, big_ints)


def containers(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(
        st.lists(children, max_size=5),
        st.lists(children, max_size=5).map(tuple),
        st.dictionaries(keys, children, max_size=5),
    )


plain_values = st.recursive(scalars, containers, max_leaves=25)

DTYPES = [
    "?",
    "i1",
    "i2",
    "i4",
    "i8",
    "u1",
    "u2",
    "u4",
    "u8",
    "f2",
    "f4",
    "f8",
    "c8",
    "c16",
    ">i2",
    ">i4",
    ">u8",
    ">f4",
    ">f8",
    ">c16",
    "M8[s]",
    "M8[ns]",
    "m8[us]",
    "S5",
    "U3",
]


@st.composite
def arrays(draw: Any, max_side: int = 5) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=max_side))
    arr = draw(hnp.arrays(dtype, shape))
    layout = draw(st.sampled_from(["C", "F", "transposed", "strided", "reversed"]))
    if layout == "F":
        arr = np.asfortranarray(arr)
    elif layout == "transposed":
        arr = arr.T
    elif layout == "strided" and arr.ndim:
        arr = arr[(slice(None, None, 2),) * arr.ndim]
    elif layout == "reversed" and arr.ndim:
        arr = arr[..., ::-1]
    return arr


numpy_scalars = st.sampled_from(DTYPES).flatmap(
    lambda name: hnp.arrays(np.dtype(name), ()).map(lambda a: a[()])
)

values_with_arrays = st.recursive(
    st.one_of(scalars, arrays(max_side=3), numpy_scalars), containers, max_leaves=12
)


# -- round trips -------------------------------------------------------------------------


@FAST
@given(plain_values)
def test_plain_values_round_trip_exactly(value: Any) -> None:
    assume(tuple_depth(value) <= codec.MAX_TUPLE_DEPTH)
    meta, buffers, length = codec.encode(value)
    assert len(buffers) == 0 and length == 0, "no data section without arrays"
    assert_same(codec.decode(meta), value)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -1,
        2**63 - 1,
        -(2**63),
        2**64 - 1,
        2**64,
        -(2**63) - 1,
        3**200,
        -(3**200),
        0.0,
        -0.0,
        math.inf,
        -math.inf,
        math.nan,
        "",
        "héllo ✓ 𝄞",
        b"",
        b"\x00\xff",
        [],
        (),
        {},
        [()],
        ((),),
        ([], ()),
        {"a": (1, [2, (3,)]), 7: {"b": ()}, 2**70: None, -(2**63): "min"},
        [1, (2**64, [2**65, (-(2**70),)])],
    ],
    ids=repr,
)
def test_edge_values_round_trip_exactly(value: Any) -> None:
    assert_same(roundtrip(value), value)


def test_negative_zero_and_nan_keep_their_bits() -> None:
    got = roundtrip([-0.0, math.nan, math.inf])
    assert math.copysign(1.0, got[0]) == -1.0
    assert math.isnan(got[1])
    assert got[2] == math.inf


def test_big_int_boundaries_choose_the_right_encoding() -> None:
    # In range: plain msgpack ints (no extension); beyond: EXT_BIGINT.
    for n in (2**64 - 1, -(2**63)):
        assert b"\xc7" not in codec.encode(n)[0][:1] and codec.decode(codec.encode(n)[0]) == n
    for n in (2**64, -(2**63) - 1, 2**64 * 255):
        meta = codec.encode(n)[0]
        assert isinstance(msgpack.unpackb(meta), msgpack.ExtType)
        assert codec.decode(meta) == n


@FAST
@given(arrays())
def test_arrays_round_trip_with_dtype_shape_and_content(arr: np.ndarray) -> None:
    got = roundtrip(arr)
    assert_same(got, arr)
    if arr.ndim >= 2 and arr.flags.f_contiguous and not arr.flags.c_contiguous:
        assert got.flags.f_contiguous, "Fortran order travels as such (no transpose copy)"


@FAST
@given(arrays())
def test_arrays_from_a_bytearray_are_writable_views(arr: np.ndarray) -> None:
    meta, buffers, length = codec.encode(arr)
    data = bytearray(join(buffers))
    got = codec.decode(meta, data if length else None)
    assert_same(got, arr)
    if got.size:
        assert got.flags.writeable
        assert np.shares_memory(got, np.frombuffer(data, np.uint8)), "no copy on receive"
        got.reshape(-1)[0] = got.reshape(-1)[-1]  # writing works


def test_arrays_decoded_from_bytes_are_read_only_but_equal() -> None:
    arr = np.arange(12, dtype=np.int32).reshape(3, 4)
    got = roundtrip(arr, bytes)
    assert_same(got, arr)
    assert not got.flags.writeable
    got2 = roundtrip(arr, bytearray)
    assert got2.flags.writeable
    got2[0, 0] = 99
    assert got2[0, 0] == 99


def test_bytes_memoryview_and_bytearray_data_all_decode() -> None:
    arr = np.linspace(0, 1, 10)
    meta, buffers, _ = codec.encode([arr, arr[::3]])
    raw = join(buffers)
    for data in (raw, bytearray(raw), memoryview(raw)):
        got = codec.decode(meta, data)
        assert_same(got, [arr, arr[::3]])
    got = codec.decode(memoryview(meta), raw)
    assert_same(got, [arr, arr[::3]])


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.arange(24, dtype=np.float64).reshape(2, 3, 4),
        lambda: np.asfortranarray(np.arange(24, dtype=">i4").reshape(2, 3, 4)),
        lambda: np.arange(24, dtype=np.int16).reshape(4, 6).T,
        lambda: np.arange(100, dtype=np.uint8).reshape(10, 10)[::3, 1::4],
        lambda: np.arange(60, dtype=np.complex64).reshape(3, 4, 5)[:, ::-1, ::2],
        lambda: np.arange(10, dtype=np.float32)[::-1],
        lambda: np.array(3.5, dtype=np.float16),  # 0-d
        lambda: np.zeros((0, 3), dtype=np.int64),
        lambda: np.zeros((3, 0, 2), dtype=np.float32, order="F"),
        lambda: np.arange(5).astype("M8[D]"),
        lambda: np.array(["a", "bcd", ""], dtype="U3"),
        lambda: np.array([b"a", b"xyz"], dtype="S3"),
        lambda: np.ones((2, 1, 2, 1), dtype=bool),
        lambda: np.array([np.nan, -0.0, np.inf], dtype=">f8"),
    ],
    ids=lambda f: "",
)
def test_array_layouts_round_trip(make: Any) -> None:
    arr = make()
    assert_same(roundtrip(arr), arr)
    assert_same(roundtrip(arr, bytearray), arr)


def test_non_contiguous_inputs_really_are_non_contiguous() -> None:
    # Guards the parametrised cases above against numpy quietly making them contiguous.
    base = np.arange(100, dtype=np.uint8).reshape(10, 10)
    view = base[::3, 1::4]
    assert not view.flags.c_contiguous and not view.flags.f_contiguous
    assert_same(roundtrip(view), view)


def test_contiguous_arrays_are_sent_without_a_copy() -> None:
    for arr in (np.arange(64, dtype=np.float64).reshape(8, 8), np.asfortranarray(np.eye(8))):
        _, buffers, _ = codec.encode(arr)
        assert np.shares_memory(np.frombuffer(buffers[0], np.uint8), arr)


def test_array_offsets_are_8_byte_aligned() -> None:
    parts = [np.zeros(3, np.uint8), np.ones(5, np.float64), np.zeros(1, np.int16), np.ones(7)]
    meta, buffers, length = codec.encode(parts)
    heads = [msgpack.unpackb(e.data) for e in msgpack.unpackb(meta)]
    assert [h[2] % 8 for h in heads] == [0, 0, 0, 0]
    assert [h[2] for h in heads] == [0, 8, 48, 56]
    assert length == 112
    assert_same(codec.decode(meta, bytearray(join(buffers))), parts)


@FAST
@given(values_with_arrays)
def test_arrays_and_scalars_nested_in_containers_round_trip(value: Any) -> None:
    assume(tuple_depth(value) <= codec.MAX_TUPLE_DEPTH)
    assert_same(roundtrip(value), value)
    assert_same(roundtrip(value, bytearray), value)


def test_arrays_nested_in_lists_dicts_tuples() -> None:
    a = np.arange(6, dtype=np.int8).reshape(2, 3)
    b = np.asfortranarray(np.ones((3, 2), dtype=">f4"))
    value = {"frames": [a, (b, {"inner": [a.T, np.float32(1.5)]})], "n": (np.int64(-7),)}
    assert_same(roundtrip(value), value)


@FAST
@given(numpy_scalars)
def test_numpy_scalars_come_back_as_the_same_numpy_type(scalar: Any) -> None:
    got = roundtrip(scalar)
    assert_same(got, scalar)


@pytest.mark.parametrize(
    "scalar",
    [
        np.float32(1.5),
        np.float64(-0.0),
        np.float16(np.nan),
        np.int64(-(2**63)),
        np.uint64(2**64 - 1),
        np.int8(-1),
        np.bool_(True),
        np.complex64(1 - 2j),
        np.datetime64("2020-01-02T03:04:05", "ms"),
        np.datetime64("NaT", "ns"),  # (a generic-unit NaT is deprecated in NumPy 2.x)
        np.timedelta64(5, "s"),
        np.str_("héllo"),
        np.bytes_(b"\x00ab"),
        np.str_(""),
        np.bytes_(b""),
    ],
    ids=repr,
)
def test_numpy_scalar_edge_cases(scalar: Any) -> None:
    got = roundtrip(scalar)
    assert type(got) is type(scalar)
    assert_same(got, scalar)


# -- subclasses of the plain types (document-as-tested) -----------------------------------


class Color(enum.IntEnum):
    RED = 1
    HUGE = 2**70


class Flag(enum.IntFlag):
    A = 1
    B = 2


Point = collections.namedtuple("Point", "x y")


class MyStr(str):
    pass


@pytest.mark.parametrize(
    "value, want",
    [
        (Color.RED, 1),
        (Color.HUGE, 2**70),
        (Flag.A | Flag.B, 3),
        (collections.OrderedDict([("b", 1), ("a", 2)]), {"b": 1, "a": 2}),
        (collections.defaultdict(list, {"x": [1]}), {"x": [1]}),
        (Point(1, 2), (1, 2)),
        (Point(1, (2, 3)), (1, (2, 3))),
        (MyStr("abc"), "abc"),
        # Big ints inside subclass containers took the slow path without being widened.
        (collections.OrderedDict(a=2**70), {"a": 2**70}),
        (Point(2**64, -(2**70)), (2**64, -(2**70))),
        ([Color.HUGE, Point(Color.RED, 2**80)], [2**70, (1, 2**80)]),
    ],
    ids=repr,
)
def test_subclasses_travel_as_their_base_type(value: Any, want: Any) -> None:
    got = roundtrip(value)
    assert_same(got, want)


def test_bytes_like_values_travel_as_bytes() -> None:
    assert_same(roundtrip(bytearray(b"ab\x00")), b"ab\x00")
    assert_same(roundtrip(memoryview(b"xyz")), b"xyz")
    assert_same(roundtrip([memoryview(b"abcd").cast("I")]), [b"abcd"])


def test_ordered_dict_keeps_its_order() -> None:
    od = collections.OrderedDict((k, i) for i, k in enumerate("zyxabc"))
    assert list(roundtrip(od)) == list("zyxabc")


def test_bool_is_not_turned_into_int() -> None:
    got = roundtrip([True, False, {True: False}])
    assert_same(got, [True, False, {True: False}])


# -- refusals ----------------------------------------------------------------------------


class Custom:
    pass


@pytest.mark.parametrize(
    "value, name",
    [
        ({1, 2}, "set"),
        (frozenset([1]), "frozenset"),
        (object(), "object"),
        (Custom(), "Custom"),
        (1 + 2j, "complex"),
        (np.array([object(), 1], dtype=object), "dtype('O')"),
        (np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]), "('a'"),
        (np.zeros(2, dtype="V8"), "V8"),
        (np.void(b"ab"), "V2"),
        ([1, {"k": (2, [{3}])}], "set"),
        ((1, (2, (3, Custom()))), "Custom"),
        ({"k": [np.array([None])]}, "dtype('O')"),
        (range(3), "range"),
    ],
    ids=lambda v: type(v).__name__,
)
def test_unsendable_values_raise_type_error_naming_the_type(value: Any, name: str) -> None:
    with pytest.raises(TypeError) as info:
        codec.encode(value)
    assert name in str(info.value)


def test_the_encoder_is_usable_after_a_refused_value() -> None:
    arr = np.arange(10, dtype=np.int32)
    good = (arr, [1, (2, {"a": 2**70})], np.float32(2.5))
    for bad in ([arr, {1}], (1, (2, object())), {"a": (arr, Custom())}, [2**70, {1}]):
        with pytest.raises(TypeError):
            codec.encode(bad)
        meta, buffers, length = codec.encode(good)
        # Nothing of the refused value leaks into the next one's data section.
        assert length == 40 and len(buffers) == 1
        assert_same(codec.decode(meta, join(buffers)), good)


def test_lone_surrogates_cannot_be_sent() -> None:
    with pytest.raises(ValueError):
        codec.encode("\ud800")
    assert_same(roundtrip("ok"), "ok")


def test_deeply_nested_values_raise_value_error_on_encode() -> None:
    deep: Any = []
    for _ in range(2000):
        deep = [deep]
    with pytest.raises(ValueError):
        codec.encode(deep)
    assert_same(roundtrip([1]), [1])


def test_tuple_nesting_limit_is_the_same_on_both_sides() -> None:
    ok: Any = ()
    for _ in range(codec.MAX_TUPLE_DEPTH - 1):
        ok = (ok,)
    assert tuple_depth(ok) == codec.MAX_TUPLE_DEPTH
    assert_same(roundtrip(ok), ok)
    with pytest.raises(ValueError, match="nested too deeply"):
        codec.encode((ok,))
    # Lists between the tuples do not count.
    mixed: Any = ()
    for _ in range(100):
        mixed = [[mixed]]
    assert_same(roundtrip(mixed), mixed)


# -- hostile input ------------------------------------------------------------------------


def decode_or_value_error(meta: bytes, data: Optional[bytes] = None) -> Any:
    """decode() may return anything or raise ValueError; any other exception fails."""
    try:
        return codec.decode(meta, data)
    except ValueError:
        return None


@FAST
@given(st.binary(max_size=200), st.one_of(st.none(), st.binary(max_size=64)))
def test_random_bytes_raise_only_value_error(meta: bytes, data: Optional[bytes]) -> None:
    decode_or_value_error(meta, data)


ext_payloads = st.one_of(
    st.binary(max_size=40),
    st.lists(st.one_of(st.text(max_size=6), int64_range, st.binary(max_size=8)), max_size=6).map(
        msgpack.packb
    ),
)


@FAST
@given(
    st.lists(
        st.tuples(st.integers(min_value=-128, max_value=127), ext_payloads), min_size=1, max_size=4
    ),
    st.one_of(st.none(), st.binary(max_size=64)),
)
def test_random_extension_values_raise_only_value_error(
    exts: List[Any], data: Optional[bytes]
) -> None:
    meta = msgpack.packb([msgpack.ExtType(code & 0x7F, payload) for code, payload in exts])
    decode_or_value_error(meta, data)
    meta = msgpack.packb(msgpack.ExtType(codec.EXT_TUPLE, meta))
    decode_or_value_error(meta, data)


hostile_dtypes = st.one_of(
    st.sampled_from(
        ["O", "|O", "V8", "V0", "S0", "U0", "i4,i4", "(2,)i4", "M8", "<f8", "u1", "x", "", "S" * 40]
    ),
    st.text(max_size=10),
    int64_range,
    st.none(),
)
hostile_ints = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from([0, 1, 8, 2**31, 2**32, 2**40, 2**62, 2**63, 2**64 - 1, -1]),
)


@FAST
@given(
    hostile_dtypes,
    st.one_of(st.lists(hostile_ints, max_size=5), hostile_ints, st.none()),
    hostile_ints,
    hostile_ints,
    st.one_of(st.none(), st.binary(max_size=64)),
)
def test_lying_array_headers_raise_only_value_error(
    dtype: Any, shape: Any, offset: Any, nbytes: Any, data: Optional[bytes]
) -> None:
    got = decode_or_value_error(array_meta([dtype, shape, offset, nbytes]), data)
    if got is not None:
        # Whatever was accepted is backed by the data section: nothing was allocated
        # beyond what the peer actually sent.
        assert isinstance(got, np.ndarray)
        assert got.nbytes <= len(data or b"")


@pytest.mark.parametrize(
    "head",
    [
        ["O", [2], 0, 16],
        ["|O", [1], 0, 8],
        ["V8", [1], 0, 8],
        ["<i4,<i4", [1], 0, 8],
        ["(2,)i4", [1], 0, 8],
        ["S0", [2**33], 0, 0],  # would make numpy allocate 8 GiB
        ["U0", [2**31], 0, 0],
        ["not a dtype", [1], 0, 1],
        [7, [1], 0, 1],
        ["<" + "f8" * 40, [1], 0, 8],
        ["<f8", [2], 0, 8],  # nbytes does not match the shape
        ["<f8", [4], 0, 32],  # more bytes than the data section holds
        ["<f8", [1], 16, 8],  # offset past the end
        ["<f8", [2], 8, 16],  # runs past the end
        ["<f8", [1], -8, 8],
        ["<f8", [-1], 0, -8],
        ["<u1", [2**31, 2**31], 0, 2**62],  # honest about a size it never sent
        ["<u1", [2**64 - 1], 0, 2**64 - 1],
        ["<f8", [1] * 65, 0, 8],
        ["<f8", "1", 0, 8],
        ["<f8", [True], 0, 8],
        ["<f8", [1.0], 0, 8],
        ["<f8", [1], 0],
        ["<f8", [1], 0, 8, 1, 1],
        "not a list",
    ],
    ids=repr,
)
def test_specific_lying_array_headers_raise_value_error(head: Any) -> None:
    with pytest.raises(ValueError):
        codec.decode(array_meta(head), bytes(16))


def test_array_with_data_but_no_data_section_raises_value_error() -> None:
    with pytest.raises(ValueError, match="outside"):
        codec.decode(array_meta(["<f8", [1], 0, 8]), None)


def test_empty_array_with_a_huge_zero_sized_shape_is_fine() -> None:
    got = codec.decode(array_meta(["<f8", [0, 2**40], 0, 0]))
    assert got.shape == (0, 2**40) and got.size == 0


@pytest.mark.parametrize(
    "payload",
    [
        ["<f8"],
        ["<f8", b"\x00" * 4],
        ["<f8", "notbytes"],
        ["O", b"\x00" * 8],
        ["V2", b"ab"],
        [1, b"\x00"],
        "x",
        ["<f8", b"\x00" * 8, 1],
    ],
    ids=repr,
)
def test_bad_numpy_scalars_raise_value_error(payload: Any) -> None:
    with pytest.raises(ValueError):
        codec.decode(msgpack.packb(ext(codec.EXT_NPSCALAR, payload)))


@pytest.mark.parametrize(
    "meta",
    [
        msgpack.packb(msgpack.ExtType(99, b"")),  # unknown extension
        msgpack.packb(ext(codec.EXT_TUPLE, {"not": "a list"})),
        msgpack.packb(msgpack.ExtType(codec.EXT_TUPLE, b"\xc1")),  # never-used byte
        msgpack.packb([1, 2]) + b"\x00",  # trailing bytes
        b"\x92\x01",  # truncated
        b"\xa2\xff\xfe",  # str that is not UTF-8
        b"",
    ],
    ids=repr,
)
def test_malformed_documents_raise_value_error(meta: bytes) -> None:
    with pytest.raises(ValueError):
        codec.decode(meta)


def test_unhashable_map_keys_raise_value_error() -> None:
    meta = b"\x81" + msgpack.packb([1]) + msgpack.packb(1)  # {[1]: 1}
    with pytest.raises(ValueError):
        codec.decode(meta)


def test_big_int_extension_decodes_any_payload() -> None:
    # Documented as tested: the payload is a big-endian two's complement integer.
    assert codec.decode(msgpack.packb(msgpack.ExtType(codec.EXT_BIGINT, b""))) == 0
    assert codec.decode(msgpack.packb(msgpack.ExtType(codec.EXT_BIGINT, b"\xff"))) == -1


def nested_lists(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"


def nested_tuples(depth: int) -> bytes:
    inner = msgpack.packb([])
    for _ in range(depth):
        inner = msgpack.packb([msgpack.ExtType(codec.EXT_TUPLE, inner)])
    return inner


@pytest.mark.parametrize("depth", [2000, 100_000])
def test_deeply_nested_lists_and_maps_raise_value_error(depth: int) -> None:
    with pytest.raises(ValueError):
        codec.decode(nested_lists(depth))
    with pytest.raises(ValueError):
        codec.decode(b"\x81\xa1k" * depth + b"\xc0")


@pytest.mark.parametrize("depth", [codec.MAX_TUPLE_DEPTH + 1, 250, 5000])
def test_deeply_nested_tuples_raise_value_error_not_a_crash(depth: int) -> None:
    # Before the depth cap, ~200 levels overflowed the C stack and killed the process.
    with pytest.raises(ValueError, match="nested"):
        codec.decode(nested_tuples(depth))


def test_tuples_at_the_depth_limit_decode() -> None:
    got = codec.decode(nested_tuples(codec.MAX_TUPLE_DEPTH))
    assert tuple_depth(got) == codec.MAX_TUPLE_DEPTH


@FAST
@given(
    st.one_of(plain_values, big_ints, st.sampled_from([Color.RED, collections.OrderedDict(a=1)]))
)
def test_the_shared_plain_packer_gives_the_encoders_bytes_or_raises(value: Any) -> None:
    # The writers' fast path (codec.pack_plain) must give exactly what encode() gives,
    # or raise so that encode() is used: tuples, subclasses and big ints raise.
    assume(tuple_depth(value) <= codec.MAX_TUPLE_DEPTH)
    assert codec.pack_plain is not None  # a GIL build
    meta, _, _ = codec.encode(value)
    try:
        fast = codec.pack_plain(value)
    except (TypeError, OverflowError, ValueError):
        return
    assert fast == meta
    assert tuple_depth(value) == 0 and type(value) in (
        type(None),
        bool,
        int,
        float,
        str,
        bytes,
        list,
        dict,
    )


def test_the_shared_plain_packer_is_left_clean_by_a_failed_call() -> None:
    assert codec.pack_plain is not None
    with pytest.raises(TypeError):
        codec.pack_plain([1, "x" * 50, (2, 3)])  # fails halfway through the list
    assert codec.pack_plain([7]) == msgpack.packb([7])


def test_the_shared_plain_packer_serves_many_threads_at_once() -> None:
    import threading

    values = [[t, "x" * (10 + t), {"k": [t] * t}] for t in range(8)]
    want = [codec.encode(v)[0] for v in values]
    bad: List[Any] = []

    def run(t: int) -> None:
        for _ in range(20000):
            if codec.pack_plain(values[t]) != want[t]:
                bad.append(t)
                return

    threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not bad and not any(th.is_alive() for th in threads)


# -- BATCH bodies ------------------------------------------------------------------------


class Refused(Exception):
    """A BATCH decoder raised ValueError."""


def batch_outcome(decode: Any, body: bytes) -> Any:
    """What a BATCH decoder makes of ``body``: its result, or :class:`Refused` for a
    ValueError; any other exception fails the test."""
    try:
        return decode(body)
    except ValueError as exc:
        return Refused(str(exc))


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "ü", ""]), plain_values), max_size=12))
def test_a_batch_reduced_to_its_last_values_is_what_storing_each_item_leaves(
    pairs: List[Any],
) -> None:
    body = b"".join(msgpack.packb(ch) + codec.encode(value)[0] for ch, value in pairs)
    items = codec.decode_batch(body)
    count, last = codec.decode_batch_last(body)
    assert count == len(pairs) == len(items) // 2
    want: Dict[str, Any] = {}
    for i in range(0, len(items), 2):
        want[items[i]] = items[i + 1]
    assert list(last) == list(want)  # the order the channels first appear in
    for channel, value in want.items():
        assert_same(last[channel], value)


@given(
    st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), int64_range), max_size=12),
    st.lists(st.sets(st.sampled_from(["a", "b", "c", "d"]), max_size=2), max_size=3),
)
def test_a_batch_with_an_item_on_a_watched_channel_is_not_reduced(
    pairs: List[Any], watched: List[Any]
) -> None:
    body = b"".join(msgpack.packb(ch) + msgpack.packb(value) for ch, value in pairs)
    got = codec.decode_batch_last(body, watched)
    if any(ch in wanted for ch, _ in pairs for wanted in watched):
        assert got is None  # the caller decodes every item
    else:
        assert got == codec.decode_batch_last(body)


@FAST
@given(st.binary(max_size=200))
def test_both_batch_decoders_refuse_the_same_random_bodies(body: bytes) -> None:
    full = batch_outcome(codec.decode_batch, body)
    reduced = batch_outcome(codec.decode_batch_last, body)
    if isinstance(full, Refused):
        assert isinstance(reduced, Refused)
    else:
        assert not isinstance(reduced, Refused) and reduced[0] == len(full) // 2


@pytest.mark.parametrize(
    "body",
    [
        b"\x01\x02",  # a channel that is not a string
        b"\xa1a",  # a channel without its value
        b"\xa1a\x92\x01",  # a truncated value
        b"\xa1a\x01\xa1b",  # a last channel without its value
        b"\xa1a\xc7\x01\x01\x00",  # an array (ext 1) without a data section
        b"\xa1a\xc1",  # a reserved byte
        b"\xa1a\xa2\xff\xfe",  # a value that is not UTF-8 (and superseded below)
    ],
)
def test_a_malformed_batch_body_is_refused_even_if_a_later_value_supersedes_it(
    body: bytes,
) -> None:
    body += b"\xa1a\x01"  # a later, valid value on the same channel
    with pytest.raises(ValueError):
        codec.decode_batch(body)
    with pytest.raises(ValueError):
        codec.decode_batch_last(body)
