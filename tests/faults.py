"""Adversarial tools for socketengine tests and probes (loopback only, always bounded).

* :class:`CuttingProxy` - a TCP proxy between a client and a host that can cut every
  link with a clean close (FIN both ways) or a reset (RST both ways), blackhole them
  (stop forwarding without closing) and resume; it counts the bytes forwarded each way.
* :class:`HandshakeFlooder` - N connections that never finish the socketengine
  handshake (idle, or dripping 1 byte per second), re-opened whenever the host closes
  them; bounded in count and in time.
* :class:`RawClient` / :func:`flood_channels` - a raw socketengine client (handshake with
  the library's sans-I/O :class:`~socketengine.protocol.Protocol`, then pre-encoded
  frames written with ``sendall``) that writes many distinct channel names fast.
* :class:`HostProcess` - a Host in a subprocess that can be killed with SIGKILL and
  restarted on the same port (first obtained from port 0).
* :class:`ClientsProcess` - N threaded Clients in a subprocess that report which of
  them are connected.

Importable by tests (``from faults import ...``) and by ``bench/`` (``from tests.faults
import ...``).  Nothing here touches the network beyond 127.0.0.1.
"""

from __future__ import annotations

import errno
import heapq
import json
import os
import queue
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from typing import IO, Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

from socketengine import frames
from socketengine.protocol import Protocol, Role, token_bytes
from socketengine.session import Session

__all__ = [
    "ClientsProcess",
    "CuttingProxy",
    "HandshakeFlooder",
    "HostProcess",
    "RawClient",
    "flood_channels",
    "raise_fd_limit",
    "rss_of",
]

LOOPBACK = "127.0.0.1"
_CHUNK = 65536  # per direction and link, the proxy holds at most this many bytes


def raise_fd_limit(n: int) -> int:
    """Raise this process's open-file limit to at least ``n`` (up to the hard limit).

    Returns the new soft limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        want = n if hard == resource.RLIM_INFINITY else min(n, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    return soft


def rss_of(pid: int, field: str = "VmRSS") -> int:
    """``VmRSS`` (or ``VmHWM``, the peak) of process ``pid`` in bytes (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


def _reset_close(sock: socket.socket) -> None:
    """Close ``sock`` so that the peer gets a TCP reset (SO_LINGER 0)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


# -- the cutting proxy -----------------------------------------------------------------


class _Link:
    """One client connection through the proxy and its upstream connection."""

    __slots__ = (
        "down",
        "up",
        "to_up",
        "to_down",
        "eof_down",
        "eof_up",
        "draining",
        "deadline",
        "frozen",
    )

    def __init__(self, down: socket.socket, up: Optional[socket.socket]) -> None:
        self.down = down  # accepted from the client
        self.up = up  # to the target; None while held by a blackhole
        self.to_up = bytearray()  # read from the client, not yet written upstream
        self.to_down = bytearray()  # read from the target, not yet written to the client
        self.eof_down = False  # the client half-closed
        self.eof_up = False  # the target half-closed
        self.draining = False  # cut cleanly: FIN sent both ways, reading until EOF
        self.deadline = 0.0
        self.frozen = False  # blackholed alone (freeze()): nothing forwarded

    def sockets(self) -> List[socket.socket]:
        return [self.down] if self.up is None else [self.down, self.up]


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 (port 0) forwarding every accepted connection to a target.

    One selector thread; at most ``max_links`` links at a time (further connections are
    closed at once) and at most 64 KiB held per direction and link, so memory is
    bounded.  Control methods (:meth:`cut_close`, :meth:`cut_reset`, :meth:`blackhole`,
    :meth:`resume`) act on every link open at the moment of the call and return once
    done.  Use as a context manager or call :meth:`close`.

    :param target_port: the port to forward to (on ``target_host``).
    :param drain_timeout: after a clean cut, seconds the proxy reads (and discards)
        until both peers have hung up, before closing regardless.
    """

    def __init__(
        self,
        target_port: int,
        target_host: str = LOOPBACK,
        *,
        max_links: int = 256,
        drain_timeout: float = 2.0,
        connect_timeout: float = 2.0,
    ) -> None:
        self.target = (target_host, target_port)
        self.max_links = max_links
        self.drain_timeout = drain_timeout
        self.connect_timeout = connect_timeout
        self.bytes_up = 0  # client -> target, bytes written to the target
        self.bytes_down = 0  # target -> client, bytes written to the client
        self.accepted = 0
        self.cuts = 0
        self.blackholed = False
        self._cut_at: Optional[Tuple[str, int, str]] = None  # (direction, byte mark, mode)
        self._links: List[_Link] = []
        self._sel = selectors.DefaultSelector()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._calls: queue.Queue[Tuple[Callable[[], None], threading.Event]] = queue.Queue()
        self._masks: Dict[socket.socket, int] = {}
        self._running = True
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="faults-proxy", daemon=True)
        self._thread.start()

    # -- public control ----------------------------------------------------------------

    @property
    def links(self) -> int:
        """Links currently forwarding or held (not those being drained after a cut)."""
        return sum(1 for link in list(self._links) if not link.draining)

    def wait_links(self, n: int, timeout: float = 10.0) -> None:
        """Wait until at least ``n`` links are open; ``TimeoutError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.links < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.links} links through the proxy, expected {n}")
            time.sleep(0.005)

    def cut_close(self, hold_new: bool = False) -> int:
        """Cut every link with a clean close: FIN to the client and to the target.

        Bytes held by the proxy are discarded; bytes the peers send afterwards are read
        and discarded until they hang up.  Ends a blackhole.  Returns the links cut.
        ``hold_new``: connections accepted afterwards are held (not connected to the
        target) until :meth:`resume`, as during a blackhole.
        """
        return self._call_counted(lambda: self._held_after(self._cut_close(), hold_new))

    def cut_reset(self, hold_new: bool = False) -> int:
        """Cut every link with a TCP reset (SO_LINGER 0) to both peers.  Ends a blackhole.
        ``hold_new`` as for :meth:`cut_close`."""
        return self._call_counted(lambda: self._held_after(self._cut_reset(), hold_new))

    def cut(self, mode: str = "close", hold_new: bool = False) -> int:
        """``cut_close()`` for ``mode="close"``, ``cut_reset()`` for ``mode="reset"``."""
        if mode == "close":
            return self.cut_close(hold_new)
        if mode == "reset":
            return self.cut_reset(hold_new)
        raise ValueError(f"mode must be 'close' or 'reset', not {mode!r}")

    def _held_after(self, n: int, hold_new: bool) -> int:
        if hold_new:  # every link is cut (draining): only new ones are held
            self.blackholed = True
            self._hold_new = True
        return n

    def cut_after(
        self, up: Optional[int] = None, down: Optional[int] = None, mode: str = "reset"
    ) -> None:
        """Cut every link (``mode`` "reset" or "close") once exactly ``up`` more bytes
        were forwarded to the target, or ``down`` more to the client (give one).

        Deterministic mid-frame cuts: the bytes beyond the mark are never forwarded.
        """
        if (up is None) == (down is None) or mode not in ("reset", "close"):
            raise ValueError("give exactly one of up= or down=, and mode 'reset' or 'close'")

        def do() -> None:
            if up is not None:
                self._cut_at = ("up", self.bytes_up + up, mode)
            else:
                assert down is not None
                self._cut_at = ("down", self.bytes_down + down, mode)
            self._update_all()

        self._call(do)

    def blackhole(self, new_links: bool = True) -> None:
        """Stop forwarding in both directions without closing anything.

        Bytes stay in the kernel buffers (the senders' writes succeed until they fill),
        as in a network partition.  With ``new_links`` (default), connections accepted
        meanwhile are held too (not connected to the target) until :meth:`resume`; a
        cut resets them.
        """

        def do() -> None:
            self.blackholed = True
            self._hold_new = new_links
            self._update_all()

        self._hold_new = new_links
        self._call(do)

    def freeze(self) -> None:
        """Blackhole only the links open now: nothing forwarded on them, nothing closed;
        links accepted afterwards work normally (a client's old link is dead while its
        new one is fine).  :meth:`resume` ends it."""

        def do() -> None:
            for link in self._links:
                link.frozen = True
            self._update_all()

        self._call(do)

    def resume(self) -> None:
        """End a blackhole: forward again what was held, connect held links upstream."""

        def do() -> None:
            self.blackholed = False
            for link in self._links:
                link.frozen = False
            for link in list(self._links):
                if link.up is None and not link.draining:
                    self._connect_up(link)
            self._update_all()

        self._call(do)

    def close(self) -> None:
        """Reset every link, stop listening and join the thread.  Idempotent."""
        if not self._running:
            return
        try:
            self._call(self._shutdown)
        except RuntimeError:
            pass
        self._thread.join(10)
        for sock in (self._wake_r, self._wake_w, self._listener):
            sock.close()
        self._sel.close()

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- loop thread -------------------------------------------------------------------

    _hold_new = True

    def _call(self, fn: Callable[[], None]) -> None:
        if not self._running or not self._thread.is_alive():
            raise RuntimeError("the proxy is closed")
        done = threading.Event()
        self._calls.put((fn, done))
        self._wake_w.send(b"x")
        if not done.wait(10):
            raise RuntimeError("the proxy thread did not answer within 10 s")

    def _call_counted(self, fn: Callable[[], int]) -> int:
        result: List[int] = []
        self._call(lambda: result.append(fn()))
        return result[0]

    def _shutdown(self) -> None:
        for link in list(self._links):
            self._drop(link, reset=True)
        self._running = False

    def _cut_close(self) -> int:
        n = 0
        self.blackholed = False
        for link in list(self._links):
            if link.draining:
                continue
            n += 1
            link.to_up.clear()
            link.to_down.clear()
            if link.up is None:  # held, never connected: just FIN the client
                self._shut_wr(link.down)
            else:
                self._shut_wr(link.down)
                self._shut_wr(link.up)
            link.draining = True
            link.deadline = time.monotonic() + self.drain_timeout
            self._update(link)
        self.cuts += n
        self._update_all()
        return n

    def _cut_reset(self) -> int:
        n = 0
        self.blackholed = False
        for link in list(self._links):
            if link.draining:
                continue
            n += 1
            self._drop(link, reset=True)
        self.cuts += n
        self._update_all()
        return n

    @staticmethod
    def _shut_wr(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _run(self) -> None:
        try:
            while self._running:
                timeout = 0.2
                for key, mask in self._sel.select(timeout):
                    sock = key.fileobj
                    if sock is self._wake_r:
                        self._run_calls()
                    elif sock is self._listener:
                        self._accept()
                    else:
                        link = key.data
                        if link in self._links:
                            self._event(link, sock, mask)  # type: ignore[arg-type]
                now = time.monotonic()
                for link in list(self._links):
                    if link.draining and now > link.deadline:
                        self._drop(link, reset=False)
        finally:
            for link in list(self._links):
                self._drop(link, reset=True)
            self._running = False
            # Answer callers still waiting.
            while True:
                try:
                    _, done = self._calls.get_nowait()
                except queue.Empty:
                    break
                done.set()

    def _run_calls(self) -> None:
        try:
            self._wake_r.recv(4096)
        except BlockingIOError:
            pass
        while True:
            try:
                fn, done = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
            finally:
                done.set()

    def _accept(self) -> None:
        for _ in range(64):
            try:
                down, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.accepted += 1
            if len(self._links) >= self.max_links:
                _reset_close(down)
                continue
            down.setblocking(False)
            down.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(down, None)
            self._links.append(link)
            if not (self.blackholed and self._hold_new):
                self._connect_up(link)
            self._update(link)

    def _connect_up(self, link: _Link) -> None:
        try:
            up = socket.create_connection(self.target, timeout=self.connect_timeout)
        except OSError:
            self._drop(link, reset=True)  # the client sees what a refused peer means: a reset
            return
        up.setblocking(False)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link.up = up

    def _peer(self, link: _Link, sock: socket.socket) -> Optional[socket.socket]:
        return link.up if sock is link.down else link.down

    def _event(self, link: _Link, sock: socket.socket, mask: int) -> None:
        from_down = sock is link.down
        if mask & selectors.EVENT_READ:
            try:
                data = sock.recv(_CHUNK)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                # A reset from one peer: pass it on as a reset to the other.
                self._drop(link, reset=True)
                return
            if data is not None:
                if link.draining:
                    if not data:
                        if from_down:
                            link.eof_down = True
                        else:
                            link.eof_up = True
                        if link.eof_down and (link.eof_up or link.up is None):
                            self._drop(link, reset=False)
                            return
                elif not data:
                    if from_down:
                        link.eof_down = True
                    else:
                        link.eof_up = True
                elif from_down:
                    link.to_up += data
                else:
                    link.to_down += data
        if mask & selectors.EVENT_WRITE and not link.draining:
            to_client = sock is link.down
            buf = link.to_down if to_client else link.to_up
            view = memoryview(buf)
            armed = self._cut_at
            if armed is not None and armed[0] == ("down" if to_client else "up"):
                sent_so_far = self.bytes_down if to_client else self.bytes_up
                view = view[: max(0, armed[1] - sent_so_far)]
            try:
                n = sock.send(view) if view else 0
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                view.release()
                self._drop(link, reset=True)
                return
            view.release()
            del buf[:n]
            if to_client:
                self.bytes_down += n
            else:
                self.bytes_up += n
            if armed is not None and armed[0] == ("down" if to_client else "up"):
                if (self.bytes_down if to_client else self.bytes_up) >= armed[1]:
                    self._cut_at = None
                    if armed[2] == "reset":
                        self._cut_reset()
                    else:
                        self._cut_close()
                    return
        if not link.draining:
            # Pass a half-close on once everything before it was forwarded.
            if link.eof_down and not link.to_up and link.up is not None:
                self._shut_wr(link.up)
            if link.eof_up and not link.to_down:
                self._shut_wr(link.down)
            if link.eof_down and link.eof_up and not link.to_up and not link.to_down:
                self._drop(link, reset=False)
                return
        self._update(link)

    def _mask(self, link: _Link, sock: socket.socket) -> int:
        if link.draining:
            eof = link.eof_down if sock is link.down else link.eof_up
            return 0 if eof else selectors.EVENT_READ
        if self.blackholed or link.up is None or link.frozen:
            return 0
        mask = 0
        if sock is link.down:
            if not link.eof_down and not link.to_up:
                mask |= selectors.EVENT_READ
            if link.to_down:
                mask |= selectors.EVENT_WRITE
        else:
            if not link.eof_up and not link.to_down:
                mask |= selectors.EVENT_READ
            if link.to_up:
                mask |= selectors.EVENT_WRITE
        return mask

    def _update(self, link: _Link) -> None:
        if link not in self._links:
            return
        for sock in link.sockets():
            want = self._mask(link, sock)
            have = self._masks.get(sock, 0)
            if want == have:
                continue
            if have == 0:
                self._sel.register(sock, want, link)
            elif want == 0:
                self._sel.unregister(sock)
            else:
                self._sel.modify(sock, want, link)
            if want:
                self._masks[sock] = want
            else:
                self._masks.pop(sock, None)

    def _update_all(self) -> None:
        for link in list(self._links):
            self._update(link)

    def _drop(self, link: _Link, reset: bool) -> None:
        if link in self._links:
            self._links.remove(link)
        for sock in link.sockets():
            if self._masks.pop(sock, 0):
                self._sel.unregister(sock)
            if reset:
                _reset_close(sock)
            else:
                sock.close()


# -- handshake flooder -----------------------------------------------------------------


def _slow_hello() -> bytes:
    """The bytes a dripping flooder sends: a preamble and a HELLO that never ends."""
    return frames.PREAMBLE + frames.HEADER.pack(frames.HELLO, 0, 0, 0, 0, 60_000) + bytes(60_000)


class HandshakeFlooder:
    """``count`` connections to ``port`` that never finish the socketengine handshake.

    ``mode="idle"`` connects and sends nothing; ``mode="drip"`` sends one byte per
    connection every ``1/rate`` seconds (a preamble and a HELLO announcing 60,000 bytes,
    so it never completes in practice).  A connection the host closes (or refuses) is
    re-opened after ``reopen_delay`` seconds.  Everything stops after ``duration``
    seconds or at :meth:`stop`; the count is capped at 20,000.  Raises the process's
    file limit as needed.  Counters: ``opened``, ``established``, ``closed_by_host``
    (closed, reset or refused by the host), ``failed`` (connect() itself failed),
    ``bytes_sent`` and :attr:`open_now`.
    """

    def __init__(
        self,
        port: int,
        count: int,
        *,
        mode: str = "idle",
        rate: float = 1.0,
        duration: float = 60.0,
        reopen_delay: float = 0.01,
        host: str = LOOPBACK,
    ) -> None:
        if mode not in ("idle", "drip"):
            raise ValueError(f"mode must be 'idle' or 'drip', not {mode!r}")
        if not 0 < count <= 20_000:
            raise ValueError("count must be between 1 and 20,000")
        self.addr = (host, port)
        self.count = count
        self.mode = mode
        self.interval = 1.0 / rate
        self.duration = duration
        self.reopen_delay = reopen_delay
        self.opened = 0  # connect() calls
        self.established = 0  # TCP handshakes completed
        self.closed_by_host = 0
        self.failed = 0
        self.bytes_sent = 0
        self._payload = _slow_hello()
        self._socks: Dict[int, socket.socket] = {}
        self._sent: Dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faults-flooder", daemon=True)

    @property
    def open_now(self) -> int:
        return len(self._socks)

    def start(self) -> HandshakeFlooder:
        raise_fd_limit(self.count + 512)
        self._thread.start()
        return self

    def wait_established(self, n: int, timeout: float = 30.0) -> None:
        """Wait until ``n`` TCP connections were established (counting re-opens).

        Established means the kernel completed the TCP handshake: the host may not have
        accepted the connection yet (it may sit in the listen backlog).
        """
        deadline = time.monotonic() + timeout
        while self.established < n:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise TimeoutError(f"only {self.established} of {n} flood connections established")
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def __enter__(self) -> HandshakeFlooder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _open(self, sel: selectors.BaseSelector, i: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.failed += 1
            raise OSError(err, os.strerror(err))
        self._socks[i] = sock
        self._sent[i] = 0
        self.opened += 1
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, i)

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        end = time.monotonic() + self.duration
        due: List[Tuple[float, int]] = [(0.0, i) for i in range(self.count)]  # reopen at
        next_drip = time.monotonic() + self.interval
        try:
            while not self._stop.is_set() and time.monotonic() < end:
                now = time.monotonic()
                while due and due[0][0] <= now:
                    _, i = heapq.heappop(due)
                    try:
                        self._open(sel, i)
                    except OSError:
                        heapq.heappush(due, (now + max(self.reopen_delay, 0.05), i))
                        break  # e.g. out of ports or files: back off
                wait = 0.05
                if due:
                    wait = min(wait, max(0.0, due[0][0] - now))
                for key, mask in sel.select(wait):
                    i = key.data
                    sock = self._socks[i]
                    data: Optional[bytes] = None
                    if mask & selectors.EVENT_WRITE:  # the TCP connection is made, or failed
                        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                            self.established += 1
                            sel.modify(sock, selectors.EVENT_READ, i)
                        else:
                            data = b""
                    if data is None and mask & selectors.EVENT_READ:
                        try:
                            data = sock.recv(65536)
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError:
                            data = b""
                    if data is None or data:
                        continue  # e.g. a REFUSE: wait for the close that follows
                    sel.unregister(sock)
                    _reset_close(sock)
                    del self._socks[i]
                    self.closed_by_host += 1
                    heapq.heappush(due, (time.monotonic() + self.reopen_delay, i))
                if self.mode == "drip" and time.monotonic() >= next_drip:
                    next_drip += self.interval
                    for i, sock in list(self._socks.items()):
                        k = self._sent[i] % len(self._payload)
                        try:
                            self.bytes_sent += sock.send(self._payload[k : k + 1])
                            self._sent[i] += 1
                        except OSError:
                            pass  # not connected yet, or closing: the read side tells
        finally:
            for sock in self._socks.values():
                try:
                    sel.unregister(sock)
                except (KeyError, ValueError):
                    pass
                _reset_close(sock)
            self._socks.clear()
            sel.close()


# -- raw client and channel flooder ----------------------------------------------------


class RawClient:
    """A blocking socketengine client speaking the protocol directly (no I/O thread).

    The handshake (token included) runs through the library's sans-I/O ``Protocol``;
    values are then written as pre-encoded frames.  Incoming frames are never read
    after the handshake, so keep the host's heartbeat longer than the write.
    """

    def __init__(
        self,
        port: int,
        *,
        name: str = "raw",
        token: Union[str, bytes, None] = None,
        host: str = LOOPBACK,
        timeout: float = 10.0,
        resume: bool = False,
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = Session(b"", name, None) if resume else None
        #: The handshake's protocol state; its decoder parses what arrives later too.
        self.protocol = protocol = Protocol(
            Role.CLIENT, name=name, token=token_bytes(token), resume=session
        )
        self.sock.sendall(protocol.data_to_send())
        while not protocol.is_open:
            data = self.sock.recv(65536)
            if not data:
                self.sock.close()
                raise ConnectionError("the host closed the connection during the handshake")
            view = memoryview(data)
            while view:
                buf = protocol.decoder.get_buffer()
                n = min(len(buf), len(view))
                buf[:n] = view[:n]
                view = view[n:]
                protocol.decoder.buffer_updated(n)
            protocol.events()
            out = protocol.data_to_send()
            if out:
                self.sock.sendall(out)
        self.bytes_sent = 0

    def send_values(self, items: Iterable[Tuple[str, Any]], batch: int = 65536) -> int:
        """Write ``(channel, value)`` pairs as DATA frames; returns the bytes written."""
        pending: List[bytes] = []
        size = 0
        total = 0
        for channel, value in items:
            parts = frames.encode_value_frame(frames.DATA, channel, value)
            frame = b"".join(bytes(p) for p in parts)
            pending.append(frame)
            size += len(frame)
            if size >= batch:
                self.sock.sendall(b"".join(pending))
                total += size
                pending, size = [], 0
        if pending:
            self.sock.sendall(b"".join(pending))
            total += size
        self.bytes_sent += total
        return total

    def close(self, reset: bool = False) -> None:
        """Send BYE and hang up (or reset)."""
        if reset:
            _reset_close(self.sock)
            return
        try:
            self.sock.sendall(b"".join(bytes(p) for p in frames.encode_frame(frames.BYE)))
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def flood_channels(
    client: RawClient, count: int, *, prefix: str = "ch", value: Any = 0, start: int = 0
) -> int:
    """Write one value on each of ``count`` distinct channels ``f"{prefix}{i}"``.

    Returns the bytes written.
    """
    return client.send_values((f"{prefix}{i}", value) for i in range(start, start + count))


# -- processes -----------------------------------------------------------------------

_HOST_SCRIPT = textwrap.dedent(
    """
    import json, sys, threading
    from socketengine import Host
    cfg = json.loads(sys.argv[1])
    try:
        h = Host(port=cfg["port"], open=False, **cfg["kwargs"])
    except OSError as exc:
        print("ERR", exc.errno, flush=True)
        sys.exit(3)
    subs = [h.subscribe(ch, maxsize=cfg["maxsize"]) for ch in cfg["never_read"]]
    counts = {}
    lock = threading.Lock()
    for ch in cfg["count"]:
        def count(value, conn, ch=ch):
            with lock:
                counts[ch] = counts.get(ch, 0) + 1
        h.on(ch, count)
    h.on("_faults.clients", lambda value, conn: sorted(c.name or "" for c in h.clients()))
    h.on("_faults.counts", lambda value, conn: dict(counts))
    try:
        h.open()
    except OSError as exc:
        print("ERR", exc.errno, flush=True)
        sys.exit(3)
    print(h.port, flush=True)
    sys.stdin.read()  # until the parent closes stdin (or dies)
    h.close()
    """
)


class HostProcess:
    """A :class:`~socketengine.Host` in a subprocess, killable and restartable.

    :meth:`start` binds port 0 the first time (or ``port``); :meth:`restart` binds the
    same port again, retrying while it is still in use.  The child exits when its stdin
    closes, so it never outlives this process.  ``host_kwargs`` go to ``Host`` (JSON
    values only: heartbeat, token, max_clients, handshake_timeout, ...).  The host
    answers requests on ``"_faults.clients"`` (sorted names of connected clients) and
    ``"_faults.counts"`` (messages received per channel listed in ``count``);
    ``never_read`` channels get a subscription that is never read.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        never_read: Iterable[str] = (),
        maxsize: int = 10_000,
        count: Iterable[str] = (),
        **host_kwargs: Any,
    ) -> None:
        self.port = port
        self.host_kwargs = host_kwargs
        self.never_read = list(never_read)
        self.maxsize = maxsize
        self.count = list(count)
        self.proc: Optional[subprocess.Popen[str]] = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def _spawn(self, port: int) -> Tuple[subprocess.Popen[str], str]:
        cfg = {
            "port": port,
            "kwargs": self.host_kwargs,
            "never_read": self.never_read,
            "maxsize": self.maxsize,
            "count": self.count,
        }
        proc = subprocess.Popen(
            [sys.executable, "-c", _HOST_SCRIPT, json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        return proc, proc.stdout.readline().strip()

    def start(self, timeout: float = 10.0) -> int:
        """Start the host (on ``self.port``; 0 the first time picks one); returns the port."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        deadline = time.monotonic() + timeout
        while True:
            proc, line = self._spawn(self.port)
            if line and not line.startswith("ERR"):
                self.proc = proc
                self.port = int(line)
                self.starts += 1
                return self.port
            proc.wait(10)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the host could not listen on port {self.port}: {line!r}")
            time.sleep(0.05)  # the port is still in use: retry (bounded by the deadline)

    def kill(self) -> None:
        """SIGKILL the host (no BYE, no close) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._close_pipes()

    def restart(self, timeout: float = 10.0) -> int:
        """Kill (if running) and start again on the same port."""
        self.kill()
        return self.start(timeout)

    def stop(self) -> None:
        """Close the host politely (stdin EOF), or kill it after 5 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()
                self.proc.wait(5)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait(10)
        self._close_pipes()

    def _close_pipes(self) -> None:
        if self.proc is not None:
            for f in (self.proc.stdin, self.proc.stdout):
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        pass

    def rss(self) -> int:
        return rss_of(self.pid)

    def peak_rss(self) -> int:
        return rss_of(self.pid, "VmHWM")

    def __enter__(self) -> HostProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_CLIENTS_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    from socketengine import Client
    cfg = json.loads(sys.argv[1])
    logging.basicConfig(level=cfg["log_level"])  # to stderr, e.g. errors the I/O thread caught
    clients = [
        Client(port=cfg["port"], name=f"{cfg['prefix']}{i}", **cfg["kwargs"])
        for i in range(cfg["n"])
    ]
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "status":
            down = [c.name for c in clients if not c.connected]
            reconnects = sum(c.reconnects for c in clients)
            print(json.dumps({"down": down, "reconnects": reconnects}), flush=True)
        else:
            break
    for c in clients:
        c.close()
    """
)


class ClientsProcess:
    """``n`` threaded Clients named ``f"{prefix}{i}"`` in a subprocess.

    :meth:`status` returns the names of those not connected now and the sum of their
    ``reconnects``.  What the clients log at ``log_level`` and above (default ERROR, e.g.
    an exception the I/O thread caught) goes to ``stderr`` (a file; default: inherited).
    The child exits when :meth:`stop` is called or this process dies.
    """

    def __init__(
        self,
        port: int,
        n: int,
        *,
        prefix: str = "c",
        stderr: Optional[IO[str]] = None,
        log_level: str = "ERROR",
        **client_kwargs: Any,
    ) -> None:
        cfg = {
            "port": port,
            "n": n,
            "prefix": prefix,
            "log_level": log_level,
            "kwargs": client_kwargs,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CLIENTS_SCRIPT, json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.stop()
            raise RuntimeError(f"the clients process did not start: {line!r}")

    def status(self) -> Tuple[List[str], int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("status\n")
        self.proc.stdin.flush()
        got = json.loads(self.proc.stdout.readline())
        return list(got["down"]), int(got["reconnects"])

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> ClientsProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
