"""protocol: two Protocol state machines talking to each other in memory.

Bytes from ``data_to_send()`` are copied into the other side's decoder through
``get_buffer()`` / ``buffer_updated()``, exactly as the I/O layer does, and
``events()`` is called after every delivery.  Every byte sent is recorded so that
tests can check the shared secret never travels.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socketengine import frames
from socketengine.errors import (
    AuthenticationError,
    HandshakeError,
    HostBusy,
    MessageTooBig,
    ProtocolError,
)
from socketengine.frames import Frame, FrameDecoder
from socketengine.protocol import Protocol, Role, State, token_bytes
from socketengine.state import Admission

FAST = settings(max_examples=100, deadline=None)

HOST_TOKEN = b"correct horse battery staple"


# -- helpers ---------------------------------------------------------------------------


def deliver(p: Protocol, data: bytes, chunk: Optional[int] = None) -> None:
    """Copy ``data`` into ``p``'s decoder as recv_into would (optionally in chunks)."""
    view = memoryview(data)
    while view:
        buf = p.decoder.get_buffer()
        n = min(len(buf), len(view), chunk or len(view))
        buf[:n] = view[:n]
        view = view[n:]
        p.decoder.buffer_updated(n)


def raw_frame(ftype: int, value: Any = None, channel: str = "", fid: int = 0) -> bytes:
    return b"".join(
        bytes(memoryview(p)) for p in frames.encode_value_frame(ftype, channel, value, fid=fid)
    )


class Link:
    """A host and a client Protocol joined by an in-memory 'wire' that records everything."""

    def __init__(self, host: Protocol, client: Protocol) -> None:
        self.host = host
        self.client = client
        self.sent: List[bytes] = []
        self.host_events: List[Frame] = []
        self.client_events: List[Frame] = []

    def to_host(self, chunk: Optional[int] = None) -> bool:
        data = self.client.data_to_send()
        if not data:
            return False
        self.sent.append(data)
        deliver(self.host, data, chunk)
        self.host_events += self.host.events()
        return True

    def to_client(self, chunk: Optional[int] = None) -> bool:
        data = self.host.data_to_send()
        if not data:
            return False
        self.sent.append(data)
        deliver(self.client, data, chunk)
        self.client_events += self.client.events()
        return True

    def run(self, chunk: Optional[int] = None) -> None:
        """Shuttle bytes both ways until neither side has anything to send."""
        for _ in range(10):
            moved = self.to_host(chunk)
            moved = self.to_client(chunk) or moved
            if not moved:
                return
        raise AssertionError("the handshake did not settle")

    @property
    def wire(self) -> bytes:
        return b"".join(self.sent)


def link(
    host_token: Optional[bytes] = None,
    client_token: Optional[bytes] = None,
    name: Optional[str] = "cam-1",
    **kwargs: Any,
) -> Link:
    return Link(
        Protocol(Role.HOST, token=host_token, session=kwargs.pop("session", 0), **kwargs),
        Protocol(Role.CLIENT, name=name, token=client_token, **kwargs),
    )


def opened(host_token: Optional[bytes] = None, client_token: Optional[bytes] = None) -> Link:
    lk = link(host_token, client_token)
    lk.run()
    assert lk.host.is_open and lk.client.is_open
    return lk


def frame_types(data: bytes, preamble: bool = False) -> List[int]:
    return [f.type for f in FrameDecoder(expect_preamble=preamble).feed(data)]


# -- successful handshakes -------------------------------------------------------------


def test_no_token_both_open_and_host_learns_the_client_name() -> None:
    lk = link(session=42)
    assert lk.host.state is State.HANDSHAKE and lk.client.state is State.HANDSHAKE
    lk.run()
    assert lk.host.is_open and lk.client.is_open
    assert lk.host.peer_name == "cam-1"
    assert lk.client.session == 42
    assert lk.host_events == [] and lk.client_events == []  # handshake frames are consumed
    assert lk.host.data_to_send() == b"" and lk.client.data_to_send() == b""


def test_wire_sequence_without_token() -> None:
    lk = link()
    hello = lk.client.data_to_send()
    assert hello.startswith(frames.PREAMBLE)
    assert frame_types(hello, preamble=True) == [frames.HELLO]
    deliver(lk.host, hello)
    assert lk.host.events() == []
    assert frame_types(lk.host.data_to_send(), preamble=True) == [frames.WELCOME]


def test_anonymous_client() -> None:
    lk = link(name=None)
    lk.run()
    assert lk.host.is_open and lk.host.peer_name is None


@pytest.mark.parametrize(
    "token",
    [HOST_TOKEN, token_bytes("pässwörd as a str"), token_bytes("x" * 1000), bytes(range(256))],
    ids=["bytes", "str", "long", "binary"],
)
def test_matching_tokens_open_both_sides(token: bytes) -> None:
    lk = link(token, token)
    lk.run()
    assert lk.host.is_open and lk.client.is_open
    assert lk.host.peer_name == "cam-1"
    assert token not in lk.wire


def test_wire_sequence_with_token() -> None:
    lk = link(HOST_TOKEN, HOST_TOKEN)
    lk.to_host()
    assert frame_types(lk.sent[-1], preamble=True) == [frames.HELLO]
    lk.to_client()
    assert frame_types(lk.sent[-1], preamble=True) == [frames.CHALLENGE]
    assert not lk.host.is_open and not lk.client.is_open
    lk.to_host()
    assert frame_types(lk.sent[-1]) == [frames.AUTH]
    assert lk.host.is_open and not lk.client.is_open
    lk.to_client()
    assert frame_types(lk.sent[-1]) == [frames.WELCOME]
    assert lk.client.is_open


def test_token_bytes_normalises_str_and_refuses_empty_or_other_types() -> None:
    assert token_bytes(None) is None
    assert token_bytes("é") == "é".encode()
    assert token_bytes(b"x") == b"x"
    assert token_bytes(bytearray(b"x")) == b"x"  # type: ignore[arg-type]
    for bad in ("", b"", 123, ["x"]):
        with pytest.raises(TypeError):
            token_bytes(bad)  # type: ignore[arg-type]


@FAST
@given(
    st.binary(min_size=8, max_size=64),
    st.one_of(
        st.none(),
        st.text(max_size=256).filter(lambda t: len(t.encode("utf-8", "surrogatepass")) <= 256),
    ),
    st.integers(min_value=1, max_value=64),
)
def test_handshake_survives_any_chunking_and_never_sends_the_token(
    token: bytes, name: Optional[str], chunk: int
) -> None:
    lk = link(token, token, name=name)
    lk.run(chunk)
    assert lk.host.is_open and lk.client.is_open
    assert lk.host.peer_name == name
    assert token not in lk.wire


# -- refused handshakes ----------------------------------------------------------------


def test_wrong_token_host_raises_and_client_receives_refuse() -> None:
    lk = link(HOST_TOKEN, b"not the right token at all")
    lk.to_host()  # HELLO
    lk.to_client()  # CHALLENGE
    with pytest.raises(AuthenticationError, match="wrong token"):
        lk.to_host()  # AUTH with a wrong mac
    assert lk.host.state is State.CLOSED
    refuse = lk.host.data_to_send()
    assert frame_types(refuse) == [frames.REFUSE]
    lk.sent.append(refuse)
    deliver(lk.client, refuse)
    with pytest.raises(AuthenticationError, match="refused the token"):
        lk.client.events()
    assert lk.client.state is State.CLOSED
    assert HOST_TOKEN not in lk.wire and b"not the right token at all" not in lk.wire


def test_client_without_token_to_a_token_host() -> None:
    lk = link(HOST_TOKEN, None)
    lk.to_host()
    with pytest.raises(AuthenticationError, match="requires a token"):
        lk.to_client()  # CHALLENGE
    assert lk.client.state is State.CLOSED
    assert HOST_TOKEN not in lk.wire


def test_client_with_token_to_a_host_without_one() -> None:
    lk = link(None, HOST_TOKEN)
    lk.to_host()  # the host opens: it asked for nothing
    assert lk.host.is_open
    with pytest.raises(AuthenticationError, match="did not ask for the token"):
        lk.to_client()  # WELCOME without a mac
    assert lk.client.state is State.CLOSED
    assert HOST_TOKEN not in lk.wire


def test_authentication_error_is_a_handshake_and_connection_error() -> None:
    assert issubclass(AuthenticationError, HandshakeError)
    assert issubclass(AuthenticationError, ConnectionError)


def test_host_that_cannot_prove_the_token() -> None:
    """A host that skips the proof (WELCOME without the right mac) is refused."""
    client = Protocol(Role.CLIENT, name="c", token=HOST_TOKEN)
    client.data_to_send()
    challenge = raw_frame(frames.CHALLENGE, {"nonce": b"n" * 16})
    deliver(client, frames.PREAMBLE + challenge)
    assert client.events() == []
    assert frame_types(client.data_to_send()) == [frames.AUTH]
    deliver(client, raw_frame(frames.WELCOME, {"v": 1, "id": 0, "mac": b"m" * 32}))
    with pytest.raises(AuthenticationError, match="could not prove"):
        client.events()


def test_host_refuse_reaches_the_client_as_handshake_error() -> None:
    lk = link()
    hello = lk.client.data_to_send()
    deliver(lk.host, hello)
    lk.host.decoder.take()  # the host decides before processing, e.g. too many clients
    lk.host.refuse("too many clients")
    assert lk.host.state is State.CLOSED
    deliver(lk.client, lk.host.data_to_send())
    with pytest.raises(HandshakeError, match="too many clients") as info:
        lk.client.events()
    assert not isinstance(info.value, AuthenticationError)
    assert not isinstance(info.value, HostBusy)


def test_a_busy_refusal_is_host_busy_which_open_retries() -> None:
    """REFUSE "busy" (a handshake evicted under a flood, max_pending) is transient:
    :class:`HostBusy`, a :class:`HandshakeError` that a client's open() tries again."""
    lk = link()
    deliver(lk.host, lk.client.data_to_send())
    lk.host.decoder.take()
    lk.host.refuse(*Admission.busy(128))
    deliver(lk.client, lk.host.data_to_send())
    with pytest.raises(HostBusy, match="max_pending"):
        lk.client.events()


# -- protocol violations -------------------------------------------------------------------


def test_data_before_the_handshake_is_a_protocol_error_at_the_host() -> None:
    host = Protocol(Role.HOST)
    deliver(host, frames.PREAMBLE + raw_frame(frames.DATA, 1, "ch"))
    with pytest.raises(ProtocolError, match="during the handshake"):
        host.events()
    assert not host.is_open


def test_data_instead_of_auth_is_a_protocol_error_at_the_host() -> None:
    lk = link(HOST_TOKEN, HOST_TOKEN)
    lk.to_host()
    lk.client.data_to_send()  # the AUTH is never sent ...
    deliver(lk.host, raw_frame(frames.DATA, 1, "ch"))  # ... data instead
    with pytest.raises(ProtocolError):
        lk.host.events()
    assert not lk.host.is_open


def test_data_before_welcome_is_a_protocol_error_at_the_client() -> None:
    client = Protocol(Role.CLIENT, name="c")
    deliver(client, frames.PREAMBLE + raw_frame(frames.DATA, 1, "ch"))
    with pytest.raises(ProtocolError):
        client.events()


@pytest.mark.parametrize(
    "hello",
    [
        {"v": 1, "name": "x"},
        {"v": 1, "name": "x", "nonce": b"short"},
        {"v": 1, "name": "x", "nonce": "s" * 16},
        {"v": 1, "name": "x" * 257, "nonce": b"n" * 16},
        {"v": 1, "name": 5, "nonce": b"n" * 16},
        [1, 2],
        None,
    ],
    ids=repr,
)
def test_malformed_hello_is_a_protocol_error(hello: Any) -> None:
    host = Protocol(Role.HOST)
    deliver(host, frames.PREAMBLE + raw_frame(frames.HELLO, hello))
    with pytest.raises(ProtocolError):
        host.events()


def test_second_hello_is_a_protocol_error() -> None:
    lk = link(HOST_TOKEN, HOST_TOKEN)
    lk.to_host()
    deliver(lk.host, raw_frame(frames.HELLO, {"v": 1, "name": "x", "nonce": b"n" * 16}))
    with pytest.raises(ProtocolError):
        lk.host.events()


@pytest.mark.parametrize("ftype", [frames.HELLO, frames.AUTH, frames.CHALLENGE, frames.WELCOME])
def test_handshake_frames_after_open_are_protocol_errors(ftype: int) -> None:
    lk = opened()
    for side in (lk.host, lk.client):
        deliver(side, raw_frame(ftype, {"nonce": b"n" * 16, "v": 1}))
        with pytest.raises(ProtocolError, match="after the handshake"):
            side.events()


def test_oversized_frame_before_the_handshake_is_refused_from_its_header() -> None:
    host = Protocol(Role.HOST, max_message=1 << 30)
    head = frames.HEADER.pack(frames.DATA, 0, 0, 0, 0, 10 * 1024 * 1024)
    with pytest.raises(MessageTooBig):
        deliver(host, frames.PREAMBLE + head)


def test_pre_handshake_preamble_errors() -> None:
    host = Protocol(Role.HOST)
    with pytest.raises(HandshakeError, match="TLS"):
        deliver(host, bytes.fromhex("160301") + bytes(20))


# -- the open connection ---------------------------------------------------------------


def test_ping_is_answered_with_pong() -> None:
    lk = opened()
    lk.client.send_ping()
    ping = lk.client.data_to_send()
    assert frame_types(ping) == [frames.PING]
    deliver(lk.host, ping)
    assert lk.host.events() == []
    pong = lk.host.data_to_send()
    assert frame_types(pong) == [frames.PONG]
    deliver(lk.client, pong)
    assert lk.client.events() == []
    assert lk.client.data_to_send() == b""  # a PONG is not answered


def test_host_can_ping_too_and_pings_mix_with_data_in_order() -> None:
    lk = opened()
    stream = (
        raw_frame(frames.DATA, 1, "a")
        + raw_frame(frames.PING)
        + raw_frame(frames.REQUEST, {"q": 2}, "b", fid=5)
        + raw_frame(frames.PONG)
        + raw_frame(frames.PING)
        + raw_frame(frames.BYE)
    )
    deliver(lk.client, stream)
    got = lk.client.events()
    assert [(f.type, f.channel, f.id) for f in got] == [
        (frames.DATA, "a", 0),
        (frames.REQUEST, "b", 5),
        (frames.BYE, "", 0),
    ]
    assert [f.value() for f in got[:2]] == [1, {"q": 2}]
    assert frame_types(lk.client.data_to_send()) == [frames.PONG, frames.PONG]


def test_application_frames_pass_through_after_open() -> None:
    lk = opened(HOST_TOKEN, HOST_TOKEN)
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    deliver(lk.host, raw_frame(frames.DATA, {"img": arr}, "cam"))
    [frame] = lk.host.events()
    assert frame.channel == "cam"
    got = frame.value()["img"]
    assert got.dtype == arr.dtype and np.array_equal(got, arr)


@pytest.mark.parametrize("token", [None, HOST_TOKEN])
def test_large_frames_right_behind_welcome_use_the_full_limit(token: Optional[bytes]) -> None:
    """A host may send data (e.g. an image) right after WELCOME, in the same read.

    The pre-handshake limit (64 KiB) must not apply to it: the decoder pauses after the
    WELCOME until events() has raised max_message.
    """
    lk = link(token, token)
    while not lk.host.is_open:
        lk.to_host()
        if not lk.host.is_open:
            lk.to_client()
    img = (np.arange(480 * 640 * 3) % 256).astype(np.uint8).reshape(480, 640, 3)
    data = lk.host.data_to_send() + raw_frame(frames.DATA, img, "img") + raw_frame(frames.PING)
    deliver(lk.client, data)
    got = lk.client.events()
    assert lk.client.is_open
    assert [f.channel for f in got] == ["img"]
    assert np.array_equal(got[0].value(), img)
    assert frame_types(lk.client.data_to_send()) == [frames.PONG]


@pytest.mark.parametrize("chunk", [1, 7, 1000, None])
def test_client_pipelined_data_after_hello_reaches_a_tokenless_host(chunk: Optional[int]) -> None:
    """Documented as tested: without a token the host is open once HELLO is read, so
    frames the client sends straight behind HELLO are delivered (sized against the
    full max_message)."""
    host = Protocol(Role.HOST)
    client = Protocol(Role.CLIENT, name="eager")
    big = np.zeros(200_000, np.uint8)
    deliver(host, client.data_to_send() + raw_frame(frames.DATA, big, "x"), chunk)
    got = host.events()
    assert host.is_open and [f.channel for f in got] == ["x"]


def test_events_is_empty_when_nothing_arrived() -> None:
    lk = opened()
    assert lk.host.events() == [] and lk.client.events() == []


def _collect(frames_: Sequence[Frame]) -> List[int]:
    return [f.type for f in frames_]


def test_max_message_is_enforced_after_open() -> None:
    host = Protocol(Role.HOST, max_message=100_000)
    client = Protocol(Role.CLIENT, max_message=100_000)
    lk = Link(host, client)
    lk.run()
    assert host.is_open
    deliver(host, raw_frame(frames.DATA, np.zeros(90_000, np.uint8), "ok"))
    assert _collect(host.events()) == [frames.DATA]
    with pytest.raises(MessageTooBig):
        deliver(host, raw_frame(frames.DATA, np.zeros(100_001, np.uint8), "big"))


def test_an_unauthenticated_hello_builds_no_interest_and_opens_no_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A HELLO's interest (a pattern index costs many times its wire size) and its
    # shared-memory announcement (a file the host opens) wait for the token: an
    # unauthenticated peer gets neither built nor opened.
    from socketengine import shm
    from socketengine.patterns import Interest, Pattern

    checked: List[Any] = []
    monkeypatch.setattr(shm, "announce", lambda: [1, 2, b"t" * 16])
    monkeypatch.setattr(shm, "check_peer", lambda value: checked.append(value))
    interest = Interest(["a", Pattern("b/+")])
    wrong = link(HOST_TOKEN, b"wrong", interest=interest, shm_threshold=65536)
    wrong.to_host()  # HELLO
    assert wrong.host.peer_interest is None and not checked
    wrong.to_client()  # CHALLENGE
    with pytest.raises(AuthenticationError):
        wrong.to_host()  # AUTH with the wrong token
    assert wrong.host.peer_interest is None and not checked
    good = link(HOST_TOKEN, HOST_TOKEN, interest=interest, shm_threshold=65536)
    good.run()
    assert good.host.is_open and good.host.peer_interest == interest
    assert checked == [[1, 2, b"t" * 16]]


def _largest_interests() -> List[Any]:
    """Interests at both protocol limits, shaped for the longest HELLO encoding."""
    from socketengine.patterns import MAX_INTEREST_BYTES, MAX_INTEREST_KEYS, Interest, Pattern

    keys, total = MAX_INTEREST_KEYS, MAX_INTEREST_BYTES
    short = [f"{i:04x}".ljust(total // keys, "n") for i in range(keys)]  # 4 bytes of framing
    longer = [Pattern(f"{i:04x}/+/".ljust(32, "p")) for i in range(total // 32)]  # 5 bytes
    return [Interest.declared(short), Interest.declared(longer)]


@pytest.mark.parametrize("which", [0, 1])
def test_any_interest_a_client_may_declare_fits_its_hello_next_to_the_largest_will(
    which: int,
) -> None:
    # MAX_INTEREST_KEYS and MAX_INTEREST_BYTES are chosen so that the HELLO of a client
    # at both limits, with a 16 KiB will and a 256-byte name, stays under the 64 KiB
    # handshake frame limit: what the client accepts, the host can read.
    from socketengine.limits import PRE_HANDSHAKE_MAX
    from socketengine.protocol import MAX_WILL_BYTES, encode_will

    interest = _largest_interests()[which]
    will = encode_will("will", b"w" * (MAX_WILL_BYTES - 3))  # bin16: 3 bytes of header
    assert len(will[1]) == MAX_WILL_BYTES
    lk = link(HOST_TOKEN, HOST_TOKEN, name="n" * 256, interest=interest, will=will)
    lk.run()
    assert lk.host.is_open and lk.host.peer_interest == interest
    assert len(lk.sent[0]) < PRE_HANDSHAKE_MAX - 4 * 1024  # the HELLO: 57,718 bytes here


def test_a_hello_interest_beyond_the_limit_closes_the_connection_once_authenticated() -> None:
    # A HELLO small enough for the handshake limit but whose interest is beyond
    # MAX_INTEREST_BYTES (built here without the client's check): the host refuses it
    # with a ProtocolError naming the limit, once the token is proven, and builds no index.
    from socketengine.patterns import MAX_INTEREST_BYTES, Interest

    interest = Interest([f"{i:04x}".ljust(64, "x") for i in range(MAX_INTEREST_BYTES // 64 + 1)])
    lk = link(HOST_TOKEN, HOST_TOKEN, interest=interest)
    lk.to_host()  # HELLO: not looked at yet
    lk.to_client()  # CHALLENGE
    with pytest.raises(ProtocolError, match=f"MAX_INTEREST_BYTES={MAX_INTEREST_BYTES}"):
        lk.to_host()  # AUTH: the token is right, the interest is not
    assert lk.host.peer_interest is None and not lk.host.is_open
