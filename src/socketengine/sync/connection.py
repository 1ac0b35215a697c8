"""One peer connection in the threaded layer: moves bytes for the connection engine.

Every rule (states, closing, heartbeats, requests, the send queue) is the sans-I/O
:class:`~socketengine.engine.ConnectionEngine`'s.  This module only owns the socket,
the lock and the waiting:

Threading model: the endpoint's loop thread does all reading, the handshake and the
closing; any thread may write.  A write encodes in the caller's thread (so bad values
raise there, before anything is queued), pushes the frame to the engine's send queue
under this connection's lock and, when the link is idle, sends it at once from the
caller's thread.  When the socket's buffer is full, the rest stays queued and the loop
thread sends it as the socket drains; frames written meanwhile are coalesced into the
same ``sendmsg`` call.
"""

from __future__ import annotations

import logging
import os
import select
import selectors
import signal
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any, Final, List, Optional, Tuple

from .. import frames, shm
from ..codec import Buffer
from ..compiled import mypyc_attr
from ..endpoint import WriteItems
from ..engine import CONTROL_DELAY, ConnectionEngine, ConnState, Tick, describe_peer
from ..errors import (
    ConnectionClosed,
    EndpointClosed,
    HandshakeError,
    ProtocolError,
    SocketEngineError,
    WriteTimeout,
    malformed,
)
from ..peer import PeerView
from ..protocol import Protocol
from ..sendqueue import (
    ITEM_OVERHEAD,
    PACE_ABOVE,
    PACE_BELOW,
    PACE_WAIT,
    STAGE_MAX,
    SendQueue,
)
from .delivery import Flag, Waiter

# Frames a host holds for a client whose link is down (values, answers to requests).
_HOLDABLE: Final = frozenset((frames.DATA, frames.REPLY, frames.REPLY_ERROR))

if TYPE_CHECKING:  # pragma: no cover
    from .endpoint import Endpoint

logger: Final = logging.getLogger("socketengine")

_READ: Final = selectors.EVENT_READ
_WRITE: Final = selectors.EVENT_WRITE
# At most this many buffers go into one sendmsg call (Linux IOV_MAX is 1024).
_IOV: Final = 512
# Reads per readiness event before the loop serves other sockets (fairness).
_READS_PER_EVENT: Final = 16
_HAS_POLL: Final = hasattr(select, "poll")  # not on Windows: there a reply is handed over
_POLL_IN: Final = getattr(select, "POLLIN", 1) | getattr(select, "POLLPRI", 2)
# signal.signal/getsignal wrap these with enum conversions that cost ~5 us a call pair;
# a request on the main thread makes one pair (_HeldInterrupt).
_signal_c: Final[Any] = getattr(signal, "_signal", signal)
_getsignal: Final = getattr(_signal_c, "getsignal", signal.getsignal)
_setsignal: Final = getattr(_signal_c, "signal", signal.signal)
_SIGINT: Final = int(signal.SIGINT)
#: A thread reading its own reply re-checks the link at least this often (seconds).
_SELF_READ_SLICE = 0.25
#: Looked up once: an enum member read through its class is slow on the write path.
_OPEN: Final = ConnState.OPEN
_monotonic: Final = time.monotonic
# Over TLS, small parts are joined (one TLS record) up to about 4x this many bytes.
#: A spin that runs out this many times in a row leaves 63 waits out of 64 asleep.
_SPIN_MISSES_MAX: Final = 6
_TLS_JOIN: Final = 64 * 1024


class _Reply(Waiter):
    """A request waiting for its reply (a reply sink of the engine's request table)."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        super().__init__()
        self.error: Optional[BaseException] = None

    def done(self) -> bool:
        return self.event.is_set()

    def set_result(self, result: Any) -> None:
        self.set(result)

    def set_exception(self, exception: BaseException) -> None:
        self.error = exception
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


class SpinCredit:
    """How often one kind of wait on a connection spins (:meth:`Connection.read_until`):
    a spin that runs out before its value came sends the next 1, 3, 7 ... 63 waits of
    that kind to sleep at once; a value within the spin, or in before the wait began,
    starts over.  A connection keeps one for replies (requests, SYNCs) and one for
    answers (``wait()`` or a subscription right after a write), so that waits for a slow
    peer's values do not stop requests to a quick handler from spinning."""

    __slots__ = ("skip", "misses")

    def __init__(self) -> None:
        self.skip = 0  # waits left that sleep at once
        self.misses = 0  # spins in a row that ran out

    def take(self) -> bool:
        """True if this wait may spin (else it counts one skipped wait)."""
        if self.skip > 0:
            self.skip -= 1
            return False
        return True

    def result(self, came: bool) -> None:
        """A spin ended: ``came`` if the value came within it (or before it)."""
        if came:
            self.misses = 0
        else:
            self.misses = min(self.misses + 1, _SPIN_MISSES_MAX)
            self.skip = (1 << self.misses) - 1


class ReaderWake:
    """Wakes a thread that reads its connection itself (:meth:`Connection.read_until`)
    from another thread, when what it waits for can be ended from outside: a client's
    ``Subscription.get()`` is ended by ``sub.close()`` in any thread.  A pipe, made on
    first use; closed once its owner is closed and no reader polls it any more (a
    descriptor closed under a poller could be reused by anything the program opens).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fds: Optional[Tuple[int, int]] = None
        self._users = 0
        self._closed = False

    def acquire(self) -> Optional[int]:
        """The descriptor to poll (released by :meth:`release`), or None once closed."""
        with self._lock:
            if self._closed:
                return None
            if self._fds is None:
                r, w = os.pipe()
                os.set_blocking(r, False)
                os.set_blocking(w, False)
                self._fds = (r, w)
            self._users += 1
            return self._fds[0]

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._closed and not self._users:
                self._close_fds()

    def wake(self) -> None:
        """Wake whoever polls (any thread; a wake nobody waits for is drained later)."""
        with self._lock:
            if self._fds is not None and self._users:
                try:
                    os.write(self._fds[1], b"\0")
                except OSError:  # full: a wake is pending anyway
                    pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if not self._users:
                self._close_fds()

    def _close_fds(self) -> None:
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None


def _drain(fd: int) -> None:
    """Empty a non-blocking :class:`ReaderWake` pipe."""
    try:
        while os.read(fd, 512):
            pass
    except OSError:  # empty
        pass


def _check_signals() -> None:
    """Run the Python signal handlers of signals that arrived meanwhile, now (the main
    thread; raises what a handler raises, as a blocking call interrupted by them would)."""
    import ctypes  # once the spin ran out, about to sleep: its cost does not matter

    ctypes.pythonapi.PyErr_CheckSignals()


class _HeldInterrupt:
    """Ctrl-C while the main thread reads its own reply (:meth:`Connection.read_until`).

    Raised at once while the thread waits; held while it handles frames, so a frame is
    never left half handled, and raised right after.  Only on the main thread (where
    Python runs signal handlers) and only over a Python-level SIGINT handler.
    """

    __slots__ = ("previous", "handling", "held")

    def __init__(self) -> None:
        self.previous: Any = None
        self.handling = False
        self.held: Optional[Tuple[int, Any]] = None

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False
        previous = _getsignal(_SIGINT)
        if not callable(previous):
            return False
        self.previous = previous
        _setsignal(_SIGINT, self._on_signal)
        return True

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.handling:
            self.held = (signum, frame)
        else:
            self.previous(signum, frame)

    def deliver(self) -> None:
        """Run the handler for a Ctrl-C held while frames were handled (outside the role)."""
        held, self.held = self.held, None
        if held is not None:
            self.previous(*held)

    def uninstall(self) -> None:
        _setsignal(_SIGINT, self.previous)


@mypyc_attr(allow_interpreted_subclasses=True)  # tests subclass it
class Connection(PeerView):
    """A connection to one peer.

    On a host these are the objects :meth:`Host.clients` returns.  Attributes:

    * ``address`` -- the peer's ``(host, port)``;
    * ``name`` -- the name the client gave (``Client(name=...)``), or ``None``;
    * ``values`` -- the latest value received on each channel from this peer;
    * ``connected_at`` / ``closed_at`` -- ``time.time()`` of accept / close;
    * ``error`` -- why the connection ended, if it ended badly;
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
        # A host's run of deferred broadcasts (fanout.py): handed over before anything
        # else is queued here, so nothing overtakes it.  None on a client.
        self._fan = endpoint._fan
        self.socket = sock
        self.address = address
        engine = ConnectionEngine(
            protocol,
            peer=describe_peer(None, address),
            max_buffer=endpoint.max_buffer,
            heartbeat=endpoint.heartbeat,
            handshake_timeout=endpoint.handshake_timeout,
            now=_monotonic(),
            on_image=endpoint._images.queue_hook,
        )
        self._init_peer(engine, endpoint._latest)
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._want_write = False
        self._flush_scheduled = False
        self._flushing = False  # one flusher at a time; it owns the queue's head
        self._room_waiters = 0
        # Pacing (sendqueue.PACE_ABOVE): bytes_out when a pacing wait saw no byte
        # leave; no pacing while it is still the same (-1: none).
        self._pace_stalled = -1
        self._shut_wr = False
        self._pauses = 0  # reasons to stop reading (full subscriptions, callback backlog)
        self._registered = False
        self._self_reader = False  # a waiting thread reads this socket (read_until)
        # read_until's spins: for replies (requests, SYNCs), and for answers (a wait()
        # or a subscription's get() right after a write: SendQueue.owed).
        self.reply_spin = SpinCredit()
        self.answer_spin = SpinCredit()
        self._read_dropped = False  # ... and the loop stopped watching it for reads
        # TLS: the handshake runs non-blocking in the loop before anything else is sent.
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._tls_pending = self._tls
        self._tls_want = _READ | _WRITE
        self.ready = threading.Event()  # handshake completed
        self.closed = threading.Event()  # socket closed
        self.settled = threading.Event()  # ready or closed, whichever came first
        self._timer: Any = None
        self._control_timer: Any = None

    # -- public ---------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """True between the end of the handshake and the start of closing."""
        return self.engine.state is ConnState.OPEN

    def write(
        self,
        channel: str,
        data: Any,
        ack: bool = False,
        timeout: Optional[float] = None,
        compress: Optional[bool] = None,
    ) -> None:
        """Send ``data`` on ``channel`` to this peer only.  Thread-safe.

        ``compress``: True compresses ``data`` whatever its size, False never, None as
        the endpoint's ``compression`` / ``compress_threshold`` say (only for a peer
        that announced the codec, and only when the result is smaller).

        ``ack=True`` blocks until the peer confirms it has stored the value (and
        everything written before it), like socket.engine 1.x's ``writeSync``; no
        handler is needed on the other side.  Raises :class:`WriteTimeout` after
        ``timeout`` seconds (default: the endpoint's ``timeout``),
        :class:`ConnectionClosed` if the connection is lost first, and
        :class:`NotSupported` if the peer runs protocol 1.0.
        """
        if self._endpoint._codecs is None and not compress:
            self.send_value(frames.value_item(channel, data))
        else:
            self.send_value(self._endpoint._encode_for(self, channel, data, compress))
        self.messages_out += 1
        if ack:
            self.sync(timeout)

    def write_many(self, items: WriteItems, compress: Optional[bool] = None) -> None:
        """Send many values to this peer at once: a mapping ``{channel: value}`` or an
        iterable of ``(channel, value)`` pairs.  Each is delivered exactly as if
        written by :meth:`write`, in order; the batch takes one lock and one flush
        (small values travel several to a BATCH frame).

        Every value is encoded first: ``TypeError``/``ValueError`` naming the item if
        one cannot be sent, and then nothing is sent.  The batch is queued whole: it
        waits (at most ``timeout`` s) until it fits under ``max_buffer`` (an empty
        queue takes any batch), then :class:`WriteTimeout` with nothing sent.
        Thread-safe."""
        encoded, nbytes = self._endpoint._encode_many(self, items, compress)
        self.send_values(encoded, nbytes)

    def sync(self, timeout: Optional[float] = None) -> None:
        """Block until the peer confirms it has stored everything written to it so far
        (a SYNC frame, answered by ACK: protocol 1.1).  Raises :class:`WriteTimeout`
        after ``timeout`` seconds (default: the endpoint's ``timeout``) and
        :class:`ConnectionClosed` if the connection is lost first; never hangs."""
        limit = self._endpoint.timeout if timeout is None else timeout
        reply = _Reply()
        requests = self.engine.requests
        rid = requests.open(reply)
        try:
            frame = self.engine.sync_frame(rid)
            self.send_parts([frame], len(frame), bounded=False)  # waited for below
            if not self.read_until(reply.event, limit, spin=self.reply_spin):
                raise WriteTimeout(
                    f"{self._peer()} did not acknowledge the writes within {limit} s"
                )
        finally:
            requests.cancel(rid)
        if reply.error is not None:
            raise reply.error

    def send_value(self, encoded: Any, *, block: bool = True, defer: bool = False) -> None:
        """Queue a value encoded by :func:`frames.value_item`: a BATCH item or a
        DATA frame's ``(parts, size)``.  Thread-safe."""
        if type(encoded) is bytes:
            if block and not defer:
                self.send_item(encoded)
            else:
                self.send_parts(encoded, len(encoded), block=block, defer=defer)
        else:
            self.send_parts(encoded[0], encoded[1], block=block, defer=defer)

    def send_values(self, encoded: frames.EncodedValues, nbytes: int) -> None:
        """Queue a ``write_many``'s values (see :meth:`EndpointBase._encode_many`)
        whole, under one lock, and send them with one flush.  Thread-safe."""
        if not encoded:
            return
        fan = self._fan
        if fan is not None and fan.items:
            self._endpoint._fan_flush()
        engine = self.engine
        if engine.state is not _OPEN:
            for value in encoded:  # held for a resume one by one, or the right error
                self.send_value(value)
                self.messages_out += 1
            return
        with self._lock:
            if engine.state is not _OPEN:
                self._check_writable()
            queue = self._queue
            if not queue.fits(nbytes):
                self._wait_room(nbytes)
            queue.push_values(encoded, nbytes)
            self.messages_out += len(encoded)
            if not self._want_write and not self._flush_scheduled:
                if self._tls:
                    self._flush_scheduled = True
                    self._loop.call_soon(self._scheduled_flush)
                else:
                    self._flush_locked()
            queue.wrote(_monotonic())

    def write_image(
        self,
        img: Any,
        channel: str = "image",
        codec: Optional[str] = None,
        quality: Optional[int] = None,
        conflate: bool = True,
    ) -> None:
        """Send a numpy image on ``channel`` (default ``"image"``) to this peer only.

        ``codec`` (``"raw"``, ``"jpeg"``, ``"png"``) and ``quality`` default to the
        endpoint's ``image_codec`` / ``image_quality``.  If an earlier image on
        ``channel`` is still waiting unsent, this one replaces it (latest frame wins;
        counted in :attr:`images_dropped`).

        ``conflate=False`` makes the channel lossless: every frame is queued like a
        plain value, in order, and a slow receiver slows the writer (backpressure,
        bounded by ``max_buffer``) instead of getting only the newest frame.
        """
        parts, nbytes = self._endpoint._image_frame(img, channel, codec, quality, conflate)
        self.send_parts(parts, nbytes, image=channel if conflate else None)
        self.messages_out += 1

    def request(self, channel: str, data: Any, timeout: Optional[float] = 5.0) -> Any:
        """Send ``data`` as a request on ``channel`` and return the peer's reply.

        The reply is the return value of the peer's ``on(channel)`` callback.  Raises
        :class:`RemoteError` if that callback raised (or there is none),
        ``TimeoutError`` after ``timeout`` seconds (``None``: no limit), and
        :class:`ConnectionClosed` if the connection is lost first.  Thread-safe.
        """
        reply = _Reply()
        requests = self.engine.requests
        rid = requests.open(reply)
        try:
            parts = frames.encode_value_frame(frames.REQUEST, channel, data, fid=rid)
            self.send_parts(parts)
            self.messages_out += 1
            if not self.read_until(reply.event, timeout, spin=self.reply_spin):
                raise TimeoutError(
                    f"no reply from {self._peer()} to a request on {channel!r} within {timeout} s"
                )
        finally:
            requests.cancel(rid)
        if reply.error is not None:
            raise reply.error
        return reply.item

    def owed(self, now: float) -> bool:
        """The peer owes this side an answer (:meth:`SendQueue.owed`): a value awaited
        now is most likely it, so a thread about to wait for it spins first."""
        return self._queue.owed(now)

    def read_until(
        self,
        flag: Flag,
        timeout: Optional[float],
        wake: Optional[ReaderWake] = None,
        spin: Optional[SpinCredit] = None,
    ) -> bool:
        """Wait for ``flag`` (a reply, an ACK, a ``wait()``, a subscription's next item),
        reading this connection meanwhile.  ``wake``: another thread may set ``flag``
        (a subscription closed) and wakes this one through it.

        True once ``flag`` is set, False after ``timeout`` seconds (``None``: no limit).
        A reply read by the I/O thread reaches a waiting thread through a hand-over that
        costs more than the round trip itself on an idle machine (a sleeping thread is
        woken on another core).  So the waiting thread reads the socket itself: the
        loop stops watching it for reads, the thread polls it, and for each read takes
        the loop's role (:attr:`Loop.role`), acting as the loop, so the frames are
        handled exactly as the loop would handle them (values stored, waiters and
        callbacks served, inline handlers run, RACKs queued).  Everything else -- writes
        to a full socket, heartbeats, timers, other sockets -- stays with the loop.

        Falls back to a plain wait when it cannot read here: on the loop thread, over
        TLS (the TLS layer buffers bytes ``poll`` cannot see), when another thread
        already reads this connection, while reading is paused (backpressure), or once
        the connection is not open.

        ``spin``: ``flag`` is most likely set soon -- a reply the peer sends at once (a
        request's, a SYNC's: :attr:`reply_spin`), or a value awaited right after this
        side wrote, with nothing from the peer since (:attr:`answer_spin`,
        :meth:`SendQueue.owed`) -- so poll without sleeping for up to
        :attr:`Endpoint.spin` seconds first, as that credit allows (counted per call,
        whatever path it takes).  Other waits (``None``) sleep at once: a value comes
        whenever the peer writes it.
        """
        budget = self._endpoint.spin
        # The credit this wait spins on; None: it sleeps at once.
        credit = spin if spin is not None and budget > 0.0 and spin.take() else None
        if flag.is_set():
            if credit is not None:
                credit.result(True)  # in before the wait: a spin would have paid
            return True
        loop = self._loop
        if not (self._endpoint._self_read and _HAS_POLL) or self._tls or loop.in_thread():
            return flag.wait(timeout)
        deadline = None if timeout is None else _monotonic() + timeout
        me = threading.current_thread()
        engine = self.engine
        with loop.role:
            here = not (
                self._self_reader
                or self._pauses
                or engine.state is not _OPEN
                or engine.peer_done
                or not loop.running
            )
            if here:
                # The loop stops watching this socket for reads, or it would wake (and
                # take the role) for the very bytes this thread is about to read.
                self._self_reader = self._read_dropped = True
                loop.acting = me
                try:
                    self._update_interest()
                finally:
                    loop.acting = None
        if not here:
            return flag.wait(timeout)
        ctrl_c = _HeldInterrupt()
        installed = False
        wake_fd: Optional[int] = None
        try:
            installed = ctrl_c.install()
            poller = select.poll()
            try:
                poller.register(self.socket, _POLL_IN)
                polling = True
            except (ValueError, OSError):  # closed meanwhile: the plain wait below
                polling = False
            wake_fd = wake.acquire() if wake is not None and polling else None
            if wake_fd is not None:
                poller.register(wake_fd, _POLL_IN)
            # Spin first (Endpoint.spin): a reply that comes within it costs no wake-up
            # of this thread, which costs more than the spin.
            spin_end = _monotonic() + budget if credit is not None else 0.0
            spun_out = False
            while polling and not flag.is_set():
                now = _monotonic()
                left = _SELF_READ_SLICE if deadline is None else deadline - now
                if left <= 0 or engine.closed:
                    break
                if now < spin_end:
                    ready = poller.poll(0)
                    if not ready:
                        continue
                elif spin_end:
                    # The spin ran out.  A Ctrl-C during it did not interrupt a poll
                    # (none blocked), and compiled code never runs Python's signal
                    # handlers by itself: run them now, before sleeping.
                    spin_end = 0.0
                    spun_out = True
                    if installed:
                        _check_signals()
                    continue
                else:
                    # Bounded: a close that shutdown() could not wake is seen in a slice.
                    ready = poller.poll(1000.0 * min(left, _SELF_READ_SLICE) + 1)
                if wake_fd is not None and any(fd == wake_fd for fd, _ in ready):
                    _drain(wake_fd)
                    if len(ready) == 1:
                        continue  # nothing to read: see whether the flag is set
                if not ready or flag.is_set():
                    continue
                with loop.role:
                    # The loop (or a plain wait) takes over once it may not read here.
                    stop = engine.closed or self._pauses > 0 or engine.peer_done
                    if not stop:
                        loop.acting = me
                        ctrl_c.handling = True
                        try:
                            self._on_readable()
                        except Exception:  # as in the loop: a handler never kills a reader
                            logger.exception("%s: error reading %s", self._endpoint, self._peer())
                            stop = True
                        finally:
                            ctrl_c.handling = False
                            loop.acting = None
                if stop:  # not a ``break`` inside the ``with``: mypyc cannot compile that
                    break
                ctrl_c.deliver()
        finally:
            if wake is not None and wake_fd is not None:
                wake.release()
            with loop.role:
                self._self_reader = False
                if self._read_dropped:
                    self._read_dropped = False
                    loop.acting = me
                    try:
                        self._update_interest()  # the loop reads again
                    finally:
                        loop.acting = None
            if installed:
                ctrl_c.uninstall()
                ctrl_c.deliver()  # a Ctrl-C held by a read step that ended with a break
        if credit is not None:
            credit.result(not spun_out and flag.is_set())
        if flag.is_set():
            return True
        rest = None if deadline is None else max(0.0, deadline - _monotonic())
        return flag.wait(rest)

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
            self.engine.received(_monotonic())  # silence while paused was ours, not theirs
        self._update_interest()

    @property
    def reading_paused(self) -> bool:
        """True while backpressure stops this connection from being read."""
        return self._pauses > 0

    def heartbeat(self, now: float) -> None:
        """The endpoint's periodic tick (loop thread)."""
        self._act(self.engine.tick(now, self._pauses > 0), now)

    def _act(self, verdict: Tick, now: float) -> None:
        if verdict is Tick.NOTHING:
            return
        if verdict is Tick.PING:
            self._send_raw(self.engine.ping(now))
        elif verdict is Tick.DEAD:
            logger.warning("%s: %s", self._endpoint, self.engine.error)
            self._finish()
        elif verdict is Tick.HANDSHAKE_TIMEOUT:
            self._fail(self.engine.error or HandshakeError("handshake timeout"))
        else:  # LINGER_OVER
            self._finish()

    def _on_deadline(self) -> None:
        """The engine's next deadline passed (loop thread)."""
        self._timer = None
        now = _monotonic()
        self._act(self.engine.tick(now, self._pauses > 0), now)
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        """Schedule a check at the engine's next deadline (handshake, linger)."""
        if self.engine.closed:
            return
        deadline = self.engine.next_deadline()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self._loop.call_later(
                max(0.0, deadline - _monotonic()), self._on_deadline
            )

    def close(self, timeout: Optional[float] = None) -> None:
        """Close this connection gracefully: flush, say BYE, wait up to ``timeout`` s."""
        linger = self._endpoint.timeout if timeout is None else timeout
        self._loop.call_soon(self.begin_close, linger)
        if not self._loop.in_thread():
            self.closed.wait(linger + 1.0)

    def __repr__(self) -> str:
        name = f" name={self.name!r}" if self.name else ""
        return f"<Connection {self.address[0]}:{self.address[1]}{name} {self.engine.state.value}>"

    # -- sending (any thread) -----------------------------------------------------------

    def send_item(self, item: bytes, block: bool = True, defer: bool = False) -> None:
        """:meth:`send_parts` for a BATCH item (a small value, the most frequent write):
        the same rules, fewer steps.  Thread-safe.

        In a burst (a flush already due on the loop thread, or the socket full: its
        writability triggers one) the item is staged without the lock
        (:attr:`SendQueue.staged`, within ``stage_below``): the flush takes it in
        order.  Appended first, checked after: if the flush began meanwhile or the link
        closed, :meth:`_settle_staged` decides under the lock."""
        fan = self._fan
        if fan is not None and fan.items:
            self._endpoint._fan_flush()
        engine = self.engine
        queue = self._queue
        if queue.queued > PACE_ABOVE and block and not defer:
            self._pace()  # only on an open link
        if (self._flush_scheduled or self._want_write) and engine.state is _OPEN:
            staged = queue.staged
            if len(staged) < STAGE_MAX and queue.queued <= queue.stage_below:
                staged.append(item)
                if (self._flush_scheduled or self._want_write) and engine.state is _OPEN:
                    return  # the due flush has not begun (both flags are cleared
                    # before a flush takes the staged items): it takes this one
                if self._settle_staged(item):
                    return
        if engine.state is not _OPEN and self._held(item, len(item), None):
            return
        lock = self._lock
        lock.acquire()  # not ``with``: its __exit__ call costs as much as the lock
        try:
            if engine.state is not _OPEN:
                self._check_writable()
            queue = self._queue
            if not (self._want_write or defer or self._flush_scheduled or self._tls):
                now = _monotonic()
                if queue.quiet(now) and queue.push_item_direct(item):
                    # A value on a quiet link and an idle queue: sent now, as below.
                    queue.wrote(now)
                    self._flush_locked()
                    return
            if not queue.offer_item(item):
                if block:
                    self._wait_room(len(item) + ITEM_OVERHEAD)
                elif queue.slow_consumer(len(item), _monotonic(), self._endpoint.timeout):
                    self._drop_slow_consumer_locked()
                queue.push_item(item)
            if self._want_write:
                return
            if defer:  # a burst of broadcasts: one flush on the loop thread
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    self._loop.call_soon(self._scheduled_flush)
                return
            if self._flush_scheduled:  # a burst: the flush stamps last_write
                return
            idle = queue.opens_burst(_monotonic())
            if idle and not self._tls:
                self._flush_locked()
            else:
                self._flush_scheduled = True
                self._loop.call_soon(self._scheduled_flush)
        finally:
            lock.release()

    def _send_run(self, items: List[bytes], nbytes: int) -> None:
        """A host's run of broadcast values (:class:`FanOut`, ``nbytes`` as it counts
        them), queued at once, in order, and sent by the loop thread; like
        :meth:`send_item` with ``block=False`` for each.  Called with the host's
        ``_held_lock`` held.

        A connection that is no longer open gets them only if its session survives
        it: into the queue that a resume continues (while the link is being closed),
        or the held session (once it is).  Raises :class:`WriteTimeout` when it drops
        this peer as a slow consumer (nothing of the run is queued then)."""
        engine = self.engine
        if engine.closed:
            for item in items:
                if not self._held(item, len(item), None):
                    return  # no session kept for it
            return
        with self._lock:
            queue = self._queue
            if engine.state is not _OPEN:
                # Lost just now (the loop has not closed it yet): the session keeps the
                # queue for a resume, up to max_buffer.  Closing with a BYE: not sent.
                if engine.resumable and queue.offer_items(items, nbytes):
                    self.messages_out += len(items)
                return
            if not queue.offer_items(items, nbytes):
                if queue.slow_consumer(nbytes, _monotonic(), self._endpoint.timeout):
                    self._drop_slow_consumer_locked()
                queue.push_items(items, nbytes)
            self.messages_out += len(items)
            if self._want_write or self._flush_scheduled:
                return
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _settle_staged(self, item: bytes) -> bool:
        """A staged ``item`` raced with the flush or a close: True if it is accepted
        (queued, taken or carried to the next link), False if it was taken back for
        the ordinary path (its link closed before any flush or hand-over took it)."""
        with self._lock:
            queue = self._queue
            if self.engine.state is _OPEN:
                queue.unstage()  # no flush may be due any more: make sure of one
                if not self._want_write and not self._flush_scheduled:
                    self._flush_scheduled = True
                    self._loop.call_soon(self._scheduled_flush)
                return True
            return not queue.unstage_own(item)

    def send_parts(
        self,
        parts: Any,
        nbytes: Optional[int] = None,
        *,
        image: Optional[str] = None,
        block: bool = True,
        defer: bool = False,
        bounded: bool = True,
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
        :param bounded: ``False`` queues a small protocol frame (SYNC) without waiting
            for room: its caller bounds the wait for the answer itself.

        An image frame (``image``) never waits for room either: it takes its channel's
        slot beyond ``max_buffer``, and a newer image replaces it while it is unsent.

        ``parts`` may also be a BATCH item (``bytes``, see :func:`frames.value_item`).
        """
        if nbytes is None:
            nbytes = frames.frame_size(parts)
        fan = self._fan
        if fan is not None and fan.items:
            self._endpoint._fan_flush()
        engine = self.engine
        queue = self._queue
        if queue.queued > PACE_ABOVE and block and bounded and not defer and image is None:
            self._pace()  # only on an open link
        if (
            engine.state is not _OPEN
            and (type(parts) is bytes or parts[0][0] in _HOLDABLE)
            and self._held(parts, nbytes, image)
        ):
            return
        with self._lock:
            if engine.state is not ConnState.OPEN:
                self._check_writable()
            if not queue.fits(nbytes) and not (image is not None and queue.waiting_image(image)):
                if not block:
                    if queue.slow_consumer(nbytes, _monotonic(), self._endpoint.timeout):
                        self._drop_slow_consumer_locked()
                elif image is None and bounded:
                    self._wait_room(nbytes)
                # else: an image takes its channel's slot and never waits (the next
                # one replaces it while it is unsent), nor does a protocol frame
            if type(parts) is bytes:
                queue.push_item(parts)
            elif image is None and queue.push_direct(parts, nbytes):
                pass  # a lone frame on an idle queue: straight to the wire
            elif not queue.push(parts, nbytes, image):
                return  # replaced a waiting image frame: it keeps that frame's turn
            if self._want_write:
                return  # the loop thread sends it when the socket drains
            # Coalescing: a write on an idle link goes out at once from this thread (no
            # thread hop, lowest latency); writes that follow it closely are left for one
            # flush on the loop thread, which sends the whole burst in a few syscalls.
            if self._flush_scheduled:  # a burst: the flush stamps last_write
                return
            idle = queue.opens_burst(_monotonic())
            if idle and not defer and not self._tls:  # SSL: never read and write at once
                self._flush_locked()
            else:
                self._flush_scheduled = True
                self._loop.call_soon(self._scheduled_flush)

    def _check_writable(self) -> None:
        """Raise why nothing can be queued: :class:`EndpointClosed` after the
        endpoint's ``close()``, else the engine's :class:`ConnectionClosed`."""
        if self._endpoint.stopped:
            raise EndpointClosed(f"cannot write: {self._endpoint!r} is closed")
        self.engine.check_writable()

    def _held(self, parts: Any, nbytes: int, image: Optional[str]) -> bool:
        """The link is down: queue the write into the held session if there is one
        (:meth:`EndpointBase._hold`)."""
        return bool(self._endpoint._hold(self, parts, nbytes, image))

    def _scheduled_flush(self) -> None:
        """Send a burst of queued writes (loop thread)."""
        with self._lock:
            self._flush_scheduled = False
            # The burst's writes did not stamp themselves (one clock read less each): a
            # write right after this flush still belongs to it.
            self._queue.last_write = _monotonic()
            if not self._want_write and not self.engine.closed:
                self._flush_locked()

    def _drop_slow_consumer_locked(self) -> None:
        """A broadcast found this peer too far behind (lock held): drop it."""
        queued = self._queue.queued
        since = _monotonic() - self._queue.full_for
        error = WriteTimeout(
            f"{self._peer()} is a slow consumer: {queued} bytes unsent for {since:.1f} s "
            f"(max_buffer={self._queue.max_buffer}); disconnecting it"
        )
        self.engine.fail(WriteTimeout(f"{self._peer()} was disconnected as a slow consumer"))
        self._loop.call_soon(self._drop_slow_consumer, queued)
        raise error

    def _drop_slow_consumer(self, queued: int) -> None:
        logger.warning(
            "%s: disconnecting slow consumer %s (%d bytes unsent)",
            self._endpoint,
            self._peer(),
            queued,
        )
        self._finish()

    def flush(self, timeout: Optional[float] = None, acked: bool = False) -> None:
        """Block until everything written so far is handed to the operating system
        (``acked=True``: until the peer confirms it has stored all of it).

        Raises :class:`WriteTimeout` after ``timeout`` seconds (default: the endpoint's
        ``timeout``) and :class:`ConnectionClosed` if the connection closes first.
        """
        limit = self._endpoint.timeout if timeout is None else timeout
        deadline = _monotonic() + limit
        if acked:
            self.sync(limit)
            return
        fan = self._fan
        if fan is not None and fan.items:
            self._endpoint._fan_flush()
        with self._lock:
            if self._queue and not self._want_write and not self._flushing:
                if not self._flush_scheduled and not self._tls and self.ready.is_set():
                    self._flush_locked()
            while self._queue:
                if self.engine.closed:
                    raise ConnectionClosed(f"connection to {self._peer()} closed before flushing")
                left = deadline - _monotonic()
                if left <= 0:
                    raise WriteTimeout(
                        f"{self._peer()} did not take {self._queue.queued} queued bytes "
                        f"within {limit} s"
                    )
                self._wait_drained(min(left, 0.05))

    def _wait_drained(self, timeout: float) -> None:
        """Wait (lock held) until the flusher reports progress, at most ``timeout`` s;
        counted in ``_room_waiters`` so that the flusher knows to notify."""
        self._room_waiters += 1
        try:
            self._drained.wait(timeout)
        finally:
            self._room_waiters -= 1

    def _pace(self) -> None:
        """A writer finds more than PACE_ABOVE bytes queued: wait up to PACE_WAIT for the
        flush to take the queue down to PACE_BELOW (sendqueue.PACE_ABOVE).  Never on
        the I/O thread (it is the flusher), nor for a peer marked stalled: a wait in
        which no byte left marks it, until bytes leave again."""
        if (
            self.engine.state is not _OPEN
            or self.bytes_out == self._pace_stalled
            or self._loop.in_thread()
        ):
            return
        queue = self._queue
        start = self.bytes_out
        deadline = _monotonic() + PACE_WAIT
        with self._lock:
            if queue.queued > PACE_BELOW and self.engine.state is _OPEN:
                self.writes_paced += 1
            while queue.queued > PACE_BELOW and self.engine.state is _OPEN:
                left = deadline - _monotonic()
                if left <= 0:
                    if self.bytes_out == start:
                        self._pace_stalled = start
                    return
                self._wait_drained(left)

    def _wait_room(self, nbytes: int) -> None:
        deadline = _monotonic() + self._endpoint.timeout
        queue = self._queue
        while not queue.fits(nbytes):
            if self.engine.state is not ConnState.OPEN:
                raise ConnectionClosed(f"connection to {self._peer()} closed while writing")
            left = deadline - _monotonic()
            if left <= 0 or self._loop.in_thread():
                raise WriteTimeout(
                    f"{self._peer()} is not reading: {queue.queued} bytes are already queued "
                    f"(max_buffer={queue.max_buffer}); the write was not sent"
                )
            self._wait_drained(left)

    def _adopt(self, old: Optional[SendQueue]) -> None:
        """Continue the previous link's queue on this one (loop thread, before
        ``ready``): the engine replays what the peer lacks (resume)."""
        if old is not None and old.framing:
            # The previous link's last flusher is still framing what it took from the
            # queue (without its lock): let it place it, or those frames would be lost.
            deadline = _monotonic() + 1.0
            while old.framing and _monotonic() < deadline:
                time.sleep(0.0005)
        with self._lock:
            self.engine.adopt(old)

    def _absorb(self, outbox: SendQueue) -> None:
        """Queue a reconnecting client's outbox first (loop thread, before ``ready``)."""
        with self._lock:
            self._queue.absorb(outbox)

    def _queue_parts(self, parts: List[Buffer]) -> None:
        """Queue a frame without sending it yet (loop thread, before ``ready``)."""
        with self._lock:
            self._queue.push(parts, frames.frame_size(parts))

    def _send_raw(self, data: bytes) -> None:
        """Queue protocol bytes (handshake, ping, pong, bye) from the loop thread."""
        if not data or self.engine.closed:
            return
        with self._lock:
            self._queue.push([data], len(data))
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
        if not self._queue:
            if self._room_waiters:
                self._drained.notify_all()
            engine = self.engine
            if engine.peer_done:
                self._loop.call_soon(self._finish)  # the peer is done, and so are we
            elif engine.bye_sent and not self._shut_wr:
                self._loop.call_soon(self._shutdown_write)
        elif self._room_waiters:
            self._drained.notify_all()

    def _flush_batches(self) -> None:
        queue = self._queue
        engine = self.engine
        sock = self.socket
        lock = self._lock
        while not engine.closed:
            if not queue.wire_pending:
                if queue.unframed:
                    entries = []  # frame the next of those already taken
                else:
                    entries = queue.take_inbox()
                    if not entries:
                        return
                # Framing (BATCH building) happens outside the lock: writers go on.
                lock.release()
                try:
                    queue.to_wire(entries)
                finally:
                    lock.acquire()
                continue
            batch = queue.wire_batch(_IOV)
            error: Optional[OSError] = None
            lock.release()
            try:
                if self._tls:
                    payload = _tls_payload(batch)  # SSLSocket has no sendmsg
                    offered = len(payload)
                    sent = sock.send(payload)
                else:
                    # Every wire buffer is bytes or a byte-format memoryview: len() == size.
                    offered = sum(map(len, batch))
                    sent = sock.sendmsg(batch) if len(batch) > 1 else sock.send(batch[0])
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                sent = 0
            except OSError as exc:
                error = exc
            finally:
                lock.acquire()
            if engine.closed:
                return
            if error is not None:
                # The reader side will see the failure too; close from the loop thread.
                engine.lost(error)
                queue.detach()  # the engine keeps the rest for a resume, or drops it
                self._drained.notify_all()
                self._loop.call_soon(self._lost, error)
                return
            if sent:
                self.bytes_out += sent
                queue.consumed(sent)
                engine.sent(_monotonic())
                if self._room_waiters and queue.queued <= PACE_BELOW:
                    self._drained.notify_all()  # a paced writer goes on
            if sent < offered:
                # The socket is full: let the loop thread finish when it drains.
                if not self._want_write:
                    self._want_write = True
                    if self._loop.in_thread():
                        self._update_interest()
                    else:
                        self._loop.call_soon(self._update_interest)
                return

    # -- loop thread ------------------------------------------------------------------

    def _update_interest(self) -> None:
        """Tell the selector what to wait for (loop thread)."""
        if self.engine.closed:
            return
        if self._tls_pending:
            events = self._tls_want
        else:
            reads = not (self._pauses or self.engine.peer_done or self._read_dropped)
            events = (_READ if reads else 0) | (_WRITE if self._want_write else 0)
        try:
            if self._registered:  # 0 events: still registered, watched for nothing
                self._loop.modify(self.socket, events, self.on_event)
            elif events:
                self._loop.register(self.socket, events, self.on_event)
                self._registered = True
        except (KeyError, ValueError, OSError):
            pass

    def attach(self) -> None:
        """Register with the loop and send the protocol's opening bytes (loop thread)."""
        self._loop.register(self.socket, _READ, self.on_event)
        self._registered = True
        self._send_raw(self.engine.control_bytes())  # held back until TLS is up
        self._arm_deadline()
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
            if not self.engine.closed:
                self._tls_step()
            return
        if mask & _WRITE and not self.engine.closed:
            with self._lock:
                self._want_write = False
                self._flush_locked()
                if not self._want_write:
                    self._update_interest()
        if mask & _READ and not self.engine.closed and not self._pauses:
            if self._self_reader:
                # A waiting thread reads this socket (read_until): stop watching it
                # until that thread is done, rather than wake for every byte it reads.
                self._read_dropped = True
                self._update_interest()
            elif not self.engine.peer_done:
                self._on_readable()

    def _on_readable(self) -> None:
        decoder = self.engine.protocol.decoder
        engine = self.engine
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
            engine.received(_monotonic())
            try:
                decoder.buffer_updated(n)
                # More than once when shared-memory frames were handed over one at a
                # time (Protocol.events); nothing after the peer's BYE is handled.
                while decoder.frames and not engine.closed and not engine.bye_received:
                    self._process()
                if engine.take_racked():
                    self._window_moved()
            except (ProtocolError, HandshakeError) as exc:
                self._fail(exc)
                return
            except Exception as exc:  # a malformed frame a decoder let through
                self._fail(malformed(exc))
                return
            if engine.closed or self._pauses or engine.peer_done:
                return
            if n < size and not (self._tls and sock.pending()):  # type: ignore[attr-defined]
                return

    def _process(self) -> None:
        engine = self.engine
        was_open = engine.opened or engine.state is not ConnState.HANDSHAKE
        try:
            events = engine.events()
        except BaseException:
            self._send_raw(engine.control_bytes())
            raise
        if not was_open and engine.opened:
            self.engine.peer = self._peer()
            writer = engine.protocol.shm_writer
            if writer is not None:
                writer.slot_wait = shm.SLOT_WAIT  # a thread may wait; an event loop never

            # The WELCOME goes first on the wire but leaves only after the connection is
            # ready (listed by clients(), reached by write_all): once a client's open()
            # returns, the host's next write_all reaches it.
            welcome = engine.control_bytes()
            if welcome:
                with self._lock:
                    self._queue.push_wire(welcome)
            try:
                self._endpoint._on_ready(self)  # sets self.ready (host: after retained values)
            finally:
                self._send_raw(engine.control_bytes())
            self._arm_deadline()  # the handshake deadline no longer applies
            self.settled.set()
            with self._lock:
                if self._queue and not self._want_write:
                    self._flush_locked()
            if events:
                self._endpoint._dispatch(self, events)
            return
        control = engine.control_bytes()
        urgent = engine.take_rack_urgent()
        if not events or not control or engine.closed or urgent:
            self._send_raw(control)
            if events:
                self._endpoint._dispatch(self, events)
            return
        # What the protocol owes the peer now (a RACK every 32 sequenced frames, a PONG)
        # leaves with the next write (a reply to these frames, the next request), in one
        # send, or after CONTROL_DELAY at the latest (a request's p99 rose from 162 to
        # 250 us once requests were sequenced and their RACKs went out on their own).
        with self._lock:
            self._queue.push([control], len(control))
        try:
            self._endpoint._dispatch(self, events)
        finally:
            if self._control_timer is None:
                self._control_timer = self._loop.call_later(CONTROL_DELAY, self._flush_control)

    def _window_moved(self) -> None:
        """A RACK arrived (loop thread): if the send queue held values back for want
        of room in the replay window, send them now.  Checked under the lock, where the
        flusher decides to hold back, so a RACK cannot slip between the two."""
        with self._lock:
            if self._queue.held_back and not self._want_write and not self.engine.closed:
                self._flush_locked()

    def _flush_control(self) -> None:
        """Send protocol bytes no write took along (loop thread, see :meth:`_process`)."""
        self._control_timer = None
        with self._lock:
            if self._queue and not self._want_write and not self.engine.closed:
                self._flush_locked()

    def mark_ready(self) -> None:
        """The handshake is complete: writes may flow (loop thread)."""
        if self.engine.opening:  # nobody continued a session here: start afresh
            self._adopt(None)
        self.ready.set()

    def _on_control(self, frame: frames.Frame) -> bool:
        """A frame that is not DATA/REQUEST (loop thread); True: stop handling (BYE)."""
        if not self.engine.control(frame):
            if frame.type == frames.SYNC:
                self._send_raw(self.engine.control_bytes())  # the ACK, in order
                for ack in self.engine.take_acks():  # a sequenced ACK: numbered
                    with self._lock:
                        self._queue.push([ack], len(ack))
                        if not self._want_write and not self.engine.closed:
                            self._flush_locked()
            return False
        self._on_bye()
        return True

    def _fail(self, exc: BaseException) -> None:
        """The peer broke the protocol: log, close (a REFUSE is already queued, if any)."""
        logger.warning("%s: closing connection to %s: %s", self._endpoint, self._peer(), exc)
        last = self.engine.fail(exc)
        if last:
            with self._lock:
                self._queue.push([last], len(last))
                if not self._want_write:
                    self._flush_locked()  # best effort: tell the peer why
        self._finish()

    def _on_eof(self) -> None:
        """The peer closed its sending side (loop thread)."""
        if not self.engine.receive_eof():
            self._lost(None)  # no BYE either way: the peer went away
            return
        # A graceful close: flush what is still owed to the peer, then close.
        with self._lock:
            done = not self._queue
        if done:
            self._finish()
        else:
            self._update_interest()  # stop reading; the last flush finishes

    def _lost(self, exc: Optional[BaseException]) -> None:
        """The peer went away (EOF, reset)."""
        engine = self.engine
        if engine.closed:
            return
        was_open = engine.state is not ConnState.HANDSHAKE
        engine.lost(exc)
        if exc is not None and was_open:
            logger.info("%s: connection to %s lost: %s", self._endpoint, self._peer(), exc)
        self._finish()

    def refuse(self, reason: str, code: str, linger: float) -> None:
        """Refuse this connection in its handshake (host, loop thread): say why,
        half-close, and read until the client hangs up (at most ``linger`` s)."""
        logger.warning("%s: refused %s: %s", self._endpoint, self._peer(), reason)
        out = self.engine.refuse(reason, code, _monotonic(), linger)
        self._loop.register(self.socket, _READ, self.on_event)
        self._registered = True
        with self._lock:
            self._queue.push([out], len(out))
            self._flush_locked()
        self._arm_deadline()

    def begin_close(self, linger: float) -> None:
        """Start a graceful close (loop thread): flush, BYE, half-close, await EOF.

        After ``linger`` seconds the socket is closed whatever is left unsent.
        """
        engine = self.engine
        if engine.closed or engine.bye_sent:
            return
        opened = engine.state is ConnState.OPEN or engine.bye_received
        bye = engine.send_bye(_monotonic(), linger)
        with self._lock:
            if opened and bye:
                self._queue.push([bye], len(bye))
                if not self._want_write:
                    self._flush_locked()
            else:
                self._queue.clear()
                self._loop.call_soon(self._shutdown_write)
        self._arm_deadline()

    def _shutdown_write(self) -> None:
        if self.engine.closed or self._shut_wr:
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
        with self._lock:
            done = not self._queue
        if done:
            self._loop.call_soon(self._finish)
            return
        self._update_interest()
        if self._timer is None:
            self._timer = self._loop.call_later(self._endpoint.timeout, self._finish)

    def _finish(self) -> None:
        """Close the socket and tell the endpoint (loop thread, idempotent)."""
        engine = self.engine
        if engine.closed:
            return
        # The link's death and its session's suspension (_on_closed) are one step for
        # a broadcast: it finds the client either live or held, never neither.
        with self._endpoint._held_lock:
            fan = self._fan
            if fan is not None and fan.items:
                self._endpoint._fan_flush()  # into the queue its session may keep
            with self._lock:
                engine.finish()
                self._drained.notify_all()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._registered:
                self._loop.unregister(self.socket)
                self._registered = False
            if self._self_reader:
                try:  # wake the thread polling this socket in read_until: close() won't
                    self.socket.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            try:
                self.socket.close()
            except OSError:  # pragma: no cover
                pass
            self.closed_at = time.time()
            self.closed.set()
            self.settled.set()
            try:
                self._endpoint._on_closed(self)
            except SocketEngineError:  # pragma: no cover
                pass
