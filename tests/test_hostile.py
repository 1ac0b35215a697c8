"""Hostile and heavy input: huge announced frames, a thousand clients, junk floods."""

import resource
import socket
import threading

import pytest
from conftest import wait_for
from test_endpoints import _handshake

from socketengine import Client, Host, frames


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")  # pragma: no cover


def _fd_room(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.skip(f"needs {n} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_NOFILE"), reason="POSIX")
def test_announced_giant_frames_do_not_make_memory_jump() -> None:
    with Host(port=0) as h, Client(port=h.port) as good:
        liars = []
        before = _rss()
        for _ in range(20):  # each announces a 60 MB frame, then sends 1 KiB of it
            s = socket.create_connection(("127.0.0.1", h.port))
            _handshake(s)
            s.sendall(frames.HEADER.pack(frames.DATA, 0, 1, 0, 1, 60_000_000) + b"x\xc0")
            s.sendall(b"\0" * 1024)
            liars.append(s)
        wait_for(lambda: sum(c.bytes_in > 1024 for c in h.clients()) >= 20)
        grown = _rss() - before
        assert grown < 50_000_000, f"RSS grew by {grown} bytes for 1.2 GB announced"
        good.write("ok", 1)
        wait_for(lambda: h.get("ok") == 1)
        for s in liars:
            s.close()


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_NOFILE"), reason="POSIX")
def test_a_thousand_concurrent_clients_on_one_host() -> None:
    n = 1000
    _fd_room(2 * n + 200)
    with Host(port=0, max_clients=n + 10) as h:
        before_threads = threading.active_count()
        before = _rss()
        socks = []
        try:
            for _i in range(n):
                s = socket.create_connection(("127.0.0.1", h.port))
                _handshake(s)
                socks.append(s)
            wait_for(lambda: len(h.clients()) == n, timeout=30)
            per_connection = (_rss() - before) / n
            for i, s in enumerate(socks):
                s.sendall(b"".join(frames.encode_value_frame(frames.DATA, "id", i)))
            wait_for(lambda: len(h.get_all("id")) == n, timeout=30)
            assert sorted(h.get_all("id")) == list(range(n))
            assert h.write_all("hello", "everyone") == n
            dec = frames.FrameDecoder(expect_preamble=False)
            for s in socks[:: n // 20]:  # a sample: every one of them got it
                s.settimeout(10)
                got: list = []
                while not any(f.type == frames.DATA for f in got):
                    got += dec.feed(s.recv(65536))
                assert [f.value() for f in got if f.type == frames.DATA] == ["everyone"]
            assert threading.active_count() - before_threads <= 1  # no thread per client
            print(f"host RSS per connection: {per_connection:.0f} bytes")
            assert per_connection < 64 * 1024, f"{per_connection:.0f} bytes per connection"
        finally:
            for s in socks:
                s.close()
        wait_for(lambda: not h._conns, timeout=30)


def test_junk_flood_after_the_handshake_closes_only_the_sender() -> None:
    with Host(port=0) as h, Client(port=h.port) as good:
        for junk in (b"\xff" * 4096, frames.HEADER.pack(0x7F, 0, 0, 0, 0, 0), b"\x10" * 64):
            s = socket.create_connection(("127.0.0.1", h.port))
            _handshake(s)
            s.sendall(junk)
            s.settimeout(5)
            try:
                while s.recv(65536):
                    pass
            except ConnectionResetError:
                pass
            s.close()
        good.write("fine", True)
        wait_for(lambda: h.get("fine") is True)
        assert len(h.clients()) == 1
