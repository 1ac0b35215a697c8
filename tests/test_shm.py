"""Shared memory between endpoints on one machine (protocol 1.1 "shm", src/socketengine/shm.py).

The core (writer, reader, descriptors, handshake) is tested in memory; the endpoints on
loopback in both layers; crashes with ``kill -9`` of a real second process; permissions
with a second user created for the test.
"""

from __future__ import annotations

import gc
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
import zlib
from typing import Any, Iterator, List, Optional

import pytest
from conftest import wait_for
from test_parity import LAYERS, AioThread, loop_thread, make_client, make_host  # noqa: F401

from socketengine import Client, Host, aio, frames, shm
from socketengine.errors import ProtocolError
from socketengine.protocol import Protocol, Role
from socketengine.sendqueue import SendQueue

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.skipif(not shm.available(), reason="shared memory needs Linux memfd")

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _shm_maps() -> List[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if "socketengine-shm" in line]


def _memfds() -> List[str]:
    """This process's descriptors of shared memory segments (not the identity memfd)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "socketengine-shm" in target:
            out.append(target)
    return out


def _dev_shm() -> List[str]:
    """socketengine's files in /dev/shm: there must never be any (memfds have no name).
    Other programs' files are ignored: this machine runs other benchmarks meanwhile."""
    names = os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []
    return sorted(n for n in names if "socketengine" in n)


# -- the core, in memory ---------------------------------------------------------------------


def _reader() -> shm.ShmReader:
    ident = shm.identity()
    assert ident is not None
    return shm.ShmReader(ident[0], ident[2])


def _take(n: int) -> bytearray:
    return bytearray(n)


def test_a_slot_round_trips_and_is_reused_only_once_released() -> None:
    writer, reader = shm.ShmWriter(1), _reader()
    try:
        full = shm.SLOTS * shm.SEGMENTS
        descs = [writer.put([bytes([i]) * 1000], 1000) for i in range(full)]
        assert all(d is not None for d in descs)
        # Every slot is in flight: the next frame goes through the socket, nothing waits.
        assert writer.put([b"x" * 1000], 1000) is None
        assert writer.fallbacks == 1
        assert bytes(reader.read(descs[0], 1 << 20, _take)) == b"\x00" * 1000
        again = writer.put([b"y" * 1000], 1000)  # the released slot
        assert again is not None
        for i, d in enumerate(descs[1:], 1):
            assert bytes(reader.read(d, 1 << 20, _take)) == bytes([i]) * 1000
        assert bytes(reader.read(again, 1 << 20, _take)) == b"y" * 1000
    finally:
        writer.close()
        reader.close()


@pytest.mark.parametrize("lease", [True, False])
def test_a_held_array_keeps_its_slot_until_it_is_gone(lease: bool, monkeypatch: Any) -> None:
    monkeypatch.setattr(shm, "LEASE", lease)
    writer, reader = shm.ShmWriter(1), _reader()
    try:
        held = []
        for i in range(shm.SLOTS * shm.SEGMENTS):
            desc = writer.put([bytes([i]) * 1000], 1000)
            assert desc is not None
            held.append(np.frombuffer(reader.read(desc, 1 << 20, _take), np.uint8))
        # Leased: every slot is an array the application holds; copied: all released.
        assert (writer.put([b"z" * 1000], 1000) is None) is lease
        for i, a in enumerate(held):
            assert (a == i).all()  # unchanged while held
        del held, a
        desc = writer.put([b"w" * 1000], 1000)
        assert desc is not None
        assert bytes(reader.read(desc, 1 << 20, _take)) == b"w" * 1000
    finally:
        writer.close()
        reader.close()


def test_a_descriptor_for_an_overwritten_or_foreign_slot_is_refused() -> None:
    writer, reader = shm.ShmWriter(1), _reader()
    try:
        desc = writer.put([b"a" * 100], 100)
        assert desc is not None
        seg_id, fd, size, off, length, seq = shm.DESCRIPTOR.unpack(desc)
        with pytest.raises(ProtocolError, match="overwritten"):
            reader.read(shm.DESCRIPTOR.pack(seg_id, fd, size, off, length, seq + 1), 1 << 20, _take)
        with pytest.raises(ProtocolError, match="outside"):
            reader.read(shm.DESCRIPTOR.pack(seg_id, fd, size, off, size, seq), 1 << 40, _take)
        with pytest.raises(ProtocolError, match="max_message"):
            reader.read(desc, 10, _take)
        with pytest.raises(ProtocolError, match="another segment"):
            reader.read(shm.DESCRIPTOR.pack(seg_id + 7, fd, size, off, length, seq), 1 << 20, _take)
        with pytest.raises(ProtocolError, match="cannot open"):
            reader.read(
                shm.DESCRIPTOR.pack(seg_id + 8, 999_999, size, off, length, seq), 1 << 20, _take
            )
        with pytest.raises(ProtocolError, match="wrong size"):
            reader.read(desc[:-1], 1 << 20, _take)
        assert bytes(reader.read(desc, 1 << 20, _take)) == b"a" * 100
    finally:
        writer.close()
        reader.close()


def test_larger_frames_get_a_new_segment_and_the_old_one_is_closed_once_read() -> None:
    before = _fds()
    writer, reader = shm.ShmWriter(1), _reader()
    small = writer.put([b"s" * 100], 100)
    big = writer.put([b"b" * 100_000], 100_000)
    assert small is not None and big is not None
    reader.read(small, 1 << 20, _take)
    reader.read(big, 1 << 20, _take)
    both = _fds()  # both segments open, and mapped by the reader
    writer.put([b"c" * 10], 10)  # the writer notices the old segment is done
    assert _fds() < both
    # the writer's current segment; the reader keeps both of its mappings
    assert len({m.split()[0] for m in _shm_maps()}) == 3
    writer.close()
    reader.close()
    assert _fds() == before
    assert _shm_maps() == [] and _memfds() == []


def test_an_idle_segment_of_the_current_size_is_reused_not_closed() -> None:
    writer, reader = shm.ShmWriter(1), _reader()
    try:
        first = [writer.put([b"a" * 1000], 1000) for _ in range(shm.SLOTS)]
        spill = writer.put([b"b" * 1000], 1000)  # every slot in flight: a second segment
        assert len(writer._all) == 2
        for desc in first + [spill]:
            reader.read(desc, 1 << 20, _take)
        # Filling the second segment and one more takes the first one's released slots
        # instead of closing it and faulting in a third.
        more = [writer.put([b"c" * 1000], 1000) for _ in range(shm.SLOTS)]
        assert all(d is not None for d in more)
        assert len(writer._all) == 2 and writer.fallbacks == 0
        for desc in more:
            assert bytes(reader.read(desc, 1 << 20, _take)) == b"c" * 1000
    finally:
        writer.close()
        reader.close()


class _Clock:
    """Stands in for ``shm.time``: each sleep runs ``on_sleep`` (no real waiting)."""

    def __init__(self, on_sleep: Any) -> None:
        self.now = 0.0
        self.sleeps = 0
        self.on_sleep = on_sleep

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds
        self.on_sleep(self.sleeps)


def test_a_thread_writer_waits_briefly_for_a_slot_then_not_while_the_reader_stalls(
    monkeypatch: Any,
) -> None:
    writer, reader = shm.ShmWriter(1), _reader()
    writer.slot_wait = 0.002
    try:
        full = [writer.put([bytes([i]) * 1000], 1000) for i in range(shm.SLOTS * shm.SEGMENTS)]
        # The reader releases a slot during the wait: the frame takes it.
        clock = _Clock(lambda n: reader.read(full[0], 1 << 20, _take) if n == 3 else None)
        monkeypatch.setattr(shm, "time", clock)
        assert writer.put([b"w" * 1000], 1000) is not None
        assert clock.sleeps == 3 and writer.fallbacks == 0
        # Nothing released within slot_wait: the socket, and no further waits...
        clock.on_sleep = lambda n: None
        assert writer.put([b"x" * 1000], 1000) is None
        waited = clock.sleeps
        assert waited > 3 and writer.fallbacks == 1
        assert writer.put([b"y" * 1000], 1000) is None
        assert clock.sleeps == waited and writer.fallbacks == 2
        # ...until a slot is free again.
        reader.read(full[1], 1 << 20, _take)
        assert writer.put([b"z" * 1000], 1000) is not None
        for desc in full[2:]:
            reader.read(desc, 1 << 20, _take)
        assert writer.put([b"v" * 1000], 1000) is not None
        assert clock.sleeps == waited  # free slots: no wait
    finally:
        writer.close()
        reader.close()


def test_the_send_queue_turns_large_data_frames_into_descriptors() -> None:
    queue = SendQueue(1 << 30)
    queue.shm = shm.ShmWriter(1000)
    try:
        big = np.arange(1000, dtype=np.float64)
        parts, n = frames.value_frame(frames.DATA, "a", big)
        queue.push(parts, n)
        queue.push(*frames.value_frame(frames.DATA, "small", np.zeros(3)))
        queue.push_item(frames.value_item("x", 1))  # type: ignore[arg-type]
        queue.to_wire(queue.take_inbox())
        wire = b"".join(bytes(p) for p in queue.wire_batch(100))
        assert queue.queued == len(wire)  # the bytes that left shared memory are not queued
        decoder = frames.FrameDecoder(expect_preamble=False)
        got = decoder.feed(wire)
        assert [f.flags & frames.FLAG_SHM for f in got] == [frames.FLAG_SHM, 0, 0]
        assert len(got[0].data) == shm.DESCRIPTOR.size
    finally:
        queue.shm.close()


def _give(protocol: Protocol, data: bytes) -> None:
    """Bytes into the protocol's decoder, the way an I/O layer does (frames stay there)."""
    view = memoryview(data)
    while view:
        buf = protocol.decoder.get_buffer()
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        protocol.decoder.buffer_updated(n)
        view = view[n:]


def _pair(host_kwargs: Any = None, client_kwargs: Any = None) -> Any:
    host = Protocol(Role.HOST, **(host_kwargs or {}))
    client = Protocol(Role.CLIENT, name="c", **(client_kwargs or {}))
    for _ in range(4):  # bounded: the handshake takes two round trips at most
        _give(host, client.data_to_send())
        host.events()
        _give(client, host.data_to_send())
        client.events()
    return host, client


@pytest.mark.parametrize("token", [None, b"secret"])
def test_the_handshake_proves_same_machine_same_user(token: Optional[bytes]) -> None:
    host, client = _pair(
        {"shm_threshold": 10, "token": token}, {"shm_threshold": 10, "token": token}
    )
    assert host.is_open and client.is_open
    assert host.shm_writer is not None and host.shm_reader is not None
    assert client.shm_writer is not None and client.shm_reader is not None
    # A value through the core both ways: descriptor out, array back.
    queue = SendQueue(1 << 30)
    queue.shm = client.shm_writer
    value = np.arange(100, dtype=np.int32)
    queue.push(*frames.value_frame(frames.DATA, "v", value))
    queue.to_wire(queue.take_inbox())
    _give(host, b"".join(bytes(p) for p in queue.wire_batch(10)))
    (frame,) = host.events()
    assert frame.flags == 0 and np.array_equal(frame.value(), value)
    host.close_shm()
    client.close_shm()


def test_a_burst_of_descriptors_is_copied_out_one_frame_at_a_time() -> None:
    host, client = _pair({"shm_threshold": 10}, {"shm_threshold": 10})
    queue = SendQueue(1 << 30)
    queue.shm = client.shm_writer
    values = [np.full(100_000, i, np.uint8) for i in range(3)]
    queue.push_item(frames.value_item("before", 0))  # type: ignore[arg-type]
    for value in values:
        queue.push(*frames.value_frame(frames.DATA, "v", value))
    queue.push_item(frames.value_item("after", 1))  # type: ignore[arg-type]
    queue.to_wire(queue.take_inbox())
    _give(host, b"".join(bytes(p) for p in queue.wire_batch(100)))
    got, sizes = [], []
    for _ in range(5):  # bounded: one shared-memory frame per call
        events = host.events()
        if not events:
            break
        sizes.append(len(events))
        got.extend(frame.value() for frame in events)
    # Each slot is copied out only once the frame before it was handed over, so that
    # the receive buffer of a frame nobody kept can be reused for the next one.
    assert sizes == [2, 1, 1, 1] and not host.decoder.frames
    assert got[0] == 0 and got[4] == 1
    assert all(np.array_equal(a, b) for a, b in zip(got[1:4], values))
    host.close_shm()
    client.close_shm()


@pytest.mark.parametrize("side", ["host", "client", "both"])
def test_either_side_turning_it_off_means_the_socket(side: str) -> None:
    on, off = {"shm_threshold": 10}, {"shm_threshold": None}
    host, client = _pair(off if side != "client" else on, off if side != "host" else on)
    assert host.is_open and client.is_open
    assert (host.shm_writer, host.shm_reader, client.shm_writer, client.shm_reader) == (None,) * 4


def test_a_claim_the_host_cannot_verify_means_the_socket(caplog: Any) -> None:
    client = Protocol(Role.CLIENT, name="c", shm_threshold=10)
    pid, fd, tag = shm.identity()  # type: ignore[misc]
    for bad in ([pid, fd, os.urandom(16)], [pid, 999_999, tag], [1 << 40, fd, tag], "x"):
        host = Protocol(Role.HOST, shm_threshold=10)
        hello = Protocol(Role.CLIENT, name="c")._announce({"name": "c", "nonce": os.urandom(16)})
        hello["shm"] = bad
        _give(
            host, frames.PREAMBLE + b"".join(frames.encode_frame(frames.HELLO, "", _msgpack(hello)))
        )
        with caplog.at_level("DEBUG", logger="socketengine"):
            host.events()
        assert host.is_open and host.shm_writer is None
        assert b"shm_ok" not in host.data_to_send()
    del client
    assert "shared memory not used" in caplog.text


def _msgpack(value: Any) -> bytes:
    from socketengine import codec

    return codec.encode(value)[0]


def test_a_descriptor_from_a_peer_that_never_negotiated_closes_the_connection() -> None:
    host, client = _pair()
    desc = shm.DESCRIPTOR.pack(1, 3, 128, 64, 0, 1)
    raw = frames.encode_frame(
        frames.DATA, "x", _msgpack(b""), [desc], len(desc), flags=frames.FLAG_SHM
    )
    _give(host, b"".join(raw))
    with pytest.raises(ProtocolError, match="not negotiated"):
        host.events()


# -- endpoints, both layers --------------------------------------------------------------------


def _conn_protocols(h: Any) -> List[Protocol]:
    return [c.engine.protocol for c in list(h.ep._conns.values())]


@pytest.mark.parametrize("layer", LAYERS)
def test_arrays_and_raw_images_travel_through_shared_memory(
    layer: str,
    loop_thread: AioThread,  # noqa: F811
) -> None:
    h = make_host(layer, loop_thread)
    c = make_client(layer, loop_thread, h.ep.port)
    try:
        wait_for(lambda: _conn_protocols(h) and _conn_protocols(h)[0].shm_writer is not None)
        big = np.random.default_rng(1).integers(0, 255, (480, 640, 3), dtype=np.uint8)
        small = np.arange(10)
        c.do("write", "big", big)
        c.do("write", "small", small)
        c.do("write_image", big, "cam")
        h.do("write_all", "back", big)
        wait_for(lambda: h.do("get", "big") is not None and h.do("get", "cam") is not None)
        wait_for(lambda: c.do("get", "back") is not None)
        for got in (h.do("get", "big"), h.do("get", "cam"), c.do("get", "back")):
            assert np.array_equal(got, big) and got.flags.writeable
        assert np.array_equal(h.do("get", "small"), small)
        assert c.ep._conn.engine.queue.shm.frames == 2  # big and cam; small is below the threshold
        assert _conn_protocols(h)[0].shm_writer.frames == 1
        del got
    finally:
        c.close()
        h.close()
    # The values the endpoints keep are views of the slots (leased): mapped until dropped.
    h = c = None  # drop the endpoints and the values they keep
    _gone()


def _gone() -> None:
    """Nothing mapped and no segment descriptor left, once nothing holds a value."""
    gc.collect()
    wait_for(lambda: _shm_maps() == [] and _memfds() == [], what="no shared memory left")


@pytest.mark.parametrize("layer", LAYERS)
def test_shm_false_sends_through_the_socket(
    layer: str,
    loop_thread: AioThread,  # noqa: F811
) -> None:
    h = make_host(layer, loop_thread)
    c = make_client(layer, loop_thread, h.ep.port, shm=False)
    try:
        big = np.ones((1000, 1000), dtype=np.uint8)
        c.do("write", "big", big)
        wait_for(lambda: h.do("get", "big") is not None)
        assert np.array_equal(h.do("get", "big"), big)
        assert c.ep._conn.engine.queue.shm is None
        assert _conn_protocols(h)[0].shm_reader is None
    finally:
        c.close()
        h.close()


@pytest.mark.parametrize(
    "kwargs, error",
    [({"shm": "yes"}, TypeError), ({"shm": 1}, TypeError), ({"shm_threshold": 0}, ValueError)],
)
def test_both_layers_check_the_shm_parameters(kwargs: Any, error: type) -> None:
    with pytest.raises(error):
        Host(port=0, **kwargs)
    with pytest.raises(error):
        aio.Host(port=0, **kwargs)
    with pytest.raises(error):
        Client(port=1, **kwargs)
    with pytest.raises(error):
        aio.Client(port=1, **kwargs)


def test_the_values_a_receiver_holds_stay_unchanged() -> None:
    h = Host(port=0)
    c = Client(port=h.port)
    try:
        held = []
        for i in range(3 * shm.SLOTS):
            c.write("a", np.full(100_000, i, dtype=np.uint8))
            wait_for(lambda i=i: h.get("a") is not None and h.get("a")[0] == i)
            held.append(h.get("a"))
        for i, a in enumerate(held):
            assert (a == i).all()
    finally:
        c.close()
        h.close()


def test_many_connections_leave_no_descriptor_or_mapping_behind() -> None:
    h = Host(port=0)
    try:
        c = Client(port=h.port)
        c.write("a", np.zeros(200_000))
        wait_for(lambda: h.get("a") is not None)
        c.close()
        wait_for(lambda: not h.clients())
        before = _fds()
        dev = _dev_shm()
        for i in range(30):
            c = Client(port=h.port)
            c.write("a", np.full(200_000 + i * 8, i, dtype=np.uint8))
            h.write_all("b", np.full(300_000, i, dtype=np.uint8))
            wait_for(lambda i=i: h.get("a") is not None and h.get("a")[0] == i)
            wait_for(lambda i=i, c=c: c.get("b") is not None and c.get("b")[0] == i)
            c.close()
            wait_for(lambda: not h.clients())
        wait_for(lambda: _fds() <= before, what=f"fds back to {before}")
        assert _dev_shm() == dev
    finally:
        h.close()
    h = c = None  # drop the endpoints and the values they keep
    _gone()


# -- a writer many times faster than the reader ------------------------------------------------

_FAST_WRITER = """
import sys, time, zlib
import numpy as np
from socketengine import Client
c = Client(port=int(sys.argv[1]), name="cam")
base = np.random.default_rng(7).integers(0, 255, (480, 640, 3), dtype=np.uint8)
deadline = time.monotonic() + float(sys.argv[2])
i = 0
while time.monotonic() < deadline:
    frame = np.roll(base, i, axis=1)
    frame[0, 0, :] = 0
    flat = frame.reshape(-1)
    crc = zlib.crc32(flat[8:])
    flat[:8] = np.frombuffer(i.to_bytes(4, "little") + crc.to_bytes(4, "little"), np.uint8)
    c.write_image(frame, "cam")
    i += 1
c.write("count", i)
c.close()
"""


def _check_frame(frame: Any) -> int:
    flat = frame.reshape(-1)
    index = int.from_bytes(bytes(flat[:4]), "little")
    crc = int.from_bytes(bytes(flat[4:8]), "little")
    assert zlib.crc32(flat[8:]) == crc, f"frame {index} is torn"
    return index


def test_a_slow_reader_gets_only_whole_frames_newest_first() -> None:
    h = Host(port=0)
    proc = subprocess.Popen(
        [sys.executable, "-c", _FAST_WRITER, str(h.port), "3"],
        env={**os.environ, "PYTHONPATH": SRC},
    )
    seen: List[int] = []
    used = False
    try:
        deadline = time.monotonic() + 30
        while h.get("count") is None and time.monotonic() < deadline:
            frame = h.get("cam")
            used = used or any(c.engine.protocol.shm_reader for c in list(h._conns.values()))
            if frame is not None:
                seen.append(_check_frame(frame))
            time.sleep(0.05)  # the slow reader: a few frames per second
        assert proc.wait(30) == 0
        total = h.get("count")
        assert total is not None
        assert seen == sorted(seen)
        assert len(set(seen)) < total / 3, "the writer was not many times faster"
        assert _check_frame(h.get("cam")) == total - 1  # the newest frame wins
        assert used, "the frames did not go through shared memory"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        h.close()


# -- kill -9 ------------------------------------------------------------------------------------

_STREAMER = """
import sys, time
import numpy as np
from socketengine import Client, Host
role, port = sys.argv[1], int(sys.argv[2])
ep = Client(port=port) if role == "client" else Host(port=port)
if role == "host":
    print(ep.port, flush=True)
i = 0
while True:  # killed by the test
    a = np.full(500_000, i % 251, dtype=np.uint8)
    if role == "client":
        ep.write("a", a)
    else:
        ep.write_all("a", a)
    i += 1
    time.sleep(0.001)
"""


def _streamer(role: str, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _STREAMER, role, str(port)],
        env={**os.environ, "PYTHONPATH": SRC},
        stdout=subprocess.PIPE,
        text=True,
    )


def _killed(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def test_kill_9_of_the_writing_client_leaves_nothing_behind() -> None:
    dev = _dev_shm()
    h = Host(port=0, heartbeat=0.5)
    before = _fds()
    proc = _streamer("client", h.port)
    try:
        wait_for(lambda: h.get("a") is not None, timeout=20)
        wait_for(lambda: any(p.shm_reader for p in [c.engine.protocol for c in h._conns.values()]))
        wait_for(lambda: _shm_maps(), what="the client's segment mapped here")
        _killed(proc)
        wait_for(lambda: not h.clients(), timeout=10)
        value = h.get("a")
        assert (value == value[0]).all()  # what the host keeps of the dead client stays valid
        del value
    finally:
        if proc.poll() is None:
            _killed(proc)
        h.close()
    h = None  # drop the host and the values it keeps
    _gone()
    assert _fds() <= before
    assert _dev_shm() == dev


def test_kill_9_of_the_writing_host_leaves_nothing_behind() -> None:
    dev = _dev_shm()
    proc = _streamer("host", 0)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    c = Client(port=port, heartbeat=0.5)
    try:
        wait_for(lambda: c.get("a") is not None, timeout=20)
        wait_for(lambda: _shm_maps(), what="the host's segment mapped here")
        _killed(proc)
        wait_for(lambda: not c.connected, what="the client to notice")
        value = c.get("a")
        assert (value == value[0]).all()  # what the client holds stays valid
        del value
        assert _dev_shm() == dev
    finally:
        if proc.poll() is None:
            _killed(proc)
        c.close()
    c = None  # drop the client and the values it keeps
    _gone()


# -- another user --------------------------------------------------------------------------------

_OTHER_USER = "socketengine-shm-test"

_TRY_OPEN = """
import mmap, os, sys
path = sys.argv[1]
try:
    fd = os.open(path, os.O_RDONLY)
except PermissionError:
    print("denied")
else:
    m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    print("mapped", m[:8])
"""


@pytest.fixture
def other_user() -> Iterator[pwd.struct_passwd]:
    if os.geteuid() != 0:
        pytest.skip("creating a second user needs root")
    if shutil.which("useradd") is None or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs useradd and a system /usr/bin/python3 the other user may run")
    try:
        user = pwd.getpwnam(_OTHER_USER)
    except KeyError:
        done = subprocess.run(["useradd", "--no-create-home", _OTHER_USER], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"useradd failed: {done.stderr.decode().strip()}")
        user = pwd.getpwnam(_OTHER_USER)
    yield user


def _as(user: pwd.struct_passwd, *args: str) -> str:
    def drop() -> None:
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    done = subprocess.run(
        ["/usr/bin/python3", "-c", *args], preexec_fn=drop, capture_output=True, text=True, cwd="/"
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_another_user_cannot_map_a_segment_or_pass_the_handshake(other_user: Any) -> None:
    writer = shm.ShmWriter(1)
    try:
        desc = writer.put([b"secret!!" * 10], 80)
        assert desc is not None
        _, fd, *_ = shm.DESCRIPTOR.unpack(desc)
        pid, ident_fd, _ = shm.identity()  # type: ignore[misc]
        assert _as(other_user, _TRY_OPEN, f"/proc/{pid}/fd/{fd}") == "denied"
        assert _as(other_user, _TRY_OPEN, f"/proc/{pid}/fd/{ident_fd}") == "denied"
        # The same process as this user maps it (the check above is the kernel's).
        assert _as(pwd.getpwuid(os.getuid()), _TRY_OPEN, f"/proc/{pid}/fd/{fd}").startswith(
            "mapped"
        )
    finally:
        writer.close()
