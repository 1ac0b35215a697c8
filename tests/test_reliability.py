"""Heartbeats, slow consumers, image conflation, frozen and killed peers."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from conftest import wait_for
from test_endpoints import _handshake

from socketengine import Client, Host, WriteTimeout


def test_heartbeat_drops_a_silent_peer() -> None:
    gone: list = []
    with Host(port=0, heartbeat=0.2) as h:
        h.on_disconnect(lambda conn: gone.append(conn.name))
        raw = socket.create_connection(("127.0.0.1", h.port))
        _handshake(raw)  # then never answers a PING
        wait_for(lambda: len(h.clients()) == 1)
        wait_for(lambda: gone == ["raw"], timeout=5, what="the silent peer to be dropped")
        assert h.clients() == []
        raw.close()


def test_heartbeat_keeps_an_idle_healthy_link() -> None:
    with Host(port=0, heartbeat=0.1) as h, Client(port=h.port, heartbeat=0.1) as c:
        conn = wait_for(lambda: h.clients() and h.clients()[0])
        start = conn.bytes_in
        # Idle for many heartbeat intervals: pings flow, nobody is declared dead.
        wait_for(lambda: conn.bytes_in >= start + 16 * 8, what="pings from the client")
        assert c.connected and conn.is_open
        c.write("still", "here")
        wait_for(lambda: h.get("still") == "here")


def test_heartbeat_none_disables_pings() -> None:
    with Host(port=0, heartbeat=None) as h, Client(port=h.port, heartbeat=None) as c:
        assert h.heartbeat is None and c.heartbeat is None
        c.write("a", 1)
        wait_for(lambda: h.get("a") == 1)
    with pytest.raises(ValueError):
        Host(port=0, heartbeat=0, open=False)


def test_images_are_conflated_for_a_slow_receiver() -> None:
    with Host(port=0) as h, Client(port=h.port) as c:
        conn = wait_for(lambda: h.clients() and h.clients()[0])
        c._conn.pause_reading()  # the receiver stops reading: a very slow consumer
        wait_for(lambda: c._conn.reading_paused)
        frame = np.zeros((500, 1000, 3), np.uint8)
        for i in range(60):
            frame = np.full((500, 1000, 3), i, np.uint8)
            h.write_image_all(frame)
            # Never more than the kernel's buffers plus one waiting frame per channel.
            assert conn.stats()["queued_bytes"] <= 3 * frame.nbytes
        assert conn.images_dropped > 0
        assert conn.images_sent + conn.images_dropped == 60
        c._conn.resume_reading()
        wait_for(lambda: c.get("image") is not None and c.get("image")[0, 0, 0] == 59)
        assert np.array_equal(c.get("image"), frame)
        assert conn.stats()["images_dropped"] == conn.images_dropped


def test_write_all_drops_a_slow_consumer_and_keeps_serving_the_rest() -> None:
    dropped: list = []
    with Host(port=0, max_buffer=1 << 20, timeout=0.3) as h:
        h.on_disconnect(lambda conn: dropped.append(conn.name))
        slow = Client(port=h.port, name="slow")
        fast = Client(port=h.port, name="fast")
        wait_for(lambda: len(h.clients()) == 2)
        slow._conn.pause_reading()
        slow_conn = h.get_client("slow")
        payload = b"x" * 65536
        i = 0
        for i in range(2_000):  # bounded; the slow one is dropped long before
            h.write_all("data", [i, payload])
            assert slow_conn.stats()["queued_bytes"] <= 2 * (1 << 20) + 65600
            # A healthy consumer keeps up with a producer paced at its speed.
            wait_for(lambda i=i: fast.get("data") is not None and fast.get("data")[0] == i)
            if dropped:
                break
        assert dropped == ["slow"]
        h.write_all("data", ["after", b""])
        wait_for(lambda: fast.get("data") == ["after", b""])
        fast.close()
        slow.close()


def test_blocking_write_to_a_full_peer_times_out() -> None:
    with Host(port=0) as h:
        c = Client(port=h.port, max_buffer=1 << 20, timeout=0.2)
        conn = wait_for(lambda: h.clients() and h.clients()[0])
        conn.pause_reading()
        with pytest.raises(WriteTimeout, match="not reading"):
            for i in range(10_000):
                c.write("x", [i, b"y" * 65536])
        conn.resume_reading()
        c.write("x", "ok")  # room again once the host reads
        wait_for(lambda: h.get("x") == "ok")
        c.close()


def test_writers_in_several_threads_to_a_stalled_host_lose_nothing() -> None:
    # While the client's socket is full (the host stopped reading) a threaded write
    # stages its value without the connection lock, as in a burst: the flush that the
    # socket's writability triggers takes it.  Writers in three threads, the host
    # stalled and released three times: every value arrives once, in each thread's
    # order.
    threads = 3
    got: list = [[] for _ in range(threads)]
    filler = "x" * 200  # the socket buffers fill in a few MB
    with Host(port=0) as h, Client(port=h.port) as c:
        for k in range(threads):
            h.on(f"t{k}", lambda value, *_, k=k: got[k].append(value[0]))
        at_host = wait_for(lambda: h.clients() and h.clients()[0])
        at_client = c._conn
        assert at_client is not None
        stop = threading.Event()
        written = [0] * threads

        def writer(k: int) -> None:
            i = 0
            while not stop.is_set() and i < 2_000_000:  # bounded either way
                c.write(f"t{k}", [i, filler])
                i += 1
            written[k] = i

        seen = [0]

        def staged_while_full() -> bool:
            # Seen three polls in a row (not a writer caught between its append and
            # its check): items wait staged for the socket to drain.
            full = at_client._want_write and not at_client._flush_scheduled
            seen[0] = seen[0] + 1 if full and at_client._queue.staged else 0
            return seen[0] >= 3

        workers = [threading.Thread(target=writer, args=(k,), daemon=True) for k in range(3)]
        for w in workers:
            w.start()
        try:
            for _ in range(3):
                at_host.pause_reading()
                seen[0] = 0
                wait_for(staged_while_full, 20, "writes staged while the socket is full")
                before = sum(map(len, got))
                at_host.resume_reading()
                wait_for(lambda n=before: sum(map(len, got)) > n, 20, "values after the stall")
        finally:
            stop.set()
            for w in workers:
                w.join(30)
        assert not any(w.is_alive() for w in workers)
        for k in range(threads):
            wait_for(lambda k=k: len(got[k]) >= written[k], 60, f"thread {k}'s values")
            assert got[k] == list(range(written[k])), f"thread {k}"


CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from socketengine import Client
    # shm=False: the frames must cross the socket to be cut mid-frame (test_shm.py
    # kills a writer that uses shared memory).
    c = Client(port=int(sys.argv[1]), name=sys.argv[2], heartbeat=0.2, shm=False)
    print("ready", flush=True)
    big = np.ones((4000, 4000), np.uint8)  # 16 MB frames: kills land mid-frame
    for i in range(100000):
        c.write("n", i)
        if sys.argv[2] == "big":
            c.write("big", big)
    """
)


def _child(port: int, name: str) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(port), name], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None and p.stdout.readline() == "ready\n"
    return p


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_a_client_killed_mid_frame_does_not_disturb_the_host() -> None:
    with Host(port=0) as h, Client(port=h.port, name="healthy") as healthy:
        p = _child(h.port, "big")
        wait_for(lambda: h.get_client("big") and h.get_client("big").bytes_in > 20_000_000)
        p.kill()
        p.wait(10)
        wait_for(lambda: h.get_client("big") is None, what="the killed client to be dropped")
        healthy.write("ok", 1)
        wait_for(lambda: h.get("ok") == 1)
        assert [c.name for c in h.clients()] == ["healthy"]


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="POSIX signals")
def test_a_frozen_client_is_dropped_and_does_not_stall_others() -> None:
    gone: list = []
    with (
        Host(port=0, heartbeat=0.2, max_buffer=1 << 20, timeout=0.5) as h,
        Client(port=h.port, name="healthy", heartbeat=0.2) as healthy,
    ):
        h.on_disconnect(lambda conn: gone.append(conn.name))
        p = _child(h.port, "frozen")
        wait_for(lambda: h.get_client("frozen") is not None)
        os.kill(p.pid, signal.SIGSTOP)
        try:
            payload = b"z" * 65536
            for i in range(2_000):  # bounded; the frozen one is dropped long before
                h.write_all("feed", [i, payload])
                # The healthy client keeps receiving everything, paced at its speed.
                wait_for(
                    lambda i=i: healthy.get("feed") is not None and healthy.get("feed")[0] == i
                )
                if "frozen" in gone:
                    break
            assert gone == ["frozen"]
            assert healthy.connected
        finally:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)


def test_many_connect_and_drop_sockets() -> None:
    with Host(port=0) as h, Client(port=h.port) as good:
        for _ in range(1000):  # a thousand connect-and-drop sockets
            s = socket.create_connection(("127.0.0.1", h.port))
            s.close()
        assert h._loop.running  # the I/O thread survived all of them
        good.write("alive", True)
        wait_for(lambda: h.get("alive") is True)
        wait_for(lambda: len(h._conns) == 1, what="dropped sockets to be forgotten")
        assert threading.active_count() < 20


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="POSIX signals")
def test_heartbeat_detects_a_frozen_client_without_traffic() -> None:
    gone: list = []
    with Host(port=0, heartbeat=0.2) as h:
        h.on_disconnect(lambda conn: gone.append(conn.name))
        p = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, time\n"
                "from socketengine import Client\n"
                "c = Client(port=int(sys.argv[1]), name='idle', heartbeat=0.2)\n"
                "print('ready', flush=True)\n"
                "time.sleep(60)\n",
                str(h.port),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
            wait_for(lambda: h.get_client("idle") is not None)
            os.kill(p.pid, signal.SIGSTOP)  # TCP stays up; only heartbeats can tell
            wait_for(lambda: gone == ["idle"], timeout=5, what="the frozen client to be dropped")
        finally:
            p.kill()
            p.wait(10)


def test_flush_waits_until_the_kernel_has_everything_or_times_out() -> None:
    with Host(port=0) as h, Client(port=h.port, max_buffer=1 << 27) as c:
        big = b"q" * 4_000_000
        c.write("big", big)
        c.flush(5)
        assert c._conn.stats()["queued_bytes"] == 0
        wait_for(lambda: h.get("big") == big)
        conn = wait_for(lambda: h.clients() and h.clients()[0])
        conn.pause_reading()  # the host stops reading: the kernel buffers fill up
        wait_for(lambda: conn.reading_paused)
        with pytest.raises(WriteTimeout, match="did not take"):
            for _ in range(10):  # 40 MB: more than loopback's buffers, less than max_buffer
                c.write("big", big)
            c.flush(0.3)
        conn.resume_reading()
        c.flush(10)  # everything goes once the host reads again
