"""Compression on the wire (protocol 1.1 "z", FLAG_COMPRESSED), in both I/O layers.

Bytes on the wire are read from ``conn.stats()["bytes_out"]``: a compressible value
that was compressed costs a fraction of its encoded size, one that was not costs more
than its encoded size.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Dict, Iterator, Optional

import numpy as np
import pytest
import zstandard
from conftest import wait_for
from hypothesis import given, settings
from hypothesis import strategies as st
from test_parity import LAYERS, AioThread, Side, make_client, make_host

from socketengine import Client, Host, aio, codec, compression, frames
from socketengine.errors import MessageTooBig, ProtocolError
from socketengine.protocol import Protocol, Role

BIG: Dict[str, Any] = {"samples": [i % 1000 for i in range(20_000)], "label": "telemetry " * 2_000}
BIG_SIZE = len(codec.encode(BIG)[0])  # ~75 KB of msgpack
ARRAY = np.tile(np.arange(512, dtype=np.float32), 256).reshape(256, 512)  # 512 KiB


@pytest.fixture
def loop_thread() -> Iterator[AioThread]:
    runner = AioThread()
    yield runner
    runner.close()


def _conn(side: Side) -> Any:
    """The host's only connection, or the client's connection."""

    def find() -> Any:
        if hasattr(side.ep, "clients"):
            conns = side.ep.clients()
            return conns[0] if conns else None
        return side.ep._conn

    return wait_for(lambda: find() if side.runner is None else side.runner.call(find))


def _bytes_out(side: Side, conn: Any) -> int:
    if side.runner is None:
        return int(conn.stats()["bytes_out"])
    return int(side.runner.call(lambda: conn.stats()["bytes_out"]))


def _received(side: Side, channel: str) -> Any:
    return wait_for(lambda: side.do("get", channel) is not None, what=channel) and side.do(
        "get", channel
    )


def _pair(
    layer: str, runner: AioThread, host_kw: Optional[Dict[str, Any]] = None, **client_kw: Any
) -> tuple[Side, Side]:
    host = make_host(layer, runner, **(host_kw or {}))
    client = make_client(layer, runner, host.ep.port, **client_kw)
    _conn(host)
    return host, client


# -- the handshake ---------------------------------------------------------------------------


def _give(proto: Protocol, data: bytes) -> None:
    """Hand received bytes to a protocol's decoder (its events() takes the frames)."""
    view = memoryview(data)
    while view:
        buf = proto.decoder.get_buffer()
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        buf.release()
        view = view[n:]
        proto.decoder.buffer_updated(n)


def test_hello_and_welcome_announce_the_codecs_this_side_can_decode() -> None:
    client = Protocol(Role.CLIENT, name="c")
    host = Protocol(Role.HOST)
    _give(host, client.data_to_send())
    host.events()
    _give(client, host.data_to_send())
    client.events()
    assert client.is_open and host.is_open
    assert host.peer_codecs == client.peer_codecs == tuple(compression.available())
    assert host.peer_codecs == ("zstd", "lz4")


def test_a_malformed_codec_announcement_fails_the_handshake() -> None:
    host = Protocol(Role.HOST)
    hello = {"v": 1, "name": "c", "nonce": bytes(16), "z": "zstd"}
    wire = frames.PREAMBLE + b"".join(frames.encode_frame(frames.HELLO, "", codec.encode(hello)[0]))
    _give(host, wire)
    with pytest.raises(ProtocolError):
        host.events()


# -- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["gzip", "ZSTD", 1, True])
def test_both_layers_refuse_an_unknown_codec_naming_the_choices(bad: Any) -> None:
    for make in (
        lambda: Host(port=0, open=False, compression=bad),
        lambda: Client(port=1, open=False, compression=bad),
        lambda: aio.Host(port=0, compression=bad),
        lambda: aio.Client(port=1, compression=bad),
    ):
        with pytest.raises(ValueError, match="'zstd', 'lz4', 'auto'"):
            make()


def test_threshold_must_be_a_non_negative_int() -> None:
    with pytest.raises(ValueError, match="compress_threshold"):
        Host(port=0, open=False, compression="zstd", compress_threshold=-1)
    with pytest.raises(ValueError, match="compress_threshold"):
        aio.Client(port=1, compression="lz4", compress_threshold=1.5)  # type: ignore[arg-type]


def test_settings_are_kept() -> None:
    host = Host(port=0, open=False, compression="auto", compress_threshold=0)
    assert host.compression == "auto" and host.compress_threshold == 0
    assert host._codecs == ("zstd", "lz4")
    client = aio.Client(port=1, compression="lz4")
    assert client._codecs == ("lz4",)
    assert client.compress_threshold == compression.DEFAULT_THRESHOLD
    host.close()


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("name", ["zstd", "lz4"])
def test_large_values_round_trip_compressed_both_ways(
    layer: str, name: str, loop_thread: AioThread
) -> None:
    host, client = _pair(layer, loop_thread, {"compression": name}, compression=name)
    try:
        hconn, cconn = _conn(host), _conn(client)
        before = _bytes_out(client, cconn)
        client.do("write", "dict", BIG)
        client.do("write", "array", ARRAY)
        assert _received(host, "dict") == BIG
        got = _received(host, "array")
        assert got.dtype == np.float32 and np.array_equal(got, ARRAY)
        # compressed: far fewer bytes than the two encoded values
        assert _bytes_out(client, cconn) - before < (BIG_SIZE + ARRAY.nbytes) // 4

        before = _bytes_out(host, hconn)
        assert host.do("write_all", "dict", BIG) == 1
        assert host.do("write_all", "array", ARRAY) == 1
        assert _received(client, "dict") == BIG
        assert np.array_equal(_received(client, "array"), ARRAY)
        assert _bytes_out(host, hconn) - before < (BIG_SIZE + ARRAY.nbytes) // 4
    finally:
        client.close()
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_receiver_without_compression_still_decodes_what_it_announced(
    layer: str, loop_thread: AioThread
) -> None:
    # What is announced is what can be decoded: compression=None only stops sending.
    host, client = _pair(layer, loop_thread, None, compression="zstd")
    try:
        cconn = _conn(client)
        before = _bytes_out(client, cconn)
        client.do("write", "dict", BIG)
        assert _received(host, "dict") == BIG
        assert _bytes_out(client, cconn) - before < BIG_SIZE // 4
    finally:
        client.close()
        host.close()


# -- when values are NOT compressed ----------------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS)
def test_a_peer_that_announced_no_codec_gets_plain_frames(
    layer: str, loop_thread: AioThread
) -> None:
    host, client = _pair(layer, loop_thread, {"compression": "zstd"}, compression="zstd")
    try:
        hconn, cconn = _conn(host), _conn(client)
        hconn.engine.protocol.peer_codecs = ()  # as if the client had announced none
        cconn.engine.protocol.peer_codecs = ()
        before = (_bytes_out(host, hconn), _bytes_out(client, cconn))
        client.do("write", "dict", BIG)
        client.do("write", "forced", BIG, compress=True)  # True cannot override the peer
        host.do("write_all", "dict", BIG)
        assert _received(host, "dict") == BIG
        assert _received(host, "forced") == BIG
        assert _received(client, "dict") == BIG
        assert _bytes_out(client, cconn) - before[1] > 2 * BIG_SIZE
        assert _bytes_out(host, hconn) - before[0] > BIG_SIZE
    finally:
        client.close()
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_write_all_compresses_only_for_peers_that_announced_the_codec(
    layer: str, loop_thread: AioThread
) -> None:
    host = make_host(layer, loop_thread, compression="zstd")
    plain = make_client(layer, loop_thread, host.ep.port, name="plain")
    zipped = make_client(layer, loop_thread, host.ep.port, name="zipped")
    try:
        conns = wait_for(
            lambda: len(host.ep.clients()) == 2 and {c.name: c for c in host.ep.clients()}
        )
        conns["plain"].engine.protocol.peer_codecs = ()
        before = {n: _bytes_out(host, c) for n, c in conns.items()}
        assert host.do("write_all", "dict", BIG) == 2
        assert _received(plain, "dict") == BIG
        assert _received(zipped, "dict") == BIG
        assert _bytes_out(host, conns["plain"]) - before["plain"] > BIG_SIZE
        assert _bytes_out(host, conns["zipped"]) - before["zipped"] < BIG_SIZE // 4
    finally:
        plain.close()
        zipped.close()
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_values_below_the_threshold_are_sent_as_they_are(
    layer: str, loop_thread: AioThread
) -> None:
    host, client = _pair(layer, loop_thread, None, compression="zstd", compress_threshold=100_000)
    small = {"label": "x" * 50_000}  # compresses to almost nothing, but below the threshold
    try:
        cconn = _conn(client)
        before = _bytes_out(client, cconn)
        client.do("write", "small", small)
        assert _received(host, "small") == small
        middle = _bytes_out(client, cconn)
        assert middle - before > 50_000
        client.do("write", "array", ARRAY)  # 512 KiB: above it
        assert np.array_equal(_received(host, "array"), ARRAY)
        assert _bytes_out(client, cconn) - middle < ARRAY.nbytes // 4
    finally:
        client.close()
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_compress_false_disables_and_true_forces(layer: str, loop_thread: AioThread) -> None:
    host, client = _pair(layer, loop_thread, None, compression="lz4")
    try:
        cconn = _conn(client)
        before = _bytes_out(client, cconn)
        client.do("write", "off", BIG, compress=False)
        assert _received(host, "off") == BIG
        middle = _bytes_out(client, cconn)
        assert middle - before > BIG_SIZE
        small = {"label": "y" * 3000}  # below the 4096-byte default threshold
        client.do("write", "forced", small, compress=True)
        assert _received(host, "forced") == small
        assert _bytes_out(client, cconn) - middle < 1000
    finally:
        client.close()
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_compress_true_on_an_endpoint_without_compression(
    layer: str, loop_thread: AioThread
) -> None:
    host, client = _pair(layer, loop_thread)
    try:
        hconn = _conn(host)
        before = _bytes_out(host, hconn)
        assert host.do("write_all", "dict", BIG, compress=True) == 1
        assert _received(client, "dict") == BIG
        assert _bytes_out(host, hconn) - before < BIG_SIZE // 4
        # the per-connection write too
        if host.runner is None:
            hconn.write("one", BIG, compress=True)
        else:
            host.runner.run(hconn.write("one", BIG, compress=True))
        assert _received(client, "one") == BIG
    finally:
        client.close()
        host.close()


@pytest.mark.parametrize("layer", LAYERS)
def test_images_are_never_compressed(layer: str, loop_thread: AioThread) -> None:
    # shm=False: the image's bytes must cross the socket to be counted there.
    host, client = _pair(
        layer, loop_thread, None, compression="zstd", compress_threshold=0, shm=False
    )
    img = np.zeros((240, 320, 3), np.uint8)  # would compress ~1000x
    try:
        cconn = _conn(client)
        before = _bytes_out(client, cconn)
        client.do("write_image", img, "cam")
        assert np.array_equal(_received(host, "cam"), img)
        assert _bytes_out(client, cconn) - before > img.nbytes
    finally:
        client.close()
        host.close()


# -- hostile frames --------------------------------------------------------------------------


def _raw_client(port: int) -> socket.socket:
    """A client that completes the handshake with the sans-I/O core, then is ours."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    proto = Protocol(Role.CLIENT, name="bomber")
    sock.sendall(proto.data_to_send())
    while not proto.is_open:
        data = sock.recv(65536)
        assert data, "the host closed during the handshake"
        _give(proto, data)
        proto.events()
    return sock


def _compressed_data_frame(channel: str, head: Any, body: bytes) -> bytes:
    meta = codec.encode(head)[0]
    return b"".join(
        frames.encode_frame(
            frames.DATA, channel, meta, [body], len(body), flags=frames.FLAG_COMPRESSED
        )
    )


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, socket.timeout):
        return False
    return True


BOMBS = {
    # declares 10 bytes, the zstd frame declares (and holds) 2 MiB of zeros
    "frame-declares-more": (["zstd", 10, 0], zstandard.compress(bytes(2 << 20))),
    # declares 2 MiB: refused before decompressing
    "header-declares-more": (["zstd", 2 << 20, 0], zstandard.compress(b"x")),
    # sizes that do not add up
    "wrong-sizes": (["zstd", 5, 5], zstandard.compress(codec.encode({"a": 1})[0])),
    "unknown-codec": (["gzip", 10, 0], b"\x1f\x8b" * 10),
    # no data section: the sync receiver's fast path must not take it for a plain value
    "no-data": (["zstd", 10, 0], b""),
}


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("bomb", list(BOMBS))
def test_a_bad_compressed_frame_closes_only_that_connection_and_is_logged(
    layer: str, bomb: str, loop_thread: AioThread, caplog: pytest.LogCaptureFixture
) -> None:
    host = make_host(layer, loop_thread, max_message=1 << 20)
    good = make_client(layer, loop_thread, host.ep.port, name="good", compression="zstd")
    try:
        wait_for(lambda: len(host.ep.clients()) == 1)
        sock = _raw_client(host.ep.port)
        with caplog.at_level(logging.WARNING, logger="socketengine"):
            head, body = BOMBS[bomb]
            sock.sendall(_compressed_data_frame("boom", head, body))
            assert _closed_by_peer(sock)
            wait_for(lambda: any("bomber" in r.getMessage() for r in caplog.records))
        sock.close()
        assert host.do("get", "boom") is None
        # the other client is untouched and still compresses
        value = {"z": "ok " * 5000}
        good.do("write", "after", value)
        assert _received(host, "after") == value
        assert [c.name for c in host.ep.clients()] == ["good"]
    finally:
        good.close()
        host.close()


def test_frame_value_refuses_bombs_without_an_endpoint() -> None:
    body = zstandard.compress(bytes(2 << 20))
    wire = _compressed_data_frame("c", ["zstd", 10, 0], body)
    (frame,) = frames.FrameDecoder(expect_preamble=False).feed(wire)
    with pytest.raises(MessageTooBig):
        frame.value(1 << 20)
    with pytest.raises(ProtocolError):
        frame.value(4 << 20)  # within the limit, but not the 10 bytes declared


def test_compressed_frame_helpers_round_trip() -> None:
    meta, buffers, data_len = codec.encode({"a": ARRAY, "b": "text" * 1000})
    packed = frames.compressed_frame("ch", meta, buffers, data_len, "zstd")
    assert packed is not None
    parts, size = packed
    wire = b"".join(bytes(memoryview(p)) for p in parts)
    assert len(wire) == size < data_len // 4
    (frame,) = frames.FrameDecoder(expect_preamble=False).feed(wire)
    assert frame.flags == frames.FLAG_COMPRESSED
    value = frame.value(1 << 22)
    assert np.array_equal(value["a"], ARRAY) and value["a"].flags.writeable
    assert value["b"] == "text" * 1000
    # incompressible: not worth it
    noise = np.random.default_rng(1).bytes(10_000)
    meta, buffers, data_len = codec.encode(noise)
    assert frames.compressed_frame("ch", meta, buffers, data_len, "lz4") is None


def test_a_codec_that_is_not_installed_is_refused_at_construction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(compression._loaded, "lz4", None)  # as if lz4 were not installed
    for make in (
        lambda: Host(port=0, open=False, compression="lz4"),
        lambda: aio.Client(port=1, compression="lz4"),
    ):
        with pytest.raises(compression.CompressionUnavailable, match="pip install"):
            make()
    assert aio.Host(port=0, compression="auto")._codecs == ("zstd",)
    monkeypatch.setitem(compression._loaded, "zstd", None)
    with pytest.raises(compression.CompressionUnavailable):
        Client(port=1, open=False, compression="auto")


_heads = st.one_of(
    st.tuples(
        st.sampled_from(["zstd", "lz4", "gz"]), st.integers(-2, 1 << 21), st.integers(-2, 99)
    ),
    st.lists(st.integers(), max_size=4),
    st.text(max_size=8),
)


@settings(max_examples=200, deadline=None)
@given(
    head=_heads,
    body=st.binary(max_size=200),
    prefix=st.sampled_from([b"", b"\x28\xb5\x2f\xfd", b"\x04\x22\x4d\x18"]),
)
def test_any_compressed_frame_decodes_or_raises_protocol_error(
    head: Any, body: bytes, prefix: bytes
) -> None:
    wire = _compressed_data_frame("c", list(head) if type(head) is tuple else head, prefix + body)
    (frame,) = frames.FrameDecoder(expect_preamble=False).feed(wire)
    try:
        frame.value(1 << 20)
    except ProtocolError:  # MessageTooBig is one
        pass


@pytest.mark.parametrize("layer", LAYERS)
def test_a_relaying_host_forwards_a_compressed_write_decompressed(
    layer: str, loop_thread: AioThread
) -> None:
    host = make_host(layer, loop_thread, relay=True)
    writer = make_client(layer, loop_thread, host.ep.port, name="w", compression="zstd")
    reader = make_client(layer, loop_thread, host.ep.port, name="r")
    try:
        wait_for(lambda: len(host.ep.clients()) == 2)
        wconn = _conn(writer)
        before = _bytes_out(writer, wconn)
        writer.do("write", "dict", BIG)
        assert _received(reader, "dict") == BIG
        assert reader.do("sender", "dict") == "w"
        assert _received(host, "dict") == BIG
        assert _bytes_out(writer, wconn) - before < BIG_SIZE // 4
    finally:
        writer.close()
        reader.close()
        host.close()
