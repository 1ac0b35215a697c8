"""Compression codecs: round trips, negotiation, and hostile frames (bombs, truncation, garbage)."""

from __future__ import annotations

import resource
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import List

import lz4.frame
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from socketengine import compression
from socketengine.compression import (
    CompressionUnavailable,
    available,
    compress,
    decompress,
    maybe_compress,
    negotiate,
    should_compress,
)
from socketengine.errors import MessageTooBig, ProtocolError

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CODECS = ["zstd", "lz4"]
MiB = 1 << 20

# bytes of every kind: random, runs, repeated patterns, empty
payloads = st.one_of(
    st.binary(max_size=5000),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=20), st.integers(1, 3000)),
    st.builds(lambda n: bytes(n), st.integers(0, 300_000)),
)


def peak_rss() -> int:
    """The process's peak resident set size in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
@FAST
@given(data=payloads, level=st.sampled_from([None, 0, 1, 3]))
def test_round_trip(codec: str, data: bytes, level: object) -> None:
    if codec == "zstd" and level == 0:
        level = -1  # a fast negative level
    packed = compress(codec, data, level)  # type: ignore[arg-type]
    assert type(packed) is bytes
    assert decompress(codec, packed, len(data)) == data
    assert decompress(codec, bytearray(packed), len(data) + 10) == data
    if len(data) > 0:
        with pytest.raises(MessageTooBig, match="limit"):
            decompress(codec, packed, len(data) - 1)


@pytest.mark.parametrize("codec", CODECS)
def test_buffers_of_any_shape_are_compressed_as_their_bytes(codec: str) -> None:
    depth = np.tile(np.arange(64, dtype=np.float32), 480 * 10).reshape(480, 640)
    for source in (depth, memoryview(depth), bytearray(depth.tobytes()), depth.tobytes()):
        packed = compress(codec, source)  # type: ignore[arg-type]
        assert len(packed) < depth.nbytes // 4  # a repeating pattern compresses well
        assert decompress(codec, packed, depth.nbytes) == depth.tobytes()
    with pytest.raises(ValueError, match="C-contiguous"):
        compress(codec, depth[:, ::2])  # type: ignore[arg-type]


@pytest.mark.parametrize("codec", CODECS)
def test_compressed_frames_record_their_size(codec: str) -> None:
    packed = compress(codec, b"x" * 10_000)
    if codec == "zstd":
        assert zstandard.get_frame_parameters(packed).content_size == 10_000
    else:
        assert lz4.frame.get_frame_info(packed)["content_size"] == 10_000


def test_compress_from_many_threads() -> None:
    """Contexts are per thread: concurrent calls must not mix up their outputs."""
    errors: List[str] = []

    def work(seed: int) -> None:
        for i in range(50):
            data = bytes([seed, i]) * (1000 + 37 * i)
            for codec, level in (("zstd", 1), ("zstd", 3), ("lz4", 0)):
                if decompress(codec, compress(codec, data, level), len(data)) != data:
                    errors.append(f"{seed}/{i}/{codec}")

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert not any(t.is_alive() for t in threads)


# -- choosing ---------------------------------------------------------------------------------


def test_available_lists_installed_codecs_in_preference_order() -> None:
    assert available() == ["zstd", "lz4"]


def test_negotiate() -> None:
    assert negotiate(["zstd", "lz4"], ["lz4", "zstd"]) == "zstd"  # ours decides the order
    assert negotiate(["lz4", "zstd"], ["zstd", "lz4"]) == "lz4"
    assert negotiate(["zstd", "lz4"], ["lz4"]) == "lz4"
    assert negotiate(["zstd"], ["lz4", "brotli"]) is None
    assert negotiate([], ["zstd"]) is None
    assert negotiate(["zstd"], []) is None
    assert negotiate(["brotli", "zstd"], ("brotli", "zstd")) == "zstd"  # unknown names skipped


@pytest.mark.parametrize("theirs", [None, "zstd", {"zstd": 1}, [b"zstd"], ["zstd", 1], ["x"] * 33])
def test_negotiate_refuses_malformed_announcements(theirs: object) -> None:
    with pytest.raises(ProtocolError):
        negotiate(["zstd"], theirs)


def test_should_compress_and_maybe_compress() -> None:
    assert compression.DEFAULT_THRESHOLD > 0
    assert not should_compress(compression.DEFAULT_THRESHOLD - 1)
    assert should_compress(compression.DEFAULT_THRESHOLD)
    assert should_compress(10, threshold=10)
    assert not should_compress(10**9, threshold=None)
    big = b"abc" * 10_000
    packed = maybe_compress("zstd", big)
    assert packed is not None and decompress("zstd", packed, len(big)) == big
    assert maybe_compress("zstd", b"abc" * 10) is None  # below the threshold
    assert maybe_compress(None, big) is None  # nothing negotiated
    noise = np.random.default_rng(1).bytes(50_000)
    assert maybe_compress("lz4", noise) is None  # it would not shrink


def test_unknown_codec_and_bad_levels() -> None:
    with pytest.raises(ValueError, match="unknown compression codec 'gzip'"):
        compress("gzip", b"x")
    with pytest.raises(ValueError, match="unknown compression codec"):
        decompress("gzip", b"x", 10)
    with pytest.raises(ValueError, match="level must be an int in 1?-?131072..22"):
        compress("zstd", b"x", 23)
    with pytest.raises(ValueError, match="0..16"):
        compress("lz4", b"x", 17)
    with pytest.raises(ValueError, match="level"):
        compress("lz4", b"x", 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_size"):
        decompress("zstd", compress("zstd", b"x"), -1)


@pytest.mark.parametrize("codec", CODECS)
def test_missing_library_names_the_extra(codec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the module cache is the single place backends are looked up: None means "not importable"
    monkeypatch.setitem(compression._loaded, codec, None)
    assert codec not in available()
    for call in (lambda: compress(codec, b"x"), lambda: decompress(codec, b"x", 1)):
        with pytest.raises(CompressionUnavailable, match=r"socket\.engine\[compression\]"):
            call()
    assert issubclass(CompressionUnavailable, ImportError)
    other = "lz4" if codec == "zstd" else "zstd"
    assert negotiate(available(), ["zstd", "lz4"]) == other


# -- hostile frames ---------------------------------------------------------------------------


def zstd_stream_of_zeros(total: int) -> bytes:
    """A zstd frame of ``total`` zero bytes that does not record its size."""
    cobj = zstandard.ZstdCompressor(level=1, write_content_size=False).compressobj()
    chunk = bytes(MiB)
    out = [cobj.compress(chunk) for _ in range(total // MiB)]
    out.append(cobj.flush())
    return b"".join(out)


def zstd_declaring(frame: bytes, size: int) -> bytes:
    """``frame`` (no size, not single-segment) with a 4-byte content size field added."""
    fhd = frame[4]
    assert fhd >> 6 == 0 and not fhd & 0x20 and not fhd & 0x03
    return frame[:4] + bytes([fhd | 0x80, frame[5]]) + struct.pack("<I", size) + frame[6:]


def test_zstd_bomb_declaring_its_size_is_refused_before_decompressing() -> None:
    bomb = zstd_declaring(zstd_stream_of_zeros(512 * MiB), 512 * MiB)
    assert len(bomb) < 64 * 1024
    before = peak_rss()
    with pytest.raises(MessageTooBig, match="expands to 536870912 bytes, over the 1048576"):
        decompress("zstd", bomb, MiB)
    assert peak_rss() - before < 64 * MiB


def test_zstd_bomb_lying_about_its_size_fails_without_expanding() -> None:
    bomb = zstd_declaring(zstd_stream_of_zeros(512 * MiB), 1000)
    before = peak_rss()
    with pytest.raises(ProtocolError) as info:
        decompress("zstd", bomb, MiB)
    assert not isinstance(info.value, MessageTooBig)
    assert peak_rss() - before < 64 * MiB


def test_zstd_frame_without_its_size_is_refused() -> None:
    with pytest.raises(ProtocolError, match="does not record its decompressed size"):
        decompress("zstd", zstd_stream_of_zeros(MiB), 10 * MiB)


def lz4_stream_of_zeros(total: int, declared: int = 0) -> bytes:
    comp = lz4.frame.LZ4FrameCompressor()
    out = [comp.begin(source_size=declared)]
    chunk = bytes(MiB)
    out += [comp.compress(chunk) for _ in range(total // MiB)]
    if not declared or declared == total:
        out.append(comp.flush())  # (lz4 refuses to end a frame whose declared size is wrong)
    return b"".join(out)


def test_lz4_bomb_declaring_its_size_is_refused_before_decompressing() -> None:
    bomb = lz4_stream_of_zeros(256 * MiB, declared=256 * MiB)
    before = peak_rss()
    with pytest.raises(MessageTooBig, match="expands to 268435456 bytes"):
        decompress("lz4", bomb, MiB)
    assert peak_rss() - before < 64 * MiB


def test_lz4_bomb_lying_about_its_size_fails_without_expanding() -> None:
    bomb = lz4_stream_of_zeros(256 * MiB, declared=1000)
    before = peak_rss()
    with pytest.raises(ProtocolError, match="declared 1000 bytes and held more"):
        decompress("lz4", bomb, MiB)
    assert peak_rss() - before < 64 * MiB


def test_lz4_bomb_without_its_size_stops_at_the_limit() -> None:
    bomb = lz4_stream_of_zeros(256 * MiB)
    assert not bomb[4] & 0x08
    before = peak_rss()
    with pytest.raises(MessageTooBig, match="over the 3145728-byte limit"):
        decompress("lz4", bomb, 3 * MiB)
    assert peak_rss() - before < 64 * MiB
    # the same frame within the limit decompresses, in steps
    small = lz4_stream_of_zeros(3 * MiB)
    assert decompress("lz4", small, 3 * MiB) == bytes(3 * MiB)
    with pytest.raises(MessageTooBig):
        decompress("lz4", small, 3 * MiB - 1)


@pytest.mark.parametrize("codec", CODECS)
def test_truncated_frames_raise_protocol_error(codec: str) -> None:
    data = np.random.default_rng(3).integers(0, 4, 200_000, dtype=np.uint8).tobytes()
    packed = compress(codec, data)
    cuts = sorted(set(range(0, 40)) | set(range(40, len(packed), 997)) | {len(packed) - 1})
    for cut in cuts:
        with pytest.raises(ProtocolError):
            decompress(codec, packed[:cut], len(data))


@pytest.mark.parametrize("codec", CODECS)
def test_trailing_bytes_raise_protocol_error(codec: str) -> None:
    packed = compress(codec, b"hello" * 1000)
    with pytest.raises(ProtocolError, match="bytes after the"):
        decompress(codec, packed + b"x", 5000)
    with pytest.raises(ProtocolError, match="bytes after the"):
        decompress(codec, packed + packed, 10_000)  # a second frame is trailing bytes too


@pytest.mark.parametrize("codec", CODECS)
@FAST
@given(garbage=st.binary(max_size=300))
def test_garbage_raises_only_protocol_error(codec: str, garbage: bytes) -> None:
    for blob in (
        garbage,
        (compression._ZSTD_MAGIC if codec == "zstd" else compression._LZ4_MAGIC) + garbage,
    ):
        try:
            out = decompress(codec, blob, 100_000)
        except ProtocolError:
            continue
        assert len(out) <= 100_000


@pytest.mark.parametrize("codec", CODECS)
@FAST
@given(
    data=payloads,
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 10**6),
)
def test_corrupted_frames_raise_only_protocol_error(
    codec: str, data: bytes, flips: List[tuple], cut: int
) -> None:
    packed = bytearray(compress(codec, data))
    for pos, xor in flips:
        packed[pos % len(packed)] ^= xor
    packed = packed[: max(1, cut % (len(packed) + 1))]
    try:
        out = decompress(codec, packed, len(data) + 16)
    except ProtocolError:
        return
    assert len(out) <= len(data) + 16


# -- the benchmark's link and the benchmark itself --------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def test_bench_relay_forwards_every_byte_and_stops_by_itself() -> None:
    if not (ROOT / "bench" / "compression.py").exists():
        pytest.skip("bench/ is not in this checkout")
    from bench.compression import Link

    link = Link(1000.0)
    try:
        payload = np.random.default_rng(5).bytes(300_000)
        link.receiver.keep.set()
        _, _, wire = link.send(payload, "raw", None)
        assert wire == len(payload) and link.receiver.last == payload
        _, _, wire = link.send(payload, "zstd", 1)
        assert link.receiver.last == payload
    finally:
        link.close()
    assert link.relay is not None
    assert not link.relay.thread.is_alive()  # the relay ended when the sender closed
    assert not link.receiver.thread.is_alive()


def test_bench_compression_runs() -> None:
    """Smoke test of bench/compression.py: it runs and prints every row (no timing checks)."""
    if not (ROOT / "bench" / "compression.py").exists():
        pytest.skip("bench/ is not in this checkout")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.compression", "--runs", "1", "--repeat", "1"]
        + ["--rates", "1000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| depth 1mm |")]
    assert [r.split("|")[3].strip() for r in rows] == ["raw", "zstd-1", "zstd-3", "lz4"]
