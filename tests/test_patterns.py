"""Channel patterns, the Matcher index, Interest and the wire form of keys."""

from __future__ import annotations

import threading
from typing import List, Sequence, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from socketengine import patterns
from socketengine.errors import ProtocolError
from socketengine.patterns import Interest, Matcher, Pattern, from_wire, to_wire

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# the model tests draw a lot per example: fewer examples keep them well inside the timeout
MODEL = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- reference matcher: the syntax, written as plainly as possible ----------------------------


def ref_match(pattern: str, name: str) -> bool:
    """Level by level, recursively: the definition in the module docstring."""
    return _ref(pattern.split("/"), name.split("/"))


def _ref(p: Sequence[str], n: Sequence[str]) -> bool:
    if not p:
        return not n
    if p[0] == "#":
        return True  # zero or more levels, and it is the last one
    if not n:
        return False
    if p[0] == "+" or p[0] == n[0]:
        return _ref(p[1:], n[1:])
    return False


# Level alphabets small enough that random names and patterns often meet.
LITERAL = st.sampled_from(["a", "b", "", "ab", "*", "x y", "é", "\n", "a.b"])
PAT_LEVEL = st.one_of(LITERAL, st.just("+"))


@st.composite
def pattern_texts(draw: st.DrawFn) -> str:
    levels = draw(st.lists(PAT_LEVEL, min_size=0, max_size=5))
    if draw(st.booleans()) or not levels:
        levels.append("#")
    text = "/".join(levels)
    return text if text else "#"


@st.composite
def channel_names(draw: st.DrawFn) -> str:
    # names may contain wildcard characters: they are literal in names
    level = st.one_of(LITERAL, st.sampled_from(["+", "#", "a+", "#b"]))
    return "/".join(draw(st.lists(level, min_size=1, max_size=6)))


# -- Pattern ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("sensors/+/temp", "sensors/left/temp", True),
        ("sensors/+/temp", "sensors/temp", False),
        ("sensors/+/temp", "sensors/a/b/temp", False),
        ("sensors/+/temp", "sensors//temp", True),  # an empty level is a level
        ("robot1/#", "robot1", True),  # '#' matches zero levels
        ("robot1/#", "robot1/arm", True),
        ("robot1/#", "robot1/arm/joint3", True),
        ("robot1/#", "robot10/arm", False),
        ("robot1/#", "robot", False),
        ("#", "", True),
        ("#", "anything/at/all", True),
        ("+", "", True),
        ("+", "a", True),
        ("+", "a/b", False),
        ("+/+", "a/b", True),
        ("+/#", "a", True),
        ("a/*", "a/b", False),  # '*' is literal
        ("a/*", "a/*", True),
        ("a.b/+", "axb/c", False),  # regex characters are literal
        ("a/b", "a/b", True),  # no wildcard: exactly one name
        ("a/b", "a/b/c", False),
        ("x/+", "x/line\nbreak", True),
    ],
)
def test_pattern_match(pattern: str, name: str, expected: bool) -> None:
    assert Pattern(pattern).match(name) is expected
    assert ref_match(pattern, name) is expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty pattern"),
        ("a/#/b", "must be the last level"),
        ("#/#", "must be the last level"),
        ("a+", "mixes"),
        ("a/b+/c", "mixes"),
        ("a/#b", "mixes"),
        ("++", "mixes"),
        ("x/" + "é" * 200, "the limit is 256"),
        ("a/\udc80", "not valid Unicode"),
    ],
)
def test_malformed_patterns_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Pattern(text)


@pytest.mark.parametrize("value", [None, b"a/+", 3, ["a"]])
def test_pattern_must_be_a_str(value: object) -> None:
    with pytest.raises(TypeError, match="written as a str"):
        Pattern(value)  # type: ignore[arg-type]


def test_pattern_length_limit_is_in_utf8_bytes() -> None:
    Pattern("a" * 256)
    with pytest.raises(ValueError, match="257 UTF-8 bytes"):
        Pattern("a" * 257)
    Pattern("é" * 128)  # 256 bytes
    with pytest.raises(ValueError):
        Pattern("é" * 128 + "a")


def test_pattern_value_semantics() -> None:
    p = Pattern("a/+")
    assert p == Pattern("a/+")
    assert p != Pattern("a/#")
    assert p != "a/+"  # a str is an exact name, never equal to a pattern
    assert hash(p) == hash(Pattern("a/+"))
    assert len({p, Pattern("a/+"), Pattern("a/#")}) == 2
    assert repr(p) == "Pattern('a/+')"
    assert str(p) == "a/+"
    assert p.text == "a/+"
    assert p.levels == ("a", "+")
    assert not p.is_literal
    assert Pattern("a/b").is_literal
    with pytest.raises(AttributeError):
        p._text = "b"  # type: ignore[misc]
    assert p.text == "a/+"


@FAST
@given(pattern_texts(), channel_names())
def test_pattern_agrees_with_reference(pattern: str, name: str) -> None:
    assert Pattern(pattern).match(name) == ref_match(pattern, name)


def ref_valid(text: str) -> bool:
    """The syntax rules of the module docstring, written out."""
    if not text or any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        return False
    if len(text.encode("utf-8")) > 256:
        return False
    levels = text.split("/")
    if "#" in levels[:-1]:
        return False
    return all(lvl in ("+", "#") or ("+" not in lvl and "#" not in lvl) for lvl in levels)


@FAST
@given(
    st.one_of(
        st.text(max_size=40),
        st.lists(st.sampled_from(["a", "+", "#", "", "a+", "#b", "é"]), max_size=6).map("/".join),
        st.text(alphabet="a/+#é", min_size=60, max_size=140),
    )
)
def test_pattern_accepts_exactly_the_valid_syntax(text: str) -> None:
    try:
        p = Pattern(text)
    except ValueError:
        assert not ref_valid(text)
    else:
        assert ref_valid(text)
        assert p.text == text
        assert p.match(text) == ref_match(text, text)


# -- Matcher ----------------------------------------------------------------------------------


def test_matcher_exact_and_patterns_in_insertion_order() -> None:
    m: Matcher[str] = Matcher()
    assert m.add(Pattern("sensors/#"), "all")
    assert m.add("sensors/left/temp", "exact")
    assert m.add(Pattern("sensors/+/temp"), "temps")
    assert m.add(Pattern("other/+"), "other")
    assert m.match("sensors/left/temp") == (
        (Pattern("sensors/#"), "all"),
        ("sensors/left/temp", "exact"),
        (Pattern("sensors/+/temp"), "temps"),
    )
    assert m.match("sensors/right/temp") == (
        (Pattern("sensors/#"), "all"),
        (Pattern("sensors/+/temp"), "temps"),
    )
    assert m.match("nothing") == ()
    assert m.items_for("other/x") == ["other"]
    assert len(m) == 4


def test_str_keys_with_wildcard_characters_stay_exact() -> None:
    m: Matcher[int] = Matcher()
    m.add("a/+", 1)
    m.add("#", 2)
    m.add("a/*", 3)
    assert m.match("a/b") == ()
    assert m.match("x") == ()
    assert m.match("a/+") == (("a/+", 1),)
    assert m.match("#") == (("#", 2),)
    assert m.match("a/*") == (("a/*", 3),)


def test_matcher_add_is_idempotent_and_remove_works() -> None:
    m: Matcher[str] = Matcher()
    assert m.add(Pattern("a/+"), "x")
    assert not m.add(Pattern("a/+"), "x")
    assert m.add(Pattern("a/+"), "y")
    assert m.add("a/b", "x")  # same item, other key (a str, not the pattern)
    assert m.match("a/b") == ((Pattern("a/+"), "x"), (Pattern("a/+"), "y"), ("a/b", "x"))
    m.remove(Pattern("a/+"), "x")
    assert m.match("a/b") == ((Pattern("a/+"), "y"), ("a/b", "x"))
    with pytest.raises(KeyError):
        m.remove(Pattern("a/+"), "x")
    assert not m.discard(Pattern("a/+"), "x")
    assert not m.discard(Pattern("a/b"), "x")  # a literal pattern is not the str key
    m.remove("a/b", "x")
    m.remove(Pattern("a/+"), "y")
    assert m.match("a/b") == ()
    assert len(m) == 0 and not m
    m.add(Pattern("#"), "z")
    m.clear()
    assert m.match("q") == () and not m


def test_matcher_cache_is_invalidated_by_add_and_remove() -> None:
    m: Matcher[int] = Matcher()
    m.add(Pattern("a/+"), 1)
    assert m.match("a/b") == ((Pattern("a/+"), 1),)
    assert m.match("a/b") == ((Pattern("a/+"), 1),)  # from the cache
    m.add(Pattern("a/b"), 2)
    assert m.match("a/b") == ((Pattern("a/+"), 1), (Pattern("a/b"), 2))
    m.remove(Pattern("a/+"), 1)
    assert m.match("a/b") == ((Pattern("a/b"), 2),)


def test_matcher_cache_is_bounded() -> None:
    m: Matcher[int] = Matcher([(Pattern("#"), 1)])
    for i in range(patterns.CACHE_SIZE + 100):
        assert m.match(f"c{i}") == ((Pattern("#"), 1),)
    assert len(m._index.cache) == patterns.CACHE_SIZE
    assert m.match("new") == ((Pattern("#"), 1),)  # still right past the bound


def test_matcher_rejects_other_key_types() -> None:
    m: Matcher[int] = Matcher()
    with pytest.raises(TypeError, match="exact channel name"):
        m.add(b"a", 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        m.discard(1, 1)  # type: ignore[arg-type]


def test_matcher_items_keys_iter_repr() -> None:
    m: Matcher[str] = Matcher([("a", "1"), (Pattern("b/#"), "2")])
    assert m.items() == (("a", "1"), (Pattern("b/#"), "2"))
    assert list(m) == list(m.items())
    assert m.keys() == frozenset({"a", Pattern("b/#")})
    assert "Pattern('b/#')" in repr(m)


Op = Tuple[bool, str, bool, int]  # (add?, text, is_pattern?, item)


@MODEL
@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.one_of(pattern_texts(), channel_names()),
            st.booleans(),
            st.integers(0, 2),
        ),
        max_size=40,
    ),
    st.lists(channel_names(), min_size=1, max_size=8),
)
def test_matcher_agrees_with_a_list_model(ops: List[Op], names: List[str]) -> None:
    m: Matcher[int] = Matcher()
    model: List[Tuple[object, int]] = []  # (key, item) in insertion order
    for i, (adding, text, is_pattern, item) in enumerate(ops):
        try:
            key: patterns.Key = Pattern(text) if is_pattern else text
        except ValueError:
            continue  # a name drawn as a pattern may be malformed
        pair = (key, item)
        present = any(type(k) is type(key) and k == key and it == item for k, it in model)
        if adding:
            assert m.add(key, item) is not present
            if not present:
                model.append(pair)
        else:
            assert m.discard(key, item) is present
            if present:
                model = [p for p in model if not (type(p[0]) is type(key) and p == pair)]
        if i % 5 == 0:  # fill the cache between updates, so invalidation is exercised
            for name in names:
                m.match(name)
    for name in names:
        expected = tuple(
            (k, it)
            for k, it in model
            if (ref_match(k.text, name) if isinstance(k, Pattern) else k == name)
        )
        assert m.match(name) == expected
        assert m.match(name) == expected  # cached
    assert len(m) == len(model)


def test_matcher_readers_see_consistent_indexes_while_writers_update() -> None:
    """Readers never lock: while a writer adds and removes, every result is one a
    consistent index could give (the permanent entry always there, nothing foreign)."""
    m: Matcher[int] = Matcher()
    m.add(Pattern("s/#"), -1)
    stop = threading.Event()
    errors: List[str] = []
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            for name in ("s/a", "s/b/c", "s/a/x"):
                result = m.match(name)
                if result[0] != (Pattern("s/#"), -1):
                    errors.append(f"{name}: {result!r}")
                for key, item in result[1:]:
                    if not (isinstance(key, Pattern) and key.match(name)):
                        errors.append(f"{name}: foreign {key!r}")
                    if item < 0:
                        errors.append(f"{name}: duplicate {item}")
            reads[0] += 1

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        keys = [Pattern("s/+"), Pattern("s/+/+"), Pattern("s/a/#"), Pattern("+/b/+")]
        for rnd in range(300):
            for i, k in enumerate(keys):
                m.add(k, rnd * 10 + i)
            for i, k in enumerate(keys):
                m.remove(k, rnd * 10 + i)
        # make sure readers really overlapped with writes: wait until they have read more
        deadline = 2000
        while reads[0] < 50 and deadline:
            deadline -= 1
            m.add(keys[0], 1)
            m.remove(keys[0], 1)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors[:5]
    assert reads[0] > 0
    assert m.match("s/a") == ((Pattern("s/#"), -1),)


# -- Interest ---------------------------------------------------------------------------------


def test_interest_wants() -> None:
    i = Interest(["status", Pattern("sensors/+/temp"), Pattern("log/#"), "a/+"])
    assert i.wants("status")
    assert i.wants("sensors/x/temp")
    assert i.wants("log")
    assert i.wants("log/a/b")
    assert i.wants("a/+")
    assert not i.wants("a/b")  # "a/+" as a str is exact
    assert not i.wants("sensors/x/pressure")
    assert not i.wants("statu")
    assert not i.everything


@pytest.mark.parametrize("declared", [None, [], (), set()])
def test_empty_interest_wants_everything(declared: object) -> None:
    i = Interest(declared)  # type: ignore[arg-type]
    assert i.everything
    assert i.wants("anything") and i.wants("")


def test_interest_exact_only_and_updated() -> None:
    i = Interest(["a"])
    assert i.wants("a") and not i.wants("b")
    j = i.updated(add=[Pattern("b/#")], remove=["a"])
    assert not j.wants("a") and j.wants("b/c")
    assert i.wants("a")  # the original is unchanged
    assert j == Interest([Pattern("b/#")])
    assert hash(j) == hash(Interest([Pattern("b/#")]))
    assert j.updated(remove=[Pattern("b/#")]).everything


def test_interest_rejects_bad_keys() -> None:
    with pytest.raises(TypeError, match="iterable of keys"):
        Interest("abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Interest([1])  # type: ignore[list-item]


@MODEL
@given(st.lists(st.one_of(pattern_texts(), channel_names()), max_size=8), st.data())
def test_interest_agrees_with_reference(texts: List[str], data: st.DataObject) -> None:
    keys: List[patterns.Key] = []
    for t in texts:
        if data.draw(st.booleans()):
            keys.append(t)
        else:
            try:
                keys.append(Pattern(t))
            except ValueError:
                keys.append(t)
    interest = Interest(keys)
    for name in data.draw(st.lists(channel_names(), min_size=1, max_size=5)):
        expected = not keys or any(
            ref_match(k.text, name) if isinstance(k, Pattern) else k == name for k in keys
        )
        assert interest.wants(name) is expected
        assert interest.wants(name) is expected


# -- wire -------------------------------------------------------------------------------------


def test_wire_round_trip() -> None:
    assert to_wire("a/+") == {"c": "a/+"}
    assert to_wire(Pattern("a/+")) == {"p": "a/+"}
    assert from_wire({"c": "a/+"}) == "a/+"
    assert type(from_wire({"c": "a/+"})) is str
    assert from_wire({"p": "a/+"}) == Pattern("a/+")
    i = Interest(["x", Pattern("a/#"), ""])
    wire = i.to_wire()
    assert wire == [{"c": ""}, {"c": "x"}, {"p": "a/#"}]
    assert Interest.from_wire(wire) == i
    assert Interest.from_wire(None).everything
    with pytest.raises(TypeError):
        to_wire(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ("a", "is a map"),
        ({}, "is a map"),
        ({"c": "a", "p": "b"}, "is a map"),
        ({"x": "a"}, "unknown key tag"),
        ({1: "a"}, "unknown key tag"),
        ({"c": b"a"}, "is a str"),
        ({"p": None}, "is a str"),
        ({"p": "a/#/b"}, "malformed pattern"),
        ({"p": ""}, "malformed pattern"),
        ({"p": "a" * 300}, "malformed pattern"),
        ({"c": "a" * 0x10000}, "the limit is 65535"),
        ({"c": "\ud800"}, "not valid Unicode"),
        ([("c", "a")], "is a map"),
    ],
)
def test_from_wire_refuses_malformed_keys(obj: object, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        from_wire(obj)


def test_interest_from_wire_refuses_malformed() -> None:
    with pytest.raises(ProtocolError, match="list of keys"):
        Interest.from_wire({"c": "a"})
    with pytest.raises(ProtocolError, match="MAX_INTEREST_KEYS=3"):
        Interest.from_wire([{"c": str(i)} for i in range(4)], max_keys=3)
    with pytest.raises(ProtocolError, match="malformed pattern"):
        Interest.from_wire([{"c": "a"}, {"p": "#/a"}])


def _keys_of(sizes: Sequence[int], tag: str = "c") -> List[dict]:
    """Distinct wire keys of these UTF-8 sizes (>= 4 bytes each)."""
    return [{tag: f"{i:04x}".ljust(size, "x")} for i, size in enumerate(sizes)]


def test_interest_from_wire_enforces_the_protocol_limits() -> None:
    # A declared interest becomes a pattern index of up to ~250 bytes per level: a host
    # accepts MAX_INTEREST_KEYS keys of MAX_INTEREST_BYTES together, no more, and says
    # which limit the peer crossed.
    keys, total = patterns.MAX_INTEREST_KEYS, patterns.MAX_INTEREST_BYTES
    assert (keys, total) == (2048, 32 * 1024)
    at_limit = _keys_of([total // keys] * keys)
    assert len(Interest.from_wire(at_limit).keys) == keys
    with pytest.raises(ProtocolError, match=f"MAX_INTEREST_KEYS={keys}"):
        Interest.from_wire(at_limit + [{"c": "one more"}])
    full = _keys_of([256] * (total // 256), "p")  # exactly the limit, as patterns
    assert len(Interest.from_wire(full).keys) == total // 256
    with pytest.raises(ProtocolError, match=f"MAX_INTEREST_BYTES={total}"):
        Interest.from_wire(full + [{"c": "x"}])
    # UTF-8 bytes, not characters: 10,923 three-byte characters are 32,769 bytes
    with pytest.raises(ProtocolError, match="MAX_INTEREST_BYTES"):
        Interest.from_wire([{"c": "\u20ac" * 10_923}])
    assert Interest.from_wire([{"c": "\u20ac" * 10_922}]).keys == {"\u20ac" * 10_922}


def test_an_interest_beyond_the_limit_is_refused_before_the_rest_is_parsed() -> None:
    # Key by key: the keys after the one that crosses MAX_INTEREST_BYTES are never
    # parsed (here the next one is malformed: the error is the limit's, not its).
    wire = [{"c": "x" * patterns.MAX_INTEREST_BYTES}, {"c": "y"}, {"p": "#/a"}]
    with pytest.raises(ProtocolError, match="MAX_INTEREST_BYTES"):
        Interest.from_wire(wire)


def test_the_audit_interest_of_a_megabyte_is_refused() -> None:
    # 4096 patterns of 256 bytes (~1 MB on the wire) used to build a ~250 MB index.
    wire = [{"p": f"{i:x}" + "/" * (256 - len(f"{i:x}"))} for i in range(4096)]
    with pytest.raises(ProtocolError, match="MAX_INTEREST_KEYS"):
        Interest.from_wire(wire)
    with pytest.raises(ProtocolError, match="MAX_INTEREST_BYTES"):
        Interest.from_wire(wire[:2048])


def test_interest_declared_refuses_what_a_host_would_refuse() -> None:
    keys, total = patterns.MAX_INTEREST_KEYS, patterns.MAX_INTEREST_BYTES
    names = [f"{i:04x}" for i in range(keys)]
    assert len(Interest.declared(names + names).keys) == keys  # duplicates count once
    with pytest.raises(ValueError, match=f"MAX_INTEREST_KEYS={keys}") as info:
        Interest.declared(names + ["one more"])
    assert "Pattern(" in str(info.value)  # tells what to do instead
    with pytest.raises(ValueError, match=f"MAX_INTEREST_BYTES={total}"):
        Interest.declared(["a" * total, Pattern("b")])
    assert Interest.declared(["a" * (total - 1), Pattern("b")]).keys == {
        "a" * (total - 1),
        Pattern("b"),
    }
    with pytest.raises(TypeError):
        Interest.declared("abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Interest.declared([1])  # type: ignore[list-item]
    # what declared() accepts, from_wire() accepts: the same keys, the same count
    biggest = Interest.declared(_wire_names(keys, total))
    assert Interest.from_wire(biggest.to_wire()) == biggest


def _wire_names(keys: int, total: int) -> List[str]:
    base, extra = divmod(total, keys)
    return [f"{i:04x}".ljust(base + (i < extra), "n") for i in range(keys)]


def test_interest_built_at_once_matches_like_one_built_key_by_key() -> None:
    # Interest builds its index in one pass (no path copying); Matcher adds key by key.
    keys: List[object] = [
        Pattern("a/+/c"),
        Pattern("a/#"),
        Pattern("+"),
        Pattern("+/+"),
        Pattern("//"),
        Pattern("#"),
        Pattern("x/y"),
        "x/+",
        "",
    ]
    names = ["", "a", "a/b", "a/b/c", "a/b/c/d", "x", "x/y", "x/+", "/", "//", "///", "q/r"]
    for n in range(len(keys) + 1):
        chosen = keys[:n]
        interest = Interest(chosen)  # type: ignore[arg-type]
        matcher: Matcher[int] = Matcher((k, 0) for k in chosen)  # type: ignore[misc]
        for name in names:
            assert interest.wants(name) is (not chosen or bool(matcher.match(name))), (n, name)


@FAST
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10) | st.binary(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.text(max_size=2) | st.integers(), inner, max_size=3)
        ),
        max_leaves=8,
    )
)
def test_from_wire_garbage_raises_only_protocol_error(obj: object) -> None:
    try:
        key = from_wire(obj)
    except ProtocolError:
        pass
    else:
        assert to_wire(key) == obj
    try:
        interest = Interest.from_wire(obj)
    except ProtocolError:
        pass
    else:
        assert obj is None or len(interest.keys) <= len(obj)  # type: ignore[arg-type]


# -- the benchmark runs -----------------------------------------------------------------------


def test_bench_patterns_runs() -> None:
    """Smoke test of bench/patterns.py: it runs and prints a row per size (no timing checks)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "patterns.py").exists():
        pytest.skip("bench/ is not in this checkout")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.patterns", "--runs", "1", "--sizes", "1,20"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| 1 |", "| 20 |"))]
    assert len(rows) == 2
    assert all(line.count("|") == 8 for line in rows)
