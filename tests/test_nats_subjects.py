"""Subject tokens: reversible, injective, never a wildcard or a token separator."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socketengine.transport.nats.subjects import (
    MAX_NAME_BYTES,
    Subjects,
    bucket_name,
    check_prefix,
    decode_token,
    encode_token,
)

TOKEN_CHARS = re.compile(r"[A-Za-z0-9_-]+")
names = st.text(max_size=80).filter(lambda s: len(s.encode("utf-8")) <= MAX_NAME_BYTES)
nasty = st.lists(
    st.sampled_from([".", "*", ">", " ", "\t", "\n", "_", "-", "é", "\x00", "a", "B", "9", "😀"]),
    max_size=20,
).map("".join)


@given(st.one_of(names, nasty))
@settings(max_examples=200)
def test_token_round_trips_and_is_one_safe_token(name: str) -> None:
    tok = encode_token(name)
    assert tok
    assert TOKEN_CHARS.fullmatch(tok), tok
    for bad in (".", "*", ">", " ", "\t", "\r", "\n"):
        assert bad not in tok
    assert decode_token(tok) == name


@given(st.one_of(names, nasty), st.one_of(names, nasty))
def test_token_is_injective(a: str, b: str) -> None:
    if a != b:
        assert encode_token(a) != encode_token(b)


@pytest.mark.parametrize(
    "name", ["", "*", ">", "a.b", "a b", "image.>", "_", "_2E", "x" * MAX_NAME_BYTES]
)
def test_awkward_names(name: str) -> None:
    tok = encode_token(name)
    assert "." not in tok and "*" not in tok and ">" not in tok and " " not in tok
    assert decode_token(tok) == name


def test_plain_names_stay_readable() -> None:
    assert encode_token("camera1") == "camera1"
    assert encode_token("front-cam") == "front-cam"
    assert encode_token("a.b") == "a_2Eb"


def test_limits_and_types() -> None:
    with pytest.raises(ValueError, match="at most 256"):
        encode_token("é" * 129, "channel name")
    with pytest.raises(TypeError):
        encode_token(b"abc")  # type: ignore[arg-type]


@pytest.mark.parametrize("tok", ["", "a.b", "*", "_2", "_zz", "_41", "_FF", "a b", "__"])
def test_decode_refuses_what_encode_never_makes(tok: str) -> None:
    with pytest.raises(ValueError):
        decode_token(tok)


@given(st.one_of(names, nasty), st.one_of(names, nasty), st.one_of(names, nasty))
def test_subjects_parse_back(host: str, client: str, channel: str) -> None:
    s = Subjects("se.test")
    for kind, subject, name in [
        ("in", s.host_inbox(host, client), client),
        ("c", s.client_inbox(host, client), client),
        ("b", s.broadcast(host, channel), channel),
        ("p", s.presence(host, client), client),
    ]:
        assert len(subject.split(".")) == 6  # se.test.h.H.kind.X: exactly one token each
        parsed = s.parse(subject)
        assert (parsed.kind, parsed.host, parsed.name) == (kind, host, name)
    parsed = s.parse(s.host_announce(host))
    assert (parsed.kind, parsed.host) == ("hosts", host)


def test_wildcards_only_where_intended() -> None:
    s = Subjects()
    assert s.host_inbox_all("h") == "se.h.h.in.*"
    assert s.broadcast_all("h") == "se.h.h.b.*"
    assert "*" not in s.broadcast("h", "*") and ">" not in s.broadcast("h", ">")


@pytest.mark.parametrize("prefix", ["", "a..b", ".a", "a.", "a b", "a.*", ">", "a.>"])
def test_bad_prefix(prefix: str) -> None:
    with pytest.raises(ValueError):
        check_prefix(prefix)


@given(names, names)
def test_bucket_names_are_valid_and_distinct(a: str, b: str) -> None:
    na, nb = bucket_name("se", "retained", a), bucket_name("se", "retained", b)
    assert TOKEN_CHARS.fullmatch(na) and len(na) <= 80
    if a != b:
        assert na != nb
