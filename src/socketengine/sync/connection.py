"""One peer connection in the threaded layer.

Threading model: the endpoint's loop thread does all reading, the handshake and the
closing; any thread may write.  A write encodes in the caller's thread (so bad values
raise there, before anything is queued), appends the frame to this connection's send
queue and, when the link is idle, sends it at once from the caller's thread.  When
the socket's buffer is full, the rest stays queued and the loop thread sends it as the
socket drains; frames written meanwhile are coalesced into the same ``sendmsg`` call.
"""

from __future__ import annotations

import itertools
import logging
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Tuple

from .. import frames
from ..codec import Buffer
from ..errors import (
    ConnectionClosed,
    HandshakeError,
    ProtocolError,
    RemoteError,
    SocketEngineError,
    WriteTimeout,
)
from ..images import EncodedImage, read_latest
from ..protocol import Protocol
from .delivery import Pausable, Waiter

if TYPE_CHECKING:  # pragma: no cover
    from .endpoint import Endpoint

logger = logging.getLogger("socketengine")

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
# At most this many buffers go into one sendmsg call (Linux IOV_MAX is 1024).
_IOV = 512
# Reads per readiness event before the loop serves other sockets (fairness).
_READS_PER_EVENT = 16

DEFAULT_MAX_BUFFER = 256 * 1024 * 1024
# Writes closer together than this (seconds) count as a burst: they are coalesced.
_BURST_GAP = 50e-6
_monotonic = time.monotonic
# Over TLS, small parts are joined (one TLS record) up to about 4x this many bytes.
_TLS_JOIN = 64 * 1024


class _Reply(Waiter):
    """A request waiting for its reply (filled by the loop thread)."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        super().__init__()
        self.error: Optional[BaseException] = None

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.event.set()


def _tls_payload(batch: List[Buffer]) -> Buffer:
    """What one ``SSLSocket.send`` gets: a large part alone, or small parts joined."""
    first = batch[0]
    if len(batch) == 1 or len(first) >= _TLS_JOIN:
        return first
    group: List[Buffer] = []
    total = 0
    for item in batch:
        size = len(item)
        if group and total + size > 4 * _TLS_JOIN:
            break
        group.append(item)
        total += size
    return b"".join(group)


class _Slot:
    """A queued image frame that a newer frame on the same channel may replace."""

    __slots__ = ("channel", "parts", "nbytes")

    def __init__(self, channel: str, parts: List[Buffer], nbytes: int) -> None:
        self.channel = channel
        self.parts = parts
        self.nbytes = nbytes


class Connection(Pausable):
    """A connection to one peer.

    On a host these are the objects :meth:`Host.clients` returns.  Attributes:

    * ``address`` -- the peer's ``(host, port)``;
    * ``name`` -- the name the client gave (``Client(name=...)``), or ``None``;
    * ``values`` -- the latest value received on each channel from this peer;
    * ``connected_at`` -- ``time.time()`` when the connection was accepted;
    * ``socket`` -- the underlying socket, for inspection only (the I/O thread owns it).
    """

    def __init__(
        self,
        endpoint: Endpoint,
        sock: socket.socket,
        protocol: Protocol,
        address: Tuple[Any, ...],
    ) -> None:
        self._endpoint = endpoint
        self._loop = endpoint._loop
        self.socket = sock
        self.protocol = protocol
        self.address = address
        self.values: Dict[str, Any] = {}
        self.connected_at = time.time()
        self.closed_at: Optional[float] = None
        self.error: Optional[BaseException] = None
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._queue: Deque[Any] = deque()  # frame parts and _Slot placeholders
        self._queued = 0
        self._want_write = False
        self._is_ready = False  # == ready.is_set(), without a call on the write path
        self._flush_scheduled = False
        self._flushing = False  # one flusher at a time; it owns the queue's head
        self._last_write = 0.0
        self._room_waiters = 0
        self._max_buffer = endpoint.max_buffer
        self._closing = False  # no more writes; BYE queued
        self._closed = False
        self._shut_wr = False
        self._bye_sent = False
        self._eof = False  # the peer will send nothing more (BYE or FIN received)
        self._pauses = 0  # reasons to stop reading (full subscriptions, callback backlog)
        self._registered = False
        # TLS: the handshake runs non-blocking in the loop before anything else is sent.
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._tls_pending = self._tls
        self._tls_want = _READ | _WRITE
        self._requests: Dict[int, _Reply] = {}
        self._slots: Dict[str, _Slot] = {}  # image frames still replaceable, by channel
        self._encoded: Dict[str, EncodedImage] = {}  # newest JPEG/PNG file per channel
        self._full_since: Optional[float] = None  # write_all: when max_buffer was first hit
        self.last_recv = self.last_send = time.monotonic()
        self.images_sent = 0
        self.images_dropped = 0
        self._request_ids = itertools.count(1)
        self.ready = threading.Event()  # handshake completed
        self.closed = threading.Event()  # socket closed
        self.settled = threading.Event()  # ready or closed, whichever came first
        self._timer: Any = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.messages_in = 0
        self.messages_out = 0

    # -- public ---------------------------------------------------------------------

    @property
    def name(self) -> Optional[str]:
        return self.protocol.peer_name

    @property
    def session(self) -> int:
        """The id the host gave this connection (unique per host)."""
        return self.protocol.session

    @property
    def is_open(self) -> bool:
        """True between the end of the handshake and the start of closing."""
        return self.ready.is_set() and not self._closing and not self._closed

    def get(self, channel: str, default: Any = None) -> Any:
        """The latest value this peer sent on ``channel``, or ``default``.

        An image sent compressed is returned decoded (a numpy array).
        """
        # Decoded once for this connection and the endpoint's latest value alike.
        return read_latest(channel, default, self.values, self._endpoint._latest)

    def get_jpeg(self, channel: str = "image") -> Optional[bytes]:
        """The newest JPEG/PNG file this peer sent on ``channel``, still encoded."""
        enc = self._encoded.get(channel)
        return None if enc is None else enc.tobytes()

    def write(self, channel: str, data: Any) -> None:
        """Send ``data`` on ``channel`` to this peer only.  Thread-safe."""
        parts, nbytes = frames.value_frame(frames.DATA, channel, data)
        self.send_parts(parts, nbytes)
        self.messages_out += 1

    def write_image(
        self,
        img: Any,
        channel: str = "image",
        codec: Optional[str] = None,
        quality: Optional[int] = None,
    ) -> None:
        """Send a numpy image on ``channel`` (default ``"image"``) to this peer only.

        ``codec`` (``"raw"``, ``"jpeg"``, ``"png"``) and ``quality`` default to the
        endpoint's ``image_codec`` / ``image_quality``.  If an earlier image on
        ``channel`` is still waiting unsent, this one replaces it (latest frame wins;
        counted in :attr:`images_dropped`).
        """
        parts, nbytes = self._endpoint._image_frame(img, channel, codec, quality)
        self.send_parts(parts, nbytes, image=channel)
        self.messages_out += 1

    def stats(self) -> Dict[str, Any]:
        """Counters of this connection (bytes and messages each way, images, queue)."""
        return {
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
            "images_sent": self.images_sent,
            "images_dropped": self.images_dropped,
            "queued_bytes": self._queued,
            "reading_paused": self.reading_paused,
        }

    def request(self, channel: str, data: Any, timeout: Optional[float] = 5.0) -> Any:
        """Send ``data`` as a request on ``channel`` and return the peer's reply.

        The reply is the return value of the peer's ``on(channel)`` callback.  Raises
        :class:`RemoteError` if that callback raised (or there is none),
        ``TimeoutError`` after ``timeout`` seconds (``None``: no limit), and
        :class:`ConnectionClosed` if the connection is lost first.  Thread-safe.
        """
        rid = next(self._request_ids) & 0xFFFFFFFF or next(self._request_ids)
        parts = frames.encode_value_frame(frames.REQUEST, channel, data, fid=rid)
        reply = _Reply()
        self._requests[rid] = reply
        try:
            self.send_parts(parts)
            if not reply.event.wait(timeout):
                raise TimeoutError(
                    f"no reply from {self._peer()} to a request on {channel!r} within {timeout} s"
                )
        finally:
            self._requests.pop(rid, None)
        if reply.error is not None:
            raise reply.error
        return reply.item

    def _on_reply(self, frame: frames.Frame) -> None:
        """A REPLY or REPLY_ERROR arrived (loop thread)."""
        reply = self._requests.get(frame.id)
        if reply is None:
            logger.debug("%s: late or unknown reply id %d ignored", self._endpoint, frame.id)
            return
        value = frame.value()
        if frame.type == frames.REPLY:
            reply.set(value)
        else:
            reply.fail(RemoteError(str(value)))

    # -- flow control (any thread) ---------------------------------------------------

    def pause_reading(self) -> None:
        """Stop reading from this peer until :meth:`resume_reading` (counted)."""
        self._call(self._pause, 1)

    def resume_reading(self) -> None:
        """Undo one :meth:`pause_reading`."""
        self._call(self._pause, -1)

    def _call(self, fn: Any, *args: Any) -> None:
        if self._loop.in_thread():
            fn(*args)
        else:
            self._loop.call_soon(fn, *args)

    def _pause(self, delta: int) -> None:
        self._pauses = max(0, self._pauses + delta)
        if not self._pauses:
            self.last_recv = time.monotonic()  # silence while paused was ours, not theirs
        self._update_interest()

    def heartbeat(self, interval: float, now: float) -> None:
        """Ping an idle link; drop a peer silent for three intervals (loop thread)."""
        if self._closed or not self.ready.is_set():
            return
        if self._pauses or self._eof:
            self.last_recv = now  # we are not reading: its silence proves nothing
        elif now - self.last_recv > 3 * interval:
            logger.warning(
                "%s: %s sent nothing for %.1f s (heartbeat %.1f s): declaring it dead",
                self._endpoint,
                self._peer(),
                now - self.last_recv,
                interval,
            )
            self._lost(ConnectionClosed(f"{self._peer()} stopped answering heartbeats"))
            return
        if now - self.last_send >= interval and not self._bye_sent:
            self.protocol.send_ping()
            self._send_raw(self.protocol.data_to_send())

    @property
    def reading_paused(self) -> bool:
        """True while backpressure stops this connection from being read."""
        return self._pauses > 0

    def close(self, timeout: Optional[float] = None) -> None:
        """Close this connection gracefully: flush, say BYE, wait up to ``timeout`` s."""
        linger = self._endpoint.timeout if timeout is None else timeout
        self._loop.call_soon(self.begin_close, linger)
        if not self._loop.in_thread():
            self.closed.wait(linger + 1.0)

    def __repr__(self) -> str:
        state = "open" if self.is_open else ("closed" if self._closed else "handshake")
        name = f" name={self.name!r}" if self.name else ""
        return f"<Connection {self.address[0]}:{self.address[1]}{name} {state}>"

    # -- sending (any thread) -----------------------------------------------------------

    def send_parts(
        self,
        parts: List[Buffer],
        nbytes: Optional[int] = None,
        *,
        image: Optional[str] = None,
        block: bool = True,
        defer: bool = False,
    ) -> None:
        """Queue a frame's parts and send what the socket takes now.  Thread-safe.

        :param image: the channel of an image frame: it replaces an earlier image on
            that channel that is still waiting unsent (conflation: latest frame wins).
        :param block: while more than ``max_buffer`` bytes are queued for this peer,
            ``True`` waits up to the endpoint's ``timeout`` and then raises
            :class:`WriteTimeout` without sending; ``False`` (``write_all``) queues up to
            twice ``max_buffer`` for at most ``timeout`` seconds, then drops the peer as
            a slow consumer and raises :class:`WriteTimeout`.
        :param defer: leave the sending to the loop thread even on an idle link (a
            burst of broadcasts: one flush per connection instead of a syscall each).
        """
        if nbytes is None:
            nbytes = frames.frame_size(parts)
        with self._lock:
            if self._closing or self._closed:
                raise ConnectionClosed(f"connection to {self._peer()} is closed")
            queued = self._queued
            if image is not None:
                slot = self._slots.get(image)
                if slot is not None:  # the earlier frame never left: replace it
                    self._queued = queued + nbytes - slot.nbytes
                    slot.parts, slot.nbytes = parts, nbytes
                    self.images_dropped += 1
                    self._endpoint._image_dropped(image)
                    return
            if queued and queued + nbytes > self._max_buffer:
                if block:
                    self._wait_room(nbytes)
                else:
                    self._check_slow_consumer(nbytes)
            queue = self._queue
            if image is not None:
                self.images_sent += 1
                if queue:
                    slot = self._slots[image] = _Slot(image, parts, nbytes)
                    queue.append(slot)
                    self._queued += nbytes
                    return
                self._endpoint._image_sent(image, nbytes)
            queue.extend(parts)
            self._queued += nbytes
            if not self._is_ready or self._want_write:
                return  # the loop thread sends it (after the handshake / when writable)
            # Coalescing: a write on an idle link goes out at once from this thread (no
            # thread hop, lowest latency); writes that follow it closely are left for one
            # flush on the loop thread, which sends the whole burst in a few syscalls.
            now = _monotonic()
            idle = now - self._last_write > _BURST_GAP
            self._last_write = now
            if self._flush_scheduled:
                return
            if idle and not defer and not self._tls:  # SSL: never read and write at once
                self._flush_locked()
            else:
                self._flush_scheduled = True
                self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        """Send a burst of queued writes (loop thread)."""
        with self._lock:
            self._flush_scheduled = False
            if not self._want_write and not self._closed:
                self._flush_locked()

    def mark_ready(self) -> None:
        """The handshake is complete: writes may flow (loop thread)."""
        self._is_ready = True
        self.ready.set()

    def _check_slow_consumer(self, nbytes: int) -> None:
        """A broadcast found this peer's buffer full (lock held): tolerate it for
        ``timeout`` seconds and up to twice ``max_buffer``, then drop the peer."""
        now = time.monotonic()
        if self._full_since is None:
            self._full_since = now
        limit = self._endpoint.max_buffer
        if now - self._full_since > self._endpoint.timeout or self._queued + nbytes > 2 * limit:
            self._closing = True
            self._loop.call_soon(self._drop_slow_consumer)
            raise WriteTimeout(
                f"{self._peer()} is a slow consumer: {self._queued} bytes unsent for "
                f"{now - self._full_since:.1f} s (max_buffer={limit}); disconnecting it"
            )

    def _drop_slow_consumer(self) -> None:
        logger.warning(
            "%s: disconnecting slow consumer %s (%d bytes unsent)",
            self._endpoint,
            self._peer(),
            self._queued,
        )
        self.error = WriteTimeout(f"{self._peer()} was disconnected as a slow consumer")
        self._finish()

    def flush(self, timeout: Optional[float] = None) -> None:
        """Block until everything written so far is handed to the operating system.

        Raises :class:`WriteTimeout` after ``timeout`` seconds (default: the endpoint's
        ``timeout``) and :class:`ConnectionClosed` if the connection closes first.
        """
        limit = self._endpoint.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._lock:
            if self._queue and not self._want_write and not self._flushing:
                if not self._flush_scheduled and not self._tls and self._is_ready:
                    self._flush_locked()
            while self._queue:
                if self._closed:
                    raise ConnectionClosed(f"connection to {self._peer()} closed before flushing")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WriteTimeout(
                        f"{self._peer()} did not take {self._queued} queued bytes within {limit} s"
                    )
                self._room_waiters += 1
                try:
                    self._drained.wait(min(left, 0.05))
                finally:
                    self._room_waiters -= 1

    def _wait_room(self, nbytes: int) -> None:
        deadline = time.monotonic() + self._endpoint.timeout
        while self._queued and self._queued + nbytes > self._endpoint.max_buffer:
            if self._closed or self._closing:
                raise ConnectionClosed(f"connection to {self._peer()} closed while writing")
            left = deadline - time.monotonic()
            if left <= 0 or self._loop.in_thread():
                raise WriteTimeout(
                    f"{self._peer()} is not reading: {self._queued} bytes are already queued "
                    f"(max_buffer={self._endpoint.max_buffer}); the write was not sent"
                )
            self._room_waiters += 1
            try:
                self._drained.wait(left)
            finally:
                self._room_waiters -= 1

    def _queue_parts(self, parts: List[Buffer]) -> None:
        """Queue a frame without sending it yet (loop thread, before ``ready``)."""
        with self._lock:
            self._queue.extend(parts)
            self._queued += frames.frame_size(parts)

    def _send_raw(self, data: bytes) -> None:
        """Queue protocol bytes (handshake, pong, bye) from the loop thread."""
        with self._lock:
            if self._bye_sent or self._closed:
                return  # nothing may follow our BYE
            self._queue.append(data)
            self._queued += len(data)
            if not self._want_write:
                self._flush_locked()

    def _flush_locked(self) -> None:
        """Send queued parts until done or the socket would block (lock held).

        The lock is released around each system call, so writers keep appending while a
        batch is on its way (they only touch the tail; the one flusher owns the head).
        """
        if self._tls_pending or self._flushing:
            return  # after the TLS handshake / the current flusher picks new parts up
        self._flushing = True
        try:
            self._flush_batches()
        finally:
            self._flushing = False
        if self._queued <= self._max_buffer:
            self._full_since = None
        if not self._queue:
            if self._room_waiters:
                self._drained.notify_all()
            if self._eof:
                self._loop.call_soon(self._finish)  # the peer is done, and so are we
            elif self._bye_sent and not self._shut_wr:
                self._loop.call_soon(self._shutdown_write)

    def _flush_batches(self) -> None:
        queue = self._queue
        sock = self.socket
        lock = self._lock
        while queue and not self._closed:
            head = queue[0]
            if type(head) is _Slot:
                # An image frame's turn: from now on it is being sent, not replaceable.
                queue.popleft()
                del self._slots[head.channel]
                queue.extendleft(reversed(head.parts))
                self._endpoint._image_sent(head.channel, head.nbytes)
                continue
            batch: List[Buffer] = []
            for item in queue:
                if type(item) is _Slot or len(batch) == _IOV:
                    break
                batch.append(item)
            error: Optional[OSError] = None
            lock.release()
            try:
                if self._tls:
                    payload = _tls_payload(batch)  # SSLSocket has no sendmsg
                    offered = len(payload)
                    sent = sock.send(payload)
                else:
                    # Every queued part is bytes or a byte-format memoryview: len() == size.
                    offered = sum(map(len, batch))
                    sent = sock.sendmsg(batch) if len(batch) > 1 else sock.send(batch[0])
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                sent = 0
            except OSError as exc:
                error = exc
            finally:
                lock.acquire()
            if self._closed:
                return
            if error is not None:
                # The reader side will see the failure too; close from the loop thread.
                self.error = self.error or error
                queue.clear()
                self._queued = 0
                self._drained.notify_all()
                self._loop.call_soon(self._lost, error)
                return
            if sent:
                self.bytes_out += sent
                self._queued -= sent
                self.last_send = time.monotonic()
            full = sent < offered
            # Drop what was sent; keep the unsent tail of a partly sent buffer.
            while sent:
                head = queue[0]
                size = len(head)
                if sent >= size:
                    queue.popleft()
                    sent -= size
                else:
                    queue[0] = memoryview(head).cast("B")[sent:]
                    sent = 0
            if full:
                # The socket is full: let the loop thread finish when it drains.
                if not self._want_write:
                    self._want_write = True
                    if self._loop.in_thread():
                        self._update_interest()
                    else:
                        self._loop.call_soon(self._update_interest)
                return

    # -- loop thread ------------------------------------------------------------------

    def _peer(self) -> str:
        host, port = self.address[0], self.address[1]
        return f"{self.name or 'peer'} at {host}:{port}"

    def _update_interest(self) -> None:
        """Tell the selector what to wait for (loop thread)."""
        if self._closed:
            return
        if self._tls_pending:
            events = self._tls_want
        else:
            events = (0 if self._pauses or self._eof else _READ) | (
                _WRITE if self._want_write else 0
            )
        try:
            if not events:
                if self._registered:
                    self._loop.unregister(self.socket)
                    self._registered = False
            elif self._registered:
                self._loop.modify(self.socket, events, self.on_event)
            else:
                self._loop.register(self.socket, events, self.on_event)
                self._registered = True
        except (KeyError, ValueError, OSError):
            pass

    def attach(self) -> None:
        """Register with the loop and send the protocol's opening bytes (loop thread)."""
        self._loop.register(self.socket, _READ, self.on_event)
        self._registered = True
        out = self.protocol.data_to_send()
        if out:
            self._send_raw(out)  # held back until the TLS handshake is done
        if self._tls_pending:
            self._tls_step()

    def _tls_step(self) -> None:
        """Advance the non-blocking TLS handshake (loop thread)."""
        sock: Any = self.socket
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._tls_want = _READ
            self._update_interest()
            return
        except ssl.SSLWantWriteError:
            self._tls_want = _WRITE
            self._update_interest()
            return
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "verify_message", None) or exc
            self._fail(
                HandshakeError(
                    f"TLS handshake with {self._peer()} failed: {reason} "
                    "(do both sides use tls=, with matching certificates?)"
                )
            )
            return
        self._tls_pending = False
        with self._lock:
            self._flush_locked()
        self._update_interest()
        self._on_readable()  # the peer's first bytes may already be decrypted

    def on_event(self, mask: int) -> None:
        if self._tls_pending:
            if not self._closed:
                self._tls_step()
            return
        if mask & _WRITE and not self._closed:
            with self._lock:
                self._want_write = False
                self._flush_locked()
                if not self._want_write:
                    self._update_interest()
        if mask & _READ and not self._closed and not self._pauses and not self._eof:
            self._on_readable()

    def _on_readable(self) -> None:
        decoder = self.protocol.decoder
        sock = self.socket
        for _ in range(_READS_PER_EVENT):
            buf = decoder.get_buffer()
            size = len(buf)
            try:
                n = sock.recv_into(buf)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError as exc:
                self._lost(exc)
                return
            finally:
                buf.release()
            if n == 0:
                self._on_eof()
                return
            self.bytes_in += n
            self.last_recv = time.monotonic()
            try:
                decoder.buffer_updated(n)
                if decoder.frames:
                    self._process()
            except (ProtocolError, HandshakeError) as exc:
                self._fail(exc)
                return
            if self._closed or self._pauses or self._eof:
                return
            if n < size and not (self._tls and sock.pending()):  # type: ignore[attr-defined]
                return

    def _process(self) -> None:
        was_ready = self.ready.is_set()
        try:
            events = self.protocol.events()
        finally:
            out = self.protocol.data_to_send()
            if out:
                self._send_raw(out)
        if not was_ready and self.protocol.is_open:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._endpoint._on_ready(self)  # sets self.ready (host: after queuing retained values)
            self.settled.set()
            with self._lock:
                if self._queue and not self._want_write:
                    self._flush_locked()
        if events:
            self._endpoint._dispatch(self, events)

    def start_handshake_timer(self, seconds: float) -> None:
        def expired() -> None:
            if not self.ready.is_set() and not self._closed:
                self._fail(
                    HandshakeError(
                        f"{self._peer()} did not complete the handshake within {seconds} s"
                    )
                )

        self._timer = self._loop.call_later(seconds, expired)

    def _fail(self, exc: BaseException) -> None:
        """The peer broke the protocol: log, close (a REFUSE is already queued, if any)."""
        logger.warning("%s: closing connection to %s: %s", self._endpoint, self._peer(), exc)
        self.error = exc
        with self._lock:
            if self._queue and not self._want_write:
                self._flush_locked()  # best effort: tell the peer why
        self._finish()

    def _on_eof(self) -> None:
        """The peer closed its sending side (loop thread)."""
        if not self.ready.is_set() or not self._closing:
            self._lost(None)  # no BYE either way: the peer went away
            return
        # A graceful close: flush what is still owed to the peer, then close.
        self._eof = True
        with self._lock:
            done = not self._queue
        if done:
            self._finish()
        else:
            self._update_interest()  # stop reading; the last flush finishes

    def _lost(self, exc: Optional[BaseException]) -> None:
        """The peer went away (EOF, reset)."""
        if self._closed:
            return
        if not self.ready.is_set() and self.error is None:
            how = f"reset the connection ({exc})" if exc is not None else "closed the connection"
            self.error = HandshakeError(
                f"{self._peer()} {how} during the handshake: does it expect TLS "
                "(tls=) or a token, or is it at its max_clients?"
            )
        elif exc is not None:
            self.error = self.error or exc
            logger.info("%s: connection to %s lost: %s", self._endpoint, self._peer(), exc)
        self._finish()

    def begin_close(self, linger: float) -> None:
        """Start a graceful close (loop thread): flush, BYE, half-close, await EOF.

        After ``linger`` seconds the socket is closed whatever is left unsent.
        """
        if self._closed:
            return
        with self._lock:
            if self._bye_sent:
                return
            self._closing = True
            self._bye_sent = True
            if self.ready.is_set():
                self._queue.append(b"".join(frames.encode_frame(frames.BYE)))
                if not self._want_write:
                    self._flush_locked()
            else:
                self._queue.clear()
                self._queued = 0
                self._loop.call_soon(self._shutdown_write)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(max(linger, 0.0), self._finish)

    def _shutdown_write(self) -> None:
        if self._closed or self._shut_wr:
            return
        self._shut_wr = True
        if self._tls:
            return  # SSLSocket.shutdown() drops the TLS layer; BYE alone says we are done
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:
            self._finish()

    def _on_bye(self) -> None:
        """The peer said BYE: it sends nothing more.  Flush what we owe it, then close."""
        self._eof = True
        with self._lock:
            self._closing = True  # no new writes
            done = not self._queue
        if done:
            self._loop.call_soon(self._finish)
            return
        self._update_interest()
        if self._timer is None:
            self._timer = self._loop.call_later(self._endpoint.timeout, self._finish)

    def _finish(self) -> None:
        """Close the socket and tell the endpoint (loop thread, idempotent)."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
            self._closing = True
            self._queue.clear()
            self._slots.clear()
            self._queued = 0
            self._drained.notify_all()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._registered:
            self._loop.unregister(self.socket)
            self._registered = False
        try:
            self.socket.close()
        except OSError:  # pragma: no cover
            pass
        self.closed_at = time.time()
        for reply in list(self._requests.values()):
            reply.fail(
                ConnectionClosed(f"the connection to {self._peer()} closed before it replied")
            )
        self.closed.set()
        self.settled.set()
        try:
            self._endpoint._on_closed(self)
        except SocketEngineError:  # pragma: no cover
            pass
